"""The fused lm_head + cross-entropy: the loss and gradients of the unfused expression, in fp32 and under
bf16 autocast, in one slice or many, with either input frozen."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qwenvl.model.cross_entropy as ce
from qwenvl import QwenVL
from qwenvl.model.cross_entropy import linear_cross_entropy


def _inputs(n=37, d=16, vocab=1000, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(vocab, d, generator=g, dtype=dtype) * 0.5).requires_grad_()
    y = torch.randint(0, vocab, (n,), generator=g)
    return h, w, y


def _grads(fn, h, w, y, autocast=False):
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(h, w, y)
    (loss * 0.37).backward()  # a non-unit incoming gradient
    return loss.detach(), h.grad.clone(), w.grad.clone()


def _reference(h, w, y):
    return F.cross_entropy(F.linear(h, w).float(), y, reduction="sum")


def test_gradcheck_in_double():
    h, w, y = _inputs(n=5, d=4, vocab=11, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, y), (h, w))


@pytest.mark.parametrize("slices", [False, True])
def test_fp32_equals_the_unfused_expression(monkeypatch, slices):
    if slices:  # force several logit slices and a partial last row block
        monkeypatch.setattr(ce, "_MAX_LOGIT_ELEMENTS", 10 * 1000)
    h, w, y = _inputs()
    got, want = _grads(linear_cross_entropy, h, w, y), _grads(_reference, h, w, y)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_equals_the_unfused_expression_under_autocast():
    h, w, y = _inputs(n=20, d=64, vocab=3000)
    got = _grads(linear_cross_entropy, h, w, y, autocast=True)
    want = _grads(_reference, h, w, y, autocast=True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-4)
    for a, b in zip(got[1:], want[1:], strict=True):  # bf16 products: equal up to their rounding
        assert float((a - b).norm() / b.norm()) < 1e-2
    assert got[1].dtype == got[2].dtype == torch.float32  # gradients in the parameters' dtype
    exact = _grads(_reference, h, w, y)  # and bf16 is still close to the fp32 truth
    torch.testing.assert_close(got[0], exact[0], rtol=2e-2, atol=0)


def test_frozen_inputs_and_no_grad():
    h, w, y = _inputs()
    w.requires_grad_(False)
    h.grad = None
    linear_cross_entropy(h, w, y).backward()
    torch.testing.assert_close(h.grad, torch.autograd.grad(_reference(h, w, y), h)[0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _reference(h, w, y).detach(), rtol=1e-6, atol=1e-4)


def test_bad_targets_are_named():
    h, w, y = _inputs()
    with pytest.raises(ValueError, match="target ids must be in"):
        linear_cross_entropy(h, w, y + 1000)
    with pytest.raises(ValueError, match="expected hidden"):
        linear_cross_entropy(h, w, y[:3])


def test_model_loss_equals_cross_entropy_of_its_logits():
    model = QwenVL.from_config("tiny", seed=0)
    ids = torch.randint(1000, 50000, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :5] = -100
    out = model(ids, labels=labels)
    logits = model(ids).logits
    target = labels[:, 1:]
    keep = target != -100
    want = F.cross_entropy(logits[:, :-1][keep].float(), target[keep])
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-5)
    assert out.num_loss_tokens == int(keep.sum())
    out.loss.backward()
    assert model.lm_head.weight.grad is not None and model.transformer.ln_f.weight.grad is not None
