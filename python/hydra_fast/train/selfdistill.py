"""Build a self-distillation training set: offline prompts, answered by the base model itself.

Prompts come from ``sources`` (seeded, deduplicated, MT-Bench-guarded); each is wrapped in the base's chat
template and answered with HF ``generate`` in left-padded batches (greedy, or sampled with a per-shard seed).
Shards are written atomically and listed in the manifest as they finish, so an interrupted build resumes where
it stopped and produces the same files as an uninterrupted one.

Several processes can build one directory together (``workers=K``, one call per ``worker`` in 0..K-1, on one
GPU or several): worker w answers the shards s with s % K == w and the manifest is updated under a file lock.
A shard's content depends only on its prompts and the seed, so the files are those of a one-process build.
Generation of a small model is bound by host time per step, so K processes on one GPU finish K times sooner
until the GPU is busy.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hydra_fast import safe_io
from hydra_fast.heads import BaseFingerprint, fingerprint
from hydra_fast.hub import sha256_file
from hydra_fast.train import sources as src
from hydra_fast.train.dataset import (FORMAT, MANIFEST, PROMPTS, DataError, DataMismatchError, check_base,
                                      collate, read_manifest, write_json_atomic)


@dataclass(frozen=True)
class BuildConfig:
    sources: tuple[str, ...] = ("builtin:1000", "stdlib:1000")  # SourceSpec strings
    seed: int = 0
    max_new_tokens: int = 256
    do_sample: bool = False  # False: greedy answers (what greedy speculative decoding must predict)
    temperature: float = 0.7
    top_p: float = 0.95
    batch_size: int = 32  # prompts per generate call
    shard_size: int = 512  # prompts per shard (the unit of resume)
    max_prompt_tokens: int = 512  # longer prompts are skipped
    chat_template: bool = True  # False: raw prompt text (base models without a chat template)
    system_prompt: str | None = None
    # cached with every sample, so training need not run the base model for them (dataset.py says how stored):
    cache_hidden: bool = False  # the base's last hidden state at every position (bf16)
    cache_top_k: int = 0  # the base's top-k next-token log-probabilities at every answer position (0: none)

    def __post_init__(self):
        if self.cache_top_k < 0:
            raise ValueError(f"cache_top_k must be >= 0, got {self.cache_top_k}")


def check_tokenizer(tokenizer, base_model) -> None:
    """DataMismatchError when the tokenizer cannot belong to base_model (more tokens than its vocabulary)."""
    vocab = base_model.get_output_embeddings().weight.shape[0]
    n = len(tokenizer)
    if n > vocab:
        raise DataMismatchError(f"the tokenizer has {n} tokens but the model's vocabulary has {vocab}: the tokenizer "
                                "belongs to another model; load the tokenizer saved with this model")


def tokenizer_digest(tokenizer) -> str:
    n = len(tokenizer)
    probe = sorted({round(i * (n - 1) / 63) for i in range(64)})
    blob = json.dumps([n, tokenizer.convert_ids_to_tokens(probe), getattr(tokenizer, "chat_template", None)])
    return hashlib.sha256(blob.encode()).hexdigest()


def encode_prompt(tokenizer, prompt: str, config: BuildConfig) -> list[int]:
    if not config.chat_template:
        return tokenizer(prompt)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; pass --no-chat-template to use raw prompts")
    messages = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
    messages.append({"role": "user", "content": prompt})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_ids(base_model, tokenizer) -> list[int]:
    eos = base_model.generation_config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise DataError("neither the model's generation config nor the tokenizer names an end-of-sequence token")
    return ids


@torch.no_grad()
def answer(base_model, prompts: list[list[int]], config: BuildConfig, eos: list[int], pad: int) -> list[list[int]]:
    """The base model's answers (token ids, up to and including the first end token) to tokenized prompts."""
    device = base_model.get_output_embeddings().weight.device
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad, dtype=torch.long)  # [B, L], left-padded
    mask = torch.zeros(len(prompts), L, dtype=torch.long)  # [B, L]
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p)
        mask[b, L - len(p):] = 1
    sampling = dict(do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=0) \
        if config.do_sample else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = base_model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                              max_new_tokens=config.max_new_tokens, eos_token_id=eos, pad_token_id=pad, **sampling)
    answers = []
    for row in out[:, L:].tolist():  # [B, new]
        end = next((j for j, t in enumerate(row) if t in eos), None)
        answers.append(row if end is None else row[: end + 1])
    return answers


@torch.no_grad()
def teacher_cache(base_model, samples: list[tuple[list[int], int, int]], config: BuildConfig,
                  batch_size: int = 16, chunk_rows: int = 4096) -> dict[str, torch.Tensor]:
    """The base model's view of finished samples, for ``cache_hidden`` / ``cache_top_k``.

    hidden bf16 [sum L, d]: last hidden state (after the final norm) at every position of every sample;
    top_ids int32 / top_logp fp16 [sum A, k]: the top-k log-probabilities of the token after position p, for
    p = answer_start - 1 .. L - 2 of each sample (A = L - answer_start rows: one per answer token)."""
    device = base_model.get_output_embeddings().weight.device
    decoder, lm = base_model.get_decoder(), base_model.get_output_embeddings()
    k = min(config.cache_top_k, lm.weight.shape[0])
    empty = [s[2] for s in samples if s[1] < 1]
    if empty:  # the teacher for answer token 0 would be the position before the sample
        raise DataError(f"samples {empty[:5]} have an empty prompt; the teacher cache needs a prompt token")
    hidden_rows, top_ids, top_logp = [None] * len(samples), [None] * len(samples), [None] * len(samples)
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i][0]))  # similar lengths share a batch
    for b in range(0, len(order), batch_size):
        idx = order[b: b + batch_size]
        batch = collate([(torch.tensor(samples[i][0]), samples[i][1]) for i in idx],
                        max(len(samples[i][0]) for i in idx)).to(device)
        h = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state  # [B, T, d]
        if config.cache_hidden:
            for r, i in enumerate(idx):
                hidden_rows[i] = h[r, : len(samples[i][0])].to(torch.bfloat16).cpu()
        if k:
            rows = h[:, :-1][batch.answer_mask[:, 1:]]  # [sum A, d]: positions whose next token is an answer token
            vals, inds = [], []
            for c in range(0, rows.shape[0], chunk_rows):
                v, j = torch.log_softmax(lm(rows[c: c + chunk_rows]).float(), dim=-1).topk(k, dim=-1)  # [c, k]
                vals.append(v.half().cpu())
                inds.append(j.int().cpu())
            counts = [len(samples[i][0]) - samples[i][1] for i in idx]  # sample-major, like the rows
            vals = torch.cat(vals) if vals else torch.zeros(0, k, dtype=torch.float16)
            inds = torch.cat(inds) if inds else torch.zeros(0, k, dtype=torch.int32)
            for i, v, j in zip(idx, vals.split(counts), inds.split(counts)):
                top_logp[i], top_ids[i] = v, j
    out = {}
    if config.cache_hidden:
        out["hidden"] = torch.cat(hidden_rows)
    if k:
        out["top_ids"], out["top_logp"] = torch.cat(top_ids), torch.cat(top_logp)
    return out


def _shard_seed(seed: int, shard: int) -> int:
    return (seed * 1_000_003 + shard) % (1 << 63)


def _write_shard(path: Path, samples: list[tuple[list[int], int, int]], extra: dict | None = None) -> dict:
    """samples: (prompt + answer ids, answer_start, prompt_index); extra: teacher_cache tensors. Atomic;
    returns its manifest entry."""
    from safetensors.torch import save_file

    lengths = [len(s[0]) for s in samples]
    offsets = torch.zeros(len(samples) + 1, dtype=torch.long)  # [n + 1]
    offsets[1:] = torch.tensor(lengths, dtype=torch.long).cumsum(0)
    tensors = {
        "tokens": torch.tensor([t for s in samples for t in s[0]], dtype=torch.int32),  # [sum L]
        "offsets": offsets,
        "answer_start": torch.tensor([s[1] for s in samples], dtype=torch.int32),  # [n]
        "prompt_index": torch.tensor([s[2] for s in samples], dtype=torch.long),  # [n]
        **(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"format": FORMAT})
    tmp.replace(path)
    return {"file": path.name, "num_samples": len(samples), "num_tokens": sum(lengths),
            "answer_tokens": sum(len(s[0]) - s[1] for s in samples), "sha256": sha256_file(path)}


def _check_resume(manifest: dict, fresh: dict, directory: Path) -> None:
    keys = ("base", "tokenizer", "recipe", "prompts_sha256")
    # recipe fields added since a manifest was written count as their defaults
    old = {**manifest, "recipe": {**dataclasses.asdict(BuildConfig()), **manifest.get("recipe", {}),
                                  "sources": manifest.get("recipe", {}).get("sources")}}
    diff = [k for k in keys if k != "base" and old.get(k) != fresh[k]]
    if "base" not in old or BaseFingerprint(**old["base"]).differences(BaseFingerprint(**fresh["base"])):
        diff.insert(0, "base")
    if manifest.get("format") != FORMAT or diff:
        raise DataMismatchError(
            f"{directory / MANIFEST} was written for another build ({', '.join(diff) or 'format'} differ"
            f"{': another base model' if 'base' in diff else ''}); use a new output directory, or --overwrite")


def _locked(directory: Path):
    """An exclusive lock on the data directory's manifest, held across read-modify-write by any worker."""
    return safe_io.locked(directory / ".manifest.lock")


def build(base_model, tokenizer, directory, config: BuildConfig = BuildConfig(), mt_bench=None,
          time_budget_s: float | None = None, overwrite: bool = False, progress: bool = True,
          workers: int = 1, worker: int = 0) -> dict:
    """Generate (or finish) the data set in ``directory``; returns the manifest.

    mt_bench: the MT-Bench question file to guard against (default: ``sources.find_mt_bench()``).
    time_budget_s: stop before a shard that would end past the budget (the manifest says complete: false).
    workers, worker: this call answers only the shards s with s % workers == worker; the other workers run
    the same call (same directory and config) in other processes, at the same time or later."""
    from tqdm.auto import tqdm

    t0 = time.monotonic()
    directory = Path(directory)
    if not (isinstance(workers, int) and isinstance(worker, int) and workers >= 1 and 0 <= worker < workers):
        raise ValueError(f"need workers >= 1 and 0 <= worker < workers, got worker {worker} of {workers}")
    if overwrite and workers > 1:
        raise DataError(f"overwrite with {workers} workers would let one worker delete the others' shards; "
                        f"delete {directory} first, then start the workers")
    check_tokenizer(tokenizer, base_model)
    specs = [src.SourceSpec.parse(s) for s in config.sources]
    prompts, counts = src.collect_prompts(specs, config.seed)
    if not prompts:
        raise DataError(f"the prompt sources {', '.join(config.sources)} gave no prompts")
    guard_file = src.find_mt_bench(mt_bench)
    checked = src.check_no_mt_bench(prompts, guard_file)
    prompts_sha = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    fresh = {
        "format": FORMAT, "base": dataclasses.asdict(fingerprint(base_model)),
        "base_name": str(getattr(base_model.config, "_name_or_path", "")),
        "tokenizer": tokenizer_digest(tokenizer), "recipe": json.loads(json.dumps(dataclasses.asdict(config))),
        "prompt_counts": counts, "num_prompts": len(prompts), "prompts_sha256": prompts_sha,
        "mt_bench_guard": {"file": str(guard_file) if guard_file else None, "questions_checked": checked},
        "shards": {}, "skipped_long_prompts": 0, "complete": False,
    }
    manifest_path = directory / MANIFEST
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory):  # the first worker to get here writes the manifest; the others check it
        if manifest_path.exists() and not overwrite:
            manifest = read_manifest(directory)
            if manifest.get("base") != fresh["base"]:
                check_base(manifest, base_model, str(directory))
            _check_resume(manifest, fresh, directory)
        else:
            for old in directory.glob("shard-*.safetensors"):
                old.unlink()
            manifest = fresh
            with open(directory / PROMPTS, "w") as f:
                for i, p in enumerate(prompts):
                    f.write(json.dumps({"index": i, "prompt": p}) + "\n")
            write_json_atomic(manifest_path, manifest)

    eos = stop_ids(base_model, tokenizer)
    pad = base_model.generation_config.pad_token_id
    pad = eos[0] if pad is None else (pad if isinstance(pad, int) else pad[0])
    num_shards = -(-len(prompts) // config.shard_size)
    mine = [s for s in range(num_shards) if s % workers == worker]
    done = {k for k, v in manifest["shards"].items() if (directory / v["file"]).is_file()
            and sha256_file(directory / v["file"]) == v["sha256"]}
    todo = [s for s in mine if f"{s:05d}" not in done]
    bar = tqdm(total=sum(min(len(prompts), (s + 1) * config.shard_size) - s * config.shard_size for s in todo),
               unit="prompt", desc="self-distill" if workers == 1 else f"self-distill {worker + 1}/{workers}",
               disable=not progress)
    slowest, finished = 0.0, 0
    for s in todo:
        key = f"{s:05d}"
        over = time_budget_s is not None and time.monotonic() - t0 + slowest > time_budget_s
        if over and (finished or manifest["shards"]):  # a budget always buys at least one shard
            break
        ts = time.monotonic()
        lo, hi = s * config.shard_size, min(len(prompts), (s + 1) * config.shard_size)
        encoded = [(i, encode_prompt(tokenizer, prompts[i], config)) for i in range(lo, hi)]
        kept = [(i, p) for i, p in encoded if len(p) <= config.max_prompt_tokens]
        kept.sort(key=lambda e: (-len(e[1]), e[0]))  # similar lengths share a batch: less padding
        torch.manual_seed(_shard_seed(config.seed, s))
        samples = []
        for b in range(0, len(kept), config.batch_size):
            chunk = kept[b: b + config.batch_size]
            answers = answer(base_model, [p for _, p in chunk], config, eos, pad)
            samples += [(p + a, len(p), i) for (i, p), a in zip(chunk, answers) if a]
            bar.update(len(chunk))
        bar.update(len(encoded) - len(kept))
        samples.sort(key=lambda e: e[2])
        extra = teacher_cache(base_model, samples, config) if (config.cache_hidden or config.cache_top_k) else None
        entry = _write_shard(directory / f"shard-{key}.safetensors", samples, extra)
        entry["seconds"] = round(time.monotonic() - ts, 2)
        entry["skipped_long_prompts"] = len(encoded) - len(kept)
        with _locked(directory):  # other workers may have added their shards since we last read
            manifest = read_manifest(directory)
            manifest["shards"][key] = entry
            manifest["skipped_long_prompts"] = sum(v.get("skipped_long_prompts", 0)
                                                   for v in manifest["shards"].values())
            manifest["complete"] = len(manifest["shards"]) == num_shards
            write_json_atomic(manifest_path, manifest)
        finished += 1
        slowest = max(slowest, time.monotonic() - ts)
    bar.close()
    with _locked(directory):
        manifest = read_manifest(directory)
        manifest["complete"] = len(manifest["shards"]) == num_shards
        write_json_atomic(manifest_path, manifest)
    if not manifest["shards"]:
        raise DataError(f"{directory}: no shard was finished (time budget {time_budget_s} s too short?)")
    if not any(v["num_samples"] for v in manifest["shards"].values()):
        raise DataError(f"{directory}: the data set is empty: every prompt was longer than max_prompt_tokens="
                        f"{config.max_prompt_tokens} or got an empty answer")
    return manifest
