"""``lm_head`` for training from scratch on a small answer vocabulary: the rows no label uses, kept as one row.

The demo's answers use ~20 distinct tokens of the 151,936-row vocabulary, yet the full softmax makes every
step multiply the labelled positions by all of ``lm_head`` three times (the logits, and the gradients of the
hidden states and of the weight): at hidden 128 that is 48.5 of a step's ~79 GFLOP. If the rows of the
tokens that are never a target start *equal* (the demo starts them at zero), full-softmax training keeps
them equal: each receives the same gradient (its softmax probability times the hidden state, with no
target term), hence the same AdamW moments, weight decay and update. :class:`SharedRowsHead` stores those
``N`` rows once and computes exactly what the ``vocab x hidden`` matrix would:

- logits: the ``k`` distinct rows' own, and the shared row's logit in every other column;
- loss: ``log(sum_k exp(z_k) + N exp(z_shared)) - z_target`` (targets must be among the ``k`` rows);
- gradient of the shared row: ``sqrt(N)`` times the gradient each of the ``N`` rows would get, so that
  the global gradient norm (clipping) counts the ``N`` rows, and AdamW, invariant to a gradient's scale but
  for its ``eps`` term (1e-8 against gradients of ~1e-3 here), moves the row as it moves each of them.

``state_dict()`` holds the full ``lm_head.weight`` (official layout), and loading one whose other rows are
equal works too; :meth:`SharedRowsHead.to_linear` turns it back into ``nn.Linear``. The loss runs through
:meth:`SharedRowsHead.cross_entropy`, which :meth:`qwenvl.model.QwenVL.loss` calls for a head that has it.

The input embedding has the same waste the other way round: the demo's conversations use ~100 distinct
tokens, yet its gradient is a dense 151,936 x 128 table (zeroed, clipped and stepped by AdamW every step:
~60 of a ~700 ms step on 2 AVX2 cores). A row that is never looked up gets a zero gradient, so AdamW only
decays it: ``p <- p (1 - lr wd)`` every step. :class:`UsedRowsEmbedding` trains the used rows as their own
parameter and follows that decay with one more parameter, ``decay`` (1 x 1, starting at 1, given a zero
gradient every step, so AdamW applies exactly that factor to it); every other row is its initial value
times ``decay``. Training on a row outside the used ones is refused (an evaluation may read any row).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SharedRowsHead", "UsedRowsEmbedding", "input_ids", "label_ids"]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class _WholeWeight(nn.Module):
    """A layer that stands for one ``weight`` tensor of ``weight_shape`` (``full_weight()``) and keeps it in
    parts: its state dict holds the whole ``weight``, and loading one goes through ``_load_weight``."""

    weight_shape: tuple[int, int]

    def full_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _load_weight(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.full_weight()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        weight = state_dict[key]
        if tuple(weight.shape) != self.weight_shape:
            error_msgs.append(f"size mismatch for {key}: {tuple(weight.shape)} in the checkpoint, "
                              f"{self.weight_shape} here")
            return
        try:
            self._load_weight(weight)
        except ValueError as e:
            error_msgs.append(f"{key}: {e}")


class SharedRowsHead(_WholeWeight):
    """A bias-free ``vocab x hidden`` linear layer whose rows outside ``ids`` are all one (shared) row.

    ``rows`` (k, hidden) are the rows of ``ids`` (sorted, distinct), ``shared`` (1, hidden) every other row.
    """

    ids: torch.Tensor  # buffer

    def __init__(self, rows: torch.Tensor, shared: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> None:
        super().__init__()
        ids = torch.as_tensor(ids, dtype=torch.long, device=rows.device)
        if ids.dim() != 1 or rows.dim() != 2 or rows.shape[0] != ids.numel() or shared.shape != (1, rows.shape[1]):
            raise ValueError(f"expected rows (k, d), shared (1, d) and k ids, got {tuple(rows.shape)}, "
                             f"{tuple(shared.shape)} and {tuple(ids.shape)}")
        if ids.numel() and (not bool((ids[1:] > ids[:-1]).all()) or ids[0] < 0 or ids[-1] >= vocab_size):
            raise ValueError(f"ids must be sorted, distinct and in [0, {vocab_size})")
        if ids.numel() >= vocab_size:
            raise ValueError("no row left to share: ids cover the whole vocabulary")
        self.rows = nn.Parameter(rows)
        self.shared = nn.Parameter(shared)
        self.register_buffer("ids", ids, persistent=False)
        self.in_features = rows.shape[1]
        self.out_features = vocab_size
        self.weight_shape = (vocab_size, rows.shape[1])
        self.num_shared = vocab_size - ids.numel()

    @classmethod
    @torch.no_grad()
    def from_linear(cls, layer: nn.Linear, ids: Any) -> SharedRowsHead:
        """The head of ``layer`` (bias-free), whose rows outside ``ids`` must all be equal."""
        if layer.bias is not None:
            raise ValueError("SharedRowsHead has no bias")
        ids = torch.unique(torch.as_tensor(ids, dtype=torch.long)).to(layer.weight.device)
        rows, shared = _split(layer.weight.detach(), ids)
        return cls(rows.clone(), shared.clone(), ids, layer.out_features)

    def full_weight(self) -> torch.Tensor:
        """The ``vocab x hidden`` matrix this head stands for (a new tensor)."""
        w = self.shared.detach().expand(self.out_features, -1).clone()
        w[self.ids] = self.rows.detach()
        return w

    def to_linear(self) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, bias=False, device=self.rows.device,
                          dtype=self.rows.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.full_weight())
        layer.weight.requires_grad_(self.rows.requires_grad)
        return layer

    def _logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shared = _ScaleGrad.apply(self.shared, 1.0 / math.sqrt(self.num_shared))
        return F.linear(x, self.rows), F.linear(x, shared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        own, shared = self._logits(x)
        return shared.expand(*shared.shape[:-1], self.out_features).index_copy(-1, self.ids, own)

    def cross_entropy(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Summed ``F.cross_entropy`` of the full logits at ``hidden`` (N, d) for ``target`` (N,) ids,
        computed over ``k + 1`` columns."""
        pos = torch.searchsorted(self.ids, target).clamp_(max=max(self.ids.numel() - 1, 0))
        if target.numel() and (not self.ids.numel() or not bool((self.ids[pos] == target).all())):
            missing = sorted(set(target.tolist()) - set(self.ids.tolist()))[:5]
            raise ValueError(f"target ids {missing} are not among the head's own rows (a shared row cannot be a "
                             "target)")
        own, shared = self._logits(hidden)
        acc = torch.promote_types(own.dtype, torch.float32)  # fp32 (fp64 for fp64), as linear_cross_entropy
        logits = torch.cat([own.to(acc), shared.to(acc) + math.log(self.num_shared)], dim=-1)
        return F.cross_entropy(logits, pos, reduction="sum")

    def _load_weight(self, weight: torch.Tensor) -> None:
        rows, shared = _split(weight.to(self.rows.device), self.ids)
        with torch.no_grad():
            self.rows.copy_(rows)
            self.shared.copy_(shared)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, own_rows={self.ids.numel()}"


def _split(weight: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of ``ids``, the one row every other row equals); ValueError when those rows differ."""
    others = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    others[ids] = False
    if not bool(others.any()):
        raise ValueError("no row left to share: ids cover the whole vocabulary")
    rest = weight[others]
    if not bool((rest == rest[:1]).all()):
        raise ValueError("the rows outside the head's own ids are not all equal, so they cannot be one shared row")
    return weight[ids], rest[:1]


class UsedRowsEmbedding(_WholeWeight):
    """An ``nn.Embedding`` (``vocab x hidden``) that trains only the rows of ``ids`` (sorted, distinct): ``rows``
    (k, hidden) are theirs, every other row is its value in ``initial`` times ``decay`` (see the module
    docstring)."""

    initial: torch.Tensor  # buffers
    index: torch.Tensor
    ids: torch.Tensor

    def __init__(self, initial: torch.Tensor, ids: Any) -> None:
        super().__init__()
        ids = torch.unique(torch.as_tensor(ids, dtype=torch.long)).to(initial.device)
        vocab = initial.shape[0]
        if not ids.numel() or ids[0] < 0 or ids[-1] >= vocab:
            raise ValueError(f"ids must be a non-empty set in [0, {vocab})")
        self.rows = nn.Parameter(initial[ids].detach().clone())
        self.decay = nn.Parameter(torch.ones(1, 1, dtype=initial.dtype, device=initial.device))
        self.register_buffer("initial", initial.detach().clone(), persistent=False)
        index = torch.full((vocab,), -1, dtype=torch.long, device=initial.device)
        index[ids] = torch.arange(ids.numel(), device=initial.device)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("ids", ids, persistent=False)
        self.num_embeddings, self.embedding_dim = vocab, initial.shape[1]
        self.weight_shape = (vocab, initial.shape[1])
        # AdamW steps only parameters that have a gradient: give `decay` a zero one whenever the rows get theirs
        self.rows.register_post_accumulate_grad_hook(self._zero_decay_grad)

    def _zero_decay_grad(self, _: torch.Tensor) -> None:
        if self.decay.requires_grad and self.decay.grad is None:
            self.decay.grad = torch.zeros_like(self.decay)

    @classmethod
    def from_embedding(cls, layer: nn.Embedding, ids: Any) -> UsedRowsEmbedding:
        return cls(layer.weight, ids)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        index = self.index[input_ids]
        if not input_ids.numel() or int(index.min()) >= 0:
            return F.embedding(index, self.rows)
        unused = index < 0
        if torch.is_grad_enabled() and self.rows.requires_grad:  # its gradient would belong to that row alone
            ids = sorted(set(input_ids[unused].tolist()))[:5]
            raise ValueError(f"token ids {ids} are not among the embedding's trained rows")
        out = F.embedding(index.clamp(min=0), self.rows)  # e.g. generation during an evaluation: rows as they are
        out[unused] = self.initial[input_ids[unused]] * self.decay
        return out

    def full_weight(self) -> torch.Tensor:
        """The ``vocab x hidden`` table this embedding stands for (a new tensor)."""
        w = self.initial * self.decay.detach()
        w[self.ids] = self.rows.detach()
        return w

    def to_embedding(self) -> nn.Embedding:
        layer = nn.Embedding(self.num_embeddings, self.embedding_dim, device=self.rows.device, dtype=self.rows.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.full_weight())
        layer.weight.requires_grad_(self.rows.requires_grad)
        return layer

    def _load_weight(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.initial.copy_(weight)
            self.rows.copy_(weight[self.ids])
            self.decay.fill_(1.0)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, trained_rows={self.ids.numel()}"


def input_ids(dataset: Any) -> list[int]:
    """The distinct input token ids of a :class:`~qwenvl.data.dataset.ConversationDataset`, sorted."""
    return _distinct(s.input_ids for s in dataset.samples)


def label_ids(dataset: Any) -> list[int]:
    """The distinct target ids of a :class:`~qwenvl.data.dataset.ConversationDataset` (labels after the first
    position, as the loss shifts them), sorted."""
    from ..data.dataset import IGNORE_INDEX

    targets = (s.labels[1:] for s in dataset.samples)
    return [t for t in _distinct(targets) if t != IGNORE_INDEX]


def _distinct(arrays: Any) -> list[int]:
    return np.unique(np.concatenate([np.asarray(a) for a in arrays])).tolist()
