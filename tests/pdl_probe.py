"""Decode on CUDA and print what came out, for test_cuda_engine's programmatic-dependent-launch test.

Run as ``python tests/pdl_probe.py`` with ``HYDRA_FAST_PDL`` set or not (it is read once per process): one JSON
line with the tokens, the accept lengths and a digest of the KV cache, for bf16 and fp32, with oracle Hydra++
heads over a model whose head size (64) takes the tensor-core attention and a prompt long enough for split KV.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oracle_heads import OracleHeads, bind, true_sequences  # noqa: E402

from hydra_fast.heads import DraftHeads  # noqa: E402
from hydra_fast.model import HydraModel  # noqa: E402


def main() -> None:
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=211, max_position_embeddings=1024)
        base = LlamaForCausalLM(cfg).eval().to("cuda", dtype)
        ids = torch.randint(0, 211, (1, 300), device="cuda")
        n = 41
        oracle = OracleHeads(DraftHeads.from_base(base, "hydra++"), true_sequences(base, [ids], n), 3)
        oracle = oracle.to("cuda", dtype)
        with bind(oracle):
            model = HydraModel(base, oracle, max_cache_len=512, tree="mc_sim_7b_63")
            res = model.generate(ids, max_new_tokens=n, return_dict_in_generate=True)
        cache = model._engine.cache
        digest = hashlib.sha256()
        L = int(cache.lens[0])  # the positions written: the prompt and the accepted tokens
        for t in (cache.k, cache.v):
            digest.update(t[:, :, :, :L].float().cpu().numpy().tobytes())
        out[str(dtype)] = {"tokens": res.sequences[0].tolist(), "accept": res.accept_lengths[0],
                           "cache": digest.hexdigest(), "fused": model._fused is not None}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
