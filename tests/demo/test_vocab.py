"""SharedRowsHead: the same logits, loss, gradients and AdamW steps as the full ``lm_head`` it stands for."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qwenvl.demo.vocab import SharedRowsHead, UsedRowsEmbedding
from qwenvl.model import QwenVL
from qwenvl.train.trainer import _clip_grad_norm

VOCAB, D = 1000, 16
IDS = [3, 17, 40, 41, 500, 999]


def _full_head(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(D, VOCAB, bias=False, dtype=torch.float64)
    with torch.no_grad():
        keep = head.weight[IDS].clone()
        head.weight.zero_()
        head.weight[IDS] = keep
    return head


def test_logits_loss_and_gradients_match_the_full_head() -> None:
    full = _full_head()
    shared = SharedRowsHead.from_linear(full, IDS)
    assert shared.num_shared == VOCAB - len(IDS) and shared.rows.shape == (len(IDS), D)
    h = torch.randn(12, D, dtype=torch.float64)
    y = torch.tensor(IDS * 2)
    torch.testing.assert_close(shared(h), full(h))
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    a = torch.nn.functional.cross_entropy(full(h1), y, reduction="sum")
    b = shared.cross_entropy(h2, y)
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(shared.rows.grad, full.weight.grad[IDS])
    others = torch.ones(VOCAB, dtype=torch.bool)
    others[IDS] = False
    per_row = full.weight.grad[others]
    torch.testing.assert_close(per_row, per_row[:1].expand_as(per_row))  # every shared row gets the same gradient
    # the shared row's gradient counts all N rows in the norm: sqrt(N) x each one's
    torch.testing.assert_close(shared.shared.grad, per_row[:1] * (VOCAB - len(IDS)) ** 0.5)
    total = torch.cat([p.grad.flatten() for p in shared.parameters()]).norm()
    torch.testing.assert_close(total, full.weight.grad.norm())


def test_adamw_steps_with_clipping_match_the_full_head() -> None:
    full = _full_head(1)
    shared = SharedRowsHead.from_linear(full, IDS)
    opt_full = torch.optim.AdamW(full.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-30)
    opt_shared = torch.optim.AdamW(shared.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-30)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        h = torch.randn(20, D, dtype=torch.float64, generator=gen)
        y = torch.tensor(IDS)[torch.randint(len(IDS), (20,), generator=gen)]
        for head, opt in ((full, opt_full), (shared, opt_shared)):
            opt.zero_grad()
            loss = (shared.cross_entropy(h, y) if head is shared
                    else torch.nn.functional.cross_entropy(full(h), y, reduction="sum"))
            loss.backward()
            _clip_grad_norm(list(head.parameters()), 0.5)  # clipping is active: these norms are ~5-20
            opt.step()
    torch.testing.assert_close(shared.full_weight(), full.weight.detach())


def test_state_dict_is_the_full_weight_and_round_trips() -> None:
    full = _full_head()
    shared = SharedRowsHead.from_linear(full, IDS)
    sd = shared.state_dict()
    assert list(sd) == ["weight"] and torch.equal(sd["weight"], full.weight.detach())
    other = SharedRowsHead.from_linear(_full_head(5), IDS)
    other.load_state_dict(sd)
    assert torch.equal(other.full_weight(), full.weight.detach())
    assert torch.equal(shared.to_linear().weight, full.weight.detach())
    bad = full.weight.detach().clone()
    bad[0, 0] = 1.0  # a row outside IDS that differs from the others
    with pytest.raises(RuntimeError, match="not all equal"):
        other.load_state_dict({"weight": bad})
    with pytest.raises(ValueError, match="not all equal"):
        SharedRowsHead.from_linear(nn.Linear(D, VOCAB, bias=False), IDS)


def test_a_target_outside_the_own_rows_is_refused() -> None:
    shared = SharedRowsHead.from_linear(_full_head(), IDS)
    with pytest.raises(ValueError, match=r"target ids \[4\]"):
        shared.cross_entropy(torch.randn(2, D, dtype=torch.float64), torch.tensor([3, 4]))


def test_the_model_trains_through_the_shared_head(tiny_model: QwenVL) -> None:
    model = copy.deepcopy(tiny_model).double()
    vocab = model.lm_head.out_features
    ids = [5, 9, 151643]
    with torch.no_grad():
        keep = model.lm_head.weight[ids].clone()
        model.lm_head.weight.zero_()
        model.lm_head.weight[ids] = keep
    twin = copy.deepcopy(model)
    twin.lm_head = SharedRowsHead.from_linear(twin.lm_head, ids)
    ids_t = torch.tensor([[1, 2, 5, 9, 151643, 5]])
    labels = torch.tensor([[-100, -100, 5, 9, 151643, 5]])
    out = [m(input_ids=ids_t, labels=labels).loss for m in (model, twin)]
    torch.testing.assert_close(out[0], out[1])
    for o in out:
        o.backward()
    torch.testing.assert_close(twin.transformer.h[0].attn.c_attn.weight.grad,
                               model.transformer.h[0].attn.c_attn.weight.grad)
    assert set(twin.state_dict()) == set(model.state_dict())
    torch.testing.assert_close(twin.state_dict()["lm_head.weight"], model.state_dict()["lm_head.weight"])
    assert twin.lm_head.out_features == vocab


def test_used_rows_embedding_trains_as_the_full_table() -> None:
    torch.manual_seed(0)
    full = nn.Embedding(VOCAB, D, dtype=torch.float64)
    used = UsedRowsEmbedding.from_embedding(full, IDS)
    extra = nn.Linear(D, 3, dtype=torch.float64)  # a second parameter, so that clipping mixes norms
    extra2 = copy.deepcopy(extra)
    opt_full = torch.optim.AdamW([*full.parameters(), *extra.parameters()], lr=1e-2, weight_decay=0.1, eps=1e-30)
    opt_used = torch.optim.AdamW([*used.parameters(), *extra2.parameters()], lr=1e-2, weight_decay=0.1, eps=1e-30)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.tensor(IDS)[torch.randint(len(IDS), (4, 7), generator=gen)]
        for emb, head, opt in ((full, extra, opt_full), (used, extra2, opt_used)):
            opt.zero_grad()
            head(emb(x)).square().sum().backward()
            _clip_grad_norm([*emb.parameters(), *head.parameters()], 0.5)
            for group in opt.param_groups:
                group["lr"] = 1e-2 / (step + 1)  # a schedule: the decay of unused rows follows it
            opt.step()
    torch.testing.assert_close(used.full_weight(), full.weight.detach())
    assert not torch.equal(used.full_weight()[0], used.initial[0])  # unused rows did decay
    torch.testing.assert_close(extra2.weight, extra.weight)
    # any row can be read without gradients (generation during an evaluation); training on one is refused
    x = torch.tensor([[0, 3, 999, 2]])
    with torch.no_grad():
        torch.testing.assert_close(used(x), full(x))
    with pytest.raises(ValueError, match=r"token ids \[0, 2\]"):
        used(x)
    sd = used.state_dict()
    assert list(sd) == ["weight"]
    again = UsedRowsEmbedding.from_embedding(nn.Embedding(VOCAB, D, dtype=torch.float64), IDS)
    again.load_state_dict(sd)
    torch.testing.assert_close(again.full_weight(), full.weight.detach())
    torch.testing.assert_close(used.to_embedding().weight, full.weight.detach())
