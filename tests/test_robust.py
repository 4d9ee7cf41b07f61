"""HydraModel under misuse: bad ids, failed builds, moved or changed weights, threads, inference mode,
setups it cannot run, and memory over many prompt lengths."""
from __future__ import annotations

import threading

import pytest
import torch
from _train_tiny import tiny_llama

from hydra_fast.heads import DraftHeads
from hydra_fast.model import HydraModel, UnsupportedModelError

V = 211


def llama(seed=0):
    return tiny_llama(vocab=V, seed=seed)


def hf_greedy(base, ids, n):
    return base.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)


def model_with_heads(kind="hydra", **kw):
    base = llama()
    return HydraModel(base, DraftHeads.from_base(base, kind), tree="tiny", **kw)


def prompt(n, seed=0):
    return torch.randint(0, V, (1, n), generator=torch.Generator().manual_seed(seed))


def engine_bytes(engine) -> int:
    """Bytes of every distinct tensor storage the engine holds (attributes, dicts, lists, caches)."""
    seen, total, stack = set(), 0, [vars(engine)]
    while stack:
        obj = stack.pop()
        if torch.is_tensor(obj):
            key = obj.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += obj.untyped_storage().nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("hydra_fast"):
            stack.append(vars(obj))
    return total


def test_memory_does_not_grow_with_new_prompt_lengths():
    model = model_with_heads("hydra++", max_cache_len=512)
    model.generate(prompt(5), max_new_tokens=2)
    before = engine_bytes(model._engine)
    for n in range(30, 330, 30):  # 10 distinct prompt lengths
        model.generate(prompt(n, seed=n), max_new_tokens=2)
    assert model._engine is not None and engine_bytes(model._engine) == before


@pytest.mark.parametrize("bad", [V, V + 1000, -1])
def test_token_id_out_of_vocabulary_is_a_clear_error(bad):
    model = model_with_heads()
    ids = prompt(6)
    ids[0, 3] = bad
    with pytest.raises(ValueError, match=rf"= {bad} is not a token id.*vocabulary size {V}"):
        model.generate(ids, max_new_tokens=3)


@pytest.mark.parametrize("pad", [-1, -100])
def test_negative_pad_id_in_a_ragged_batch(pad):
    base = llama()
    model = HydraModel(base, DraftHeads.from_base(base, "hydra"), tree="tiny")
    a, b = prompt(7, 1)[0], prompt(4, 2)[0]
    ids = torch.full((2, 7), pad)
    ids[0], ids[1, 3:] = a, b  # left padding with an id the embedding cannot look up
    mask = (ids != pad).long()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, pad_token_id=pad)
    assert out[0, 7:].tolist() == hf_greedy(base, a[None], 5)[0, 7:].tolist()
    assert out[1, 7:].tolist() == hf_greedy(base, b[None], 5)[0, 4:].tolist()


def test_tree_deeper_than_the_heads_is_refused_before_any_build():
    model = model_with_heads()
    ids = prompt(8)
    good = model.generate(ids, max_new_tokens=6)
    built = model._engine
    with pytest.raises(ValueError, match="5 deep but these heads draft 4"):
        model.generate(ids, max_new_tokens=6, tree=[[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0]])
    assert model._engine is built
    assert torch.equal(model.generate(ids, max_new_tokens=6), good)


@pytest.mark.parametrize("failure", [torch.OutOfMemoryError("simulated"), KeyboardInterrupt()],
                         ids=["out_of_memory", "ctrl_c"])
def test_failed_engine_build_does_not_poison_later_calls(monkeypatch, failure):
    from hydra_fast import model as model_module

    model = model_with_heads()
    ids = prompt(8)
    good = model.generate(ids, max_new_tokens=6)

    class Failing(model_module.StepRunner):  # fails as a capture or compile cut short would
        def __init__(self, *a, **k):
            raise failure
    monkeypatch.setattr(model_module, "StepRunner", Failing)
    with pytest.raises(type(failure)):
        model.generate(ids, max_new_tokens=6, tree="chain4")
    monkeypatch.undo()
    assert torch.equal(model.generate(ids, max_new_tokens=6), good)


def test_engine_rebuilt_when_weights_change_dtype_or_storage():
    base = llama()
    model = HydraModel(base, DraftHeads.from_base(base, "hydra"), tree="tiny")
    ids = prompt(9)
    model.generate(ids, max_new_tokens=4)
    first = model._engine
    other = llama(seed=5).state_dict()
    base.load_state_dict(other, assign=True)  # new storages, new values
    out = model.generate(ids, max_new_tokens=8)
    assert model._engine is not first
    assert out.tolist() == hf_greedy(base, ids, 8).tolist()
    second = model._engine
    model.to(torch.bfloat16)
    out = model.generate(ids, max_new_tokens=8)
    assert model._engine is not second and model._engine.cache.k.dtype == torch.bfloat16
    assert out.shape == (1, 17) and torch.equal(out[:, :9], ids)


def test_base_moved_without_its_heads_is_a_clear_error():
    base = llama()
    model = HydraModel(base, DraftHeads.from_base(base, "hydra"), tree="tiny")
    model.generate(prompt(5), max_new_tokens=2)
    base.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"heads.to\("):
        model.generate(prompt(5), max_new_tokens=2)


def test_threads_sharing_one_model_get_their_own_outputs():
    base = llama()
    model = HydraModel(base, DraftHeads.from_base(base, "hydra"), tree="tiny")
    a, b = prompt(12, 1), prompt(5, 2)
    want_a, want_b = hf_greedy(base, a, 12), hf_greedy(base, b, 12)
    b_done, results = threading.Event(), {}

    class PauseOnce:
        """Streamer of thread A: holds A mid-generation until B finished (or 1 s, when B waits for A)."""
        paused = False

        def put(self, value):
            if not self.paused and value.numel() == 1:
                self.paused = True
                b_done.wait(timeout=1.0)

        def end(self):
            pass

    def run_a():
        results["a"] = model.generate(a, max_new_tokens=12, streamer=PauseOnce())

    def run_b():
        results["b"] = model.generate(b, max_new_tokens=12)
        b_done.set()
    ta = threading.Thread(target=run_a)
    ta.start()
    while not getattr(model, "_engine", None):
        ta.join(0.01)
    tb = threading.Thread(target=run_b)
    tb.start()
    ta.join()
    tb.join()
    assert results["a"].tolist() == want_a.tolist() and results["b"].tolist() == want_b.tolist()
    assert base.config._attn_implementation != "hydra_tree"


def test_first_call_in_inference_mode_then_outside():
    model = model_with_heads()
    ids = prompt(7)
    with torch.inference_mode():
        inside = model.generate(ids, max_new_tokens=6)
    outside = model.generate(ids, max_new_tokens=6)
    assert torch.equal(inside, outside)


def test_device_map_over_several_devices_is_refused():
    base = llama()
    base.hf_device_map = {"model.embed_tokens": 0, "model.layers": 1, "lm_head": "cpu"}
    with pytest.raises(UnsupportedModelError, match="device_map"):
        HydraModel(base)


def test_quantized_model_is_refused():
    base = llama()
    base.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(UnsupportedModelError, match="quantized"):
        HydraModel(base)


def test_offloaded_weights_are_refused():
    base = llama()
    base.model.layers[1].mlp.up_proj.weight = torch.nn.Parameter(torch.empty(128, 64, device="meta"))
    with pytest.raises(UnsupportedModelError, match="meta"):
        HydraModel(base)


# ---------------------------------------------------------------------------------------------- CUDA
def _cuda_model(kind):
    base = llama().cuda()
    return base, HydraModel(base, DraftHeads.from_base(base, kind), tree="tiny")  # steps replayed as a CUDA graph


@pytest.mark.parametrize("kind", ["hydra", "hydra++"])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_rebuilt_after_the_base_moves_and_changes_dtype(kind):
    base, model = _cuda_model(kind)
    ids = prompt(9).cuda()
    want = hf_greedy(base, ids, 12)
    assert torch.equal(model.generate(ids, max_new_tokens=12), want)
    model.to("cpu")
    model.to("cuda")
    junk = [torch.randn(1 << 16, device="cuda") for _ in range(64)]  # reuse the freed storages
    assert torch.equal(model.generate(ids, max_new_tokens=12), want)
    del junk
    sd = {k: v.clone() for k, v in llama(seed=3).cuda().state_dict().items()}
    base.load_state_dict(sd, assign=True)
    assert torch.equal(model.generate(ids, max_new_tokens=12), hf_greedy(base, ids, 12))
    model.to(torch.bfloat16)
    out = model.generate(ids, max_new_tokens=12)
    assert model._engine.cache.k.dtype == torch.bfloat16 and out.shape == (1, 21)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bad_token_id_leaves_the_context_usable():
    base, model = _cuda_model("hydra")
    ids = prompt(9).cuda()
    ids[0, 4] = V + 7
    with pytest.raises(ValueError, match="vocabulary size"):
        model.generate(ids, max_new_tokens=4)
    ids[0, 4] = 5
    assert torch.equal(model.generate(ids, max_new_tokens=8), hf_greedy(base, ids, 8))
    torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inference_mode_then_outside_and_threads():
    base, model = _cuda_model("hydra")
    a, b = prompt(9, 1).cuda(), prompt(6, 2).cuda()
    with torch.inference_mode():
        inside = model.generate(a, max_new_tokens=10)
    assert torch.equal(model.generate(a, max_new_tokens=10), inside)
    results = {}
    threads = [threading.Thread(target=lambda k=k, x=x: results.__setitem__(k, model.generate(x, max_new_tokens=10)))
               for k, x in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(results["a"], hf_greedy(base, a, 10)) and torch.equal(results["b"], hf_greedy(base, b, 10))
