"""Shared helpers of the hydra_fast benchmarks: timing, device ceilings, run metadata, checks, tables.

Timing on CUDA uses events around every call. Before each chunk of calls a device-side sleep is enqueued so
the host gets ahead of the GPU: the calls then run back to back and each event pair measures device time only,
not the host's launch latency (the way triton's do_bench keeps the queue busy with its cache flush). Inputs
rotate among several sets so repeated calls do not find their bytes in L2. ``--graph`` instead captures a CUDA
graph of several calls and times its replays. Every number is a median in microseconds.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]


def import_hydra_fast():
    """hydra_fast, installed or from the repository's python/ folder."""
    try:
        import hydra_fast  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO / "python"))
        import hydra_fast  # noqa: F401
    return hydra_fast


@dataclass(frozen=True)
class TimingConfig:
    budget_s: float = 0.15  # device time spent timing one method on one shape (warm-up excluded)
    warmup: int = 3  # calls before timing (at least one per input set)
    min_reps: int = 10
    max_reps: int = 2000
    graph: bool = False  # time replays of a captured CUDA graph of graph_calls calls
    graph_calls: int = 20
    chunk: int = 25  # calls enqueued behind one device-side sleep


def setup_run(args, quiet_loggers=("torch._dynamo", "torch._inductor", "torch.fx", "transformers")):
    """Shared start of the end-to-end drivers: quiet logs, SIGTERM as SystemExit (results still written),
    thread count, the hydra_fast import. -> (hydra_fast module, device, default dtype)."""
    import logging
    import signal
    import warnings

    warnings.filterwarnings("ignore")
    for name in quiet_loggers:
        logging.getLogger(name).setLevel(logging.ERROR)

    def _raise_exit(signum, frame):
        raise SystemExit(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise_exit)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    hydra_fast = import_hydra_fast()
    import transformers

    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return hydra_fast, device, dtype


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Sleeper:
    """Device-side busy wait (torch.cuda._sleep) calibrated in microseconds; a no-op where unavailable."""

    def __init__(self, device: torch.device):
        self.cycles_per_us = 0.0
        if device.type != "cuda" or not hasattr(torch.cuda, "_sleep"):
            return
        try:
            torch.cuda._sleep(1000)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            cycles = 20_000_000
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            torch.cuda.synchronize()
            self.cycles_per_us = cycles / (start.elapsed_time(end) * 1e3)
        except Exception:  # noqa: BLE001 - timing still works without it, with launch gaps
            self.cycles_per_us = 0.0

    def sleep_us(self, us: float) -> None:
        if self.cycles_per_us > 0 and us > 0:
            torch.cuda._sleep(int(min(us, 200_000) * self.cycles_per_us))


def _summary(times_us: list[float], **extra) -> dict:
    times_us = sorted(times_us)
    q = lambda f: times_us[min(len(times_us) - 1, int(f * len(times_us)))]  # noqa: E731
    return dict(median_us=statistics.median(times_us), p10_us=q(0.1), p90_us=q(0.9), min_us=times_us[0],
                reps=len(times_us), **extra)


def time_calls(fn: Callable[[Any], Any], sets: list, device: torch.device, cfg: TimingConfig,
               sleeper: Sleeper | None = None) -> dict:
    """Median time of fn(sets[i % len(sets)]) in microseconds, and how it was measured."""
    n = len(sets)
    for i in range(max(cfg.warmup, n)):
        fn(sets[i % n])
    sync(device)
    if device.type != "cuda":
        return _time_host(fn, sets, cfg)
    if cfg.graph:
        return _time_graph(fn, sets, device, cfg, sleeper)
    return _time_events(fn, sets, device, cfg, sleeper)


def _time_host(fn, sets, cfg: TimingConfig) -> dict:
    n, times = len(sets), []
    t_end = time.perf_counter() + cfg.budget_s
    while len(times) < cfg.max_reps and (len(times) < cfg.min_reps or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn(sets[len(times) % n])
        times.append((time.perf_counter() - t0) * 1e6)
    return _summary(times, mode="host clock", n_sets=n)


def _estimate(fn, sets, device, k: int = 5) -> tuple[float, float, float]:
    """(host enqueue us, device us, wall us) per call over k back-to-back calls."""
    n = len(sets)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sync(device)
    t0 = time.perf_counter()
    e0.record()
    for i in range(k):
        fn(sets[i % n])
    e1.record()
    t_host = time.perf_counter() - t0
    sync(device)
    t_wall = time.perf_counter() - t0
    return t_host * 1e6 / k, e0.elapsed_time(e1) * 1e3 / k, t_wall * 1e6 / k


def _reps(cfg: TimingConfig, per_call_us: float) -> int:
    return int(max(cfg.min_reps, min(cfg.max_reps, cfg.budget_s * 1e6 / max(per_call_us, 1.0))))


def _time_events(fn, sets, device, cfg: TimingConfig, sleeper: Sleeper | None) -> dict:
    n = len(sets)
    host_us, dev_us, wall_us = _estimate(fn, sets, device)
    reps = _reps(cfg, max(dev_us, host_us))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for c0 in range(0, reps, cfg.chunk):
        m = min(cfg.chunk, reps - c0)
        if sleeper is not None:
            sleeper.sleep_us(1.5 * host_us * m + 20.0)  # keep the device busy while the host enqueues m calls
        for i in range(c0, c0 + m):
            starts[i].record()
            fn(sets[i % n])
            ends[i].record()
    sync(device)
    times = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    # wall: back-to-back calls timed with the host clock, host overheads included (what an uncaptured loop pays)
    k = int(max(3, min(200, 0.3 * cfg.budget_s * 1e6 / max(wall_us, 1.0))))
    t0 = time.perf_counter()
    for i in range(k):
        fn(sets[i % n])
    sync(device)
    wall_us = (time.perf_counter() - t0) * 1e6 / k
    return _summary(times, mode="cuda events" + ("" if sleeper and sleeper.cycles_per_us else " (no sleep)"),
                    n_sets=n, host_us=host_us, wall_us=wall_us)


def _time_graph(fn, sets, device, cfg: TimingConfig, sleeper: Sleeper | None) -> dict:
    n = len(sets)
    calls = max(cfg.graph_calls, n)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for i in range(3):
            fn(sets[i % n])
    torch.cuda.current_stream(device).wait_stream(side)
    sync(device)
    graph = torch.cuda.CUDAGraph()
    keep = []  # outputs live as long as the graph
    with torch.cuda.graph(graph):
        for i in range(calls):
            keep.append(fn(sets[i % n]))
    graph.replay()
    sync(device)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    graph.replay()
    e1.record()
    sync(device)
    reps = _reps(cfg, e0.elapsed_time(e1) * 1e3)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for c0 in range(0, reps, cfg.chunk):
        m = min(cfg.chunk, reps - c0)
        if sleeper is not None:
            sleeper.sleep_us(30.0 * m + 20.0)
        for i in range(c0, c0 + m):
            starts[i].record()
            graph.replay()
            ends[i].record()
    sync(device)
    times = [s.elapsed_time(e) * 1e3 / calls for s, e in zip(starts, ends)]
    del graph, keep
    return _summary(times, mode=f"cuda graph of {calls} calls", n_sets=n)


def rotation_sets(bytes_per_set: int, target_bytes: int, max_sets: int, mem_budget: int,
                  alloc_per_set: int | None = None) -> int:
    """How many input sets to cycle: enough that their bytes exceed target_bytes, within max_sets and memory."""
    alloc = max(1, alloc_per_set if alloc_per_set is not None else bytes_per_set)
    want = math.ceil(target_bytes / max(1, bytes_per_set))
    return int(max(1, min(want, max_sets, mem_budget // alloc)))


def measure_copy_bandwidth(device: torch.device, nbytes: int, cfg: TimingConfig, sleeper: Sleeper | None) -> dict:
    """Device-to-device copy of nbytes, counting bytes read plus bytes written. GB/s = 1e9 bytes/s."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_calls(lambda s: dst.copy_(s), [src], device, cfg, sleeper)
    return dict(bytes=nbytes, median_us=t["median_us"], GBps=2 * nbytes / (t["median_us"] * 1e-6) / 1e9)


def measure_matmul_rate(device: torch.device, n: int, dtype: torch.dtype, cfg: TimingConfig,
                        sleeper: Sleeper | None) -> dict:
    """An n x n x n matrix product: the arithmetic ceiling, in TFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_calls(lambda x: torch.mm(x, b), [a], device, cfg, sleeper)
    return dict(n=n, dtype=str(dtype), median_us=t["median_us"], TFLOPs=2 * n**3 / (t["median_us"] * 1e-6) / 1e12)


def floor_us(nbytes: float, flops: float, copy_GBps: float | None, tflops: float | None) -> dict:
    """The larger of bytes over copy bandwidth and flops over the matmul rate, and which one it is."""
    mem = nbytes / (copy_GBps * 1e9) * 1e6 if copy_GBps else None
    comp = flops / (tflops * 1e12) * 1e6 if (tflops and flops) else None
    if mem is None:
        return dict(floor_us=None, mem_floor_us=None, compute_floor_us=comp, bound=None)
    bound = "compute" if (comp is not None and comp > mem) else "memory"
    return dict(floor_us=max(mem, comp or 0.0), mem_floor_us=mem, compute_floor_us=comp, bound=bound)


def run_metadata(device: torch.device, hydra_fast) -> dict:
    meta: dict[str, Any] = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        argv=sys.argv,
        python=platform.python_version(),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        device=str(device),
        device_name=platform.processor() or platform.machine(),
        cpu_threads=torch.get_num_threads(),
    )
    for package in ("triton", "transformers"):
        try:
            meta[package] = __import__(package).__version__
        except Exception:  # noqa: BLE001
            meta[package] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(device_name=props.name, sm_count=props.multi_processor_count,
                    memory_GiB=round(props.total_memory / 2**30, 1),
                    l2_bytes=getattr(props, "L2_cache_size", None), capability=f"{props.major}.{props.minor}")
    try:
        meta["hydra_fast_build_info"] = hydra_fast.build_info()
    except Exception as e:  # noqa: BLE001
        meta["hydra_fast_build_info"] = {"error": err_str(e)}
    try:
        meta["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        meta["git_commit"] = None
    meta["git_commit"] = meta["git_commit"] or os.environ.get("HYDRA_FAST_COMMIT")  # a copy without .git
    return meta


def err_str(e: BaseException, limit: int = 300) -> str:
    """One line: the exception type and the first line of its message (compile errors are long)."""
    msg = str(e).strip().splitlines()
    first = next((line for line in msg if line.strip()), "")
    return f"{type(e).__name__}: {first}"[:limit]


def compare(out: torch.Tensor, ref: torch.Tensor, tol: float) -> dict:
    """Relative error ||out - ref|| / ||ref|| in float64 and the max abs error; ok if finite and under tol."""
    if tuple(out.shape) != tuple(ref.shape):
        return dict(ok=False, detail=f"shape {tuple(out.shape)} != {tuple(ref.shape)}")
    o, r = out.detach().double(), ref.detach().double()
    finite = bool(torch.isfinite(o).all())
    diff = (o - r).nan_to_num(nan=float("inf"))
    rel = float(diff.norm() / r.norm().clamp_min(1e-30))
    return dict(ok=finite and rel <= tol, rel_err=rel, max_abs=float(diff.abs().max()), finite=finite, tol=tol)


def compare_exact(outs, refs) -> dict:
    """Integer outputs (or copies): every element equal."""
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    refs = refs if isinstance(refs, (tuple, list)) else (refs,)
    bad = 0
    for o, r in zip(outs, refs):
        if tuple(o.shape) != tuple(r.shape):
            return dict(ok=False, detail=f"shape {tuple(o.shape)} != {tuple(r.shape)}")
        bad += int((o.to(r.dtype) != r).sum())
    return dict(ok=bad == 0, mismatches=bad)


def fmt_us(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def fmt_x(num: float | None, den: float | None) -> str:
    """num / den as a speedup, e.g. 3.1x; '-' if either is missing."""
    if not num or not den:
        return "-"
    r = num / den
    return f"{r:.2g}x" if r < 10 else f"{r:.0f}x"


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
