"""answer_rows_last_block: the loss and gradients of the whole last block, from its labelled rows only."""

from __future__ import annotations

import copy

import pytest
import torch

from qwenvl.demo.answer_rows import AnswerRowsBlock, answer_rows_last_block, loss_rows
from qwenvl.model import QwenVL
from qwenvl.model.llm import Block

B, T = 4, 40


def _batch(vocab: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded samples whose answers end at different places; the last sample has no label at all."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = torch.full((B, T), -100)
    for b, (start, end) in enumerate([(20, 30), (25, 40), (5, 9)]):
        labels[b, start:end] = ids[b, start:end]
    return ids, labels


def _loss_and_grads(model: QwenVL, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_and_gradients_match_the_whole_block() -> None:
    plain = QwenVL.from_config("tiny", seed=0, dtype=torch.float64).train()
    fast = copy.deepcopy(plain)
    ids, labels = _batch()
    want, want_grads = _loss_and_grads(plain, ids, labels)
    with answer_rows_last_block(fast):
        got, grads = _loss_and_grads(fast, ids, labels)
    torch.testing.assert_close(got, want)
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], msg=name)


def test_only_the_labelled_rows_are_computed_and_other_rows_pass_through() -> None:
    model = QwenVL.from_config("tiny", seed=0).train()
    ids, labels = _batch()
    seen: dict[str, torch.Tensor] = {}
    last = model.transformer.h[-1]
    last.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    last.mlp.register_forward_hook(lambda m, args, out: seen.update(mlp_rows=args[0].shape[1]))
    with answer_rows_last_block(model):
        assert type(last) is AnswerRowsBlock
        model(input_ids=ids, labels=labels)
    rows = loss_rows(labels)
    assert seen["mlp_rows"] == int(rows.sum(1).max()) < T  # the MLP ran on the answers, not the whole sequence
    x, y = seen["x"], seen["y"]
    passed = ~rows & ~_filled(rows)
    assert passed.sum() > B * T // 2
    torch.testing.assert_close(y[passed], x[passed], rtol=0, atol=0)
    assert not torch.equal(y[rows], x[rows])


def _filled(rows: torch.Tensor) -> torch.Tensor:
    """The non-labelled positions AnswerRowsBlock also computes to fill every sample up to the longest answer
    (computed exactly, but not passed through)."""
    k = int(rows.sum(1).max())
    idx = torch.argsort((~rows).to(torch.int8), dim=1, stable=True)[:, :k]
    filled = torch.zeros_like(rows)
    filled.scatter_(1, idx, True)
    return filled & ~rows


def test_without_labels_and_after_the_block_it_is_the_plain_model() -> None:
    model = QwenVL.from_config("tiny", seed=0).eval()
    ids, _ = _batch()
    keys = list(model.state_dict())
    want = model(input_ids=ids).logits
    with answer_rows_last_block(model):
        torch.testing.assert_close(model(input_ids=ids).logits, want)  # evaluation and generation: no labels
        assert list(model.state_dict()) == keys
    assert type(model.transformer.h[-1]) is Block and "rows" not in vars(model.transformer.h[-1])
    assert not model._forward_pre_hooks


def test_a_swapped_last_block_is_refused() -> None:
    model = QwenVL.from_config("tiny", seed=0)
    model.transformer.h[-1].__class__ = AnswerRowsBlock
    with pytest.raises(TypeError, match="not a plain Block"), answer_rows_last_block(model):
        pass
