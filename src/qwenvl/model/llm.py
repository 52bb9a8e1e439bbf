"""The Qwen-7B language model blocks: RMSNorm, attention with RoPE (dynamic NTK, LogN), SwiGLU MLP.

Names follow the official checkpoint (``transformer.h.N.attn.c_attn`` ...). Inference-only tricks of
the official model (dynamic-NTK RoPE and LogN query scaling past ``seq_length``) are computed here per
sequence from explicit positions, so left-padded batches give each sequence its own values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LMConfig
from .kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fact: normalize in float32, cast back to the input dtype, then scale (the order matters in bf16)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def ntk_alpha(length: int, seq_length: int) -> float:
    """fact: dynamic-NTK factor for a prompt of ``length`` tokens: max(1, 2^ceil(log2(L/S) + 1) - 1).

    That is 1 for every length up to ``seq_length``, which this returns without the log: an all-padding row
    of a batch has length 0, whose log is undefined."""
    if length <= seq_length:
        return 1.0
    value = math.log(length / seq_length, 2) + 1
    return float(max(2 ** math.ceil(value) - 1, 1))


def rope_inv_freq(alpha: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """Per-row inverse frequencies (B, hd/2) in float32 for dynamic-NTK factors ``alpha`` (B,)."""
    exponent = torch.arange(0, head_dim, 2, device=alpha.device, dtype=torch.float32) / head_dim
    # fact: base' = base * alpha^(d / (d - 2))
    row_base = base * alpha.double().pow(head_dim / (head_dim - 2))  # (B,)
    return 1.0 / row_base.float()[:, None].pow(exponent[None, :])


def rope_cos_sin(
    positions: torch.Tensor, alpha: torch.Tensor, head_dim: int, base: float, inv_freq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and *signed* sin, each (B, 1, T, hd) in float32, for ``positions`` (B, T) and per-row NTK ``alpha`` (B,)
    (or their precomputed ``inv_freq``, see :func:`rope_inv_freq`).

    The sin's first half is negated so that :func:`apply_rope` can rotate with one ``roll`` instead of
    slicing, negating and concatenating: ``rotate_half(x) * sin == roll(x, hd/2) * signed_sin`` exactly.
    """
    if inv_freq is None:
        inv_freq = rope_inv_freq(alpha, head_dim, base)
    freqs = positions.float()[:, :, None] * inv_freq[:, None, :]  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # (B, 1, T, hd)
    sin = emb.sin()
    sin[..., : head_dim // 2].neg_()
    return emb.cos(), sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE over the whole head, computed in float32 (fact); ``sin`` signed as
    :func:`rope_cos_sin` returns it."""
    xf = x.float()
    return (xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin).type_as(x)


def logn_scale(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """fact: query at 0-based position p is scaled by log(p + 1) / log(S) when p + 1 > S. (B, T) float32.

    fact: computed in float64 and rounded once to float32, as the official table (``math.log(i, S)`` in
    Python); a float32 log and division differ from it by one ulp at about a third of the positions. (Apple's
    MPS has no float64: float32 there.)"""
    p1 = positions.to(torch.float32 if positions.device.type == "mps" else torch.float64) + 1
    return torch.where(p1 > seq_length, torch.log(p1) / math.log(seq_length), torch.ones_like(p1)).float()


def single_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention for one new token per row (decode): plain matmuls beat the fused CPU kernels here,
    whose fixed cost per call is larger than the work for a single query."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # (B, nh, 1, L)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.kv_channels
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.c_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=not cfg.no_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        q_scale: torch.Tensor | None,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.c_attn(x).view(b, t, 3, self.num_heads, self.head_dim)  # fact: [q; k; v] row blocks
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hd)
        qk = apply_rope(qkv[:2], cos, sin)  # q and k rotated together: one set of kernels, not two
        q, k, v = qk[0], qk[1], qkv[2]
        if q_scale is not None:
            q = q * q_scale[:, None, :, None].to(q.dtype)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if t == 1:
            out = single_query_attention(q, k, v, mask)
        elif mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=False)
        self.c_proj = nn.Linear(cfg.ffn_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))  # fact: silu on w2, not w1


class Block(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        self.ln_2 = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, q_scale, mask, cache, layer):  # noqa: ANN001, ANN201 (hot path)
        x = x + self.attn(self.ln_1(x), cos, sin, q_scale, mask, cache, layer)
        return x + self.mlp(self.ln_2(x))
