"""End-to-end decoding benchmark: HF generate baselines, our plain decoding, Medusa, Hydra and Hydra++.

    python bench/bench_decode.py [--model DIR | --tiny-random] [--heads-dir DIR|untrained] [--tree mc_sim_7b_63]
        [--prompts FILE] [--num-prompts 80] [--max-new-tokens 128] [--hf-prompts N]
        [--methods hf,hf_static,... | --method NAME ...] [--compile] [--device cuda] [--dtype bfloat16]
        [--json out/bench_decode.json] [--md ...] [--plot ...] [--answers-dir DIR] [--deadline-s 480]
        [--context-draft M [--context-methods plain,hydra++]] [--dynamic-methods hydra++ [--dynamic-tree SPEC]]

One process, one machine, the same prompts for every method (gpt-fast ``generate.py``, Spec-Bench). The prompt loop
is outermost, so when the deadline stops the run every method has seen the same prompts; HF methods run on every
prompt unless ``--hf-prompts`` limits them, and speedups are ratios of medians over the prompts both methods ran
(marked where they cover fewer prompts). The headline is each method over our plain decoding in the same mode
(``plain_compile`` for compiled methods; ``--compile`` always adds it). Prompt files are JSONL with "turns"
(MT-Bench; the first turn is used) or "prompt", and optionally "category": tok/s and tau are then also reported per
category and as the mean over categories. Warm-up (graph capture, compilation) happens before any timing. Per
method: tokens/s (median over prompts, wall clock incl. prefill), mean accepted length tau (tokens per step), the
acceptance histogram, the step split into draft / verify / accept / host (a separate pass: on CUDA the step as
three graphs with events, ``engine.PhasedStepRunner``; on CPU each phase timed eagerly), speedup over each
baseline, kernels per step (``step_profile.py``) and greedy agreement with HF. JSON is written after every prompt,
so a killed run still leaves its results.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
from decode_methods import (HF_METHODS, OUR_KINDS, Method, hf_method, load_base, load_prompts,  # noqa: E402
                            our_method, resolve_heads, step_kernels)
from decode_report import check_targets, render_md, summarize, write_answers, write_plot  # noqa: E402

from hydra_fast.tree_search import grown_tree  # noqa: E402

class Deadline(Exception):
    pass


# -- trees and the eager phase timer (bench_step.py uses these too) -------------------------------------------
greedy_tree = grown_tree  # bench_step.py and the tests import it from here


def parse_tree(spec: str):
    """A preset name, 'greedy:N' (N nodes incl. the root), a JSON list of rank lists, a tree file, or 'auto'
    (left for ``method_tree``: each heads folder's tree_<device>.json)."""
    from hydra_fast.tree_search import load_tree

    if spec.startswith("greedy:"):
        return greedy_tree(int(spec.split(":", 1)[1]))
    if spec.lstrip().startswith("["):
        return json.loads(spec)
    if spec.endswith(".json"):
        return load_tree(spec)
    return spec


def method_tree(tree, label: str, device, context_draft: int = 0):
    """The tree a method runs: ``tree`` itself, or for 'auto' its heads folder's tree for this device; with a
    context chain of ``context_draft`` nodes (the ``_ctx`` methods) and none otherwise, even where a tree file
    asks for one (so ``hydra++`` and ``hydra++_ctx`` differ by the chain alone)."""
    from hydra_fast.model import resolve_tree
    from hydra_fast.tree import Tree

    resolved = resolve_tree(tree, Path(label) if label not in ("untrained", "none") else None, device)
    return Tree.from_choices(resolved, context_len=context_draft)


def context_len(name: str, args) -> int:
    """The context chain length of a method: --context-draft for the ``_ctx`` variants, else 0."""
    return args.context_draft if name.endswith("_ctx") else 0


class EagerPhasedRunner:
    """CPU stand-in for engine.PhasedStepRunner: the step's three phases run eagerly, each host-timed
    (the CPU computes synchronously, so the host clock is the device clock). ``last_split_ms`` as there."""

    def __init__(self, engine):
        self.engine = engine
        self.last_split_ms: dict[str, float] = {}

    @torch.no_grad()
    def __call__(self):
        e = self.engine
        t0 = time.perf_counter()
        cand, tree = e.draft()
        t1 = time.perf_counter()
        hidden, logits = e.verify(cand, tree)
        t2 = time.perf_counter()
        result = e.accept(cand, hidden, logits, tree)
        t3 = time.perf_counter()
        self.last_split_ms = dict(draft=(t1 - t0) * 1e3, verify=(t2 - t1) * 1e3, accept=(t3 - t2) * 1e3)
        return result


class EventTimed:
    """Wraps a step runner; records each call's device time with CUDA events (host clock on CPU)."""

    def __init__(self, runner, device):
        self.runner, self.device, self.ms = runner, device, []

    def __call__(self):
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            out = self.runner()
            self.ms.append((time.perf_counter() - t0) * 1e3)
            return out
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        out = self.runner()
        e.record()
        e.synchronize()
        self.ms.append(s.elapsed_time(e))
        return out


class SplitRecorder:
    def __init__(self, phased):
        self.phased, self.splits = phased, []

    def __call__(self):
        out = self.phased()
        self.splits.append(dict(self.phased.last_split_ms))
        return out


# -- the step split ------------------------------------------------------------------------------------------
def split_pass(m: Method, heads, base, args, tree, max_cache_len, prompts, device, stop_at: float) -> dict:
    """The step split into draft / verify / accept on a few prompts, and the one-graph step's device time."""
    from hydra_fast import generate as gen
    from hydra_fast.engine import PhasedStepRunner, SamplingConfig, SpeculativeEngine, StepRunner
    from hydra_fast.model import tree_for
    from hydra_fast.tree import Tree

    t = tree_for(Tree.from_choices(tree), heads is not None)
    sampling = SamplingConfig(do_sample=True, temperature=args.temperature) if args.do_sample else SamplingConfig()
    model = m.info.get("model")
    fused = model._fused_decoder() if model is not None else None  # the method's own base forward (fast or HF)
    engine = SpeculativeEngine(base, heads, t, 1, max_cache_len, sampling, use_kernels=not args.reference_ops,
                               fused=fused)
    cuda = device.type == "cuda"
    one = EventTimed(StepRunner(engine, cuda_graph=cuda and not args.no_cuda_graph), device)
    phased = SplitRecorder(PhasedStepRunner(engine) if cuda else EagerPhasedRunner(engine))
    gcfg = base.generation_config
    eos = gcfg.eos_token_id
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    walls = {id(one): [], id(phased): []}
    done = 0
    for _, ids in prompts[: args.split_prompts]:
        if time.perf_counter() > stop_at:
            break
        for runner in (one, phased):
            p = gen.prepare_prompts(ids, None, base.get_input_embeddings().weight.shape[0])
            sink = gen.TokenSink(p, args.max_new_tokens, eos, None, None)
            walls[id(runner)] += gen.run(engine, runner, p, sink)
        done += 1
    if not phased.splits or not one.ms:
        return {"skipped": "deadline"}
    med = {k: statistics.median(s[k] for s in phased.splits) for k in ("draft", "verify", "accept")}
    step_dev = statistics.median(one.ms)
    step_wall = statistics.median(walls[id(one)]) * 1e3
    return dict(draft_ms=med["draft"], verify_ms=med["verify"], accept_ms=med["accept"],
                phased_device_ms=sum(med.values()), phased_wall_ms=statistics.median(walls[id(phased)]) * 1e3,
                step_device_ms=step_dev, step_wall_ms=step_wall, host_ms=max(0.0, step_wall - step_dev),
                steps=len(phased.splits), prompts=done,
                how=("phases: three CUDA graphs + events (PhasedStepRunner); step: one graph, events"
                     if cuda else "phases: eager, host clock; step: eager, host clock"))


# -- main ----------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model folder (default: hydra_fast.hub.default_model_path())")
    ap.add_argument("--tiny-random", action="store_true", help="a tiny random Llama and random prompts (no files)")
    ap.add_argument("--heads-dir", default=None, help="folder with medusa/ hydra/ hydra_pp/ heads, or 'untrained' "
                    "(default: the shipped heads when present, else untrained heads)")
    ap.add_argument("--tree", default="mc_sim_7b_63", help="tree preset, greedy:N, a JSON list of rank lists, a tree "
                    "file, or auto (each heads folder's tree_<device>.json, else mc_sim_7b_63)")
    ap.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                    help="trained heads draft from their N most frequent tokens (draft_vocab.safetensors; 0: full "
                         "vocabulary; default: each heads config's draft_vocab_size)")
    ap.add_argument("--prompts", default=None, help="jsonl rows with \"turns\" (first turn used) or \"prompt\", "
                    "optional \"category\" and \"question_id\" (default: MT-Bench when present; --tiny-random: "
                    "random ids)")
    ap.add_argument("--num-prompts", type=int, default=80)
    ap.add_argument("--hf-prompts", type=int, default=None,
                    help="run the HF methods on the first N prompts only (default: all; ratios say how many)")
    ap.add_argument("--split-prompts", type=int, default=3, help="prompts of the step-split pass per method")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--methods", default="hf,hf_static,hf_static_compile,plain,medusa,hydra,hydra++")
    ap.add_argument("--method", action="append", default=None, metavar="NAME",
                    help="a method to run (repeatable; replaces --methods): " + ", ".join(HF_METHODS + tuple(OUR_KINDS))
                    + ", or one of ours with _compile")
    ap.add_argument("--compile", action="store_true", help="add torch.compile variants of --compile-methods (and "
                    "always plain_compile, the baseline of compiled methods)")
    ap.add_argument("--compile-methods", default="plain,medusa,hydra++")
    ap.add_argument("--context-draft", type=int, default=0, metavar="M",
                    help="M > 0: add <method>_ctx variants of --context-methods, their trees with a context chain of "
                    "M nodes (tokens found in the prompt and the text so far; plain_ctx is prompt-lookup decoding)")
    ap.add_argument("--context-methods", default="plain,hydra++",
                    help="methods that get a _ctx variant (a _dyn method too, e.g. hydra++_dyn)")
    ap.add_argument("--dynamic-methods", default="", metavar="KINDS",
                    help="add <kind>_dyn variants of these head kinds (e.g. medusa,hydra,hydra++), decoding with the "
                         "dynamic tree --dynamic-tree instead of --tree")
    ap.add_argument("--dynamic-tree", default="dynamic", metavar="SPEC",
                    help="the _dyn methods' tree: 'dynamic' or 'dynamic:nodes=63,depth=4,topk=8,width=8'")
    ap.add_argument("--hf-compile", choices=["auto", "on", "off"], default="auto",
                    help="run hf_static_compile (auto: on CUDA only; compiling on 2 CPU cores takes minutes)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--reference-ops", action="store_true", help="pure-PyTorch ops instead of the kernels")
    ap.add_argument("--do-sample", action="store_true", help="our methods sample (lossless acceptance) at "
                    "--temperature instead of decoding greedily; the HF methods stay greedy")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of --do-sample")
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", type=Path, default=C.REPO / "out" / "bench_decode.json")
    ap.add_argument("--md", type=Path, default=None, help="default: --json with .md")
    ap.add_argument("--plot", type=Path, default=None, help="default: --json with .png")
    ap.add_argument("--answers-dir", type=Path, default=None, help="write Spec-Bench-style answer files here")
    ap.add_argument("--deadline-s", type=float, default=480.0, help="stop timing and write results by then")
    ap.add_argument("--split-reserve-s", type=float, default=None,
                    help="seconds kept for the split pass (default: 12%% of --deadline-s)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    deadline = t_start + args.deadline_s
    hydra_fast, device, dtype = C.setup_run(args)
    args.md = args.md or args.json.with_suffix(".md")
    args.plot = args.plot or args.json.with_suffix(".png")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tree = parse_tree(args.tree)

    report_notes: dict[str, str] = {}
    base, tok, model_id = load_base(args, device, dtype)
    prompts, categories = load_prompts(args, tok, report_notes)
    hf_prompts = len(prompts) if args.hf_prompts is None else args.hf_prompts
    from hydra_fast.tree import Tree

    sized = "mc_sim_7b_63" if tree == "auto" else tree  # auto trees come from calibration: at most 64 nodes, depth 5
    trees = [Tree.from_choices(sized)]
    if args.dynamic_methods:
        trees.append(Tree.from_choices(args.dynamic_tree))
    tree_nodes = max(t.num_nodes for t in trees)
    max_len = max(max(t.max_depth for t in trees) + 1, 6 if tree == "auto" else 0, args.context_draft + 1)
    longest = max(ids.shape[1] for _, ids in prompts)
    max_cache_len = (longest + args.max_new_tokens + tree_nodes + args.context_draft + 8 + 63) // 64 * 64

    meta = C.run_metadata(device, hydra_fast)
    meta.update(model=model_id, dtype=str(dtype).removeprefix("torch."), tree=args.tree, tree_nodes=tree_nodes,
                dynamic_tree=args.dynamic_tree if args.dynamic_methods else None,
                max_new_tokens=args.max_new_tokens, num_prompts=len(prompts), hf_prompts=hf_prompts,
                max_cache_len=max_cache_len, context_draft=args.context_draft, prompts_file=report_notes.get("prompts_file"),
                categories=sorted(set(categories.values())), do_sample=args.do_sample,
                temperature=args.temperature if args.do_sample else None)
    report = dict(meta=meta, methods={}, per_prompt={}, targets=[], notes=report_notes, stopped_early=None)
    names = [n.strip() for n in (args.method or args.methods.split(",")) if n.strip()]
    if args.compile:
        names += [f"{n.strip()}_compile" for n in args.compile_methods.split(",") if n.strip() in OUR_KINDS]
    names += [f"{n.strip()}_dyn" for n in args.dynamic_methods.split(",") if n.strip() in OUR_KINDS]
    if args.context_draft:
        names += [f"{n.strip()}_ctx" for n in args.context_methods.split(",")
                  if n.strip().removesuffix("_dyn") in OUR_KINDS]
    if any(n.endswith("_compile") and n not in HF_METHODS for n in names) and "plain_compile" not in names:
        names.append("plain_compile")  # a compiled method's speed-up is over compiled plain decoding
    names = list(dict.fromkeys(names))
    hf_compile = args.hf_compile == "on" or (args.hf_compile == "auto" and device.type == "cuda")
    if "hf_static_compile" in names and not hf_compile:
        names.remove("hf_static_compile")
        report["notes"]["hf_static_compile"] = f"skipped on {device.type} (--hf-compile on to run it)"

    order = list(names)  # report order; run order: ours first, HF after, the compiled HF last
    names.sort(key=lambda n: (n in HF_METHODS, n == "hf_static_compile"))
    methods: dict[str, Method] = {}
    errors: dict[str, str] = {}
    runs: dict[str, dict] = {}
    splits: dict[str, dict] = {}
    heads_cache: dict[str, tuple] = {}

    def write(final: bool = False) -> None:
        for name in order:
            if name in methods:
                report["methods"][name] = summarize(methods[name], runs.get(name, {}), runs, splits.get(name), max_len,
                                                    categories)
            if name in errors:
                report["methods"].setdefault(name, dict(heads="-", prompts=0))["error"] = errors[name]
            if name in methods:
                report["per_prompt"][name] = [
                    dict(question_id=q, new_tokens=len(r.tokens), wall_s=r.wall_s, tok_s=len(r.tokens) / r.wall_s,
                         tau=(sum(r.accept_lengths) / len(r.accept_lengths)) if r.accept_lengths else None)
                    for q, r in runs.get(name, {}).items()]
        report["targets"] = check_targets(report["methods"], device, same_tree=args.tree != "auto")
        meta["elapsed_s"] = time.perf_counter() - t_start
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str))
        tmp.replace(args.json)
        if final:
            for what, fn in (("md", lambda: args.md.write_text(render_md(report))),
                             ("plot", lambda: write_plot(report, args.plot)),
                             ("answers", lambda: args.answers_dir and write_answers(args.answers_dir, model_id,
                                                                                      methods, runs, tok))):
                try:
                    problem = fn()
                    if isinstance(problem, str):
                        report["notes"][what] = problem
                        print(problem, file=sys.stderr)
                except Exception as e:  # noqa: BLE001 - the JSON is what matters
                    report["notes"][what] = f"failed: {C.err_str(e)}"
            if args.md.exists():
                print(args.md.read_text(), flush=True)
            args.json.write_text(json.dumps(report, indent=1, default=str))

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    reserve = args.split_reserve_s if args.split_reserve_s is not None else 0.12 * args.deadline_s
    stop_main = deadline - reserve
    try:
        # build and warm up every method (graph capture, compilation) before any timing
        for name in names:
            if time.perf_counter() > stop_main:
                errors[name] = "skipped: deadline before warm-up"
                continue
            t0 = time.perf_counter()
            try:
                if name in HF_METHODS:
                    m = hf_method(name, base, args, device, max_cache_len)
                else:
                    key = name.removesuffix("_compile").removesuffix("_ctx").removesuffix("_dyn")
                    if key not in OUR_KINDS:
                        raise ValueError(f"unknown method {name!r}")
                    kind = OUR_KINDS[key]
                    if kind is not None and kind not in heads_cache:
                        heads_cache[kind] = resolve_heads(kind, base, args, report["notes"])
                    heads, label = heads_cache[kind] if kind else (None, "none")
                    own_tree = args.dynamic_tree if "_dyn" in name else tree
                    m = our_method(name, kind, heads, label, base, args,
                                   method_tree(own_tree, label, device, context_len(name, args)),
                                   max_cache_len, name.endswith("_compile"))
                methods[name] = m
                for _ in range(2 if name == "hf_static_compile" else 1):  # cudagraph trees record on the 2nd call
                    m.call(prompts[0][1], min(16, args.max_new_tokens))
                if m.family == "ours" and device.type == "cuda":  # capture each prompt length's prefill graph
                    for _, ids in prompts:
                        m.call(ids, 1)
                m.info["public"] = dict(m.info.get("public", {}), warmup_s=time.perf_counter() - t0)
                if name == "hf_static_compile":
                    m.info["public"]["compiled"] = hasattr(base, "_compiled_call")
                    m.info["public"]["compile_mode"] = m.info.get("compile_mode")
                log(f"warm-up {name}: {time.perf_counter() - t0:.1f}s")
                C.sync(device)
                if m.family == "ours":
                    m.info["public"]["kernels_per_step"] = step_kernels(m, device)
            except Exception as e:  # noqa: BLE001 - record and go on with the other methods
                errors[name] = C.err_str(e)
                log(f"warm-up {name} FAILED: {errors[name]}")
        live = [n for n in names if n in methods and n not in errors]
        for i, (qid, ids) in enumerate(prompts):
            if time.perf_counter() > stop_main:
                raise Deadline(f"main loop stopped after {i} of {len(prompts)} prompts (--deadline-s)")
            row = {}  # committed once every method has run this prompt: an interrupted prompt counts for none
            for name in live:
                if name in errors or (methods[name].family == "hf" and i >= hf_prompts):
                    continue
                try:
                    row[name] = methods[name].call(ids)
                except Exception as e:  # noqa: BLE001
                    errors[name] = f"prompt {qid}: {C.err_str(e)}"
                    log(f"{name} FAILED on prompt {qid}: {errors[name]}")
            for name, r in row.items():
                runs.setdefault(name, {})[qid] = r
            log(f"prompt {i + 1}/{len(prompts)} (q{qid}, {ids.shape[1]} tokens): " + ", ".join(
                f"{n} {len(runs[n][qid].tokens) / runs[n][qid].wall_s:.1f}" for n in live if qid in runs.get(n, {})))
            write()
    except Deadline as e:
        report["stopped_early"] = str(e)
        log(str(e))
    except (KeyboardInterrupt, SystemExit) as e:
        report["stopped_early"] = f"interrupted: {e!r}"
        write(final=True)
        return 1
    except Exception as e:  # noqa: BLE001 - e.g. a dead CUDA context: keep what was measured
        report["fatal"] = C.err_str(e)
        log(f"FATAL: {report['fatal']}")
        write(final=True)
        return 1
    try:
        for name in [n for n in names if n in methods and n not in errors and methods[n].family == "ours"
                     and not methods[n].compile]:
            if time.perf_counter() > deadline:
                report["notes"]["split"] = "deadline: split pass incomplete"
                break
            try:
                m = methods[name]
                heads = heads_cache[m.kind][0] if m.kind else None
                m.call = None  # free this method's engine and graph first
                m.info.pop("model", None)
                gc.collect()
                splits[name] = split_pass(m, heads, base, args, method_tree(tree, m.heads, device, context_len(name, args)), max_cache_len,
                                          prompts, device, deadline)
                log(f"split {name}: {splits[name]}")
            except Exception as e:  # noqa: BLE001
                splits[name] = {"error": C.err_str(e)}
                log(f"split {name} FAILED: {splits[name]['error']}")
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    except (KeyboardInterrupt, SystemExit) as e:
        report["stopped_early"] = f"interrupted: {e!r}"
    finally:
        write(final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
