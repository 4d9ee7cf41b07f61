"""Kernels per decoding step: torch.profiler over one eager (not graph-replayed) call of a step function.

On CUDA the count is of CUDA kernels launched (memcpy / memset excluded): what one CUDA graph of the step
replays. On the CPU there are no kernels to count; the count is of top-level aten ops (an aten op called
by another aten op is not counted again), labelled so.
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile


def kernels_per_step(step, device: torch.device) -> dict:
    """{count, what, top: the five most frequent names} for one call of ``step()``."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize(device)
    names: dict[str, int] = {}
    for evt in prof.events():
        if cuda:
            if evt.device_type != torch.autograd.DeviceType.CUDA or evt.name.startswith(("Memcpy", "Memset")):
                continue
        elif not top_level(evt, ("aten::",)):
            continue
        names[evt.name] = names.get(evt.name, 0) + 1
    top = sorted(names.items(), key=lambda kv: -kv[1])[:5]
    return dict(count=sum(names.values()), what="CUDA kernels" if cuda else "aten ops (top-level)",
                top=[dict(name=n[:80], count=c) for n, c in top])


def top_level(evt, prefixes: tuple[str, ...]) -> bool:
    """Whether a CPU event is an op named with one of `prefixes` that no other such op called."""
    if not evt.name.startswith(prefixes):
        return False
    parent = evt.cpu_parent
    while parent is not None:
        if parent.name.startswith(prefixes):
            return False
        parent = parent.cpu_parent
    return True
