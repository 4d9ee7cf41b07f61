"""The model card (README.md) written next to a trained head set."""
from __future__ import annotations

import json
from pathlib import Path

from hydra_fast.train.config import HeadRecipe, TrainConfig


def _size_mb(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.glob("model*.safetensors")) / 1e6


def _cache_line(recipe_d: dict, config) -> str:
    """How the base's hidden states and teacher distribution reached the heads."""
    use = getattr(config, "use_cache", True)
    hidden = "hidden states cached by the data build" if use and recipe_d.get("cache_hidden") else \
        "hidden states from the base forward at every step"
    k = recipe_d.get("cache_top_k", 0) if use else 0
    teacher = f"teacher = the cached top-{k} log-probabilities, renormalised" if k else \
        "teacher = the base LM head's full distribution"
    return f"{hidden}; {teacher}"


def write_card(directory, recipe: HeadRecipe, config: TrainConfig, manifest: dict, eval_heads: list[dict] | None,
               steps: int, seconds: float, command: str | None) -> None:
    directory = Path(directory)
    with open(directory / "config.json") as f:
        heads_cfg = json.load(f)
    base = manifest["base"]
    recipe_d = manifest["recipe"]
    shards = manifest.get("shards", {}).values()
    samples = sum(s["num_samples"] for s in shards)
    answer_tokens = sum(s["answer_tokens"] for s in shards)
    gen = "sampled (T={temperature}, top-p {top_p})".format(**recipe_d) if recipe_d["do_sample"] else "greedy"
    guard = manifest.get("mt_bench_guard", {})
    lines = [
        f"# {recipe.kind} draft heads for {Path(manifest.get('base_name') or base['architecture']).name}",
        "",
        "Trained with `hydra_fast.train` (frozen base model, self-distilled data). Load with "
        "`DraftHeads.from_pretrained(this_dir, base_model)` or `HydraModel.from_pretrained(base, this_dir)`.",
        "",
        "## Heads",
        f"- kind `{recipe.kind}`, {heads_cfg['num_heads']} heads x {heads_cfg['num_layers']} layers, "
        f"{'own LM heads' if heads_cfg['own_lm_head'] else 'shared (frozen) base LM head'}, "
        f"{heads_cfg['dtype']}, {_size_mb(directory):.1f} MB"
        f"{f', prefix layer init {recipe.prefix_init}' if recipe.kind == 'hydra++' else ''}",
        f"- base: {base['architecture']} ({base['model_type']}), hidden {base['hidden_size']}, vocab "
        f"{base['vocab_size']}, LM-head digest {base['lm_head_digest'][:12]}",
        "",
        "## Data (self-distillation)",
        f"- prompts: {', '.join(f'{k} ({v})' for k, v in manifest.get('prompt_counts', {}).items())}; "
        f"seed {recipe_d['seed']}",
        f"- answered by the base model itself with its chat template ({'on' if recipe_d['chat_template'] else 'off'}),"
        f" {gen}, at most {recipe_d['max_new_tokens']} new tokens",
        f"- {samples} samples, {answer_tokens} answer tokens (only answer tokens are scored)"
        f"{'' if manifest.get('complete') else '; the build stopped early (time budget)'}"
        f"{f'; trained on a seeded subset of {config.train_samples}' if config.train_samples else ''}",
        f"- MT-Bench guard: {guard.get('questions_checked', 0)} first turns checked"
        f" ({guard.get('file') or 'no MT-Bench file found'})",
        "",
        "## Training",
        f"- command: `{command or '(library call)'}`",
        f"- {steps} optimizer steps in {seconds:.0f} s; micro-batch {config.batch_size} x grad-accum "
        f"{config.grad_accum} (per rank), max_len {config.max_len}",
        f"- AdamW lr {recipe.lr} (warm-up {config.warmup:.0%}, cosine to {config.min_lr_ratio}x), weight decay "
        f"{recipe.decay(config)}, grad clip {config.grad_clip}",
        f"- loss per head: {1 - recipe.teacher_weight:g} x CE(data token) + {recipe.teacher_weight:g} x "
        f"KL(base distribution || head); head weights {recipe.head_decay}^i; dropout {recipe.dropout}, "
        f"input noise {recipe.noise}",
        f"- base outputs: {_cache_line(recipe_d, config)}",
        "",
        "## Held-out accuracy (head i predicts the token i + 2 ahead of its hidden state)",
    ]
    if eval_heads:
        lines += ["", "| head | top-1 | top-5 | CE | tokens |", "|---|---|---|---|---|"]
        lines += [f"| {i} | {h['top1']:.3f} | {h['top5']:.3f} | {h['ce']:.3f} | {h['tokens']} |"
                  for i, h in enumerate(eval_heads)]
    else:
        lines += ["", "(no held-out split)"]
    lines += ["", "Mean accepted length (tau) is measured by the decoding benchmarks, not by training.", ""]
    (directory / "README.md").write_text("\n".join(lines))
