"""The cost of the target distribution of sampled decoding (``sampling.target_probs``) on the CPU.

    python bench/bench_sampling.py [--logits model|random] [--rows 64] [--threads 2] [--repeats 20]

A sampled tree step computes the target distribution of every tree node: [1, rows, V] float32 logits. For each
filter setting: the median wall time of target_probs (ms), the same with the nucleus found by a full sort of
every row (``--compare-sort``, the path of CUDA graphs and torch.compile), and the nucleus sizes of the rows.
``--logits model``: SmolLM2-135M's logits at the positions of its own sampled continuation of held-out prompts
(the base a tree step verifies); ``random``: N(0, 1) logits times ``--scale``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

CASES = {  # name: (top_k, top_p)
    "temperature only": (0, 1.0),
    "top_k=50": (50, 1.0),
    "top_p=0.9": (0, 0.9),
    "top_k=50 + top_p=0.9": (50, 0.9),
}


def model_logits(rows: int, temperature: float) -> torch.Tensor:
    """SmolLM2's logits [1, rows, V] at the positions of its sampled continuation of held-out prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hydra_fast import hub

    path = hub.default_model_path()
    tok, base = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    prompts = [json.loads(line)["prompt"] for line in (C.REPO / "bench/prompts/heldout.jsonl").open()]
    out, g = [], torch.Generator().manual_seed(0)
    for prompt in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]  # [1, T]
        while len(out) < rows:
            with torch.no_grad():
                last = base(ids).logits[0, -1].float()  # [V]
            out.append(last)
            nxt = torch.multinomial((last / temperature).softmax(-1), 1, generator=g)  # [1]
            if nxt.item() == tok.eos_token_id:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
        if len(out) == rows:
            return torch.stack(out).unsqueeze(0)  # [1, rows, V]
    raise ValueError(f"the held-out prompts gave fewer than {rows} positions")


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--logits", choices=["model", "random"], default="model")
    ap.add_argument("--rows", type=int, default=64, help="tree nodes: rows of the [1, rows, V] logits")
    ap.add_argument("--vocab", type=int, default=49152, help="V of --logits random (model: the model's)")
    ap.add_argument("--scale", type=float, default=4.0, help="std of --logits random")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per case (the median is printed)")
    ap.add_argument("--compare-sort", action="store_true", help="also time the full-sort nucleus")
    args = ap.parse_args()
    C.import_hydra_fast()
    from hydra_fast import sampling

    torch.set_num_threads(args.threads)
    if args.logits == "model":
        logits = model_logits(args.rows, args.temperature)
    else:
        logits = torch.randn(1, args.rows, args.vocab, generator=torch.Generator().manual_seed(0)) * args.scale
    T = args.temperature
    print(f"target_probs on {args.logits} logits {list(logits.shape)} float32, T={T}, {args.threads} threads, "
          f"torch {torch.__version__}; median of {args.repeats} calls, ms")
    for name, (k, p) in CASES.items():
        kept = (sampling.target_probs(logits, T, k, p) > 0).sum(-1).flatten().float()
        def call():
            return sampling.target_probs(logits, T, k, p)

        line = f"{name:22s} {median_ms(call, args.repeats):8.2f} ms"
        if args.compare_sort and p < 1.0:
            partial_sort, sampling._partial_sort = sampling._partial_sort, lambda t: False
            try:
                line += f"   full sort {median_ms(call, args.repeats):8.2f} ms"
            finally:
                sampling._partial_sort = partial_sort
        print(f"{line}   kept tokens per row: median {kept.median():.0f}, max {kept.max():.0f}")


if __name__ == "__main__":
    main()
