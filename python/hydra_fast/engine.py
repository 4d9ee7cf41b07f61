"""The speculative step on a stock HF model: draft -> verify -> accept -> compact, with static buffers.

Everything the step touches is allocated once (``SpeculativeEngine.__init__``); the step itself reads no
value back to the host, so on CUDA it is captured once and replayed as one CUDA graph. ``prefill`` runs
the prompt and leaves the state (cache lengths, the next root token, the heads' input hidden state) in
those buffers; each ``step`` advances it and writes the step's result into ``self.result``:
``[B, 1 + L]`` = accepted draft count a, then the a + 1 emitted tokens (-1 padded).
A plain-decoding engine (no heads, a root-only tree) runs the same code: the baseline and the fallback.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hydra_fast import context, dynamic_tree, ops
from hydra_fast.attention import TreeAttention, register, use_tree_attention
from hydra_fast.cache import TreeKVCache
from hydra_fast.compat import cache_kwarg
from hydra_fast.dynamic_tree import DynamicTree, StepTree
from hydra_fast.fastpath import FusedDecoder, FusedLayer, NotFusable
from hydra_fast.matmul import lm_head_logits
from hydra_fast.rope_table import rotary_positions
from hydra_fast.sampling import filter_logits, inverse_cdf, target_probs, top_p_filter  # noqa: F401
from hydra_fast.tree import Tree


@dataclass(frozen=True)
class SamplingConfig:
    """Greedy when ``do_sample`` is False. Else the target is softmax(logits / ``temperature``) restricted to its
    ``top_k`` tokens (0: all) and then its ``top_p`` nucleus, renormalised, and drafts are accepted by
    ``acceptance``: "exact" (default; lossless multi-round rejection, ``accept_sample``: the output follows the
    target's distribution exactly) or "typical" (lossy typical acceptance, ``posterior_threshold`` eps and
    ``posterior_alpha`` delta: faster, but the output distribution differs from the base's)."""

    do_sample: bool = False
    temperature: float = 1.0
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3
    top_p: float = 1.0
    top_k: int = 0
    acceptance: str = "exact"

    def __post_init__(self):
        if self.acceptance not in ACCEPTANCE:
            raise ValueError(f"acceptance must be one of {', '.join(ACCEPTANCE)}, got {self.acceptance!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 keeps every token), got {self.top_k!r}")


ACCEPTANCE = ("exact", "typical")


def rows_at(seq: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """seq [B, T, d], index int64 [B] -> seq[b, index[b]] for each b: [B, d]."""
    B, _, d = seq.shape
    return seq.gather(1, index.view(B, 1, 1).expand(B, 1, d)).view(B, d)


class SpeculativeEngine:
    def __init__(self, base, heads, tree: Tree | DynamicTree, batch_size: int, capacity: int,
                 sampling: SamplingConfig = SamplingConfig(), use_kernels: bool = True,
                 fused: FusedDecoder | None = None):
        """``fused``: the base's layers as fused ops (``fastpath.FusedDecoder.build``); None runs the HF modules.
        With it, the Hydra++ prefix layer runs fused too (from a copy of its weights made here), and both take
        cos and sin from a table of the rotary embedding over the cache's positions (``rope_table``)."""
        self.base = base
        self.heads = heads
        self.tree = tree
        self.sampling = sampling
        cfg = base.config
        device = base.get_output_embeddings().weight.device
        dtype = base.get_output_embeddings().weight.dtype
        self.device, self.dtype = device, dtype
        self.impl = ops.implementation(device, prefer_kernels=use_kernels)
        register()
        self.cache_kw = cache_kwarg()  # resolved here: traced code must not call cached helpers
        self.backbone = getattr(base, base.base_model_prefix)
        self.lm_head = base.get_output_embeddings()
        self.embed_weight = base.get_input_embeddings().weight
        if heads is not None and tree.heads_depth > len(heads.heads):
            raise ValueError(f"the tree is {tree.heads_depth} deep but there are only {len(heads.heads)} heads: use "
                             f"a tree of depth <= {len(heads.heads)}")
        self.bufs = tree.buffers(device)
        if heads is not None:
            self._check_tree_width(heads)
            heads.prepare_draft(self.lm_head)  # a reduced draft vocabulary's compact LM heads, before any capture
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.batch_size, self.capacity = batch_size, capacity
        self.cache = TreeKVCache(cfg.num_hidden_layers, batch_size, kv_heads, head_dim, capacity, dtype, device)
        self.fused = fused
        # (hidden, position_ids) -> (cos, sin): the table built here, outside any capture, or the rotary module
        self.rope = (rotary_positions(self.backbone.rotary_emb, capacity, self.embed_weight.dtype, device)
                     if fused is not None else self.backbone.rotary_emb)
        self.fused_prefix = None
        self.prefix_cache = None
        if heads is not None and heads.prefix_layer is not None:
            if fused is not None:
                try:
                    self.fused_prefix = FusedLayer.build(heads.prefix_layer, cfg, inplace=False)
                except NotFusable:
                    self.fused_prefix = None
            self.prefix_cache = TreeKVCache(1, batch_size, kv_heads, head_dim, capacity, dtype, device,
                                            lens=self.cache.lens)
        B, L = batch_size, self.bufs.max_depth + 1
        self.root = torch.zeros(B, dtype=torch.long, device=device)  # next token to verify (tree node 0)
        self.hidden = torch.zeros(B, cfg.hidden_size, dtype=dtype, device=device)  # heads' input
        self.result = torch.full((B, 1 + L), -1, dtype=torch.long, device=device)
        self.accepted = torch.full((B, L), -1, dtype=torch.long, device=device)  # last step's accepted nodes
        # Sampling randomness: the engine's own generator (seeded per generate call, registered with the step's
        # CUDA graph) fills uniform [B, N] at the start of every step: [b, n] decides node n, [b, 0] the bonus.
        self.generator = torch.Generator(device=device)
        self.uniform = torch.zeros(B, self.bufs.num_nodes, dtype=torch.float32, device=device)
        self.step_causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()  # the prefix layer's, a step
        self.history = None  # int64 [B, W]: the text so far, for the context chain (``hydra_fast.context``)
        if tree.context_len > 0:
            W = context.history_width(capacity, tree.max_depth)
            self.history = torch.zeros(B, W, dtype=torch.long, device=device)

    def _check_tree_width(self, heads) -> None:
        """A level cannot take more guesses than the heads draft from: refused here, before any kernel runs."""
        widest = self.bufs.widest
        draft_vocab = getattr(heads, "draft_vocab", None)
        vocab = draft_vocab.size if draft_vocab is not None else self.lm_head.weight.shape[0]
        if widest > vocab:
            raise ValueError(f"the tree takes the top {widest} guesses of a head but the heads draft from {vocab} "
                             "tokens: use a tree with lower ranks (or a smaller topk)")

    # ------------------------------------------------------------------ pieces
    def _causal(self, n: int) -> torch.Tensor:
        # Only the step's mask is kept: one kept per prompt length would grow device memory with every new length.
        if n == self.step_causal.shape[0]:
            return self.step_causal
        return torch.ones(n, n, dtype=torch.bool, device=self.device).tril()

    def _forward(self, input_ids, position_ids, mask) -> torch.Tensor:
        """Backbone over N new tokens per sequence written after ``lens``. -> last hidden [B, N, d]."""
        if self.fused is not None:
            return self.fused.forward(input_ids, position_ids, self.cache, mask, self.impl, self.rope)
        ctx = TreeAttention(self.cache.lens, mask, self.impl)
        with use_tree_attention(self.base):
            out = self.backbone(input_ids=input_ids, position_ids=position_ids, use_cache=True,
                                **{self.cache_kw: self.cache}, hydra_tree=ctx)
        return out.last_hidden_state

    def _prefix(self, hidden, position_ids) -> torch.Tensor:
        """Hydra++ prefix layer over base hidden states [B, T, d] (causal, own KV cache) -> [B, T, d]."""
        T = hidden.shape[1]
        pos_emb = self.rope(hidden, position_ids)
        if self.fused_prefix is not None:
            return self.fused_prefix.forward(hidden, *pos_emb, self.prefix_cache, 0, self._causal(T), self.impl)
        ctx = TreeAttention(self.cache.lens, self._causal(T), self.impl)
        with use_tree_attention(self.base):
            out = self.heads.prefix_layer(hidden, attention_mask=None, position_ids=position_ids, use_cache=True,
                                          position_embeddings=pos_emb, hydra_tree=ctx,
                                          **{self.cache_kw: self.prefix_cache})
        return out[0] if isinstance(out, tuple) else out

    def draft(self) -> tuple[torch.Tensor, StepTree]:
        """Candidate tokens of every tree node [B, N] (node 0 is the root) and the step's tree: the static
        tree's buffers, or the dynamic tree built from this step's drafts (one per sequence)."""
        M = self.bufs.context_len
        if self.bufs.dynamic:
            candidates, tree = dynamic_tree.draft(self.heads, self.hidden, self.root, self.bufs, self.embed_weight,
                                                  self.lm_head, self.impl)
        else:
            tree = self.bufs.step_tree()
            if self.heads is None and M == 0:
                return self.root.view(-1, 1), tree  # [B, 1]
            if self.heads is None:
                candidates = torch.cat([self.root.view(-1, 1), self.root.new_zeros(self.batch_size, M)], dim=1)
            else:
                candidates = self.heads.draft(self.hidden, self.root, self.bufs, self.embed_weight, self.lm_head,
                                              self.impl)
        if M > 0:  # the context chain: the last N - M .. N - 1 nodes
            candidates[:, -M:] = context.draft(self.history, self.cache.lens + 1, M)
        return candidates, tree

    def reseed(self, seed: int) -> None:
        """Seed the sampling generator (``generate`` does, from the user's generator or torch's default one)."""
        self.generator.manual_seed(seed)

    def draw_uniforms(self) -> None:
        """This step's uniforms, drawn in place into ``self.uniform`` (outside torch.compile: dynamo cannot
        trace a generator; inside the CUDA graph: the generator is registered with it)."""
        if self.sampling.do_sample:
            self.uniform.uniform_(generator=self.generator)

    def _accept(self, logits, candidates, tree: StepTree):
        s = self.sampling
        if not s.do_sample:
            return self.impl.accept_greedy(logits, candidates, tree.paths)
        if s.acceptance == "typical":
            logits = filter_logits(logits, s.temperature, s.top_k, s.top_p)  # [B, N, V] float32
            return self.impl.accept_typical(logits, candidates, tree.paths, self.uniform[:, 0], s.temperature,
                                            s.posterior_threshold, s.posterior_alpha)
        probs = target_probs(logits, s.temperature, s.top_k, s.top_p)  # [B, N, V] float32
        return self.impl.accept_sample(probs, candidates, tree.first_child, tree.next_sibling,
                                       self.uniform, self.bufs.max_depth)

    def _heads_input(self, hidden_seq, nodes, accept_len, position_ids) -> torch.Tensor:
        """The heads' next input: the base hidden state at the last accepted node, or for Hydra++ the
        prefix layer's output there after it has read every accepted node. nodes [B, L], accept_len [B]."""
        B, _, d = hidden_seq.shape
        if self.prefix_cache is None:
            last = nodes.gather(1, accept_len.view(B, 1)).view(B)  # tree index of the last accepted node
            return rows_at(hidden_seq, last)
        seq = hidden_seq.gather(1, nodes.clamp(min=0).unsqueeze(-1).expand(-1, -1, d))  # [B, L, d]
        out = self._prefix(seq, position_ids)  # [B, L, d]; slots past accept_len are never read
        return rows_at(out, accept_len)

    # ------------------------------------------------------------------ prefill and step
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Right-padded prompts [B, T] with true ``lengths`` [B] (host ints). Resets the state.

        Returns the first generated token of each sequence [B] (also stored as the next root)."""
        self.prepare_prefill()
        u = self.prefill_uniform(input_ids.shape[0])
        return self.prefill_tokens(input_ids.to(self.device), lengths.to(device=self.device, dtype=torch.int32), u)

    def prepare_prefill(self) -> None:
        """The eager half of ``prefill``, run before it (and before a prefill is captured or replayed)."""
        if self.heads is not None:
            self.heads.prepare_draft(self.lm_head)  # in place when the LM head changed: captured steps see it

    def prefill_uniform(self, batch_size: int) -> torch.Tensor | None:
        """The first token's uniform draw [B] when sampling, None when greedy: drawn eagerly, outside any graph,
        so a captured prefill draws exactly what the eager one does."""
        if not self.sampling.do_sample:
            return None
        return torch.rand(batch_size, generator=self.generator, device=self.device)

    @torch.no_grad()
    def prefill_tokens(self, input_ids: torch.Tensor, lengths: torch.Tensor,
                       uniform: torch.Tensor | None = None) -> torch.Tensor:
        """The device half of ``prefill``: input_ids int64 [B, T], lengths int32 [B] and (sampling) the first
        token's uniform [B] on the engine's device. Static shapes, no host reads: ``StepRunner`` captures it as a
        CUDA graph per padded prompt length (the tokens past a sequence's length are padding: they write cache
        slots that the steps overwrite)."""
        B, T = input_ids.shape
        self.cache.reset()
        pos = torch.arange(T, device=self.device).view(1, T).expand(B, T)
        hidden = self._forward(input_ids, pos, self._causal(T))  # [B, T, d]
        last = (lengths - 1).to(torch.long)  # [B]
        h_last = rows_at(hidden, last)  # [B, d]
        logits = lm_head_logits(self.lm_head, h_last).float()  # [B, V]
        if self.sampling.do_sample:
            s = self.sampling
            first = inverse_cdf(target_probs(logits, s.temperature, s.top_k, s.top_p), uniform)
        else:
            first = logits.argmax(-1)
        if self.prefix_cache is not None:
            h_last = rows_at(self._prefix(hidden, pos), last)  # the prefix layer reads the whole prompt
        self.cache.lens.copy_(lengths)
        if self.history is not None:
            context.write_prompt(self.history, input_ids, lengths, first)
        self.root.copy_(first)
        self.hidden.copy_(h_last)
        return first

    def verify(self, candidates, tree: StepTree) -> tuple[torch.Tensor, torch.Tensor]:
        """One base forward over the tree. -> hidden [B, N, d], logits [B, N, V]."""
        lens = self.cache.lens
        pos = lens.to(torch.long).view(-1, 1) + tree.depth.view(-1, candidates.shape[1])  # [B, N]
        hidden = self._forward(candidates, pos, tree.tree_mask)  # [B, N, d]
        return hidden, lm_head_logits(self.lm_head, hidden)

    def accept(self, candidates, hidden, logits, tree: StepTree) -> torch.Tensor:
        """Accept, compact the KV cache, advance the state; fills and returns ``self.result``."""
        self.commit(*self.select(candidates, hidden, logits, tree))
        return self.result

    def select(self, candidates, hidden, logits, tree: StepTree) -> tuple[torch.Tensor, torch.Tensor]:
        """The accepting half of ``accept``: choose each sequence's path, set the heads' next input, the next
        root and ``self.result``. The KV cache and ``lens`` are left to ``commit``. -> (nodes [B, L], accept_len [B])"""
        lens = self.cache.lens
        B = lens.shape[0]
        accept_len, out_tokens, nodes = self._accept(logits, candidates, tree)
        L = nodes.shape[1]
        prefix_pos = lens.to(torch.long).view(B, 1) + torch.arange(L, device=self.device).view(1, L)
        self.hidden.copy_(self._heads_input(hidden, nodes, accept_len, prefix_pos))
        self.root.copy_(out_tokens.gather(1, accept_len.view(B, 1)).view(B))
        self.result[:, 0].copy_(accept_len)
        self.result[:, 1:].copy_(out_tokens)
        self.accepted.copy_(nodes)  # tree indices, root first, -1 padded (tree calibration reads them)
        return nodes, accept_len

    def commit(self, nodes, accept_len) -> None:
        """Move the accepted nodes' K/V of every layer into place (``kv_compact``) and advance ``lens``."""
        lens = self.cache.lens
        self.impl.kv_compact(self.cache.k, self.cache.v, lens, nodes)
        if self.history is not None:
            context.advance(self.history, lens, self.result[:, 1:])  # the tokens ``select`` emitted
        lens.add_((accept_len + 1).to(torch.int32))

    def propose(self) -> tuple[torch.Tensor, torch.Tensor]:
        """draft -> verify -> select: the whole step but ``commit``. -> (nodes [B, L], accept_len [B])"""
        candidates, tree = self.draft()  # [B, N]
        hidden, logits = self.verify(candidates, tree)
        return self.select(candidates, hidden, logits, tree)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One speculative step from the current state; fills and returns ``self.result`` [B, 1 + L]."""
        self.draw_uniforms()
        self.commit(*self.propose())
        return self.result


def register_generator(graph, engine: SpeculativeEngine) -> None:
    """Let ``graph`` draw from the engine's generator: each replay then advances it, and ``reseed`` between
    replays takes effect (torch.cuda.CUDAGraph.register_generator_state)."""
    if engine.sampling.do_sample:
        graph.register_generator_state(engine.generator)


# Prompt lengths a captured prefill is padded to (at most 1.5x the prompt): longer prompts run eagerly, where
# the forward is compute-bound rather than launch-bound.
PREFILL_BUCKETS = (16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


class StepRunner:
    """Runs ``engine.step``: eagerly, or on CUDA captured once as a CUDA graph and replayed."""

    def __init__(self, engine: SpeculativeEngine, cuda_graph: bool = True, compile: bool = False):
        self.engine = engine
        self.graph = None
        self.step = engine.step
        if compile:
            # torch.compile fuses the base model's small kernels (norms, rotary, SiLU-mul) before capture.
            # ``commit`` stays outside the compiled graph (inside the CUDA graph all the same): kv_compact
            # mutates the cache that the verify forward wrote through per-layer views, and in one inductor
            # graph that pair lowers to a self-referential copy that inductor's scheduler rejects
            # (KeyError 'op<n>' in compute_ancestors, torch 2.11 and 2.13; pytorch issue 189271).
            propose = torch.compile(engine.propose, fullgraph=True, dynamic=False)

            @torch.no_grad()
            def step() -> torch.Tensor:
                engine.draw_uniforms()
                engine.commit(*propose())
                return engine.result

            self.step = step
        self.prefill_graphs: dict[int, tuple] | None = None  # padded prompt length -> (graph, ids, lengths, first)
        if cuda_graph and engine.device.type == "cuda":
            self.graph = self._capture()
            if not compile:
                self.prefill_graphs = {}
                self._prefill_pool = torch.cuda.graph_pool_handle()

    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``engine.prefill``, replayed from a CUDA graph captured for the prompt length rounded up to one of
        ``PREFILL_BUCKETS`` (the prompt right-padded to it; each length is captured on first use). Eager
        without graphs, and for prompts longer than the largest bucket or too long to pad within the cache."""
        engine = self.engine
        B, T = input_ids.shape
        Tb = next((b for b in PREFILL_BUCKETS if b >= T), None)
        if self.prefill_graphs is None or Tb is None or Tb + engine.bufs.num_nodes > engine.cache.capacity:
            return engine.prefill(input_ids, lengths)
        if Tb not in self.prefill_graphs:
            self.prefill_graphs[Tb] = self._capture_prefill(B, Tb)
        graph, ids, lens, uniform, first = self.prefill_graphs[Tb]
        engine.prepare_prefill()
        u = engine.prefill_uniform(B)
        if u is not None:
            uniform.copy_(u)
        ids.zero_()
        ids[:, :T].copy_(input_ids)
        lens.copy_(lengths)
        graph.replay()
        return first

    def _capture_prefill(self, B: int, T: int) -> tuple:
        engine = self.engine
        engine.prepare_prefill()  # lazy state (the draft's compact heads) before capture; no random draw
        ids = torch.zeros(B, T, dtype=torch.long, device=engine.device)
        lens = torch.ones(B, dtype=torch.int32, device=engine.device)
        uniform = torch.zeros(B, device=engine.device) if engine.sampling.do_sample else None
        side = torch.cuda.Stream(device=engine.device)
        side.wait_stream(torch.cuda.current_stream(engine.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                engine.prefill_tokens(ids, lens, uniform)
        torch.cuda.current_stream(engine.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()  # no random draws inside: the uniform comes in through ``uniform``
        with torch.cuda.graph(graph, pool=self._prefill_pool):
            first = engine.prefill_tokens(ids, lens, uniform)
        return graph, ids, lens, uniform, first

    def _capture(self):
        engine = self.engine
        engine.cache.reset()
        side = torch.cuda.Stream(device=engine.device)
        side.wait_stream(torch.cuda.current_stream(engine.device))
        with torch.cuda.stream(side):  # warm-up: lazy initialisation must not happen during capture
            for _ in range(3):
                self.step()
        torch.cuda.current_stream(engine.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        register_generator(graph, engine)
        with torch.cuda.graph(graph):
            self.step()
        engine.cache.reset()  # the warm-up's tokens are garbage; prefill starts from an empty cache
        return graph

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            return self.step()
        self.graph.replay()
        return self.engine.result


class PhasedStepRunner:
    """For profiling: the step as three CUDA graphs (draft, verify, accept) with events between them.

    The phases hand over through static buffers (a copy of the tree's hidden states and logits a step),
    so a phased step is slightly slower than the one-graph step; ``last_split_ms`` holds the split of the
    most recent step as {"draft", "verify", "accept"} milliseconds.
    """

    def __init__(self, engine: SpeculativeEngine):
        if engine.device.type != "cuda":
            raise ValueError("PhasedStepRunner needs a CUDA engine")
        self.engine = engine
        B, N = engine.batch_size, engine.bufs.num_nodes
        cfg = engine.base.config
        dev, dt = engine.device, engine.dtype
        self.cand = torch.zeros(B, N, dtype=torch.long, device=dev)
        with torch.no_grad():  # the step's tree, held in static buffers between phases (a dynamic one changes)
            self.tree = StepTree(*(t.clone() for t in engine.draft()[1].tensors()))
        self.hidden = torch.zeros(B, N, cfg.hidden_size, dtype=dt, device=dev)
        self.logits = torch.zeros(B, N, engine.lm_head.weight.shape[0], dtype=dt, device=dev)
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        self.last_split_ms: dict[str, float] = {}
        self.graphs = self._capture()

    @torch.no_grad()
    def _phases(self):
        e = self.engine
        def draft():
            cand, tree = e.draft()
            self.cand.copy_(cand)
            for buf, x in zip(self.tree.tensors(), tree.tensors()):
                buf.copy_(x)

        return (draft,
                lambda: [buf.copy_(x) for buf, x in zip((self.hidden, self.logits), e.verify(self.cand, self.tree))],
                lambda: (e.draw_uniforms(), e.accept(self.cand, self.hidden, self.logits, self.tree)))

    def _capture(self):
        engine = self.engine
        engine.cache.reset()
        side = torch.cuda.Stream(device=engine.device)
        side.wait_stream(torch.cuda.current_stream(engine.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                for phase in self._phases():
                    phase()
        torch.cuda.current_stream(engine.device).wait_stream(side)
        graphs = []
        for phase in self._phases():
            g = torch.cuda.CUDAGraph()
            register_generator(g, engine)
            with torch.cuda.graph(g):
                phase()
            graphs.append(g)
        engine.cache.reset()
        return graphs

    def __call__(self) -> torch.Tensor:
        ev = self.events
        ev[0].record()
        for g, end in zip(self.graphs, ev[1:]):
            g.replay()
            end.record()
        ev[3].synchronize()
        self.last_split_ms = {name: ev[i].elapsed_time(ev[i + 1]) for i, name in
                              enumerate(("draft", "verify", "accept"))}
        return self.engine.result
