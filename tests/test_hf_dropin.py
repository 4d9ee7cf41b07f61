"""HydraModel as a drop-in for an HF model: generation_config defaults, HF keyword arguments, pipelines."""
from __future__ import annotations

import pytest
import torch
from _train_tiny import tiny_llama
from transformers import GenerationConfig, StoppingCriteria

from hydra_fast import generate_args
from hydra_fast.heads import DraftHeads
from hydra_fast.model import HydraModel

V = 211


def llama(seed=0):
    return tiny_llama(vocab=V, seed=seed)


@pytest.fixture(scope="module")
def pair():
    base = llama()
    return base, HydraModel(base, DraftHeads.from_base(base, "hydra"), tree="tiny")


def ids(n=7, seed=0):
    return torch.randint(0, V, (1, n), generator=torch.Generator().manual_seed(seed))


def test_looks_like_a_model(pair):
    base, model = pair
    assert model.config is base.config and model.generation_config is base.generation_config
    assert model.device == torch.device("cpu") and model.dtype == torch.float32 and model.can_generate()
    assert model.eval() is model and model.to("cpu") is model
    x = ids()
    assert torch.equal(model(x).logits, base(x).logits)


def test_generation_config_supplies_defaults():
    base = llama()
    base.generation_config = GenerationConfig(do_sample=True, temperature=0.5, top_p=0.8, top_k=20,
                                              max_new_tokens=9, eos_token_id=[3, 4], pad_token_id=3)
    args = generate_args.resolve({}, None, base.generation_config, prompt_len=5)
    assert (args.do_sample, args.temperature, args.top_p, args.top_k, args.max_new_tokens) == (True, 0.5, 0.8, 20, 9)
    assert args.eos_token_ids == {3, 4} and args.pad_token_id == 3
    given = GenerationConfig(do_sample=False, max_new_tokens=4)
    args = generate_args.resolve({"max_length": 12}, given, base.generation_config, prompt_len=5)
    assert (args.do_sample, args.max_new_tokens, args.eos_token_ids) == (False, 7, {3, 4})
    args = generate_args.resolve({"temperature": 0.9, "top_k": None}, None, base.generation_config, 5)
    assert (args.temperature, args.top_k) == (0.9, 20)


def test_a_sampling_model_samples_by_default(pair):
    base, model = pair
    x = ids(6)
    saved = base.generation_config
    try:
        base.generation_config = GenerationConfig(do_sample=True, temperature=5.0, max_new_tokens=12)
        greedy = model.generate(x, do_sample=False)
        torch.manual_seed(0)
        sampled = [model.generate(x) for _ in range(3)]
    finally:
        base.generation_config = saved
    assert all(s.shape == greedy.shape for s in sampled)
    assert any(not torch.equal(s, greedy) for s in sampled)


def test_generation_config_argument(pair):
    base, model = pair
    x = ids()
    out = model.generate(x, generation_config=GenerationConfig(max_new_tokens=5, do_sample=False))
    assert out.tolist() == base.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0).tolist()


def test_no_op_hf_arguments_are_accepted(pair):
    base, model = pair
    x = ids()
    want = model.generate(x, max_new_tokens=6)
    out = model.generate(inputs=x, max_new_tokens=6, use_cache=True, num_beams=1, num_return_sequences=1,
                         output_scores=False, top_k=None, top_p=None, temperature=None, repetition_penalty=1.0,
                         output_attentions=False, logits_processor=None, synced_gpus=False, bos_token_id=1)
    assert torch.equal(out, want)
    assert torch.equal(model.generate(x, max_length=x.shape[1] + 6), want)


@pytest.mark.parametrize("kwargs,name", [({"num_beams": 4}, "num_beams"), ({"repetition_penalty": 1.2}, "repetition"),
                                         ({"num_return_sequences": 2}, "num_return_sequences"),
                                         ({"output_scores": True}, "output_scores"),
                                         ({"generation_config": GenerationConfig(num_beams=3)}, "num_beams"),
                                         ({"assistant_model": object()}, "assistant_model")])
def test_real_unsupported_requests_are_refused(pair, kwargs, name):
    _, model = pair
    with pytest.raises(TypeError, match=name):
        model.generate(ids(), max_new_tokens=3, **kwargs)


def test_unsupported_base_defaults_warn_not_fail():
    base = llama()
    base.generation_config = GenerationConfig(repetition_penalty=1.05)
    model = HydraModel(base)
    with pytest.warns(UserWarning, match="repetition_penalty"):
        out = model.generate(ids(), max_new_tokens=3)
    assert out.shape == (1, 10)


def test_plain_list_of_stopping_criteria(pair):
    base, model = pair
    x = ids()
    full = model.generate(x, max_new_tokens=10)

    class AtLength(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= x.shape[1] + 4, dtype=torch.bool)
    out = model.generate(x, max_new_tokens=10, stopping_criteria=[AtLength()])
    assert torch.equal(out, full[:, : x.shape[1] + 4])


def test_text_generation_pipeline(pair, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    base, model = pair
    vocab = {f"w{i}": i for i in range(V)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w0", pad_token="w0", eos_token="w2")
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    text = "w5 w9 w17 w3"
    got = pipe(text, max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    x = tok(text, return_tensors="pt")["input_ids"]
    want = base.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False)
    assert got == tok.decode(want[0, x.shape[1]:], skip_special_tokens=True)
