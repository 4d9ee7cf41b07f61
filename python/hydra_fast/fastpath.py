"""The fast verify forward: the base model's decoder layers run as a few fused ops each.

Per layer, instead of the ~50 small kernels of the HF modules (norms in fp32 with casts, three projections, RoPE
in pieces, a cache scatter, two residual adds, SiLU and a multiply):

    [add_rms_norm + q|k|v]  ->  rope_kv_write  ->  tree_attention  ->  [o_proj]
    ->  [add_rms_norm + gate|up + silu_mul]  ->  [down_proj]

where each bracket is one op (``ops.add_rms_norm_linear``, ``linear``): on CUDA, for the few rows of a plain or
small-batch step, one GEMV kernel whose prologue is the norm and whose epilogue is SiLU-and-multiply; for a draft
tree's many rows, the elementwise kernels and a cuBLAS GEMM.

The projections read fused weights: at build time the q, k and v (and gate and up) weights of each layer are
copied once into one buffer and the HF modules' parameters become views of it, so the model's memory does not
grow and the HF modules keep working on the same numbers. Everything else (embedding, final norm, LM head) is the
HF model's own modules; cos and sin come from its rotary module or from a table of that module's output
(``rope_table.py``). The ops follow HF's rounding order (``reference.py``), so in fp32 the fast forward matches
the HF forward; the HF-module forward stays the specification and the fallback: a model whose layers are not
recognised exactly (``FusedDecoder.build`` returns None with the reason) runs through it.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

# Module classes whose forward this file reproduces, by model type (transformers 5.x).
_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")
_ATTENTIONS = ("LlamaAttention", "Qwen2Attention", "Qwen3Attention", "MistralAttention")
_MLPS = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP")
_SILU = ("SiLUActivation", "SiLU")


# base model -> its FusedDecoder (``FusedDecoder.shared``); weak keys: the decoder does not keep the base alive.
_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class NotFusable(Exception):
    """A layer this file cannot reproduce exactly; the message says why (the HF path is used instead)."""


def _linear(module, name: str) -> nn.Linear:
    lin = getattr(module, name, None)
    if type(lin) is not nn.Linear:  # quantized and LoRA layers are other classes: their math is not F.linear
        raise NotFusable(f"{type(module).__name__}.{name} is {type(lin).__name__}, not torch.nn.Linear")
    if type(lin.weight.data) is not torch.Tensor or not lin.weight.dtype.is_floating_point:
        raise NotFusable(f"{type(module).__name__}.{name}.weight is not a plain floating-point tensor")
    return lin


def _norm(module, name: str) -> nn.Module:
    norm = getattr(module, name, None)
    if norm is None or type(norm).__name__ not in _NORMS:
        raise NotFusable(f"{name} is {type(norm).__name__}, not one of {_NORMS}")
    return norm


def _fuse(linears: list[nn.Linear], inplace: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One [sum(out), in] weight (and bias) for several linears over the same input.

    ``inplace``: the linears' parameters become views of the fused buffers (no extra memory once the old
    tensors are freed); otherwise the fused buffers are copies."""
    weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)  # [sum(out), in]
    has_bias = [lin.bias is not None for lin in linears]
    if any(has_bias) and not all(has_bias):
        raise NotFusable("some of the fused projections have a bias and some do not")
    bias = torch.cat([lin.bias.detach() for lin in linears]) if all(has_bias) else None
    if inplace:
        start = 0
        for lin in linears:
            n = lin.out_features
            lin.weight = nn.Parameter(weight[start:start + n], requires_grad=lin.weight.requires_grad)
            if bias is not None:
                lin.bias = nn.Parameter(bias[start:start + n], requires_grad=lin.bias.requires_grad)
            start += n
    return weight, bias


@dataclass
class FusedLayer:
    """One decoder layer's tensors for the fused forward (views of, or copies of, the HF module's)."""

    qkv_weight: torch.Tensor  # [(Hq + 2 Hkv) D, d]
    qkv_bias: torch.Tensor | None
    o_proj: nn.Linear
    gate_up_weight: torch.Tensor  # [2 I, d]
    gate_up_bias: torch.Tensor | None
    down_proj: nn.Linear
    input_norm: nn.Module  # the HF RMSNorm modules (their weights are read at each call)
    post_norm: nn.Module
    q_norm: nn.Module | None  # per-head norms of q and k before RoPE (Qwen3), or None
    k_norm: nn.Module | None
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    views_of: tuple[nn.Linear, ...]  # q, k, v, gate, up: their weights must still view the fused buffers

    @classmethod
    def build(cls, layer: nn.Module, config, inplace: bool) -> FusedLayer:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if type(attn).__name__ not in _ATTENTIONS or type(mlp).__name__ not in _MLPS:
            raise NotFusable(f"{type(layer).__name__} has {type(attn).__name__} / {type(mlp).__name__}")
        if type(getattr(mlp, "act_fn", None)).__name__ not in _SILU:
            raise NotFusable(f"activation {type(getattr(mlp, 'act_fn', None)).__name__} is not SiLU")
        q, k, v, o = (_linear(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        gate, up, down = (_linear(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
        head_dim = int(getattr(attn, "head_dim", 0) or config.hidden_size // config.num_attention_heads)
        Hq, Hkv = q.out_features // head_dim, k.out_features // head_dim
        if Hq * head_dim != q.out_features or Hkv * head_dim != k.out_features or v.out_features != k.out_features \
                or head_dim % 2:
            raise NotFusable(f"projection sizes {q.out_features}/{k.out_features}/{v.out_features} do not fit "
                             f"head_dim {head_dim}")
        if getattr(attn, "sliding_window", None):
            raise NotFusable("sliding-window attention layer")
        q_norm = k_norm = None
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            q_norm, k_norm = _norm(attn, "q_norm"), _norm(attn, "k_norm")
            if q_norm.variance_epsilon != k_norm.variance_epsilon:
                raise NotFusable("q_norm and k_norm have different eps")
        dtypes = {p.dtype for p in (q.weight, k.weight, v.weight, o.weight, gate.weight, up.weight, down.weight)}
        if len(dtypes) != 1:
            raise NotFusable(f"mixed parameter dtypes {sorted(map(str, dtypes))}")
        qkv_w, qkv_b = _fuse([q, k, v], inplace)
        gu_w, gu_b = _fuse([gate, up], inplace)
        views = (q, k, v, gate, up) if inplace else ()
        return cls(qkv_w, qkv_b, o, gu_w, gu_b, down, _norm(layer, "input_layernorm"),
                   _norm(layer, "post_attention_layernorm"), q_norm, k_norm, Hq, Hkv, head_dim,
                   float(attn.scaling), views)

    def is_current(self) -> bool:
        """The HF parameters still view the fused buffers (not replaced by ``.to()``, ``load_state_dict(assign=True)``
        or a merge), so the fused forward computes what the HF modules compute."""
        if not self.views_of:
            return True
        q, k, v, gate, up = (lin.weight for lin in self.views_of)
        qkv = self.qkv_weight.data_ptr()
        step = self.qkv_weight.stride(0) * self.qkv_weight.element_size()
        gu = self.gate_up_weight.data_ptr()
        gstep = self.gate_up_weight.stride(0) * self.gate_up_weight.element_size()
        return (q.data_ptr() == qkv and k.data_ptr() == qkv + q.shape[0] * step
                and v.data_ptr() == qkv + (q.shape[0] + k.shape[0]) * step
                and gate.data_ptr() == gu and up.data_ptr() == gu + gate.shape[0] * gstep)

    def attention(self, qkv, cos, sin, cache, layer: int, mask, impl) -> torch.Tensor:
        """The q|k|v projection qkv [B, N, (Hq + 2 Hkv) D] -> attention output after o_proj [B, N, d]; writes K/V
        into ``cache``."""
        B, N, _ = qkv.shape
        qn, kn = self.q_norm, self.k_norm
        q = impl.rope_kv_write(qkv, cos, sin, cache.k, cache.v, layer, cache.lens, self.num_q_heads,
                               self.num_kv_heads, qn.weight if qn is not None else None,
                               kn.weight if kn is not None else None,
                               float(qn.variance_epsilon) if qn is not None else 0.0)  # [B, N, Hq, D]
        out = impl.tree_attention(q.transpose(1, 2), cache.k[layer], cache.v[layer], cache.lens, mask,
                                  self.scaling)  # [B, N, Hq, D]
        o = self.o_proj
        return impl.linear(out.reshape(B, N, self.num_q_heads * self.head_dim), o.weight, o.bias)

    def step(self, pending, residual, cos, sin, cache, layer: int, mask, impl) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer on the residual stream: the previous layer's MLP output ``pending`` (None for the first layer)
        and the residual stream before it [B, N, d] -> (this layer's MLP output, the residual stream before it).

        Four kernels besides RoPE and attention: each RMSNorm (with the residual add before it) is the prologue of
        the projection after it, and SiLU-and-multiply the epilogue of gate|up (``ops.add_rms_norm_linear``)."""
        norm = self.input_norm
        if pending is None:
            qkv = impl.rms_norm_linear(residual, norm.weight, float(norm.variance_epsilon), self.qkv_weight,
                                       self.qkv_bias)
        else:
            qkv, residual = impl.add_rms_norm_linear(pending, residual, norm.weight, float(norm.variance_epsilon),
                                                     self.qkv_weight, self.qkv_bias)
        attn = self.attention(qkv, cos, sin, cache, layer, mask, impl)
        norm = self.post_norm
        act, residual = impl.add_rms_norm_linear(attn, residual, norm.weight, float(norm.variance_epsilon),
                                                 self.gate_up_weight, self.gate_up_bias, silu_mul=True)
        down = self.down_proj
        return impl.linear(act, down.weight, down.bias), residual

    def forward(self, hidden, cos, sin, cache, layer: int, mask, impl) -> torch.Tensor:
        """A whole layer, as the HF module: hidden [B, N, d] -> hidden [B, N, d] (used for one-layer stacks)."""
        pending, residual = self.step(None, hidden, cos, sin, cache, layer, mask, impl)
        return residual + pending


class FusedDecoder:
    """The base model's backbone as fused layers. ``forward`` replaces ``backbone(...).last_hidden_state``."""

    def __init__(self, backbone: nn.Module, layers: list[FusedLayer]):
        self.backbone = backbone
        self.layers = layers
        self.final_norm = _norm(backbone, "norm")

    @classmethod
    def build(cls, base) -> tuple[FusedDecoder | None, str]:
        """Fuse ``base``'s layers in place (its q/k/v and gate/up weights become views of fused buffers).

        -> (decoder, "") or (None, why not) when any layer is not exactly one this file reproduces; then the
        model is left untouched."""
        backbone = getattr(base, base.base_model_prefix, None)
        layers = getattr(backbone, "layers", None)
        try:
            if layers is None or not hasattr(backbone, "embed_tokens") or not hasattr(backbone, "rotary_emb"):
                raise NotFusable(f"{type(backbone).__name__} has no layers / embed_tokens / rotary_emb")
            _norm(backbone, "norm")
            if getattr(base.config, "hidden_act", "silu") not in ("silu", "swish"):
                raise NotFusable(f"hidden_act {base.config.hidden_act!r}")
            for layer in layers:  # check every layer before changing any
                FusedLayer.build(layer, base.config, inplace=False)
        except NotFusable as err:
            return None, str(err)
        with torch.no_grad():
            fused = [FusedLayer.build(layer, base.config, inplace=True) for layer in layers]
        return cls(backbone, fused), ""

    @classmethod
    def shared(cls, base) -> tuple[FusedDecoder | None, str]:
        """``build``, once per base model: every HydraModel over the same base uses one decoder (a second build
        would re-fuse the weights, turning the first decoder's views stale and making each model rebuild its
        decoder and engine at every call). Rebuilt when the weights were replaced."""
        kept = _SHARED.get(base)
        if kept is not None and kept.is_current():
            return kept, ""
        decoder, reason = cls.build(base)
        if decoder is not None:
            _SHARED[base] = decoder
        return decoder, reason

    def is_current(self) -> bool:
        return all(layer.is_current() for layer in self.layers)

    def forward(self, input_ids, position_ids, cache, mask, impl, rope=None) -> torch.Tensor:
        """input_ids / position_ids int64 [B, N] written at slots [lens, lens + N) of ``cache`` (a TreeKVCache),
        mask bool [N, N] (or [B, N, N], one per sequence) over the new tokens. ``rope``: what gives (cos, sin)
        for (hidden, position_ids), e.g. a ``rope_table.RopeTable``; None calls the model's rotary module.
        -> the final normed hidden states [B, N, d]."""
        hidden = self.backbone.embed_tokens(input_ids)  # [B, N, d]
        rope = rope if rope is not None else self.backbone.rotary_emb
        cos, sin = rope(hidden, position_ids)  # [B, N, D] each, in the model's dtype
        residual, pending = hidden, None
        for i, layer in enumerate(self.layers):
            pending, residual = layer.step(pending, residual, cos, sin, cache, i, mask, impl)
        norm = self.final_norm
        return impl.add_rms_norm(pending, residual, norm.weight, float(norm.variance_epsilon))[0]
