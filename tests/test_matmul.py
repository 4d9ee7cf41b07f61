"""``matmul.linear``: the same product as F.linear in every shape, whichever order it takes."""
import pytest
import torch
import torch.nn.functional as F

from hydra_fast import matmul


@pytest.mark.parametrize("rows", [1, 2, 4, 17, 64, 65])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear(rows, bias, monkeypatch):
    monkeypatch.setattr(matmul, "LARGE_WEIGHT_BYTES", 0)  # take the weight @ x.T order for every weight
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(300, 48, generator=g)
    b = torch.randn(300, generator=g) if bias else None
    x = torch.randn(1, rows, 48, generator=g)
    out = matmul.linear(x, w, b)
    assert out.shape == (1, rows, 300) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_linear_keeps_f_linear_outside_its_shape():
    w = torch.randn(30, 8)
    x = torch.randn(4, 8)
    for args in [(x.double(), w.double()), (x.bfloat16(), w.bfloat16()), (x, w)]:  # other dtypes; a small weight
        assert torch.equal(matmul.linear(*args), F.linear(*args))


def test_linear_has_gradients(monkeypatch):
    monkeypatch.setattr(matmul, "LARGE_WEIGHT_BYTES", 0)
    w = torch.randn(20, 6, requires_grad=True)
    x = torch.randn(3, 6, requires_grad=True)
    matmul.linear(x, w).square().sum().backward()
    gw, gx = w.grad.clone(), x.grad.clone()
    w.grad = x.grad = None
    F.linear(x, w).square().sum().backward()
    torch.testing.assert_close(gw, w.grad)
    torch.testing.assert_close(gx, x.grad)


def test_lm_head_logits_calls_other_modules():
    head = torch.nn.Sequential(torch.nn.Linear(6, 10))
    x = torch.randn(3, 6)
    assert torch.equal(matmul.lm_head_logits(head, x), head(x))
    lin = torch.nn.Linear(6, 10, bias=False)
    torch.testing.assert_close(matmul.lm_head_logits(lin, x), lin(x))


@pytest.mark.parametrize("threads", [1, 2])
def test_one_row_takes_the_two_column_product_with_threads(threads, monkeypatch):
    """One row: with 2+ threads the weight @ [x, x].T form (close to F.linear), with one thread F.linear itself."""
    monkeypatch.setattr(matmul, "LARGE_WEIGHT_BYTES", 0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(7)
        w, b, x = torch.randn(500, 64, generator=g), torch.randn(500, generator=g), torch.randn(1, 1, 64, generator=g)
        out = matmul.linear(x, w, b)
        assert out.shape == (1, 1, 500) and out.is_contiguous()
        if threads == 1:
            assert torch.equal(out, F.linear(x, w, b))
        torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)
