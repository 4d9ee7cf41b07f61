"""``HydraModel``: a stock HF causal LM plus draft heads, with a drop-in ``generate()``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hydra_fast import generate as gen
from hydra_fast.engine import SamplingConfig, SpeculativeEngine, StepRunner
from hydra_fast.tree import Tree

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


class UnsupportedModelError(ValueError):
    pass


def check_supported(base) -> None:
    cfg = base.config
    model_type = getattr(cfg, "model_type", type(base).__name__)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"hydra_fast does not support model_type {model_type!r} ({type(base).__name__}); supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama, Qwen2, Qwen3 and Mistral families)")
    if not hasattr(base, "base_model_prefix") or base.get_output_embeddings() is None:
        raise UnsupportedModelError(f"{type(base).__name__} is not a causal LM with an LM head "
                                    "(load it with AutoModelForCausalLM)")


def _sliding_window(cfg) -> int | None:
    # Qwen2/Qwen3 configs carry a sliding_window size that applies only when use_sliding_window is set.
    if getattr(cfg, "model_type", "") in ("qwen2", "qwen3") and not getattr(cfg, "use_sliding_window", False):
        return None
    return getattr(cfg, "sliding_window", None)


@dataclass(frozen=True)
class EngineKey:
    batch_size: int
    tree: Tree
    sampling: SamplingConfig
    heads: bool


def resolve_tree(tree, heads_dir: Path | None, device: torch.device):
    """A tree argument as ``Tree.from_choices`` takes it: "auto" and tree files resolved (see from_pretrained)."""
    from hydra_fast.tree_search import load_tree

    if isinstance(tree, (str, Path)) and str(tree) == "auto":
        found = heads_dir / f"tree_{torch.device(device).type}.json" if heads_dir is not None else None
        return load_tree(found) if found is not None and found.is_file() else "mc_sim_7b_63"
    if isinstance(tree, Path) or (isinstance(tree, str) and tree.endswith(".json")):
        return load_tree(tree)
    return tree


class HydraModel:
    """A base model and optional draft heads. ``generate`` follows HF ``generate``'s contract.

    ``max_cache_len`` fixes the static KV cache (prompt + new tokens + the draft tree must fit);
    ``cuda_graph`` replays each step as one CUDA graph on CUDA; ``compile`` runs the step through
    ``torch.compile(fullgraph=True)`` first (fewer, fused kernels; compile time on first use);
    ``use_kernels`` picks the compiled ops (else the pure-PyTorch reference ops); ``fast`` (default) runs the base's
    decoder layers as fused ops (``fastpath.py``: its q/k/v and gate/up weights become views of fused buffers, so
    memory does not grow) when every layer is one the fast path reproduces, else the HF modules
    (``fast_path_reason`` says why).
    """

    def __init__(self, base, heads=None, tree="mc_sim_7b_63", max_cache_len: int | None = None,
                 use_kernels: bool = True, cuda_graph: bool = True, max_batch_size: int = 8,
                 compile: bool = False, fast: bool = True):
        check_supported(base)
        self.base = base.eval()
        self.heads = heads.eval() if heads is not None else None
        self.default_tree = Tree.from_choices(resolve_tree(tree, None, self.device)) if heads is not None \
            else Tree.plain()
        cfg = base.config
        limit = getattr(cfg, "max_position_embeddings", None) or 4096
        self.max_cache_len = int(max_cache_len or min(limit, 4096))
        window = _sliding_window(cfg)
        if window is not None and self.max_cache_len > window:
            raise UnsupportedModelError(
                f"{type(base).__name__} uses sliding-window attention ({window} tokens) and hydra_fast attends "
                f"to the whole cache: pass max_cache_len <= {window}")
        self.use_kernels = use_kernels
        self.cuda_graph = cuda_graph
        self.compile = compile
        self.fast = fast
        self._fused = None
        self._fast_checked = False
        self.fast_path_reason = "" if fast else "fast=False"
        self.max_batch_size = max_batch_size
        self._engine_key = None
        self._engine = None
        self._runner = None
        if heads is not None:
            self._check_heads(heads)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, base, heads=None, tree="auto", max_cache_len=None, use_kernels=True,
                        cuda_graph=True, compile=False, fast=True, **hf_kwargs):
        """``base``: a loaded HF causal LM or a local path; ``heads``: a local heads directory or None.

        ``tree``: a preset name, a list of rank lists, a tree file (``hydra-fast calibrate``), or "auto": the
        heads directory's ``tree_<device type>.json`` (e.g. tree_cpu.json) when it has one, else mc_sim_7b_63."""
        from transformers import AutoModelForCausalLM

        if isinstance(base, (str, Path)):
            base = AutoModelForCausalLM.from_pretrained(str(base), **hf_kwargs)
        elif hf_kwargs:
            raise TypeError(f"HF loading arguments {sorted(hf_kwargs)} apply only when base is a path")
        check_supported(base)
        if heads is not None and not isinstance(heads, torch.nn.Module):
            from hydra_fast.heads import DraftHeads

            weight = base.get_output_embeddings().weight
            tree = resolve_tree(tree, Path(heads), weight.device)
            heads = DraftHeads.from_pretrained(str(heads), base, device=weight.device, dtype=weight.dtype)
        return cls(base, heads, tree=tree, max_cache_len=max_cache_len, use_kernels=use_kernels,
                   cuda_graph=cuda_graph, compile=compile, fast=fast)

    def _check_heads(self, heads) -> None:
        from hydra_fast.heads import check_compatible

        check_compatible(heads, self.base)
        weight = self.base.get_output_embeddings().weight
        for name, p in heads.named_parameters():
            if p.device != weight.device or p.dtype != weight.dtype:
                raise ValueError(
                    f"heads parameter {name} is {p.dtype} on {p.device} but the base model is {weight.dtype} on "
                    f"{weight.device}: call heads.to(device={str(weight.device)!r}, dtype={weight.dtype})")

    @property
    def device(self) -> torch.device:
        return self.base.get_output_embeddings().weight.device

    def _fused_decoder(self):
        """The base's layers as fused ops (built on first use; rebuilt when the base's weights were replaced),
        or None when ``fast`` is off or the layers are not ones the fast path reproduces (see
        ``fast_path_reason``)."""
        if not self.fast or (self._fused is None and self._fast_checked):
            return None
        if self._fused is None or not self._fused.is_current():
            from hydra_fast.fastpath import FusedDecoder

            self._fused, self.fast_path_reason = FusedDecoder.build(self.base)
            self._fast_checked = True
            self._engine_key = None  # a new decoder: the engine (and its captured graph) must be rebuilt
        return self._fused

    def _get_engine(self, batch_size: int, tree: Tree, sampling: SamplingConfig, use_heads: bool):
        fused = self._fused_decoder()
        key = EngineKey(batch_size, tree, sampling, use_heads)
        if key != self._engine_key:
            self._engine = self._runner = None  # free the old cache before allocating the new one
            heads = self.heads if use_heads else None
            self._engine = SpeculativeEngine(self.base, heads, tree, batch_size, self.max_cache_len, sampling,
                                             use_kernels=self.use_kernels, fused=fused)
            self._runner = StepRunner(self._engine, cuda_graph=self.cuda_graph, compile=self.compile)
            self._engine_key = key
        return self._engine, self._runner

    # ------------------------------------------------------------------ generate
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 128, eos_token_id=None,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 posterior_threshold: float = 0.09, posterior_alpha: float = 0.3, streamer=None,
                 stopping_criteria=None, return_dict_in_generate: bool = False, tree=None,
                 pad_token_id: int | None = None, use_heads: bool = True, **unsupported):
        """HF-compatible generation. Greedy output equals ``base.generate(do_sample=False)``.

        ``use_heads=False`` runs plain decoding in the same engine (the baseline). With ``do_sample``,
        drafts are accepted by typical acceptance (``posterior_threshold`` eps, ``posterior_alpha`` delta).
        """
        if unsupported:
            raise TypeError(f"HydraModel.generate does not support {sorted(unsupported)}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        gcfg = getattr(self.base, "generation_config", None)
        if eos_token_id is None and gcfg is not None:
            eos_token_id = gcfg.eos_token_id
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        if pad_token_id is None:
            pad_token_id = (gcfg.pad_token_id if gcfg is not None and gcfg.pad_token_id is not None
                            else (min(eos) if eos else 0))
        prompts = gen.prepare_prompts(input_ids, attention_mask, pad_token_id)
        B = prompts.ids.shape[0]
        if B > self.max_batch_size:
            raise ValueError(f"batch size {B} is over this model's max_batch_size {self.max_batch_size}: split "
                             "the batch or construct HydraModel(..., max_batch_size=...)")
        if streamer is not None and B != 1:
            raise ValueError("streamers support batch size 1 only, as in HF generate")
        use_heads = use_heads and self.heads is not None
        tree_obj = (Tree.from_choices(resolve_tree(tree, None, self.device)) if tree is not None
                    else self.default_tree) if use_heads \
            else Tree.plain()
        need = int(prompts.lengths.max()) + max_new_tokens + tree_obj.num_nodes
        if need > self.max_cache_len:
            raise ValueError(
                f"prompt ({int(prompts.lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) + draft tree "
                f"({tree_obj.num_nodes} nodes) = {need} is over the cache capacity max_cache_len="
                f"{self.max_cache_len}: shorten the prompt, lower max_new_tokens or pass a larger max_cache_len")
        sampling = SamplingConfig(do_sample, float(temperature), posterior_threshold, posterior_alpha,
                                  float(top_p)) if do_sample else SamplingConfig()
        engine, runner = self._get_engine(B, tree_obj, sampling, use_heads)
        sink = gen.TokenSink(prompts, max_new_tokens, eos, stopping_criteria, streamer)
        step_times = gen.run(engine, runner, prompts, sink)
        sequences = sink.sequences(pad_token_id).to(input_ids.device)
        if not return_dict_in_generate:
            return sequences
        return gen.HydraGenerateOutput(sequences=sequences, accept_lengths=sink.accept_lengths,
                                       step_times=step_times)
