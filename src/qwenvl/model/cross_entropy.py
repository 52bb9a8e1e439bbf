"""Cross-entropy through ``lm_head`` without keeping [N, vocab] activations for the backward pass.

``F.cross_entropy(lm_head(h).float(), y)`` keeps the fp32 log-probabilities of every labelled position for
its backward pass and walks the [N, 151936] tensor about ten times (cast, log-softmax, its backward, the
cast back). :func:`linear_cross_entropy` computes the same loss and the same gradients in its forward pass,
where the logits are already at hand: one matrix product writes the logits, one pass per row block turns
them in place into ``softmax - one_hot`` (the gradient of the summed loss with respect to the logits), and
two matrix products give the gradients of the hidden states and of the weight. The backward pass only
scales them by the incoming gradient.

The row blocks are sized per device. On the CPU a block is 8 rows, so that the pass over its ~5 MB of
fp32 stays in cache. On a GPU every op on a block is a kernel launch (eight to twelve per block), and 8-row
blocks would make that about one launch per labelled token and op, which leaves the GPU waiting on the
host; there a block is as many rows as a memory bound on its fp32 temporaries allows (``_row_block``).
Every op in the pass is per row, so the block size does not change any row's numbers.

The numbers are the ones autocast gives to the unfused expression: logits in the compute dtype (bf16 under
autocast), log-sum-exp and softmax in fp32, the logits' gradient rounded to the compute dtype before the
two products, the weight's gradient accumulated in fp32 (tests/model/test_cross_entropy.py).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["linear_cross_entropy"]

# Rows of logits materialized at once (128 MiB in bf16 at the real vocabulary); larger inputs go in slices.
_MAX_LOGIT_ELEMENTS = 1 << 26
# Rows turned into softmax - one_hot per pass on the CPU: ~5 MB of fp32 at the real vocabulary, so the pass
# stays in cache (measured there).
_ROW_BLOCK = 8
# Elements of one fp32 [rows, vocab] temporary per pass on other devices, where each op is a kernel launch:
# 2**25 elements = 128 MiB, and the bf16 path holds two at once (the fp32 cast and log_softmax's output), so
# 256 MiB. At the real vocabulary a 441-row slice is 2 blocks of 221 rows (2 x 221 x 151936 x 4 B = 269 MB)
# instead of 56 blocks of 8.
_MAX_BLOCK_ELEMENTS = 1 << 25


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _row_block(device: torch.device, rows: int, vocab: int) -> int:
    """Rows per softmax - one_hot pass in a slice of ``rows`` logit rows: ``_ROW_BLOCK`` on the CPU, else the
    slice in equal blocks, as few as hold it at ``_MAX_BLOCK_ELEMENTS`` each (rounding up may add a row to a
    block; equal blocks leave no short tail block whose ops would be launched for a few rows)."""
    if device.type == "cpu":
        return _ROW_BLOCK
    blocks = -(-rows * vocab // _MAX_BLOCK_ELEMENTS)
    return max(1, -(-rows // max(1, blocks)))


@torch.no_grad()
def _loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, dtype: torch.dtype,
                    need_h: bool, need_w: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """(summed loss, its gradient wrt hidden in the compute dtype, wrt weight in fp32 (fp64 for fp64))."""
    with torch.autocast(hidden.device.type, enabled=False):
        h = hidden.to(dtype)
        w = weight.to(dtype)
        n, vocab = h.shape[0], w.shape[0]
        acc = torch.promote_types(dtype, torch.float32)  # softmax and sums: fp32, or fp64 for fp64 inputs
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = None  # fp32, summed over the slices
        rows = max(1, _MAX_LOGIT_ELEMENTS // vocab)
        step = _row_block(h.device, min(rows, n), vocab)
        minus_one = torch.full((step, 1), -1.0, dtype=acc, device=h.device)
        for s in range(0, n, rows):
            hs, ys = h[s : s + rows], target[s : s + rows]
            logits = hs @ w.t()  # (r, vocab), compute dtype; becomes the logits' gradient in place
            for b in range(0, logits.shape[0], step):
                yb = ys[b : b + step, None]
                block = logits[b : b + step]
                if block.dtype == acc:  # fp32 logits: turned into softmax - one_hot in place, no temporary
                    top = block.amax(dim=-1, keepdim=True)
                    picked = block.gather(1, yb)
                    z = block.sub_(top).exp_().sum(dim=-1, keepdim=True)
                    total += (top + z.log() - picked).sum()  # log-sum-exp - the target's logit
                    if need_h or need_w:
                        block.div_(z).scatter_add_(1, yb, minus_one[: yb.shape[0]])
                    continue
                logp = torch.log_softmax(block.to(acc), dim=-1)
                total -= logp.gather(1, yb).sum()
                if need_h or need_w:
                    block.copy_(logp.exp_().scatter_add_(1, yb, minus_one[: yb.shape[0]]))  # softmax - one_hot
            if grad_h is not None:  # need_h
                grad_h[s : s + rows] = logits @ w
            if need_w:
                part = logits.t() @ hs
                grad_w = part.to(acc) if grad_w is None else grad_w.add_(part)
    return total, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
        total, grad_h, grad_w = _loss_and_grads(hidden, weight, target, dtype, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = None if grad_h is None else (grad_h * grad_out).to(h_dtype)
        gw = None if grad_w is None else (grad_w * grad_out).to(w_dtype)
        return gh, gw, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight).float(), target, reduction="sum")`` for hidden (N, d),
    weight (vocab, d) and target (N,) class ids, with its gradients computed in the forward pass (module
    docstring). Runs in the autocast dtype when autocast is on, like ``F.linear`` would."""
    if hidden.dim() != 2 or target.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden (N, d) and target (N,), got {tuple(hidden.shape)} and {tuple(target.shape)}")
    if hidden.shape[0]:
        lo, hi = torch.stack(torch.aminmax(target)).tolist()  # one device sync per call, not two
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"target ids must be in [0, {weight.shape[0]}), got {lo}..{hi}")
    dtype = _compute_dtype(hidden)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, target, dtype)
    return _loss_and_grads(hidden, weight, target, dtype, False, False)[0]
