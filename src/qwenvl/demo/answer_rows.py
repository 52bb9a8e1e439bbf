"""The LM's last block computed only where the loss reads it, while the demo trains.

The training loss (:meth:`qwenvl.model.QwenVL.loss`) reads the final hidden states at the labelled positions
only: the answer, ~27 of a demo sample's ~321 tokens (the rest is the prompt and its 256 image tokens). Every
other block's output at every position is read by the next block's attention (its keys and values), but the
last block's output anywhere else is read by nothing. Within :func:`answer_rows_last_block` that block computes
its keys and values at every position and the rest (queries, attention, output projection, MLP) at the
labelled rows only; the other rows pass through unchanged, and nothing reads them. The loss and every gradient
are the ones the whole block gives, up to float rounding (the same products over fewer rows; checked in
``tests/demo/test_answer_rows.py``).

Why: the demo's LM has 4 blocks, so the last one is a quarter of the LM's work in a training step, and ~3/4 of
that is skipped. Measured on 2 AVX2 cores of an AMD EPYC (float32, batch 16 x 321 tokens, the demo's
4-layer LM with its shared-rows head, alternating runs in one process): a forward and backward pass took
515-541 ms instead of 590-638 ms. For a 32-block model the same trick saves ~2%, which is why it stays a
demo module and the model keeps one way to compute a block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.nn.functional as F

from ..model import QwenVL
from ..model.llm import Block, apply_rope
from ..model.qwenvl import IGNORE_INDEX

__all__ = ["AnswerRowsBlock", "answer_rows_last_block", "loss_rows"]


class AnswerRowsBlock(Block):
    """A :class:`~qwenvl.model.llm.Block` that, given ``rows`` (B, T) bool, computes its output at those rows
    only and returns every other row of its input unchanged. Without ``rows`` (no labels: evaluation,
    generation), with a KV cache or an explicit attention mask (left padding), it is the plain block."""

    rows: torch.Tensor | None = None

    def forward(self, x, cos, sin, q_scale, mask, cache, layer):  # noqa: ANN001, ANN201 (Block's signature)
        rows = self.rows
        if rows is None or cache is not None or mask is not None or q_scale is not None or rows.shape != x.shape[:2]:
            return super().forward(x, cos, sin, q_scale, mask, cache, layer)
        k = int(rows.sum(1).max())
        if k == 0:
            return super().forward(x, cos, sin, q_scale, mask, cache, layer)
        b, t, d = x.shape
        attn = self.attn
        nh, hd = attn.num_heads, attn.head_dim
        # each sample's labelled positions first, in order, then others up to k (computed too, harmlessly)
        idx = torch.argsort((~rows).to(torch.int8), dim=1, stable=True)[:, :k]  # (B, k)
        take = idx[..., None].expand(-1, -1, d)
        h = self.ln_1(x)
        w, bias = attn.c_attn.weight, attn.c_attn.bias  # fact: [q; k; v] row blocks
        kv = F.linear(h, w[d:], None if bias is None else bias[d:]).view(b, t, 2, nh, hd).permute(2, 0, 3, 1, 4)
        q = F.linear(h.gather(1, take), w[:d], None if bias is None else bias[:d]).view(b, k, nh, hd).transpose(1, 2)
        at = idx[:, None, :, None].expand(-1, 1, -1, cos.shape[-1])
        q = apply_rope(q, cos.gather(2, at), sin.gather(2, at))
        key = apply_rope(kv[0], cos, sin)
        causal = torch.arange(t, device=x.device)[None, None, None, :] <= idx[:, None, :, None]  # (B, 1, k, T)
        out = F.scaled_dot_product_attention(q, key, kv[1], attn_mask=causal)
        y = x.gather(1, take) + attn.c_proj(out.transpose(1, 2).reshape(b, k, d))
        y = y + self.mlp(self.ln_2(y))
        return x.scatter(1, take, y)


def loss_rows(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions whose hidden state :meth:`QwenVL.loss` reads (those followed by a label)."""
    keep = labels[:, 1:] != IGNORE_INDEX
    return torch.cat([keep, keep.new_zeros(keep.shape[0], 1)], dim=1)


@contextmanager
def answer_rows_last_block(model: QwenVL) -> Iterator[None]:
    """Within the block, the LM's last block is an :class:`AnswerRowsBlock` fed, at every forward pass, the
    rows that call's ``labels`` make the loss read; the plain block again afterwards. Parameter names, the
    state dict and the results stay the same."""
    block = model.transformer.h[-1]
    if type(block) is not Block:
        raise TypeError(f"the last LM block is a {type(block).__name__}, not a plain Block")

    def take_labels(_: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        labels = kwargs.get("labels")
        # the block's class is AnswerRowsBlock while the hook is registered (set below)
        cast(AnswerRowsBlock, block).rows = None if labels is None else loss_rows(labels)

    block.__class__ = AnswerRowsBlock  # same modules and parameters, another forward
    handle = model.register_forward_pre_hook(take_labels, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        block.__class__ = Block
        block.__dict__.pop("rows", None)
