"""Runs the cases of bench_ops.py: inputs, a check of every method against the reference, then timing.

Every method of every case is wrapped: an error becomes a string in the results, never the end of the run.
A CUDA error that leaves the context unusable (illegal address, device assert) raises DeadContext so the
worker process can exit and the parent start a new one at the next case.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

import common as C

# Reference-compile budget shares per op (flex is not budgeted: it is the attention baseline that matters).
COMPILE_SHARE = {"tree_attention": 0.3, "accept_greedy": 0.1, "accept_typical": 0.1, "draft_head_mlp": 0.4,
                 "kv_compact": 0.1, "rms_norm": 0.15, "add_rms_norm": 0.15, "silu_mul": 0.15, "rope_kv_write": 0.2}


class Skip(Exception):
    """A method not run on purpose (compile off, budget, deadline); recorded as 'skipped'."""


class DeadContext(Exception):
    """The CUDA context is unusable after an error; carries the row of the case that broke it."""

    def __init__(self, row: dict):
        super().__init__("CUDA context unusable")
        self.row = row


@dataclass(frozen=True)
class Policy:
    compile_mode: str  # static: one specialised graph per shape; auto: torch's automatic dynamic shapes; off
    compile_budget_s: float  # reference compiles, all ops (split by COMPILE_SHARE)
    soft_deadline_s: float  # after it only ours and eager run
    deadline_s: float  # after it no case starts


class Runner:
    def __init__(self, device: torch.device, cfg: C.TimingConfig, policy: Policy, quick: bool):
        self.device, self.cfg, self.policy, self.quick = device, cfg, policy, quick
        self.t0 = time.perf_counter()
        self.sleeper = C.Sleeper(device)
        self.copy: dict = {}
        self.matmul: dict = {}
        self.compile_spent: dict[str, float] = {}
        self.op = ""
        self._auto: dict = {}
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            self.mem_budget = int(min(16 * 2**30, 0.3 * free))
            self.rot_target, self.max_sets = 256 * 2**20, 512
        else:
            self.mem_budget, self.rot_target, self.max_sets = 512 * 2**20, 2**20, 3

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def late(self) -> bool:
        return self.elapsed() > self.policy.soft_deadline_s

    def measure_ceilings(self) -> None:
        small = self.quick or self.device.type != "cuda"
        nbytes = 64 * 2**20 if small else 2**30
        n, dtype = (512, torch.float32) if self.device.type != "cuda" else (8192, torch.bfloat16)
        for key, fn in (("copy", lambda: C.measure_copy_bandwidth(self.device, nbytes, self.cfg, self.sleeper)),
                        ("matmul", lambda: C.measure_matmul_rate(self.device, n, dtype, self.cfg, self.sleeper))):
            try:
                setattr(self, key, fn())
            except Exception as e:  # noqa: BLE001
                setattr(self, key, {"error": C.err_str(e)})
            self.free()

    def free(self) -> None:
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - alive() reports it
                pass

    def alive(self) -> bool:
        if self.device.type != "cuda":
            return True
        try:
            torch.cuda.synchronize(self.device)
            return torch.ones(1, device=self.device).add_(1).item() == 2.0
        except Exception:  # noqa: BLE001
            return False

    # -- what the case builders call -------------------------------------------------------------------------
    def compiled(self, fn, key):
        """torch.compile(fn) under the policy; raises Skip when off, out of budget or past the soft deadline."""
        p = self.policy
        if p.compile_mode == "off":
            raise Skip("--compile off")
        if self.late():
            raise Skip("deadline")
        if self.compile_spent.get(self.op, 0.0) > p.compile_budget_s * COMPILE_SHARE.get(self.op, 0.1):
            raise Skip("compile budget spent")
        if p.compile_mode == "auto":
            if key not in self._auto:
                self._auto[key] = torch.compile(fn)
            return self._auto[key]
        return torch.compile(fn, dynamic=False)

    def flex(self):
        """torch.compile(flex_attention, dynamic=False): specialised to the case's shapes, like the compiled
        reference under --compile static (a dynamic-shape graph would time a more general kernel)."""
        if self.policy.compile_mode == "off":
            raise Skip("--compile off")
        if self.late():
            raise Skip("deadline")
        from torch.nn.attention.flex_attention import flex_attention

        return torch.compile(flex_attention, dynamic=False)

    # -- one case ---------------------------------------------------------------------------------------------
    def run_case(self, case) -> dict:
        row = dict(op=case.op, label=case.label, bytes=case.nbytes, flops=case.flops, notes=case.notes,
                   methods={}, checks={})
        copy_GBps = self.copy.get("GBps")
        row.update(C.floor_us(case.nbytes, case.flops, copy_GBps, self.matmul.get("TFLOPs")))
        if self.elapsed() > self.policy.deadline_s:
            row["error"] = "skipped: deadline"
            return row
        sets = []
        try:
            n_sets = C.rotation_sets(case.bytes_per_set, self.rot_target, min(self.max_sets, case.max_sets),
                                     self.mem_budget, case.alloc_per_set)
            for i in range(n_sets):
                s = case.make_set(i)
                s["_idx"] = i
                sets.append(s)
            row["n_sets"] = n_sets
            row["rotating_bytes"] = n_sets * case.bytes_per_set
            truth = case.truth(case.check_set(sets[0]))
        except Exception as e:  # noqa: BLE001
            row["error"] = "inputs/truth: " + C.err_str(e)
            sets = []
            self._after_error(row)
            return row
        for m in case.methods:
            res = row["methods"][m.name] = {}
            fn = None
            try:
                if m.kind not in ("ours", "eager") and self.late():
                    raise Skip("deadline")
                t0 = time.perf_counter()
                fn = m.build(sets)
                res["build_s"] = time.perf_counter() - t0
                if case.mutates and m is not case.methods[0]:
                    truth = None
                    truth = case.truth(case.check_set(sets[0]))
                cs = case.check_set(sets[0])
                t0 = time.perf_counter()
                out = fn(cs)
                C.sync(self.device)
                res["first_call_s"] = time.perf_counter() - t0
                if m.kind == "compile":
                    res["compile_mode"] = self.policy.compile_mode
                    self.compile_spent[self.op] = self.compile_spent.get(self.op, 0.0) + res["first_call_s"]
                row["checks"][m.name] = case.check(m.post(case.output_of(cs, out)), truth)
                del cs, out
            except Skip as e:
                res["skipped"] = str(e)
                continue
            except Exception as e:  # noqa: BLE001
                res["error"] = C.err_str(e)
                fn = None
                self._after_error(row)
                continue
            try:
                res.update(C.time_calls(fn, sets, self.device, self.cfg, self.sleeper))
                res["GBps"] = case.nbytes / (res["median_us"] * 1e-6) / 1e9
                if copy_GBps:
                    res["pct_copy_bw"] = 100 * res["GBps"] / copy_GBps
                if row.get("floor_us"):
                    res["pct_floor"] = 100 * row["floor_us"] / res["median_us"]
            except Exception as e:  # noqa: BLE001
                res["error"] = "timing: " + C.err_str(e)
                fn = None
                self._after_error(row)
            fn = None
            self.free()
        sets = []
        self.free()
        return row

    def _after_error(self, row: dict) -> None:
        self.free()
        if not self.alive():
            row["context_lost"] = True
            raise DeadContext(row)
