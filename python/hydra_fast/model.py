"""``HydraModel``: a stock HF causal LM plus draft heads, with a drop-in ``generate()``."""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from hydra_fast import generate as gen
from hydra_fast import generate_args
from hydra_fast.engine import SamplingConfig, SpeculativeEngine, StepRunner
from hydra_fast.tree import Tree, split_context

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
    check_placement(base)


def check_placement(base) -> None:
    """The whole model on one device, in plain floating-point weights: what the static engine runs."""
    name = type(base).__name__
    device_map = getattr(base, "hf_device_map", None) or {}
    if len({str(d) for d in device_map.values()}) > 1:
        raise UnsupportedModelError(
            f"{name} is spread over {sorted({str(d) for d in device_map.values()})} by device_map: hydra_fast runs "
            "the whole model on one device; load it without device_map and move it with .to(device)")
    if getattr(base, "is_quantized", False) or getattr(base.config, "quantization_config", None) is not None:
        raise UnsupportedModelError(
            f"{name} is quantized: hydra_fast runs float32, bfloat16 or float16 weights; load the model without a "
            "quantization_config (e.g. dtype=torch.bfloat16)")
    tensors = list(itertools.chain(base.parameters(), base.buffers()))
    devices = {str(t.device) for t in tensors}
    if "meta" in devices or len(devices) > 1:
        raise UnsupportedModelError(
            f"{name} has weights on {sorted(devices)}: hydra_fast needs every weight loaded on one device (no "
            "offloading, no meta tensors); move the model with .to(device)")
    odd = sorted({str(p.dtype) for p in base.parameters() if not p.is_floating_point() or p.element_size() == 1})
    if odd:
        raise UnsupportedModelError(f"{name} has {', '.join(odd)} weights: hydra_fast runs float32, bfloat16 or "
                                    "float16 models (quantized weights are not supported)")


def _sliding_window(cfg) -> int | None:
    # Qwen2/Qwen3 configs carry a sliding_window size that applies only when use_sliding_window is set.
    if getattr(cfg, "model_type", "") in ("qwen2", "qwen3") and not getattr(cfg, "use_sliding_window", False):
        return None
    return getattr(cfg, "sliding_window", None)


def _tensor_slots(module: torch.nn.Module, out: list) -> None:
    """(data_ptr, dtype, device) of every parameter and buffer under ``module``, appended to ``out`` in module
    order (a tensor shared by two modules, e.g. tied embeddings, appears twice)."""
    for t in itertools.chain(module._parameters.values(), module._buffers.values()):
        if t is not None:
            out.append((t.data_ptr(), t.dtype, t.device))
    for child in module._modules.values():
        if child is not None:
            _tensor_slots(child, out)


@dataclass(frozen=True)
class EngineKey:
    batch_size: int
    tree: Tree
    sampling: SamplingConfig
    heads: bool


def resolve_tree(tree, heads_dir: Path | None, device: torch.device):
    """A tree argument as ``Tree.from_choices`` takes it: "auto" and tree files resolved (see from_pretrained)."""
    from hydra_fast.tree_search import read_tree_file

    def from_file(path):  # the file's tree, with the context chain it asks for
        choices, m = read_tree_file(path)
        return Tree.from_choices(choices, context_len=m) if m else choices

    if isinstance(tree, (str, Path)) and str(tree) != split_context(str(tree))[0]:  # "<tree>+ctxM"
        name, context_len = split_context(str(tree))
        return Tree.from_choices(resolve_tree(name, heads_dir, device), context_len=context_len)
    if isinstance(tree, (str, Path)) and str(tree) == "auto":
        found = heads_dir / f"tree_{torch.device(device).type}.json" if heads_dir is not None else None
        return from_file(found) if found is not None and found.is_file() else "mc_sim_7b_63"
    if isinstance(tree, Path) or (isinstance(tree, str) and tree.endswith(".json")):
        return from_file(tree)
    return tree


def tree_for(tree: Tree, use_heads: bool) -> Tree:
    """The tree a run uses: without heads, the root and the tree's context chain only."""
    return tree if use_heads else Tree.plain().with_context(tree.context_len)


class HydraModel:
    """A base model and optional draft heads. ``generate`` follows HF ``generate``'s contract.

    It looks like an HF model to HF tooling (``config``, ``generation_config``, ``device``, ``dtype``,
    ``can_generate()``, ``to()``, ``eval()``, calls go to the base model): ``transformers.pipeline`` takes it.
    Calls to ``generate`` are serialised: threads sharing one HydraModel wait for each other (the engine's
    buffers are static); for parallel generation give each thread its own HydraModel.

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
        self.default_tree = tree_for(Tree.from_choices(resolve_tree(tree, None, self.device)), heads is not None)
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
        self._engine_fp = None
        self._engine = None
        self._runner = None
        self._lock = threading.RLock()
        if heads is not None:
            self._check_heads(heads)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, base, heads=None, tree="auto", max_cache_len=None, use_kernels=True,
                        cuda_graph=True, compile=False, draft_vocab: int | None = None, fast=True, **hf_kwargs):
        """``base``: a loaded HF causal LM or a local path; ``heads``: a local heads directory or None.

        ``draft_vocab``: draft from the heads folder's N most frequent tokens (0: full vocabulary; None: the
        heads config's ``draft_vocab_size``); see ``set_draft_vocab``.

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
            heads = DraftHeads.from_pretrained(str(heads), base, device=weight.device, dtype=weight.dtype,
                                               draft_vocab=draft_vocab)
        elif draft_vocab and heads is None:
            raise ValueError(f"draft_vocab={draft_vocab} needs draft heads: pass heads=DIR")
        elif draft_vocab is not None and heads is not None:
            heads.use_draft_vocab(draft_vocab)
        return cls(base, heads, tree=tree, max_cache_len=max_cache_len, use_kernels=use_kernels,
                   cuda_graph=cuda_graph, compile=compile, fast=fast)

    def _check_heads(self, heads) -> None:
        from hydra_fast.heads import check_compatible

        check_compatible(heads, self.base)
        self._check_heads_placement(heads)

    def _check_heads_placement(self, heads) -> None:
        weight = self.base.get_output_embeddings().weight
        for name, p in heads.named_parameters():
            if p.device != weight.device or p.dtype != weight.dtype:
                raise ValueError(
                    f"heads parameter {name} is {p.dtype} on {p.device} but the base model is {weight.dtype} on "
                    f"{weight.device}: call heads.to(device={str(weight.device)!r}, dtype={weight.dtype})")

    def set_draft_vocab(self, size: int) -> None:
        """Draft from the heads' ``size`` most frequent tokens (draft_vocab.safetensors; 0: full vocabulary).
        Greedy output is unchanged; only tau and the draft time move. The next generate builds a new engine."""
        if self.heads is None:
            raise ValueError("set_draft_vocab needs draft heads; this model decodes without heads")
        self.heads.use_draft_vocab(size)
        self._engine = self._runner = self._engine_key = None

    # ------------------------------------------------------------------ the HF model surface
    main_input_name = "input_ids"

    @property
    def device(self) -> torch.device:
        return self.base.get_output_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.get_output_embeddings().weight.dtype

    @property
    def config(self):
        return self.base.config

    @property
    def generation_config(self):
        return self.base.generation_config

    @generation_config.setter
    def generation_config(self, value) -> None:
        self.base.generation_config = value

    def can_generate(self) -> bool:
        return True

    def to(self, *args, **kwargs) -> HydraModel:
        """Move or cast the base and the heads together (the engine is rebuilt on the next call)."""
        with self._lock:
            self.base.to(*args, **kwargs)
            if self.heads is not None:
                self.heads.to(*args, **kwargs)
        return self

    def eval(self) -> HydraModel:
        return self

    def __call__(self, *args, **kwargs):
        """A forward pass of the base model (logits, as HF models return them)."""
        return self.base(*args, **kwargs)

    # ------------------------------------------------------------------ the engine
    def _engine_fingerprint(self) -> tuple:
        """Where and in what the weights live: a built engine (its CUDA graph above all) is bound to these
        storages, so any change (``base.cpu(); base.cuda()``, a dtype change, ``load_state_dict(assign=True)``,
        replaced modules) rebuilds it. About a microsecond a tensor, once a call (a direct walk of the modules: ``parameters()``
        is several times slower)."""
        out: list[tuple] = []
        for m in [self.base] if self.heads is None else [self.base, self.heads]:
            _tensor_slots(m, out)
        return tuple(out)

    def _fused_decoder(self):
        """The base's layers as fused ops (built on first use; rebuilt when the base's weights were replaced),
        or None when ``fast`` is off or the layers are not ones the fast path reproduces (see
        ``fast_path_reason``)."""
        if not self.fast or (self._fused is None and self._fast_checked):
            return None
        if self._fused is None or not self._fused.is_current():
            from hydra_fast.fastpath import FusedDecoder

            with torch.inference_mode(False):  # the fused buffers become the base's parameters' storage
                self._fused, self.fast_path_reason = FusedDecoder.shared(self.base)
            self._fast_checked = True
            self._engine_key = None  # a new decoder: the engine (and its captured graph) must be rebuilt
        return self._fused

    def _get_engine(self, batch_size: int, tree: Tree, sampling: SamplingConfig, use_heads: bool):
        fused = self._fused_decoder()
        key = EngineKey(batch_size, tree, sampling, use_heads)
        fp = self._engine_fingerprint()
        if key == self._engine_key and fp == self._engine_fp:
            return self._engine, self._runner
        if fp != self._engine_fp:
            check_placement(self.base)
            if self.heads is not None:
                self._check_heads_placement(self.heads)
        # Free the old cache before allocating the new one; until the build succeeds no engine is current,
        # so a failed build (out of memory, Ctrl-C, a bad tree) leaves the next call to build again.
        self._engine = self._runner = self._engine_key = self._engine_fp = None
        heads = self.heads if use_heads else None
        with torch.inference_mode(False):  # buffers built under a caller's inference_mode would stay inference tensors
            engine = SpeculativeEngine(self.base, heads, tree, batch_size, self.max_cache_len, sampling,
                                       use_kernels=self.use_kernels, fused=fused)
            runner = StepRunner(engine, cuda_graph=self.cuda_graph, compile=self.compile)
        self._engine, self._runner, self._engine_key, self._engine_fp = engine, runner, key, fp
        return engine, runner

    # ------------------------------------------------------------------ generate
    def generate(self, input_ids=None, attention_mask=None, streamer=None, stopping_criteria=None,
                 generation_config=None, tree=None, use_heads: bool = True, posterior_threshold: float = 0.09,
                 posterior_alpha: float = 0.3, inputs=None, context_draft: int | None = None,
                 acceptance: str = "exact", generator: torch.Generator | None = None, **kwargs):
        """HF-compatible generation. Greedy output equals ``base.generate(do_sample=False)``.

        HF settings (``max_new_tokens``, ``max_length``, ``do_sample``, ``temperature``, ``top_p``, ``top_k``,
        ``eos_token_id``, ``pad_token_id``, ``return_dict_in_generate``) come from the keyword arguments, then
        ``generation_config``, then the base model's ``generation_config`` (``generate_args.py``).
        ``use_heads=False`` runs plain decoding in the same engine (the baseline). With ``do_sample``, tokens follow
        softmax(logits / temperature) restricted to ``top_k`` and then ``top_p`` exactly (``acceptance="exact"``,
        lossless rejection sampling on the tree); ``acceptance="typical"`` is the lossy typical acceptance
        (``posterior_threshold`` eps, ``posterior_alpha`` delta). ``generator`` (a torch.Generator) makes a
        sampled run reproducible; without one the seed comes from torch's default generator (torch.manual_seed).
        ``context_draft=M`` adds a chain of M tokens found in the prompt and the text so far to the draft tree
        (with or without heads; 0: none; default: the tree's, e.g. ``tree="mc_sim_7b_63+ctx8"``).
        """
        if inputs is not None:
            if input_ids is not None:
                raise TypeError("pass the prompt as input_ids or as inputs, not both")
            input_ids = inputs
        with self._lock:
            return self._generate(input_ids, attention_mask, streamer, stopping_criteria, generation_config, tree,
                                  use_heads, posterior_threshold, posterior_alpha, context_draft, acceptance,
                                  generator, kwargs)

    def _generate(self, input_ids, attention_mask, streamer, stopping_criteria, generation_config, tree,
                  use_heads, posterior_threshold, posterior_alpha, context_draft, acceptance, generator, kwargs):
        if input_ids is None:
            raise TypeError("generate needs the prompt: input_ids (a [batch, length] tensor of token ids)")
        prompt_len = int(input_ids.shape[-1]) if torch.is_tensor(input_ids) else 0
        args = generate_args.resolve(kwargs, generation_config, getattr(self.base, "generation_config", None),
                                     prompt_len)
        eos = set(args.eos_token_ids)
        pad_token_id = args.pad_token_id if args.pad_token_id is not None else (min(eos) if eos else 0)
        vocab = self.base.get_input_embeddings().weight.shape[0]
        prompts = gen.prepare_prompts(input_ids, attention_mask, vocab)
        B = prompts.ids.shape[0]
        if B > self.max_batch_size:
            raise ValueError(f"batch size {B} is over this model's max_batch_size {self.max_batch_size}: split "
                             "the batch or construct HydraModel(..., max_batch_size=...)")
        if streamer is not None and B != 1:
            raise ValueError("streamers support batch size 1 only, as in HF generate")
        use_heads = use_heads and self.heads is not None
        tree_obj = tree_for(Tree.from_choices(resolve_tree(tree, None, self.device)) if tree is not None
                            else self.default_tree, use_heads)
        if context_draft is not None:
            tree_obj = tree_obj.with_context(context_draft)
        if tree_obj.heads_depth == 0:  # no heads' nodes (e.g. a calibrated root-only tree): the heads would run for nothing
            use_heads = False
        depth, drafted = tree_obj.heads_depth, self.heads.config.num_heads if use_heads else 0
        if use_heads and depth > drafted:
            raise ValueError(f"the tree is {depth} deep but these heads draft {drafted} levels: pass a tree no "
                             "deeper than the number of heads")
        max_new_tokens = args.max_new_tokens
        need = int(prompts.lengths.max()) + max_new_tokens + tree_obj.num_nodes
        if need > self.max_cache_len:
            raise ValueError(
                f"prompt ({int(prompts.lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) + draft tree "
                f"({tree_obj.num_nodes} nodes) = {need} is over the cache capacity max_cache_len="
                f"{self.max_cache_len}: shorten the prompt, lower max_new_tokens or pass a larger max_cache_len")
        sampling = SamplingConfig(True, args.temperature, posterior_threshold, posterior_alpha, args.top_p,
                                  top_k=args.top_k, acceptance=acceptance) if args.do_sample else SamplingConfig()
        if isinstance(stopping_criteria, (list, tuple)):
            from transformers import StoppingCriteriaList

            stopping_criteria = StoppingCriteriaList(stopping_criteria)
        engine, runner = self._get_engine(B, tree_obj, sampling, use_heads)
        if args.do_sample:
            engine.reseed(gen.seed_from(generator))
        sink = gen.TokenSink(prompts, max_new_tokens, eos, stopping_criteria, streamer)
        with torch.inference_mode(False):
            step_times = gen.run(engine, runner, prompts, sink)
        sequences = sink.sequences(pad_token_id).to(input_ids.device)
        if not args.return_dict_in_generate:
            return sequences
        return gen.HydraGenerateOutput(sequences=sequences, accept_lengths=sink.accept_lengths,
                                       step_times=step_times)
