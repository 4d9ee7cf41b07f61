"""Bad input gets a clear error that says what to do; long generation does not grow memory."""
from __future__ import annotations

import gc
import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hydra_fast.heads import DraftHeads, HeadsMismatchError
from hydra_fast.model import HydraModel, UnsupportedModelError

V = 211


def llama(seed=0, vocab=V, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def test_unsupported_architecture_names_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)).eval()
    with pytest.raises(UnsupportedModelError, match="llama, qwen2, qwen3, mistral"):
        HydraModel(gpt2)


def test_heads_for_another_base_model(tmp_path):
    base, other = llama(0), llama(1)
    DraftHeads.from_base(other, "hydra").save_pretrained(tmp_path)
    with pytest.raises(HeadsMismatchError, match="lm head"):
        HydraModel.from_pretrained(base, tmp_path)
    with pytest.raises(HeadsMismatchError):
        HydraModel(llama(0, vocab=300), DraftHeads.from_base(base, "medusa"))


def test_heads_and_model_dtype_mismatch():
    base = llama()
    heads = DraftHeads.from_base(base, "hydra").to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"heads.to\("):
        HydraModel(base, heads)


def test_prompt_plus_new_tokens_over_capacity():
    base = llama()
    model = HydraModel(base, DraftHeads.from_base(base, "medusa"), max_cache_len=100)
    with pytest.raises(ValueError, match="max_cache_len=100"):
        model.generate(torch.randint(0, V, (1, 30)), max_new_tokens=20)  # 30 + 20 + 64 tree nodes > 100


def test_empty_prompt_and_empty_row():
    model = HydraModel(llama(), None, max_cache_len=64)
    with pytest.raises(ValueError, match="empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        model.generate(torch.ones(2, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]))


def test_batch_size_over_limit_and_streamer_batch():
    model = HydraModel(llama(), None, max_cache_len=64, max_batch_size=2)
    with pytest.raises(ValueError, match="max_batch_size"):
        model.generate(torch.ones(3, 4, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate(torch.ones(2, 4, dtype=torch.long), max_new_tokens=2, streamer=object())


@pytest.mark.parametrize("tree, message", [([[0], [1, 0]], "parent"), ([[0], [0]], "more than once"),
                                           ("no_such_tree", "mc_sim_7b_63"), ([[0], [-1]], "rank")])
def test_invalid_tree(tree, message):
    base = llama()
    with pytest.raises(ValueError, match=message):
        HydraModel(base, DraftHeads.from_base(base, "hydra"), tree=tree)


def test_unsupported_generate_arguments():
    model = HydraModel(llama(), None, max_cache_len=64)
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(TypeError, match="num_beams"):
        model.generate(ids, num_beams=4)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, do_sample=True, temperature=0.0)


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_ten_thousand_tokens_do_not_grow_memory():
    base = llama()
    model = HydraModel(base, DraftHeads.from_base(base, "hydra++"), max_cache_len=512)
    ids = torch.randint(0, V, (1, 8))
    model.generate(ids, max_new_tokens=200)  # warm-up: engine buffers, allocator pools
    gc.collect()
    before = _rss_bytes()
    total = 0
    while total < 10_000:
        out = model.generate(ids, max_new_tokens=400, eos_token_id=[])
        total += out.shape[1] - 8
    gc.collect()
    grown = _rss_bytes() - before
    assert total >= 10_000
    assert grown < 20 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over {total} tokens"
