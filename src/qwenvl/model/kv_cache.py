"""A preallocated key/value cache for incremental decoding.

Buffers are allocated once, [batch, heads, max_length, head_dim] per layer, and written in place at the
current position, so decode steps allocate nothing and ``torch.compile`` sees stable storage. Attention reads
only the filled prefix ``[:, :, :length]``: on a CPU, reading the whole buffer each step would cost as much
memory traffic as a large share of the weights.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch_size, num_heads, max_length, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_length = max_length
        self.length = 0  # positions filled so far (the same for every layer once a step ends)
        # Per-row dynamic-NTK factor chosen at prefill; decode steps keep it (the official behaviour).
        self.rope_alpha: torch.Tensor | None = None
        self.rope_inv_freq: torch.Tensor | None = None  # (B, hd/2) from rope_alpha, computed once at prefill

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hd) at the current position; return the filled prefix of the layer."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_length} allocated")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the rows in ``index`` (e.g. when finished sequences leave a batch)."""
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]
        if self.rope_alpha is not None:
            self.rope_alpha = self.rope_alpha.index_select(0, index)
        if self.rope_inv_freq is not None:
            self.rope_inv_freq = self.rope_inv_freq.index_select(0, index)
