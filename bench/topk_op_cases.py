"""bench_ops.py cases of topk_rows: each row's k largest values and indices, where the draft heads pick their
candidate tokens.

Rows of the draft heads' logits in bf16: 6,592 compact (draft vocabulary) or 49,152 full-vocabulary (SmolLM2)
columns, 1 to 72 rows (one per parent node of a tree level), k = 1, 4, 10 (and 40: the sort path); 16,384 and
32,768 columns place ``ops.TOPK_ROWS_MAX_WIDTH`` (the widest rows the draft gives the kernel); 64 x 64 is a dynamic
tree's frontier choice. Byte model: the rows read once, values + indices (2 k + 8 k per row) written. Methods:
ours, the eager reference (a stable descending sort), torch.compile(reference) and torch.topk (the call it
replaces, ~27 us on the H200 for these shapes). Target: faster than torch.topk and torch.compile(reference).
"""
from __future__ import annotations

import torch

TOPK_OPS = ("topk_rows",)
SHAPES = {"full": ((1, 6592, 1), (10, 6592, 10), (72, 6592, 10), (4, 6592, 4), (10, 49152, 10), (1, 49152, 1),
                   (72, 49152, 4), (10, 6592, 40), (10, 16384, 10), (10, 32768, 10), (64, 64, 8)),
          "quick": ((3, 500, 4), (2, 83, 40))}


def _tie_order(out):
    """torch.topk's (values, indices) [R, k] in the twin's order: value descending, ties by index."""
    values, indices = out
    indices, perm = indices.sort(dim=-1)
    values, perm = values.gather(-1, perm).sort(dim=-1, descending=True, stable=True)
    return values, indices.gather(-1, perm)


def topk_cases(sizes, device, runner) -> list:
    import common as C
    import op_cases as O
    from hydra_fast import ops, reference

    preset = "quick" if sizes is O.SIZES["quick"] else "full"
    cases = []
    for R, V, k in SHAPES[preset]:
        nbytes = R * (2 * V + 10 * k)

        def make_set(i, R=R, V=V):
            g = O._gen(device, 9000 + i)
            return dict(x=O._randn((R, V), g, device, scale=3.0))  # bf16: ties between nearby logits

        ref = lambda s, k=k, impl=reference.topk_rows: impl(s["x"], k)  # noqa: E731  (impl: the compiled twin)
        methods = O._std_methods("topk_rows", runner, lambda s, k=k: ops.topk_rows(s["x"], k), ref)
        methods.append(O.Method("torch.topk", "baseline", lambda sets, k=k: lambda s: torch.topk(s["x"], k, dim=-1),
                                _tie_order))
        cases.append(O.Case(
            op="topk_rows", label=dict(R=R, V=V, k=k), nbytes=nbytes, flops=0,
            notes="bf16 rows read once, values + int64 indices written; fresh rows per input set. torch.topk's tie "
                  "order is unspecified: its output is put in ours before the check, and a mismatch left in its row "
                  "is a tie at the k-th place. Target: faster than torch.topk and torch.compile(reference).",
            make_set=make_set, bytes_per_set=nbytes, truth=ref, check=C.compare_exact, methods=methods))
    return cases


TOPK_BUILDERS = {"topk_rows": topk_cases}
