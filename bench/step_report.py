"""bench_step's Markdown: per model the plain step against its weight floor, the Hydra++ step by tree size
with its phases and projection at a measured tau, the compiled steps, kernels per step, and the targets."""
from __future__ import annotations

import common as C


# --------------------------------------------------------------------------------------------------
def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def _si(v) -> str:
    if v is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v:.0f} "


def _verdict(met) -> str:
    return "not measured" if met is None else "met" if met else "MISSED"


def kernel_counts(report: dict) -> list[tuple[str, str]]:
    """(model/step, 'count what') for every step measured, for the Markdown."""
    out = []
    for name, r in report["models"].items():
        steps = [("plain", r.get("plain") or {})] + [(t["tree"], t) for t in r.get("trees", [])]
        steps += [(f"{c['tree']} compiled", c) for c in r.get("compiled", [])]
        for label, row in steps:
            k = row.get("kernels_per_step")
            if k:
                out.append((f"{name} {label}", f"{k['count']} {k['what']}"))
    return out


def render_md(report: dict) -> str:
    meta = report["meta"]
    tau = meta.get("tau")
    tau_label = f"{tau['tau']:.2f}" if tau else "-"
    copy, mm = meta.get("copy") or {}, meta.get("matmul") or {}
    lines = [f"## bench_step on {meta.get('device_name')} ({meta.get('date')}), {meta.get('dtype')}, context "
             f"{meta.get('prompt_len')} tokens; copy {_f(copy.get('GBps'), '{:.0f}')} GB/s, matmul "
             f"{_f(mm.get('TFLOPs'), '{:.3g}')} TFLOP/s (measured in this run)", ""]
    for name, r in report["models"].items():
        lines.append(f"### {name}: {r.get('layers')} layers, {_si(r.get('params'))} params, streams "
                     f"{_si(r.get('streamed_bytes'))}B a step (+ Hydra++ heads {_si(r.get('heads_bytes'))}B, "
                     f"KV {_si(r.get('kv_bytes_per_token', 0) * meta.get('prompt_len', 0))}B)")
        if "error" in r:
            lines.append(f"error: {r['error']}")
        h = r.get("plain_hf")
        if h:
            lines.append(f"- plain step through the HF modules: " + (h["error"] if "error" in h else
                         f"device {_f(h.get('device_ms'))} ms, wall {_f(h.get('wall_ms'))} ms, "
                         f"{h.get('kernels_per_step', {}).get('count', '-')} {h.get('kernels_per_step', {}).get('what', 'kernels')}"))
        if r.get("fast_path"):
            lines.append(f"- base forward: {r['fast_path']} (the rows below)")
        if r.get("draft_vocab"):
            lines.append(f"- the heads draft from a reduced vocabulary of {r['draft_vocab']} tokens")
        p = r.get("plain")
        if p and "error" not in p:
            lines += ["", C.md_table(
                ["plain step", "device ms", "wall ms", "weight floor ms", "x floor", "% of copy bw", "floor+KV ms",
                 "tok/s (wall)"],
                [["one graph", _f(p.get("device_ms")), _f(p.get("wall_ms")), _f(p.get("floor_ms")),
                  _f(p.get("x_floor"), "{:.2f}x"), _f(p.get("pct_bw"), "{:.0f}%"), _f(p.get("floor_kv_ms")),
                  _f(p.get("tok_s"), "{:.0f}")]])]
        elif p:
            lines.append(f"plain step error: {p['error']}")
        rows = []
        for t in r.get("trees", []):
            if "error" in t:
                rows.append([t["tree"], str(t.get("nodes", "-")), "err: " + t["error"][:70]] + ["-"] * 10)
                continue
            rows.append([t["tree"], str(t["nodes"]), _f(t.get("device_ms")), _f(t.get("wall_ms")),
                         _f(t.get("x_plain"), "{:.2f}x"), _f(t.get("draft_ms")), _f(t.get("verify_ms")),
                         _f(t.get("accept_ms")), _f(t.get("host_ms")), _f(t.get("floor_ms")), t.get("bound") or "-",
                         _f(t.get("proj_tok_s"), "{:.0f}"), _f(t.get("proj_speedup"), "{:.2f}x")])
        if rows:
            lines += ["", C.md_table(["Hydra++ tree", "nodes", "device ms", "wall ms", "x plain", "draft", "verify",
                                      "accept", "host", "floor ms", "bound", f"PROJECTED tok/s @tau {tau_label}",
                                      "proj. x plain"], rows)]
        for c in r.get("compiled", []):
            lines.append(f"- compiled step {c['tree']}: " + (c["error"] if "error" in c else
                         f"device {_f(c.get('device_ms'))} ms, wall {_f(c.get('wall_ms'))} ms"))
        tg = r.get("target")
        if tg:
            lines += ["", "Targets: Hydra++ 64-node (mc_sim_7b_63) step <= 1.25x plain: "
                      f"{_f(tg.get('x_plain'), '{:.2f}x')} {_verdict(tg.get('met'))}; plain step <= 1.2x weight "
                      f"floor: {_f(tg.get('plain_x_floor'), '{:.2f}x')} {_verdict(tg.get('plain_met'))}"]
        lines.append("")
    lines += ["device ms: median CUDA-event time of one graph replay (host clock on CPU); wall ms: replay + read-back",
              "of the result, host clock. draft/verify/accept: the step as three graphs (PhasedStepRunner); "
              "host = wall - device.",
              "PROJECTED tok/s = tau / wall ms, with tau measured elsewhere (random weights accept nothing): "
              + (f"{tau['tau']:.2f}, {tau['source']}." if tau
                 else "no measured tau given (--tau-json), no projection."),
              "kernels: " + ", ".join(f"{n} {k}" for n, k in kernel_counts(report)) if kernel_counts(report) else ""]
    if report.get("stopped_early"):
        lines.append(f"Stopped early: {report['stopped_early']}")
    return "\n".join(lines) + "\n"
