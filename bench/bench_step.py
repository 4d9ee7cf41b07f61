"""Decoding-step benchmark on random-weight Llama-2-7B- and Llama-3-8B-shaped models (bf16, CUDA).

    python bench/bench_step.py [--models llama2-7b,llama3-8b] [--layers N] [--sizes 1,2,4,...,128]
        [--prompt-len 512] [--json out/bench_step.json] [--md ...] [--deadline-s 230] [--compile]
        [--tau-json bench_decode.json [--tau-method hydra++] | --tau T --tau-source TEXT]
    python bench/bench_step.py --device cpu --tiny          # the same code on a tiny config, for testing

(a) The plain decoding step (our engine without heads, one CUDA graph replayed) with a ~512-token context,
    against the weight-bytes floor: bytes the step must stream (every parameter except the input embedding,
    of which it reads one row) over the device-to-device copy bandwidth measured in the same run (common.py).
(b) The speculative step with untrained Hydra++ heads against tree size: trees of N nodes (root included)
    grown greedily (bench_decode.greedy_tree) plus Medusa's released mc_sim_7b_63 (64 nodes). For each: the
    one-graph step and the step as three graphs (engine.PhasedStepRunner: draft / verify / accept), the ratio
    to the plain step (target: 64 nodes <= 1.2x), and tokens/s PROJECTED at a measured tau: tau / step time,
    with tau from a bench_decode JSON (--tau-json: its method's tau and the prompts it was measured on) or
    given with its source (--tau, --tau-source); without one there is no projection. Times are medians of graph
    replays measured with CUDA events ("device") and of replay + read-back measured with the host clock
    ("wall"), never generate(). Each step also reports its kernels (step_profile.py: CUDA kernels of one eager
    step; on the CPU top-level aten ops).
Models are built on the meta device and materialised with to_empty + normal_ (seconds, not minutes), and
freed before the next one. The context stays near --prompt-len: the cache length is reset every few steps.
JSON is written after every measurement, so a killed run still leaves its results.
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
from bench_decode import EagerPhasedRunner, greedy_tree  # noqa: E402
from step_profile import kernels_per_step  # noqa: E402
from step_report import render_md  # noqa: E402

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=2048, rope_theta=10000.0),
}
SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
RESET_EVERY = 8  # steps between resets of the cache length to the prompt length


class Deadline(Exception):
    pass


# -- model ---------------------------------------------------------------------------------------------------
def build_model(shape: str, layers: int | None, device, dtype, seed: int = 0):
    """A random-weight LlamaForCausalLM: built on meta, materialised with to_empty, weights ~ N(0, 0.02)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    spec = dict(SHAPES[shape])
    if layers:
        spec["num_hidden_layers"] = layers
    cfg = LlamaConfig(**spec, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    # non-persistent buffers (rotary inv_freq) are garbage after to_empty: rebuild the module on the device
    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg).to(device)
    model.config.dtype = dtype
    return model.eval()


def param_bytes(module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def model_bytes(model) -> dict:
    """What one decoding step must read: every weight but the input embedding (one row of it is read)."""
    total = param_bytes(model)
    emb = model.get_input_embeddings().weight
    tied = emb.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    streamed = total if tied else total - emb.numel() * emb.element_size()
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * emb.element_size()
    n_params = sum(p.numel() for p in model.parameters())
    matmul_params = n_params - (0 if tied else emb.numel())  # per token: 2 flops per weight of the matmuls
    return dict(params=n_params, param_bytes=total, streamed_bytes=streamed, kv_bytes_per_token=kv_per_token,
                matmul_params=matmul_params)


def make_heads(base, device):
    """Untrained Hydra++ heads, built directly on the device (a 7B model's heads are ~0.9 B parameters)."""
    from hydra_fast.heads import DraftHeads

    try:
        with torch.device(device):
            return DraftHeads.from_base(base, "hydra++")
    except Exception:  # noqa: BLE001 - the plain way is slower but always works
        return DraftHeads.from_base(base, "hydra++")


# -- timing --------------------------------------------------------------------------------------------------
def time_steps(runner, engine, prompt_len: int, device, budget_s: float, min_reps: int, max_reps: int) -> dict:
    """Median device time per step (CUDA events around each replay, or the host clock on CPU) and median wall
    time per step with the result read back to the host, as generate() does. The cache length is reset to
    prompt_len every RESET_EVERY steps, so the context stays near prompt_len."""
    lens = engine.cache.lens
    splits = []
    for _ in range(3):
        runner()
    C.sync(device)
    t0 = time.perf_counter()
    runner()
    C.sync(device)
    est = max(time.perf_counter() - t0, 1e-5)
    reps = int(max(min_reps, min(max_reps, budget_s / 2 / est)))
    dev_ms = []
    if device.type == "cuda" and not hasattr(runner, "last_split_ms"):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if i % RESET_EVERY == 0:
                lens.fill_(prompt_len)
            starts[i].record()
            runner()
            ends[i].record()
        C.sync(device)
        dev_ms = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    wall_ms = []
    for i in range(reps):
        if i % RESET_EVERY == 0:
            lens.fill_(prompt_len)
        C.sync(device)
        t0 = time.perf_counter()
        out = runner()
        out.cpu()
        wall_ms.append((time.perf_counter() - t0) * 1e3)
        if hasattr(runner, "last_split_ms"):
            splits.append(dict(runner.last_split_ms))
    res = dict(reps=reps, wall_ms=statistics.median(wall_ms))
    if splits:
        for k in ("draft", "verify", "accept"):
            res[f"{k}_ms"] = statistics.median(s[k] for s in splits)
        res["phased_sum_ms"] = res["draft_ms"] + res["verify_ms"] + res["accept_ms"]
    else:
        res["device_ms"] = statistics.median(dev_ms) if dev_ms else res["wall_ms"]
        res["device_p10_ms"] = sorted(dev_ms)[len(dev_ms) // 10] if dev_ms else None
    return res


def measure_engine(base, heads, tree, prompt, device, args, compile_step: bool = False, fused=None) -> dict:
    """Prefill the prompt, then time the one-graph step and (uncompiled) the phased step. ``fused``: the base's
    layers as fused ops (``fastpath.FusedDecoder``), or None for the HF modules."""
    from hydra_fast.engine import PhasedStepRunner, SamplingConfig, SpeculativeEngine, StepRunner

    cuda = device.type == "cuda"
    T = prompt.shape[1]
    capacity = (T + tree.num_nodes + RESET_EVERY * (tree.max_depth + 1) + 64 + 63) // 64 * 64
    engine = SpeculativeEngine(base, heads, tree, 1, capacity, SamplingConfig(), use_kernels=not args.reference_ops,
                               fused=fused)
    lengths = torch.tensor([T])
    out = dict(nodes=tree.num_nodes, depth=tree.max_depth)
    t0 = time.perf_counter()
    one = StepRunner(engine, cuda_graph=cuda, compile=compile_step)
    engine.prefill(prompt, lengths)
    out["capture_s"] = time.perf_counter() - t0
    out.update(time_steps(one, engine, T, device, args.budget_s, args.min_reps, args.max_reps))
    out["kernels_per_step"] = kernels_per_step(one.step, device)
    del one
    if not compile_step:
        try:
            phased = PhasedStepRunner(engine) if cuda else EagerPhasedRunner(engine)
            engine.prefill(prompt, lengths)
            split = time_steps(phased, engine, T, device, args.budget_s, args.min_reps, args.max_reps)
            out.update({k: split[k] for k in ("draft_ms", "verify_ms", "accept_ms", "phased_sum_ms")},
                       phased_wall_ms=split["wall_ms"])
            out["host_ms"] = max(0.0, out["wall_ms"] - out["device_ms"])
        except Exception as e:  # noqa: BLE001
            out["phased_error"] = C.err_str(e)
    return out


# -- main ----------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="comma list of " + ", ".join(SHAPES) + " (default: the two 7B/8B)")
    ap.add_argument("--tiny", action="store_true", help="the tiny config only (for --device cpu testing)")
    ap.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="tree sizes in nodes, root included")
    ap.add_argument("--no-mc-sim", action="store_true", help="skip the mc_sim_7b_63 tree")
    ap.add_argument("--prompt-len", type=int, default=None, help="context tokens (default 512; 64 with --tiny)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--budget-s", type=float, default=0.8, help="timing budget per runner and tree")
    ap.add_argument("--min-reps", type=int, default=20)
    ap.add_argument("--max-reps", type=int, default=400)
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd plain and 64-node steps")
    ap.add_argument("--reference-ops", action="store_true")
    ap.add_argument("--draft-vocab", type=int, default=0, metavar="N",
                    help="draft from a reduced vocabulary of N tokens (0: the full vocabulary)")
    ap.add_argument("--path", choices=("fast", "hf", "both"), default="fast",
                    help="the base's forward: fused ops (fast, the default decoding path), the HF modules, or both "
                         "(the plain step through each, then the trees through the fused path)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", type=Path, default=C.REPO / "out" / "bench_step.json")
    ap.add_argument("--md", type=Path, default=None, help="default: --json with .md")
    ap.add_argument("--deadline-s", type=float, default=230.0, help="stop measuring and write results by then")
    ap.add_argument("--tau-json", type=Path, default=None, help="a bench_decode JSON: project with its measured tau")
    ap.add_argument("--tau-method", default="hydra++", help="the method of --tau-json whose tau is used")
    ap.add_argument("--tau", type=float, default=None, help="a measured tau (with --tau-source)")
    ap.add_argument("--tau-source", default=None, help="where --tau was measured: heads, prompts, model, date")
    return ap.parse_args(argv)


def measured_tau(args) -> dict | None:
    """{tau, source} for the projection: from --tau-json (a bench_decode JSON) or --tau with --tau-source."""
    if args.tau is not None:
        if not args.tau_source:
            raise SystemExit("--tau needs --tau-source (heads, prompts, model, date of the measurement)")
        return dict(tau=args.tau, source=args.tau_source)
    if args.tau_json is None:
        return None
    report = json.loads(args.tau_json.read_text())
    meta = report.get("meta", {})
    m = report.get("methods", {}).get(args.tau_method) or {}
    if not m.get("tau"):
        raise SystemExit(f"--tau-json {args.tau_json}: no measured tau for method {args.tau_method!r} "
                         f"(methods: {', '.join(report.get('methods', {}))})")
    prompts = meta.get("prompts_file") or report.get("notes", {}).get("prompts_file") or "built-in prompts"
    return dict(tau=m["tau"], source=f"{args.tau_method} with heads {m.get('heads')} on {m.get('prompts')} prompts "
                f"of {prompts}, {meta.get('model')} {meta.get('dtype')}, {meta.get('device_name')}, "
                f"{meta.get('date')} ({args.tau_json.name})")


def run_model(name, args, device, dtype, report, write, check) -> None:
    from hydra_fast.tree import Tree

    r = report["models"].setdefault(name, {})
    t0 = time.perf_counter()
    base = build_model(name, args.layers, device, dtype)
    C.sync(device)
    r.update(build_s=time.perf_counter() - t0, layers=base.config.num_hidden_layers, **model_bytes(base))
    r["config"] = {k: getattr(base.config, k, None) for k in SHAPES[name] if k != "rope_theta"}
    r["config"]["rope"] = getattr(base.config, "rope_parameters", None)
    copy = report["meta"]["copy"].get("GBps")
    tflops = report["meta"]["matmul"].get("TFLOPs")
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, base.config.vocab_size, (1, args.prompt_len), generator=g).to(device)
    kv = r["kv_bytes_per_token"] * args.prompt_len
    check()
    fused = None
    if args.path in ("hf", "both"):  # the HF-module forward first: fusing turns the weights into views
        try:
            r["plain_hf"] = measure_engine(base, None, Tree.plain(), prompt, device, args)
        except Exception as e:  # noqa: BLE001
            r["plain_hf"] = {"error": C.err_str(e)}
        write()
    if args.path in ("fast", "both"):
        from hydra_fast.fastpath import FusedDecoder

        fused, why = FusedDecoder.build(base)
        r["fast_path"] = why or "fused"
    try:
        p = measure_engine(base, None, Tree.plain(), prompt, device, args, fused=fused)
        if copy:
            p["floor_ms"] = r["streamed_bytes"] / (copy * 1e9) * 1e3
            p["floor_kv_ms"] = (r["streamed_bytes"] + kv) / (copy * 1e9) * 1e3
            p["x_floor"] = p["device_ms"] / p["floor_ms"]
            p["pct_bw"] = 100 * p["floor_ms"] / p["device_ms"]
        p["tok_s"] = 1e3 / p["wall_ms"]
        r["plain"] = p
    except Exception as e:  # noqa: BLE001
        r["plain"] = {"error": C.err_str(e)}
    write()
    heads = None
    try:
        check()
        t0 = time.perf_counter()
        heads = make_heads(base, device)
        if args.draft_vocab:  # the first N token ids stand in for the most frequent ones (random weights)
            heads.set_draft_vocab(torch.arange(min(args.draft_vocab, base.config.vocab_size), device=device))
            r["draft_vocab"] = heads.draft_vocab.size
        r["heads_bytes"] = param_bytes(heads)
        r["heads_build_s"] = time.perf_counter() - t0
    except Deadline:
        raise
    except Exception as e:  # noqa: BLE001
        r["heads_error"] = C.err_str(e)
    trees = [(f"greedy({n})", greedy_tree(n)) for n in (int(x) for x in args.sizes.split(",") if x.strip())]
    if not args.no_mc_sim:
        trees.insert(next((i for i, (t, c) in enumerate(trees) if len(c) + 1 > 64), len(trees)),
                     ("mc_sim_7b_63", "mc_sim_7b_63"))
    r["trees"] = []
    plain_dev = (r.get("plain") or {}).get("device_ms")
    plain_wall = (r.get("plain") or {}).get("wall_ms")
    for label, choices in trees if heads is not None else []:
        check()
        row = dict(tree=label)
        try:
            tree = Tree.from_choices(choices)
            row.update(measure_engine(base, heads, tree, prompt, device, args, fused=fused))
            nbytes = r["streamed_bytes"] + r["heads_bytes"] + kv
            row.update(C.floor_us(nbytes, 2.0 * r["matmul_params"] * tree.num_nodes, copy, tflops))
            row["floor_ms"] = row.pop("floor_us") / 1e3 if row.get("floor_us") is not None else None
            row["x_plain"] = row["device_ms"] / plain_dev if plain_dev else None
            row["wall_x_plain"] = row["wall_ms"] / plain_wall if plain_wall else None
            tau = (report["meta"].get("tau") or {}).get("tau")
            if tau:
                row["proj_tok_s"] = tau / (row["wall_ms"] / 1e3)
                row["proj_speedup"] = tau * plain_wall / row["wall_ms"] if plain_wall else None  # vs plain
        except Deadline:
            raise
        except Exception as e:  # noqa: BLE001
            row["error"] = C.err_str(e)
        r["trees"].append(row)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write()
    mc = next((t for t in r["trees"] if t["tree"] == "mc_sim_7b_63" and "x_plain" in t), None)
    pl = r.get("plain") or {}
    r["target"] = dict(x_plain=mc and mc["x_plain"],
                       met=None if not mc or mc["x_plain"] is None else mc["x_plain"] <= 1.25,
                       plain_x_floor=pl.get("x_floor"),
                       plain_met=None if pl.get("x_floor") is None else pl["x_floor"] <= 1.2)
    if args.compile:
        r["compiled"] = []
        for label, choices in [("plain", None), ("mc_sim_7b_63", "mc_sim_7b_63")]:
            check()
            row = dict(tree=label)
            try:
                tree = Tree.plain() if choices is None else Tree.from_choices(choices)
                row.update(measure_engine(base, None if choices is None else heads, tree, prompt, device, args,
                                          compile_step=True, fused=fused))
            except Deadline:
                raise
            except Exception as e:  # noqa: BLE001
                row["error"] = C.err_str(e)
            r["compiled"].append(row)
            write()
    del heads, base
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    hydra_fast, device, dtype = C.setup_run(args)
    models = (args.models or ("tiny" if args.tiny else "llama2-7b,llama3-8b")).split(",")
    args.prompt_len = args.prompt_len or (64 if args.tiny or models == ["tiny"] else 512)
    args.md = args.md or args.json.with_suffix(".md")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = C.run_metadata(device, hydra_fast)
    meta.update(dtype=str(dtype).removeprefix("torch."), prompt_len=args.prompt_len, tau=measured_tau(args))
    report = dict(meta=meta, models={}, stopped_early=None)

    def write(final=False):
        meta["elapsed_s"] = time.perf_counter() - t_start
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str))
        tmp.replace(args.json)
        if final:
            try:
                md = render_md(report)
                args.md.write_text(md)
                print(md, flush=True)
            except Exception as e:  # noqa: BLE001 - the JSON is written already
                print(f"markdown failed: {C.err_str(e)}", file=sys.stderr)

    def check():
        if time.perf_counter() - t_start > args.deadline_s:
            raise Deadline(f"--deadline-s {args.deadline_s:.0f} reached")

    try:
        cfg = C.TimingConfig(budget_s=0.3)
        sleeper = C.Sleeper(device)
        for key, fn in (("copy", lambda: C.measure_copy_bandwidth(device, (1 << 30) if device.type == "cuda"
                                                                  else (1 << 26), cfg, sleeper)),
                        ("matmul", lambda: C.measure_matmul_rate(device, 8192 if device.type == "cuda" else 256,
                                                                 dtype, cfg, sleeper))):
            try:
                meta[key] = fn()
            except Exception as e:  # noqa: BLE001
                meta[key] = {"error": C.err_str(e)}
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for name in models:
            if name not in SHAPES:
                report["models"][name] = {"error": f"unknown model shape; known: {', '.join(SHAPES)}"}
                continue
            print(f"[{time.perf_counter() - t_start:6.1f}s] {name}", file=sys.stderr, flush=True)
            try:
                run_model(name, args, device, dtype, report, write, check)
            except Deadline:
                raise
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: record it, free, go on
                report["models"].setdefault(name, {})["error"] = C.err_str(e)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            write()
    except Deadline as e:
        report["stopped_early"] = str(e)
    except (KeyboardInterrupt, SystemExit) as e:
        report["stopped_early"] = f"interrupted: {e!r}"
    finally:
        write(final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
