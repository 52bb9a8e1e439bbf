"""Preallocated key/value caches for incremental decoding.

Buffers are allocated once, [batch, heads, max_length, head_dim] per layer, and written in place at the
current position, so decode steps allocate nothing and ``torch.compile`` sees stable storage. Attention reads
only the filled prefix ``[:, :, :length]``: on a CPU, reading the whole buffer each step would cost as much
memory traffic as a large share of the weights.

:class:`KVCache` holds one batch that starts together (``generate``). :class:`SlotKVCache` holds a serving
engine's decode slots: independent sequences that start and end at different times, each at its own position.
Both present the same small interface to the model (``length``, ``update``, ``advance``, ``rope_alpha``,
``rope_inv_freq``), so the model code does not know which one it writes into.
"""

from __future__ import annotations

import torch


def _buffers(num_layers: int, shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device | str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Zeroed key and value buffers of ``shape`` for every layer."""
    return ([torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)])


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
        self._start(*_buffers(num_layers, (batch_size, num_heads, max_length, head_dim), dtype, device))

    @classmethod
    def over(cls, k: list[torch.Tensor], v: list[torch.Tensor]) -> KVCache:
        """An empty cache writing into existing buffers (B, nh, max_length, hd) per layer; allocates nothing."""
        cache = cls.__new__(cls)
        cache._start(k, v)
        return cache

    def _start(self, k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        self.k, self.v = k, v
        self.max_length = k[0].shape[2]
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


class SlotKVCache:
    """KV buffers for ``slots`` independent sequences, (slots, nh, max_length, hd) per layer, each slot
    holding one sequence from position 0 (a serving engine's decode slots, gpt-fast style).

    A sequence enters a free slot through a batch-1 prefill into :meth:`slot`, the same :class:`KVCache` code
    path ``generate`` uses; :meth:`keep_rope` then stores the dynamic-NTK factor that prefill chose in the
    slot's row. :meth:`decode` is one step for slots ``[0, n)`` together: each writes its new key/value at its
    own position, and attention reads the first ``window`` positions of every slot, the caller masking the
    positions past each slot's own length. ``window`` comes from the lengths the caller tracks on the host,
    so a step reads no device value and its shapes change only when ``window`` or ``n`` does.
    """

    def __init__(
        self,
        num_layers: int,
        slots: int,
        num_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.k, self.v = _buffers(num_layers, (slots, num_heads, max_length, head_dim), dtype, device)
        self.max_length = max_length
        self.rope_alpha = torch.ones(slots, device=device)
        self.rope_inv_freq = torch.zeros(slots, head_dim // 2, device=device)

    @property
    def slots(self) -> int:
        return self.k[0].shape[0]

    def slot(self, index: int) -> KVCache:
        """An empty batch-1 :class:`KVCache` over slot ``index``'s rows, for its prefill."""
        rows = slice(index, index + 1)
        return KVCache.over([t[rows] for t in self.k], [t[rows] for t in self.v])

    def keep_rope(self, index: int, prefilled: KVCache) -> None:
        """Keep the RoPE factors the prefill of slot ``index`` chose for its decode steps."""
        if prefilled.rope_alpha is None or prefilled.rope_inv_freq is None:
            raise ValueError("the slot's prefill has not run: no RoPE factors to keep")
        self.rope_alpha[index] = prefilled.rope_alpha[0]
        self.rope_inv_freq[index] = prefilled.rope_inv_freq[0]

    def decode(self, positions: torch.Tensor, window: int) -> SlotDecode:
        """The cache of one decode step for slots ``[0, len(positions))``, writing at ``positions`` (n,)."""
        return SlotDecode(self, positions, window)


class SlotDecode:
    """One decode step of a :class:`SlotKVCache`: the model sees ``length = window - 1`` past positions."""

    def __init__(self, cache: SlotKVCache, positions: torch.Tensor, window: int) -> None:
        n = positions.shape[0]
        self.cache, self.positions, self.window = cache, positions, window
        self.rows = torch.arange(n, device=positions.device)
        self.length = window - 1
        self.max_length = cache.max_length
        # the same tensor objects on every read: the model then uses rope_inv_freq instead of recomputing it
        self.rope_alpha = cache.rope_alpha[:n]
        self.rope_inv_freq = cache.rope_inv_freq[:n]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (n, nh, 1, hd) at each slot's own position; return (n, nh, window, hd) of the layer."""
        n = k.shape[0]
        kb, vb = self.cache.k[layer], self.cache.v[layer]
        kb[self.rows, :, self.positions] = k[:, :, 0]  # (n, nh, hd) at (slot, :, position)
        vb[self.rows, :, self.positions] = v[:, :, 0]
        return kb[:n, :, : self.window], vb[:n, :, : self.window]

    def advance(self, n: int) -> None:
        """Positions are the caller's (one step advances each active slot by one)."""
