"""The fused lm_head + cross-entropy: the loss and gradients of the unfused expression, in fp32 and under
bf16 autocast, in one slice or many, with either input frozen."""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

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


@pytest.mark.parametrize("autocast", [False, True])
def test_row_block_size_does_not_change_the_numbers(monkeypatch, autocast):
    """The GPU's large row blocks give each row what the CPU's 8-row blocks give it (every op in the pass is
    per row): the same gradients, and the loss up to the order of its fp32 sum."""
    h, w, y = _inputs(n=45, d=32, vocab=3000)
    got = {}
    for block in (8, 45):  # 8: the CPU's, with a partial last block; 45: the whole input in one block
        monkeypatch.setattr(ce, "_ROW_BLOCK", block)
        got[block] = _grads(linear_cross_entropy, h, w, y, autocast=autocast)
    torch.testing.assert_close(got[45][0], got[8][0], rtol=1e-6, atol=0)
    for a, b in zip(got[45][1:], got[8][1:], strict=True):
        assert torch.equal(a, b)


def test_row_block_per_device():
    assert ce._row_block(torch.device("cpu"), 441, 151936) == 8  # in cache, measured there
    cuda = torch.device("cuda")  # a 441-row slice at the real vocabulary: 2 equal blocks, not 56 of 8
    assert ce._row_block(cuda, 441, 151936) == 221
    assert ce._row_block(cuda, 5, 11) == 5 and ce._row_block(cuda, 0, 151936) == 1


class _CountOps(TorchDispatchMode):
    """Ops that allocate or compute (a kernel launch each on a GPU); views launch nothing."""

    VIEWS = {"slice", "view", "t", "unsqueeze", "expand", "select", "alias", "detach"}

    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.VIEWS:
            self.count[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_launches_on_a_gpu_are_per_block_not_per_token(monkeypatch, dtype):
    """Counted on meta tensors, which stand in for a GPU's: 2048 labelled tokens at the real vocabulary are 5
    logit slices of 2 blocks each, about 10 ops a block, where 8-row blocks were about one op per token."""
    _autocast = torch.autocast  # meta has no autocast state; the pass only turns autocast off
    monkeypatch.setattr(
        torch, "autocast", lambda dev, **kw: contextlib.nullcontext() if dev == "meta" else _autocast(dev, **kw)
    )
    n = 2048
    h = torch.empty(n, 64, dtype=dtype, device="meta")
    w = torch.empty(151936, 64, dtype=dtype, device="meta")
    y = torch.zeros(n, dtype=torch.long, device="meta")
    with _CountOps() as ops:
        ce._loss_and_grads(h, w, y, dtype, True, True)
    assert ops.count["mm"] == 3 * 5  # logits, grad_h, grad_w per slice
    assert ops.count["gather"] == 10  # one per block
    assert sum(ops.count.values()) < n // 10
