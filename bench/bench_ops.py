"""Kernel benchmarks of the hydra_fast ops against the eager reference, torch.compile(reference), SDPA and Flex.

    python bench/bench_ops.py [--ops tree_attention,accept_greedy,...] [--device cuda] [--quick]
                              [--json out.json] [--md out.md] [--graph] [--compile static|auto|off]

For each op and size: the median time (CUDA events, rotating input sets, see common.py), achieved GB/s under
the op's byte model (every input byte the op must read once, every output byte written once; the models are in
the case builders below and in the notes under each table), the floor max(bytes / copy bandwidth, flops / matmul
rate) from ceilings measured at the start of the same run, and the same figures for the baselines. Every method
is checked once per shape against the reference before it is timed; errors are recorded, never fatal.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
from layer_op_cases import LAYER_OPS  # noqa: E402
from op_cases import BUILDERS, OPS, SIZES  # noqa: E402
from op_runner import DeadContext, Policy, Runner  # noqa: E402


# -- output -----------------------------------------------------------------------------------------------------
def _t(row: dict, name: str) -> float | None:
    return row["methods"].get(name, {}).get("median_us")


def _cell(row: dict, name: str) -> str:
    res = row["methods"].get(name)
    if res is None:
        return "-"
    if "error" in res:
        return "err"
    if "skipped" in res:
        return "skip"
    chk = row["checks"].get(name, {})
    return C.fmt_us(res.get("median_us")) + ("" if chk.get("ok", True) else "!")


def _check_cell(row: dict) -> str:
    if "error" in row:
        return "err"
    chk = row["checks"].get("ours")
    if chk is None:
        return "err" if "error" in row["methods"].get("ours", {}) else "-"
    if chk.get("ok"):
        return "ok"
    return "FAIL " + (f"{chk['rel_err']:.1e}" if "rel_err" in chk else str(chk.get("mismatches", chk.get("detail"))))


def _target(op: str, row: dict) -> str:
    ours, eager, comp = _t(row, "ours"), _t(row, "eager"), _t(row, "compile")
    if ours is None or not row["checks"].get("ours", {}).get("ok"):
        return "-"
    if op.startswith("accept"):
        ok = ours <= 20 and eager is not None and eager >= 5 * ours
    elif op == "draft_head_mlp":
        ok = eager is not None and eager >= 2 * ours and (comp is None or comp >= ours)
    elif op == "kv_compact":
        ok = ours <= 10
    elif op in LAYER_OPS:  # a fused layer op ships only if it beats torch.compile(reference)
        if comp is None:
            return "-"
        ok = comp >= ours
    elif op == "dynamic_tree_layout":  # one launch instead of ~45 small ops; ships if it beats torch.compile
        if comp is None:
            return "-"
        ok = comp >= ours
    elif op == "topk_rows":  # replaces torch.topk in the draft; ships if it beats it and torch.compile
        topk = _t(row, "torch.topk")
        if comp is None or topk is None:
            return "-"
        ok = comp >= ours and topk >= ours
    else:
        return "-"
    return "ok" if ok else "miss"


def render_op(op: str, rows: list[dict], device: torch.device) -> str:
    label_keys = next((list(r["label"]) for r in rows if r.get("label")), [])
    attn = op == "tree_attention"
    headers = label_keys + ["ours us", "GB/s"] + (["%bw"] if attn else []) + ["%floor", "eager", "compile"]
    headers += ["sdpa", "sdpa_gqa", "flex"] if attn else []
    topk = op == "topk_rows"  # the call it replaces, torch.topk, as a baseline column
    headers += ["torch.topk"] if topk else []
    headers += ["x eager", "x comp"] + (["x topk"] if topk else []) + (["x best"] if attn else ["target"]) + ["check"]
    table = []
    for r in rows:
        ours = r["methods"].get("ours", {})
        cells = [str(r.get("label", {}).get(k, "?")) for k in label_keys]
        if "error" in r:
            table.append(cells + ["err"] + ["-"] * (len(headers) - len(cells) - 2) + ["err"])
            continue
        cells += [_cell(r, "ours"), f"{ours['GBps']:.0f}" if "GBps" in ours else "-"]
        cells += [f"{ours['pct_copy_bw']:.0f}" if "pct_copy_bw" in ours else "-"] if attn else []
        cells += [f"{ours['pct_floor']:.0f}" if "pct_floor" in ours else "-", _cell(r, "eager"), _cell(r, "compile")]
        if attn:
            cells += [_cell(r, "sdpa"), _cell(r, "sdpa_gqa"), _cell(r, "flex")]
        cells += [_cell(r, "torch.topk")] if topk else []
        t = _t(r, "ours")
        cells += [C.fmt_x(_t(r, "eager"), t), C.fmt_x(_t(r, "compile"), t)]
        cells += [C.fmt_x(_t(r, "torch.topk"), t)] if topk else []
        if attn:
            best = [_t(r, m) for m in ("sdpa", "sdpa_gqa", "flex")
                    if _t(r, m) and r["checks"].get(m, {}).get("ok")]  # a wrong baseline does not count
            cells.append(C.fmt_x(min(best), t) if best else "-")
        else:
            cells.append(_target(op, r))
        table.append(cells + [_check_cell(r)])
    lines = [f"### {op} ({device.type}; median us; x = baseline time / ours; ! = wrong output)",
             C.md_table(headers, table)]
    notes = next((r["notes"] for r in rows if r.get("notes")), "")
    if notes:
        lines.append("bytes: " + notes)
    lines += _error_lines(rows)
    return "\n".join(lines)


def _error_lines(rows: list[dict], limit: int = 5) -> list[str]:
    seen: dict[str, int] = {}
    for r in rows:
        for key, msg in (("error", r.get("error")), ("context_lost", "CUDA context lost in this case; a new worker "
                                                                        "ran the next ones")):
            if r.get(key):
                seen[f"case {r.get('label')}: {msg}"] = 1
        for name, res in r["methods"].items():
            for key in ("error", "skipped"):
                if key in res:
                    k = f"{name} {key}: {res[key]}"
                    seen[k] = seen.get(k, 0) + 1
    order = sorted(seen.items(), key=lambda kv: " skipped: " in kv[0])  # errors before skips
    out = [f"- {msg[:150]} (x{n})" for msg, n in order]
    return out[:limit] + ([f"- ... {len(out) - limit} more in the JSON"] if len(out) > limit else [])


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few iterations (smoke test)")
    ap.add_argument("--json", type=Path, help="write every number here (rewritten after each case)")
    ap.add_argument("--md", type=Path, help="write the tables here")
    ap.add_argument("--graph", action="store_true", help="time replays of a CUDA graph of --graph-calls calls")
    ap.add_argument("--graph-calls", type=int, default=20)
    ap.add_argument("--compile", dest="compile_mode", choices=("static", "auto", "off"), default="static",
                    help="torch.compile(reference): static = one graph per shape, auto = torch's automatic "
                         "dynamic shapes, off")
    ap.add_argument("--compile-budget-s", type=float, default=120.0,
                    help="seconds of reference compiles over all ops; later shapes skip compile")
    ap.add_argument("--budget-s", type=float, default=None, help="timing seconds per method and shape")
    ap.add_argument("--deadline-s", type=float, default=400.0,
                    help="no case starts after this; after 80%% of it only ours and eager run")
    ap.add_argument("--isolate", choices=("auto", "on", "off"), default="auto",
                    help="one worker process per op, so a crash or a lost CUDA context costs one case "
                         "(auto: on for cuda)")
    ap.add_argument("--soft-deadline-s", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-ceilings", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--start-case", type=int, default=0, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    for name in ("torch._dynamo", "torch._inductor", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for attr in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, attr):
            setattr(torch._dynamo.config, attr, 4096)
    signal.signal(signal.SIGTERM, _raise_exit)

    hydra_fast = C.import_hydra_fast()
    device = torch.device(args.device)
    if device.type == "cpu" and args.quick:
        torch.set_num_threads(1)  # a smoke test on a shared machine: threads only add contention
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        print(f"unknown ops {unknown}; known: {', '.join(OPS)}", file=sys.stderr)
        return 2
    cfg = C.TimingConfig(budget_s=args.budget_s or (0.02 if args.quick else 0.1), warmup=1 if args.quick else 3,
                         min_reps=3 if args.quick else 10, graph=args.graph and device.type == "cuda",
                         graph_calls=args.graph_calls)
    soft = args.soft_deadline_s if args.soft_deadline_s is not None else 0.8 * args.deadline_s
    runner = Runner(device, cfg, Policy(args.compile_mode, args.compile_budget_s, soft, args.deadline_s),
                    args.quick)
    if args.worker_ceilings:
        return _worker(args, ops[0], runner)

    meta = C.run_metadata(device, hydra_fast)
    meta.update(quick=args.quick, graph=cfg.graph, compile_mode=args.compile_mode, timing=cfg.__dict__,
                rotate_target_bytes=runner.rot_target, sizes="quick" if args.quick else "full",
                timing_note="median device time per call (CUDA events, host kept ahead by a device-side sleep); "
                            "wall_us: back-to-back calls on the host clock, launch overheads included")
    if args.graph and device.type != "cuda":
        meta["graph_note"] = "--graph needs CUDA: host-clock timing used"
    runner.measure_ceilings()
    meta.update(copy=runner.copy, matmul=runner.matmul)
    head = (f"# hydra_fast ops: {meta['device_name']} | torch {meta['torch']} | copy "
            f"{runner.copy.get('GBps', 0):.0f} GB/s | mm {runner.matmul.get('TFLOPs', 0):.1f} TFLOP/s | "
            f"{cfg.budget_s}s/method | compile {args.compile_mode} | timing "
            f"{'graph' if cfg.graph else 'events' if device.type == 'cuda' else 'host clock'} | ext "
            + _ext_summary(meta["hydra_fast_build_info"], device))
    print(head, flush=True)
    isolate = args.isolate == "on" or (args.isolate == "auto" and device.type == "cuda")
    meta["isolated_workers"] = isolate
    results: dict[str, list] = {}
    report = {"meta": meta, "results": results}
    with tempfile.TemporaryDirectory(prefix="bench_ops_") as tmp:
        ceilings = Path(tmp) / "ceilings.json"
        ceilings.write_text(json.dumps(dict(copy=runner.copy, matmul=runner.matmul)))
        try:
            for op in ops:
                t_op = time.perf_counter()
                results[op] = []
                if isolate:
                    _run_isolated(op, args, runner, ceilings, Path(tmp), report)
                elif not _run_inline(op, args, runner, report):
                    meta["context_lost"] = op
                    break
                print(f"[{op}] {len(results[op])} cases in {time.perf_counter() - t_op:.1f} s (reference compiles "
                      f"{runner.compile_spent.get(op, 0.0):.1f} s), elapsed {runner.elapsed():.0f} s", flush=True)
        except (KeyboardInterrupt, SystemExit) as e:
            meta["interrupted"] = repr(e)
    meta["elapsed_s"] = runner.elapsed()
    meta["compile_spent_s"] = runner.compile_spent
    tables = [render_op(op, rows, device) for op, rows in results.items()]
    print("\n" + "\n\n".join(tables))
    fails = [f"{r['op']} {r.get('label')}" for rows in results.values() for r in rows
             if r.get("checks", {}).get("ours") and not r["checks"]["ours"].get("ok")]
    tail = (f"done in {meta['elapsed_s']:.0f} s" + (f" (interrupted: {meta['interrupted']})" if "interrupted" in meta
                                                    else "")
            + (f"; CHECK FAILED: {'; '.join(fails)[:400]}" if fails else ""))
    print(tail)
    _write(args.json, report)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(head + "\n\n" + "\n\n".join(tables) + "\n\n" + tail + "\n")
    return 0


def _ext_summary(info: dict, device: torch.device) -> str:
    if not info.get("extension"):
        return "NOT BUILT"
    if device.type == "cuda" and not info.get("cuda"):
        return "built WITHOUT CUDA: every 'ours' fails"
    return f"cuda archs {info.get('cuda_archs')}" if info.get("cuda") else "cpu"


def _cases(op: str, args, runner: Runner) -> list:
    runner.op = op
    return BUILDERS[op](SIZES["quick" if args.quick else "full"], runner.device, runner)


def _run_inline(op: str, args, runner: Runner, report: dict) -> bool:
    """All cases of op in this process. False if the CUDA context was lost (nothing after can run)."""
    rows = report["results"][op]
    try:
        cases = _cases(op, args, runner)
    except Exception as e:  # noqa: BLE001
        rows.append(_error_row(op, {}, "building cases: " + C.err_str(e)))
        return True
    for case in cases[args.start_case:]:
        try:
            rows.append(runner.run_case(case))
        except DeadContext as e:
            rows.append(e.row)
            _write(args.json, report)
            return False
        except Exception as e:  # noqa: BLE001 - a bug here must not lose the other cases
            rows.append(_error_row(op, case.label, C.err_str(e)))
            runner.free()
        _write(args.json, report)
    return True


def _worker(args, op: str, runner: Runner) -> int:
    """A worker process: the cases of one op from --start-case on, written to --json after each; exit code 3
    when the CUDA context was lost."""
    ceilings = json.loads(args.worker_ceilings.read_text())
    runner.copy, runner.matmul = ceilings["copy"], ceilings["matmul"]
    report: dict = {"results": {op: []}, "compile_spent_s": runner.compile_spent}
    try:
        cases = _cases(op, args, runner)
    except Exception as e:  # noqa: BLE001
        report["results"][op].append(_error_row(op, {}, "building cases: " + C.err_str(e)))
        report["n_cases"] = 0
        _write(args.json, report)
        return 0
    report["n_cases"] = len(cases)
    for case in cases[args.start_case:]:
        report["running"] = case.label
        _write(args.json, report)
        try:
            report["results"][op].append(runner.run_case(case))
        except DeadContext as e:
            report["results"][op].append(e.row)
            report.pop("running")
            _write(args.json, report)
            return 3
        except Exception as e:  # noqa: BLE001
            report["results"][op].append(_error_row(op, case.label, C.err_str(e)))
            runner.free()
    report.pop("running", None)
    _write(args.json, report)
    return 0


def _run_isolated(op: str, args, runner: Runner, ceilings: Path, tmp: Path, report: dict) -> None:
    """The cases of op in worker processes; a worker that dies or loses its CUDA context is replaced by one
    that starts at the next case (at most 4 workers per op)."""
    rows, meta = report["results"][op], report["meta"]
    start, n_cases = 0, None
    for attempt in range(4):
        remaining = runner.policy.deadline_s - runner.elapsed()
        if remaining < 5:
            rows.append(_error_row(op, {}, "skipped: deadline"))
            return
        out = tmp / f"{op}.{attempt}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--ops", op, "--device", args.device,
               "--json", str(out), "--worker-ceilings", str(ceilings), "--start-case", str(start),
               "--deadline-s", f"{remaining:.1f}",
               "--soft-deadline-s", f"{runner.policy.soft_deadline_s - runner.elapsed():.1f}",
               "--compile", args.compile_mode, "--compile-budget-s", str(args.compile_budget_s),
               "--graph-calls", str(args.graph_calls)]
        cmd += ["--quick"] * args.quick + ["--graph"] * args.graph
        cmd += ["--budget-s", str(args.budget_s)] if args.budget_s else []
        interrupted = None
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=remaining + 60)
            rc, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, err = "timeout", (e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or "")
        except (KeyboardInterrupt, SystemExit) as e:  # run() has killed the worker; keep what it wrote
            rc, err, interrupted = "interrupted", "", e
        child = {}
        if out.exists():
            try:
                child = json.loads(out.read_text())
            except ValueError:
                child = {}
        new = child.get("results", {}).get(op, [])
        rows.extend(new)
        n_cases = child.get("n_cases", n_cases)
        for k, v in child.get("compile_spent_s", {}).items():
            runner.compile_spent[k] = runner.compile_spent.get(k, 0.0) + v
        if interrupted is not None:
            raise interrupted
        if rc == 0:
            return
        last = next((line for line in reversed(err.strip().splitlines()) if line.strip()), "")
        if isinstance(rc, int) and rc < 0:
            last = f"{signal.Signals(-rc).name} {last}" if -rc in signal.valid_signals() else last
        meta.setdefault("workers", []).append(dict(op=op, attempt=attempt, rc=rc, stderr_tail=err[-2000:]))
        if rc == 3:  # the worker wrote the row of the case that lost the context
            start += len(new)
        else:  # it died inside the case it was running
            rows.append(_error_row(op, child.get("running", {}), f"worker died (rc {rc}): {last}"[:300]))
            start += len(new) + 1
        if n_cases is None or start >= n_cases:
            return


def _error_row(op: str, label: dict, error: str) -> dict:
    return dict(op=op, label=label, error=error, methods={}, checks={}, notes="")


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def _write(path: Path | None, report: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
