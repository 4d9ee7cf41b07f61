"""HF ``generate`` arguments resolved the way HF resolves them, for ``HydraModel.generate``.

Priority, as in ``transformers``: an explicit keyword argument > the ``generation_config`` argument > the base
model's ``generation_config`` > defaults. So an instruct model whose ``generation_config.json`` samples by
default samples here too. Keyword arguments that ask for nothing (``num_beams=1``, ``use_cache=True``,
``repetition_penalty=1.0``, ``top_k=None`` ...) are accepted; real requests for what hydra_fast does not do
(beam search, repetition penalties, logits processors ...) are a ``TypeError`` that names them. The same values
in the base model's own ``generation_config`` are ignored with one warning (HF would apply them).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

from transformers import GenerationConfig

# Settings hydra_fast applies. Unset max_new_tokens and max_length: DEFAULT_MAX_NEW_TOKENS (HF's global
# default is max_length=20, prompt included).
SUPPORTED = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_p", "top_k", "eos_token_id",
             "pad_token_id", "return_dict_in_generate")
DEFAULT_MAX_NEW_TOKENS = 128
# Values, besides None and HF's global defaults, that ask for nothing.
_NO_OP = {"min_p": (0.0,), "renormalize_logits": (False,), "output_logits": (False,), "output_attentions": (False,),
          "output_hidden_states": (False,), "synced_gpus": (False,), "min_new_tokens": (0,), "low_memory": (False,),
          "logits_processor": ((), [])}
# Settings that never change the tokens generated: ignored whatever their value.
_IGNORED = ("bos_token_id", "decoder_start_token_id", "cache_implementation", "cache_config", "compile_config",
            "disable_compile", "transformers_version", "_from_model_config", "max_cache_len", "use_mtp",
            "is_assistant", "assistant_early_exit", "prefill_chunk_size", "continuous_batching_config")


@dataclass(frozen=True)
class GenerateArgs:
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int  # 0: no top-k filter
    eos_token_ids: frozenset
    pad_token_id: int | None
    return_dict_in_generate: bool


def _is_no_op(name: str, value, defaults: dict) -> bool:
    if value is None or name in _IGNORED:
        return True
    if name in defaults and _same(value, defaults[name]):
        return True
    return any(_same(value, v) for v in _NO_OP.get(name, ()))


def _same(a, b) -> bool:
    """Equal values of one kind (True is not 1 here); False for values that do not compare."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False


def _unsupported(settings: dict, defaults: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in SUPPORTED and not _is_no_op(k, v, defaults)}


def _explain(bad: dict) -> str:
    items = ", ".join(f"{k}={v!r}" for k, v in sorted(bad.items()))
    return (f"HydraModel.generate does not support {items}: it decodes greedily or samples (do_sample, "
            f"temperature, top_p, top_k) one sequence per prompt; drop these arguments or call the base model's "
            f"generate for them")


def _settings(cfg) -> dict:
    return cfg.to_dict() if cfg is not None else {}


def resolve(kwargs: dict, generation_config=None, base_config=None, prompt_len: int = 0) -> GenerateArgs:
    """The effective settings of one ``generate`` call. ``kwargs``: every HF-style keyword argument given."""
    defaults = GenerationConfig._get_default_generation_params()
    unknown = sorted(k for k in kwargs if not hasattr(GenerationConfig(), k) and k not in _NO_OP)
    if unknown:
        raise TypeError(f"HydraModel.generate got unexpected arguments {unknown}")
    bad = _unsupported(kwargs, defaults)
    if generation_config is not None:
        if not isinstance(generation_config, GenerationConfig):
            raise TypeError(f"generation_config must be a transformers.GenerationConfig, got "
                            f"{type(generation_config).__name__}")
        bad.update({k: v for k, v in _unsupported(_settings(generation_config), defaults).items() if k not in kwargs})
    if bad:
        raise TypeError(_explain(bad))
    merged = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    if base_config is not None:
        ignored = {k: v for k, v in _unsupported(_settings(base_config), defaults).items()
                   if getattr(merged, k, None) is None and k not in kwargs}
        if ignored:
            listed = ", ".join(f"{k}={v!r}" for k, v in sorted(ignored.items()))
            warnings.warn(f"the base model's generation_config sets {listed}, which hydra_fast does not apply "
                          "(greedy or sampled decoding only)", stacklevel=3)
        merged.update(**base_config.to_dict(), defaults_only=True)
    given = {k: v for k, v in kwargs.items() if k in SUPPORTED and v is not None}
    for k, v in given.items():
        setattr(merged, k, v)
    return _finish(merged, given, defaults, prompt_len)


def _finish(cfg, given: dict, defaults: dict, prompt_len: int) -> GenerateArgs:
    def pick(name):
        value = getattr(cfg, name, None)
        return defaults.get(name) if value is None else value

    if cfg.max_new_tokens is not None and not ("max_length" in given and "max_new_tokens" not in given):
        max_new = int(cfg.max_new_tokens)
    elif cfg.max_length is not None:
        max_new = int(cfg.max_length) - prompt_len
        if max_new < 1:
            raise ValueError(f"max_length={cfg.max_length} leaves no room after the {prompt_len}-token prompt: "
                             "pass max_new_tokens (the tokens to generate) instead")
    else:
        max_new = DEFAULT_MAX_NEW_TOKENS
    do_sample = bool(pick("do_sample"))
    temperature, top_p, top_k = float(pick("temperature")), float(pick("top_p")), int(pick("top_k") or 0)
    if max_new < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: no top-k filter), got {top_k}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature}")
    eos = cfg.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    return GenerateArgs(max_new, do_sample, temperature, top_p, top_k, eos_ids, cfg.pad_token_id,
                        bool(pick("return_dict_in_generate")))
