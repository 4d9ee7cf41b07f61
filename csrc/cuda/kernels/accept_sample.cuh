// Lossless tree sampling (point-mass multi-round rejection), see reference.accept_sample. One CTA per sequence
// walks the tree from the root (the batch's one tree, links [N], or the sequence's own, links [B, N]):
//   1. the block sums the expanded node's probability row (double);
//   2. thread 0 tries the node's children in first-child / next-sibling order: child c is accepted when
//      u[c] * (total - rejected mass) < residual(token of c), a rejected token's residual entry becomes 0 (its
//      token joins a shared-memory list); an accepted child becomes the expanded node (back to 1);
//   3. when no child is accepted, the bonus token is the inverse-CDF draw of the residual: each thread sums a
//      contiguous segment of the row (rejected tokens zeroed), a block scan of the segment sums locates the
//      segment where the running sum first exceeds u[0] * total, and that segment's thread scans it in order.
// The rows of the accepted path are read (a few x V floats per sequence); nothing else is. Torch-free.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace hydra_fast::kernels {

constexpr int kSampleThreads = 256;

struct AcceptSampleParams {
  const float* probs;  // [B, N, V], last dim contiguous
  int64_t ps0, ps1;
  const int64_t* cand;  // [B, N]
  int64_t cs0, cs1;
  const int64_t* first_child;  // [N], sequence b's at first_child + b * fsb
  int64_t fsb, fs;             // fsb: 0 for one tree shared by the batch
  const int64_t* next_sibling;  // [N], sequence b's at next_sibling + b * nsb
  int64_t nsb, ns;
  const float* uniform;  // [B, N]
  int64_t us0, us1;
  int64_t* accept_len;      // [B]
  int64_t* out_tokens;      // [B, L]
  int64_t* accepted_nodes;  // [B, L]
  int B, N, L;
  int64_t V;
};

// Dynamic shared memory: the rejected tokens (at most N - 1) and the accepted nodes [L].
inline size_t accept_sample_smem_bytes(int N, int L) {
  return sizeof(int64_t) * (static_cast<size_t>(N) + static_cast<size_t>(L));
}

// Block-wide sum of one double per thread; every thread gets the result. `scratch` holds kSampleThreads / 32.
__device__ __forceinline__ double block_sum(double x, double* scratch) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  x = warp_sum(x);
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  double total = 0.0;
#pragma unroll
  for (int w = 0; w < kSampleThreads / 32; ++w) total += scratch[w];
  return total;
}

__device__ __forceinline__ bool is_rejected(const int64_t* rej, int nrej, int64_t token) {
  for (int i = 0; i < nrej; ++i) {
    if (rej[i] == token) return true;
  }
  return false;
}

__global__ void __launch_bounds__(kSampleThreads) accept_sample_kernel(const AcceptSampleParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int64_t* rej = reinterpret_cast<int64_t*>(smem_raw);  // [N] rejected tokens of the expanded node
  int64_t* nodes = rej + p.N;                            // [L] accepted nodes, root first, -1 padded
  __shared__ double s_scratch[kSampleThreads / 32];
  __shared__ int s_next, s_nrej, s_first;

  const int b = blockIdx.x, tid = threadIdx.x;
  const int N = p.N, L = p.L;
  const int64_t V = p.V;
  const float* rows = p.probs + b * p.ps0;
  const int64_t* first_child = p.first_child + b * p.fsb;  // this sequence's tree
  const int64_t* next_sibling = p.next_sibling + b * p.nsb;
  auto clamp_node = [&](int64_t n) { return static_cast<int>(min(max(n, int64_t(0)), int64_t(N - 1))); };
  auto token_of = [&](int n) { return min(max(p.cand[b * p.cs0 + n * p.cs1], int64_t(0)), V - 1); };
  for (int j = tid; j < L; j += kSampleThreads) nodes[j] = j == 0 ? 0 : -1;

  // Thread 0's walk state (only thread 0 reads it).
  int node = 0, a = 0, tests = 0;
  int64_t child = first_child[0];
  while (true) {
    const float* row = rows + node * p.ps1;
    double part = 0.0;
    for (int64_t v = tid; v < V; v += kSampleThreads) part += static_cast<double>(row[v]);
    const double total = block_sum(part, s_scratch);
    if (tid == 0) {
      double removed = 0.0;
      int nrej = 0, next = -1;
      for (; tests < N - 1 && child >= 0; ++tests) {  // each non-root node once at most
        const int c = clamp_node(child);
        const int64_t tok = token_of(c);
        const double p_tok = is_rejected(rej, nrej, tok) ? 0.0 : static_cast<double>(row[tok]);
        if (static_cast<double>(p.uniform[b * p.us0 + c * p.us1]) * (total - removed) < p_tok) {
          next = c;
          ++tests;
          break;
        }
        if (p_tok != 0.0) rej[nrej++] = tok, removed += p_tok;
        child = next_sibling[c * p.ns];
      }
      if (next >= 0) {
        ++a;
        nodes[min(a, L - 1)] = next;
        node = next;
        child = first_child[next * p.fs];
      }
      s_next = next;
      s_nrej = nrej;
      s_first = 0x7fffffff;
    }
    __syncthreads();
    if (s_next < 0) break;
    if (tid != 0) node = s_next;
  }

  // The bonus token from the residual of the last accepted node (every thread followed the same nodes).
  const float* row = rows + node * p.ps1;
  const int nrej = s_nrej;
  const int64_t seg = (V + kSampleThreads - 1) / kSampleThreads;
  const int64_t v0 = min(static_cast<int64_t>(tid) * seg, V), v1 = min(v0 + seg, V);
  double local = 0.0;
  for (int64_t v = v0; v < v1; ++v) local += is_rejected(rej, nrej, v) ? 0.0 : static_cast<double>(row[v]);
  // Inclusive block scan of the segment sums (in thread order).
  const int warp = tid >> 5, lane = tid & 31;
  double incl = local;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  __syncthreads();
  if (lane == 31) s_scratch[warp] = incl;
  __syncthreads();
  double before = 0.0, total = 0.0;
#pragma unroll
  for (int w = 0; w < kSampleThreads / 32; ++w) {
    before += w < warp ? s_scratch[w] : 0.0;
    total += s_scratch[w];
  }
  incl += before;
  const double target = static_cast<double>(p.uniform[b * p.us0]) * total;
  if (incl > target) atomicMin(&s_first, tid);
  __syncthreads();
  if (tid == s_first) {
    // The first index of this segment where the running sum exceeds the target; rounding that leaves it short
    // takes the segment's last positive entry.
    double run = incl - local;
    int64_t found = -1, last_pos = -1;
    for (int64_t v = v0; v < v1 && found < 0; ++v) {
      const double r = is_rejected(rej, nrej, v) ? 0.0 : static_cast<double>(row[v]);
      run += r;
      if (r > 0.0) last_pos = v;
      if (r > 0.0 && run > target) found = v;
    }
    s_scratch[0] = static_cast<double>(found >= 0 ? found : (last_pos >= 0 ? last_pos : V - 1));
  }
  __syncthreads();
  // u * total >= total only when total is 0 (u < 1): then no thread crossed and the reference clamps to V - 1.
  const int64_t extra = s_first != 0x7fffffff ? static_cast<int64_t>(s_scratch[0]) : V - 1;

  if (tid == 0) a = min(a, L - 1), s_next = a;
  __syncthreads();
  const int acc = s_next;
  if (tid == 0) p.accept_len[b] = acc;
  for (int j = tid; j < L; j += kSampleThreads) {
    p.accepted_nodes[static_cast<int64_t>(b) * L + j] = nodes[j];
    p.out_tokens[static_cast<int64_t>(b) * L + j] =
        j < acc ? token_of(clamp_node(nodes[j + 1])) : (j == acc ? extra : int64_t(-1));
  }
}

inline cudaError_t launch_accept_sample(const AcceptSampleParams& p, cudaStream_t stream) {
  const size_t smem = accept_sample_smem_bytes(p.N, p.L);
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(accept_sample_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  accept_sample_kernel<<<p.B, kSampleThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace hydra_fast::kernels
