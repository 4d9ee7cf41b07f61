"""bench_decode's inputs and methods: the model, the prompts (with categories), the heads, and each method as a
callable from prompt ids to a ``Run`` (HF generate variants; our engine plain, Medusa, Hydra, Hydra++,
optionally compiled), plus the kernel count of one step of ours."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import common as C
from step_profile import kernels_per_step

MT_BENCH = C.REPO.parent / "shared" / "data" / "mt_bench.jsonl"
HF_METHODS = ("hf", "hf_static", "hf_static_compile")
OUR_KINDS = {"plain": None, "medusa": "medusa", "hydra": "hydra", "hydra++": "hydra++"}
FALLBACK_PROMPTS = (
    "Compose an engaging travel blog post about a recent trip to Hawaii.",
    "Explain how a hash table works and when to use one.",
    "Write a Python function that checks whether a string is a palindrome.",
    "What are the main causes of inflation? Answer in a short paragraph.",
    "Describe the water cycle to a ten-year-old.",
    "Give three tips for writing a clear professional email.",
    "Summarize the plot of Romeo and Juliet in five sentences.",
    "List the planets of the solar system with one fact about each.",
)


# -- model, prompts, heads -------------------------------------------------------------------------------------
def tiny_random_model(device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024)
    base = LlamaForCausalLM(cfg).eval().to(device=device, dtype=dtype)
    base.generation_config.eos_token_id = None  # random weights: every method runs to max_new_tokens
    base.generation_config.pad_token_id = 0
    return base


def load_base(args, device, dtype):
    """(base model, tokenizer or None, model id): --tiny-random's tiny Llama, else --model (default: the default
    model) with its tokenizer."""
    if args.tiny_random:
        return tiny_random_model(device, dtype), None, "tiny-random-llama"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hydra_fast import hub

    path = Path(args.model) if args.model else hub.default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval(), tok, path.name


def prompt_text(row: dict, where: str) -> str:
    """A prompt row's text: MT-Bench's first turn ("turns") or "prompt"."""
    if row.get("turns"):
        return row["turns"][0]
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    raise ValueError(f"{where}: a prompt row needs \"turns\" (a list of strings) or \"prompt\" (a string), got "
                     f"keys {sorted(row)}")


def load_prompts(args, tok, notes: dict) -> tuple[list[tuple[int, torch.Tensor]], dict]:
    """(question_id, input_ids [1, T]) per prompt, through the chat template, and {question_id: category}.

    --tiny-random (no tokenizer): random token ids, or with --prompts the text's bytes as token ids."""
    if tok is None and args.prompts is None:
        g = torch.Generator().manual_seed(1)
        return [(i, torch.randint(3, 256, (1, int(torch.randint(8, 25, (1,), generator=g))), generator=g))
                for i in range(args.num_prompts)], {}
    wanted = Path(args.prompts) if args.prompts else MT_BENCH
    if wanted.exists():
        rows = [json.loads(x) for x in wanted.read_text().splitlines() if x.strip()]
        notes["prompts_file"] = str(wanted)
    elif args.prompts:
        raise SystemExit(f"--prompts {args.prompts}: no such file")
    else:
        notes["prompts"] = f"{wanted} not found: using {len(FALLBACK_PROMPTS)} built-in prompts"
        rows = [dict(question_id=1000 + i, turns=[t]) for i, t in enumerate(FALLBACK_PROMPTS)]
    rows = rows[: args.num_prompts]
    out, categories = [], {}
    for i, r in enumerate(rows):
        qid, text = r.get("question_id", i), prompt_text(r, f"{wanted} line {i + 1}")
        if tok is None:
            ids = torch.tensor([[3 + b % 253 for b in text.encode()]], dtype=torch.long)  # [1, T] byte ids
        else:
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
        out.append((qid, ids))
        if r.get("category") is not None:
            categories[qid] = str(r["category"])
    return out, categories


def resolve_heads(kind: str, base, args, notes: dict):
    """Trained heads from --heads-dir/<kind>, else the shipped ones, else untrained (labelled so)."""
    from hydra_fast.defaults import default_heads_path_or_none, heads_dir_name
    from hydra_fast.heads import DraftHeads

    path = None
    if args.heads_dir and args.heads_dir != "untrained":
        path = Path(args.heads_dir) / heads_dir_name(kind)
    elif args.heads_dir is None and not args.tiny_random:
        path = default_heads_path_or_none(kind)
    if path is not None and (path / "config.json").exists():
        try:
            return DraftHeads.from_pretrained(path, base, draft_vocab=args.draft_vocab), str(path)
        except Exception as e:  # noqa: BLE001 - e.g. heads for another base model: say so, use untrained
            notes[f"heads_{kind}"] = f"{path}: {C.err_str(e)}; using untrained heads"
    elif path is not None:
        notes[f"heads_{kind}"] = f"{path}: no heads there; using untrained heads"
    return DraftHeads.from_base(base, kind), "untrained"


# -- methods -----------------------------------------------------------------------------------------------------
@dataclass
class Run:
    tokens: list
    wall_s: float
    accept_lengths: list | None = None
    step_times: list | None = None


@dataclass
class Method:
    name: str
    family: str  # "hf" or "ours"
    heads: str  # "-", "none", a heads folder or "untrained"
    call: object = None  # ids [1, T] -> Run
    kind: str | None = None
    compile: bool = False
    info: dict = field(default_factory=dict)


def hf_method(name: str, base, args, device, max_cache_len: int) -> Method:
    """HF generate, greedy: dynamic cache; static cache eager; static cache with generate's own torch.compile
    of the decoding forward (mode reduce-overhead, i.e. CUDA graphs, on CUDA). The static cache is made once
    and reset before each call, so its buffers keep their addresses and the compiled step is reused."""
    from transformers import CompileConfig, StaticCache

    gcfg = base.generation_config
    pad = gcfg.pad_token_id if gcfg.pad_token_id is not None else 0
    kw = dict(do_sample=False, pad_token_id=pad)
    info = {}
    cache = None
    if name in ("hf_static", "hf_static_compile"):
        cache = StaticCache(config=base.config, max_cache_len=max_cache_len)
        kw.update(past_key_values=cache)
    if name == "hf_static":
        kw.update(disable_compile=True)
    elif name == "hf_static_compile":
        cc = CompileConfig(mode="reduce-overhead" if device.type == "cuda" else "default")
        if device.type != "cuda":
            cc._compile_all_devices = True  # generate compiles on CPU only when asked to
        kw.update(compile_config=cc)
        info["compile_mode"] = cc.mode

    def call(ids, max_new_tokens=None):
        ids = ids.to(device)
        if cache is not None:
            cache.reset()
        C.sync(device)
        t0 = time.perf_counter()
        out = base.generate(ids, attention_mask=torch.ones_like(ids),
                            max_new_tokens=max_new_tokens or args.max_new_tokens, **kw)
        C.sync(device)
        return Run(out[0, ids.shape[1]:].tolist(), time.perf_counter() - t0)

    return Method(name, "hf", "-", call, info=info)


def our_method(name: str, kind, heads, label: str, base, args, tree, max_cache_len: int, compile: bool) -> Method:
    from hydra_fast.model import HydraModel

    model = HydraModel(base, heads, tree=tree, max_cache_len=max_cache_len, use_kernels=not args.reference_ops,
                       cuda_graph=not args.no_cuda_graph, compile=compile)

    def call(ids, max_new_tokens=None):
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens or args.max_new_tokens, return_dict_in_generate=True,
                             **sampling_kwargs(args))
        dt = time.perf_counter() - t0  # generate reads every step back to the host: the device is done
        return Run(out.sequences[0, ids.shape[1]:].tolist(), dt, out.accept_lengths[0], out.step_times)

    tree_nodes = model.default_tree.num_nodes
    draft_vocab = heads.draft_vocab.size if heads is not None and heads.draft_vocab is not None else 0
    return Method(name, "ours", label, call, kind=kind, compile=compile,
                  info={"model": model, "public": {"tree_nodes": tree_nodes, "draft_vocab": draft_vocab}})


def sampling_kwargs(args) -> dict:
    """generate() arguments of --do-sample (lossless sampling at --temperature, seeded), else greedy."""
    if not getattr(args, "do_sample", False):
        return {}
    return dict(do_sample=True, temperature=args.temperature, generator=torch.Generator().manual_seed(0))


def step_kernels(m: Method, device) -> dict:
    """Kernels (CUDA) or top-level aten ops (CPU) of one eager call of the method's step, compiled or not.
    The engine is left as the warm-up left it; the next generate() starts with a prefill."""
    try:
        model = m.info["model"]
        return kernels_per_step(model._runner.step, device)
    except Exception as e:  # noqa: BLE001 - a count is worth having, not worth the run
        return {"count": "n/a", "error": C.err_str(e)}
