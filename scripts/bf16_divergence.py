"""Why bf16 greedy output parts from HF greedy: HF's own attention implementations part from each other too.

    python scripts/bf16_divergence.py    # CPU, SmolLM2 bf16, 4 MT-Bench first turns, 96 new tokens

Prints, per prompt, the first position where two greedy runs differ: HF sdpa vs HF eager (both bf16), ours vs
each, and HF bf16 vs HF fp32. None = identical for all 96 tokens.
"""
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, AutoTokenizer
from hydra_fast.model import HydraModel
from hydra_fast import hub
from hydra_fast.generate import first_divergence
p = hub.default_model_path()
tok = AutoTokenizer.from_pretrained(p)
rows = [json.loads(x) for x in open(ROOT.parent / "shared" / "data" / "mt_bench.jsonl")][:4]
sd = AutoModelForCausalLM.from_pretrained(p, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
ea = AutoModelForCausalLM.from_pretrained(p, dtype=torch.bfloat16, attn_implementation="eager").eval()
f32 = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
ours = HydraModel(sd, None, max_cache_len=512)
N = 96
for r in rows:
    ids = tok.apply_chat_template([{"role": "user", "content": r["turns"][0]}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    T = ids.shape[1]
    a = sd.generate(ids, max_new_tokens=N, do_sample=False)[0, T:].tolist()
    b = ea.generate(ids, max_new_tokens=N, do_sample=False)[0, T:].tolist()
    c = ours.generate(ids, max_new_tokens=N)[0, T:].tolist()
    d = f32.generate(ids, max_new_tokens=N, do_sample=False)[0, T:].tolist()
    print(f"q{r['question_id']}: HF sdpa vs HF eager (both bf16) first diff {first_divergence(a, b)}; ours vs HF sdpa {first_divergence(c, a)}; ours vs HF eager {first_divergence(c, b)}; HF bf16 sdpa vs HF fp32 {first_divergence(a, d)}", flush=True)
