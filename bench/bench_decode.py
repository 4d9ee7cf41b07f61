"""End-to-end decoding benchmark: HF generate baselines, our plain decoding, Medusa, Hydra and Hydra++.

    python bench/bench_decode.py [--model DIR | --tiny-random] [--heads-dir DIR|untrained] [--tree mc_sim_7b_63]
        [--num-prompts 80] [--max-new-tokens 128] [--hf-prompts 5] [--methods hf,hf_static,...] [--compile]
        [--device cuda] [--dtype bfloat16] [--json out/bench_decode.json] [--md ...] [--plot ...]
        [--answers-dir DIR] [--deadline-s 480]

One process, one machine, the same prompts for every method (gpt-fast ``generate.py``, Spec-Bench). The prompt
loop is outermost, so when the deadline stops the run every method has seen the same prompts; HF methods run
on the first ``--hf-prompts`` only (they are slow) and speedups are ratios of medians over the prompts both
methods ran. Warm-up (graph capture, compilation) happens before any timing. Per method: tokens/s (median over
prompts, wall clock incl. prefill), mean accepted length tau (tokens per step), the acceptance histogram, the
step split into draft / verify / accept / host (a separate pass: on CUDA the step as three graphs with events,
``engine.PhasedStepRunner``; on CPU each phase timed eagerly), speedup over each baseline and greedy agreement
with HF. JSON is written after every prompt, so a killed run still leaves its results.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

from hydra_fast.tree_search import grown_tree  # noqa: E402

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
BASELINES = ("hf", "hf_static", "hf_static_compile", "plain", "medusa")
REFERENCES = ("hf", "hf_static", "hf_static_compile")  # greedy agreement is measured against the first that ran


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


def method_tree(tree, label: str, device):
    """The tree a method runs: ``tree`` itself, or for 'auto' its heads folder's tree for this device."""
    from hydra_fast.model import resolve_tree

    return resolve_tree(tree, Path(label) if label not in ("untrained", "none") else None, device)


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
        cand = e.draft()
        t1 = time.perf_counter()
        hidden, logits = e.verify(cand)
        t2 = time.perf_counter()
        result = e.accept(cand, hidden, logits)
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


def load_prompts(args, tok, notes: dict) -> list[tuple[int, torch.Tensor]]:
    """(question_id, input_ids [1, T]) per prompt: MT-Bench first turns through the chat template."""
    if tok is None:  # --tiny-random: random token ids
        g = torch.Generator().manual_seed(1)
        return [(i, torch.randint(3, 256, (1, int(torch.randint(8, 25, (1,), generator=g))), generator=g))
                for i in range(args.num_prompts)]
    found = next((p for p in (Path(args.prompts), C.REPO / "shared" / "data" / "mt_bench.jsonl") if p.exists()), None)
    if found is None:
        notes["prompts"] = f"{args.prompts} not found: using {len(FALLBACK_PROMPTS)} built-in prompts"
        rows = [dict(question_id=1000 + i, turns=[t]) for i, t in enumerate(FALLBACK_PROMPTS)]
    else:
        rows = [json.loads(x) for x in found.read_text().splitlines() if x.strip()]
    rows = rows[: args.num_prompts]
    return [(r.get("question_id", i), tok.apply_chat_template([{"role": "user", "content": r["turns"][0]}],
                                                             add_generation_prompt=True, return_tensors="pt",
                                                             return_dict=True)["input_ids"])
            for i, r in enumerate(rows)]


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
            return DraftHeads.from_pretrained(path, base), str(path)
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
        out = model.generate(ids, max_new_tokens=max_new_tokens or args.max_new_tokens, return_dict_in_generate=True)
        dt = time.perf_counter() - t0  # generate reads every step back to the host: the device is done
        return Run(out.sequences[0, ids.shape[1]:].tolist(), dt, out.accept_lengths[0], out.step_times)

    tree_nodes = model.default_tree.num_nodes if heads is not None else 1
    return Method(name, "ours", label, call, kind=kind, compile=compile,
                  info={"model": model, "public": {"tree_nodes": tree_nodes}})


# -- the step split ------------------------------------------------------------------------------------------
def split_pass(m: Method, heads, base, args, tree, max_cache_len, prompts, device, stop_at: float) -> dict:
    """The step split into draft / verify / accept on a few prompts, and the one-graph step's device time."""
    from hydra_fast import generate as gen
    from hydra_fast.engine import PhasedStepRunner, SamplingConfig, SpeculativeEngine, StepRunner
    from hydra_fast.tree import Tree

    t = Tree.from_choices(tree) if heads is not None else Tree.plain()
    engine = SpeculativeEngine(base, heads, t, 1, max_cache_len, SamplingConfig(), use_kernels=not args.reference_ops)
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


# -- summaries -----------------------------------------------------------------------------------------------
def summarize(m: Method, runs: dict, all_runs: dict, split: dict | None, max_len: int) -> dict:
    from hydra_fast.generate import first_divergence

    mine = runs
    out = dict(family=m.family, heads=m.heads, compile=m.compile, prompts=len(mine), **m.info.get("public", {}))
    if not mine:
        return out
    tok_s = [len(r.tokens) / r.wall_s for r in mine.values()]
    out.update(tok_s=statistics.median(tok_s), tok_s_mean=statistics.mean(tok_s),
               new_tokens=sum(len(r.tokens) for r in mine.values()))
    if m.family == "ours":
        steps = [a for r in mine.values() for a in r.accept_lengths]
        times = [t for r in mine.values() for t in r.step_times]
        hist = [0] * max_len
        for a in steps:
            hist[min(a, max_len) - 1] += 1
        out.update(tau=sum(steps) / max(1, len(steps)), steps=len(steps), accept_hist=hist,
                   step_ms=statistics.median(times) * 1e3 if times else None,
                   decode_tok_s=statistics.median(
                       (len(r.tokens) - 1) / sum(r.step_times) for r in mine.values() if r.step_times))
    else:
        out.update(tau=None, accept_hist=None, step_ms=None)
    if split:
        out["split"] = split
    speed = {}
    for b in BASELINES:
        other = all_runs.get(b)
        if b == m.name or not other:
            continue
        common = sorted(set(mine) & set(other))
        if common:
            num = statistics.median(len(mine[q].tokens) / mine[q].wall_s for q in common)
            den = statistics.median(len(other[q].tokens) / other[q].wall_s for q in common)
            speed[b] = dict(x=num / den, prompts=len(common))
    out["speedup"] = speed
    agree = {}
    ref_name = next((r for r in REFERENCES if all_runs.get(r)), None)
    for label, ref in (("vs_hf", ref_name), ("vs_plain", "plain")):
        if ref is None or ref == m.name or not all_runs.get(ref):
            continue
        common = sorted(set(mine) & set(all_runs[ref]))
        divs = [first_divergence(mine[q].tokens, all_runs[ref][q].tokens) for q in common]
        bad = [d for d in divs if d is not None]
        agree[label] = dict(reference=ref, prompts=len(common), identical=len(divs) - len(bad),
                            identical_share=(len(divs) - len(bad)) / len(divs) if divs else None,
                            mean_first_div=statistics.mean(bad) if bad else None)
    out["agreement"] = agree
    return out


def check_targets(summary: dict, device) -> list[dict]:
    def x(m, b):
        return summary.get(m, {}).get("speedup", {}).get(b, {}).get("x")

    want = ([("hydra++", "plain", 3.0), ("hydra++", "medusa", 1.3), ("hydra++", "hf", 30.0)]
            if device.type == "cuda" else [("hydra++", "hf", 2.0)])
    rows = []
    for m, b, need in want:
        got = x(m, b)
        rows.append(dict(target=f"{m} >= {need}x {b}", measured=got, met=None if got is None else got >= need,
                         short_by=None if got is None or got >= need else need / got))
    return rows


# -- output --------------------------------------------------------------------------------------------------
def _f(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def _verdict(met, short_by=None) -> str:
    if met is None:
        return "not measured"
    return "met" if met else "MISSED" + (f" (short by {short_by:.2f}x)" if short_by else "")


def render_md(report: dict) -> str:
    meta, methods = report["meta"], report["methods"]
    head = (f"## bench_decode: {meta.get('model')} {meta.get('dtype')} on {meta.get('device_name')} "
            f"({meta.get('date')}), tree {meta.get('tree')}, {meta.get('max_new_tokens')} new tokens")
    rows = []
    for name, s in methods.items():
        if "error" in s and not s.get("tok_s"):
            rows.append([name, s.get("heads", "-"), "err: " + s["error"][:60]] + ["-"] * 9)
            continue
        sp = s.get("split") or {}
        split = ("/".join(_f(sp.get(k), "{:.2f}") for k in ("draft_ms", "verify_ms", "accept_ms", "host_ms"))
                 if sp and "skipped" not in sp else "-")
        ag = s.get("agreement", {}).get("vs_hf") or {}
        rows.append([name, s.get("heads", "-"), str(s.get("prompts", 0)), _f(s.get("tok_s")),
                     _f(s.get("tau"), "{:.2f}"),
                     _f(s.get("step_ms"), "{:.2f}"), split,
                     *(C.fmt_x(s.get("speedup", {}).get(b, {}).get("x"), 1.0) for b in ("hf", "hf_static_compile",
                                                                                        "plain")),
                     (f"{ag['identical']}/{ag['prompts']}" if ag else "-"), _f(ag.get("mean_first_div"), "{:.0f}")])
    table = C.md_table(["method", "heads", "n", "tok/s", "tau", "step ms", "draft/verify/accept/host ms", "xHF",
                        "xHF static+compile", "xplain", "=HF", "1st div"], rows)
    hists = [f"- {n}: " + " ".join(f"{i + 1}:{c}" for i, c in enumerate(s["accept_hist"]))
             for n, s in methods.items() if s.get("accept_hist")]
    targets = [f"- {t['target']}: {_f(t['measured'], '{:.2f}x')} " + _verdict(t["met"], t.get("short_by"))
               for t in report.get("targets", [])]
    notes = [f"- {k}: {v}" for k, v in report.get("notes", {}).items()]
    tail = ["", "tok/s: median over prompts of new tokens / wall time (prefill included). tau: tokens per step.",
            "Split: a separate pass on a few prompts; draft/verify/accept = device ms per phase (three graphs),",
            "host = step wall (replay + read-back + bookkeeping) - step device time (one graph), same pass."]
    if report.get("stopped_early"):
        tail.append(f"Stopped early: {report['stopped_early']}")
    return "\n".join([head, "", table, "", "Acceptance histogram (tokens per step: count):", *hists, "",
                      "Targets:", *targets, *(["", "Notes:", *notes] if notes else []), *tail]) + "\n"


def write_plot(report: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return f"no plot: {C.err_str(e)}"
    items = [(n, s) for n, s in report["methods"].items() if s.get("tok_s")]
    if not items:
        return "no plot: no method has results"
    fig, ax = plt.subplots(figsize=(1.2 * len(items) + 3, 4.5))
    colors = ["#999999" if s["family"] == "hf" else "#1f77b4" for _, s in items]
    bars = ax.bar([n for n, _ in items], [s["tok_s"] for _, s in items], color=colors)
    for bar, (_, s) in zip(bars, items):
        label = f"{s['tok_s']:.0f}" + (f"\ntau {s['tau']:.2f}" if s.get("tau") else "")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (median over prompts, log scale)")
    meta = report["meta"]
    ax.set_title(f"{meta.get('model')} {meta.get('dtype')} on {meta.get('device_name')}, tree {meta.get('tree')}",
                 fontsize=9)
    plt.xticks(rotation=20, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_answers(directory: Path, model_id: str, methods: dict, runs: dict, tok) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, by_q in runs.items():
        with open(directory / f"{model_id}-{name.replace('+', 'p')}.jsonl", "w") as f:
            for qid, r in by_q.items():
                text = (tok.decode(r.tokens, skip_special_tokens=True) if tok is not None
                        else " ".join(map(str, r.tokens)))
                acc = r.accept_lengths if r.accept_lengths is not None else [1] * len(r.tokens)
                f.write(json.dumps(dict(question_id=qid, answer_id=f"{name}-{qid}", model_id=f"{model_id}-{name}",
                                        choices=[dict(index=0, turns=[text], decoding_steps=[len(acc)],
                                                      new_tokens=[len(r.tokens)], wall_time=[r.wall_s],
                                                      accept_lengths=[acc])],
                                        tstamp=time.time())) + "\n")


# -- main ----------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model folder (default: hydra_fast.hub.default_model_path())")
    ap.add_argument("--tiny-random", action="store_true", help="a tiny random Llama and random prompts (no files)")
    ap.add_argument("--heads-dir", default=None, help="folder with medusa/ hydra/ hydra_pp/ heads, or 'untrained' "
                    "(default: the shipped heads when present, else untrained heads)")
    ap.add_argument("--tree", default="mc_sim_7b_63", help="tree preset, greedy:N, a JSON list of rank lists, a tree "
                    "file, or auto (each heads folder's tree_<device>.json, else mc_sim_7b_63)")
    ap.add_argument("--prompts", default=str(MT_BENCH), help="jsonl with question_id and turns (first turn used)")
    ap.add_argument("--num-prompts", type=int, default=80)
    ap.add_argument("--hf-prompts", type=int, default=5, help="prompts on which the HF methods run (they are slow)")
    ap.add_argument("--split-prompts", type=int, default=3, help="prompts of the step-split pass per method")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--methods", default="hf,hf_static,hf_static_compile,plain,medusa,hydra,hydra++")
    ap.add_argument("--compile", action="store_true", help="add torch.compile variants of --compile-methods")
    ap.add_argument("--compile-methods", default="plain,hydra++")
    ap.add_argument("--hf-compile", choices=["auto", "on", "off"], default="auto",
                    help="run hf_static_compile (auto: on CUDA only; compiling on 2 CPU cores takes minutes)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--reference-ops", action="store_true", help="pure-PyTorch ops instead of the kernels")
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

    tok = None
    report_notes: dict[str, str] = {}
    if args.tiny_random:
        base, model_id = tiny_random_model(device, dtype), "tiny-random-llama"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from hydra_fast import hub

        path = Path(args.model) if args.model else hub.default_model_path()
        tok = AutoTokenizer.from_pretrained(path)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        model_id = path.name
    prompts = load_prompts(args, tok, report_notes)
    from hydra_fast.tree import Tree

    sized = "mc_sim_7b_63" if tree == "auto" else tree  # auto trees come from calibration: at most 64 nodes, depth 5
    tree_nodes = Tree.from_choices(sized).num_nodes
    max_len = max(Tree.from_choices(sized).max_depth + 1, 6 if tree == "auto" else 0)
    longest = max(ids.shape[1] for _, ids in prompts)
    max_cache_len = (longest + args.max_new_tokens + tree_nodes + 8 + 63) // 64 * 64

    meta = C.run_metadata(device, hydra_fast)
    meta.update(model=model_id, dtype=str(dtype).removeprefix("torch."), tree=args.tree, tree_nodes=tree_nodes,
                max_new_tokens=args.max_new_tokens, num_prompts=len(prompts), hf_prompts=args.hf_prompts,
                max_cache_len=max_cache_len)
    report = dict(meta=meta, methods={}, per_prompt={}, targets=[], notes=report_notes, stopped_early=None)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    if args.compile:
        names += [f"{n.strip()}_compile" for n in args.compile_methods.split(",") if n.strip() in OUR_KINDS]
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
                report["methods"][name] = summarize(methods[name], runs.get(name, {}), runs, splits.get(name), max_len)
            if name in errors:
                report["methods"].setdefault(name, dict(heads="-", prompts=0))["error"] = errors[name]
            if name in methods:
                report["per_prompt"][name] = [
                    dict(question_id=q, new_tokens=len(r.tokens), wall_s=r.wall_s, tok_s=len(r.tokens) / r.wall_s,
                         tau=(sum(r.accept_lengths) / len(r.accept_lengths)) if r.accept_lengths else None)
                    for q, r in runs.get(name, {}).items()]
        report["targets"] = check_targets(report["methods"], device)
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
                    key = name.removesuffix("_compile")
                    if key not in OUR_KINDS:
                        raise ValueError(f"unknown method {name!r}")
                    kind = OUR_KINDS[key]
                    if kind is not None and kind not in heads_cache:
                        heads_cache[kind] = resolve_heads(kind, base, args, report["notes"])
                    heads, label = heads_cache[kind] if kind else (None, "none")
                    m = our_method(name, kind, heads, label, base, args, method_tree(tree, label, device),
                                   max_cache_len, name.endswith("_compile"))
                methods[name] = m
                for _ in range(2 if name == "hf_static_compile" else 1):  # cudagraph trees record on the 2nd call
                    m.call(prompts[0][1], min(16, args.max_new_tokens))
                m.info["public"] = dict(m.info.get("public", {}), warmup_s=time.perf_counter() - t0)
                if name == "hf_static_compile":
                    m.info["public"]["compiled"] = hasattr(base, "_compiled_call")
                    m.info["public"]["compile_mode"] = m.info.get("compile_mode")
                log(f"warm-up {name}: {time.perf_counter() - t0:.1f}s")
                C.sync(device)
            except Exception as e:  # noqa: BLE001 - record and go on with the other methods
                errors[name] = C.err_str(e)
                log(f"warm-up {name} FAILED: {errors[name]}")
        live = [n for n in names if n in methods and n not in errors]
        for i, (qid, ids) in enumerate(prompts):
            if time.perf_counter() > stop_main:
                raise Deadline(f"main loop stopped after {i} of {len(prompts)} prompts (--deadline-s)")
            row = {}  # committed once every method has run this prompt: an interrupted prompt counts for none
            for name in live:
                if name in errors or (methods[name].family == "hf" and i >= args.hf_prompts):
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
                splits[name] = split_pass(m, heads, base, args, method_tree(tree, m.heads, device), max_cache_len,
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
