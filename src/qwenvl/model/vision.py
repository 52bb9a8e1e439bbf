"""The Qwen-VL vision tower: a ViT (ViT-bigG at 9.6B size) and the cross-attention resampler.

Parameter names follow the official checkpoint (``transformer.visual.*``) so that official weights
load with no renaming. Layout facts that differ from a textbook ViT are marked ``# fact:``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig


def resize_pos_embed(pos: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Resize a square grid of position embeddings [L, C] to ``num_tokens`` positions.

    fact: bicubic, align_corners=False, computed in float32 then cast back.
    """
    src = math.isqrt(pos.shape[0])
    tgt = math.isqrt(num_tokens)
    if src == tgt:
        return pos
    grid = pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)  # (1, C, src, src)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(tgt * tgt, -1).to(pos.dtype)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed MAE-style 2D sin-cos embedding [grid*grid, dim].

    fact: the first half of the channels encodes the column (w) coordinate, the second half the row (h);
    each half is [sin(pos * omega), cos(pos * omega)] with omega_i = 1 / 10000^(i / (dim / 4)).
    """
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float32) / (dim / 4.0))
    coords = np.arange(grid, dtype=np.float32)
    w, h = np.meshgrid(coords, coords)  # w varies along columns

    def one_axis(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([one_axis(w), one_axis(h)], axis=1)).float()


class VisualAttention(nn.Module):
    """Self-attention whose fused ``in_proj`` output is laid out per head: [..., heads, 3 * head_dim]."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.in_proj(x).view(b, n, self.heads, 3 * self.head_dim)  # fact: per-head q|k|v
        q, k, v = qkv.transpose(1, 2).split(self.head_dim, dim=-1)  # each (B, nh, N, hd)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class VisualBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = VisualAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(cfg.width, cfg.mlp_width))
        self.mlp.add_module("gelu", nn.GELU())  # fact: exact (erf) GELU
        self.mlp.add_module("c_proj", nn.Linear(cfg.mlp_width, cfg.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualTransformer(nn.Module):
    """Holds ``resblocks`` so that names read ``transformer.visual.transformer.resblocks.N``."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(VisualBlock(cfg) for _ in range(cfg.layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            if self.gradient_checkpointing and self.training and x.requires_grad:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class Resampler(nn.Module):
    """One cross-attention layer: 256 learned queries attend over the ViT patches.

    fact: query = ln_q(query) + pos_embed, key = ln_kv(kv_proj(x)) + pos_embed resized to the patch grid,
    value = ln_kv(kv_proj(x)); ``attn`` is a torch ``nn.MultiheadAttention`` (q|k|v in row blocks).
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        dim = cfg.output_dim
        grid = math.isqrt(cfg.n_queries)
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, grid), requires_grad=False)
        self.query = nn.Parameter(torch.empty(cfg.n_queries, dim))
        # fact: kv_proj exists only when the ViT width differs from output_dim
        self.kv_proj = nn.Linear(cfg.width, dim, bias=False) if cfg.width != dim else nn.Identity()
        self.attn = nn.MultiheadAttention(dim, cfg.resampler_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.ln_kv = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, N, width) -> (B, n_queries, dim)
        pos_k = resize_pos_embed(self.pos_embed, x.shape[1])
        kv = self.ln_kv(self.kv_proj(x))
        q = (self.ln_q(self.query) + self.pos_embed).unsqueeze(0).expand(x.shape[0], -1, -1)
        out, _ = self.attn(q, kv + pos_k, kv, need_weights=False)
        return out


class VisionTower(nn.Module):
    """Pixels [N, 3, H, W] (CLIP-normalized) -> image features [N, n_queries, output_dim]."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(256, w))  # fact: a 16x16 grid, resized
        self.ln_pre = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.transformer = VisualTransformer(cfg)
        self.attn_pool = Resampler(cfg)
        self.ln_post = nn.LayerNorm(cfg.output_dim, eps=cfg.layer_norm_eps)
        self.proj = nn.Parameter(torch.empty(cfg.output_dim, cfg.output_dim))  # fact: a matrix, not a Linear

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init as the official code does (used for models built from scratch)."""
        w, d = self.cfg.width, self.cfg.output_dim
        self.positional_embedding.normal_(std=w**-0.5)
        self.proj.normal_(std=d**-0.5)
        nn.init.trunc_normal_(self.attn_pool.query, std=0.02)
        self.attn_pool.pos_embed.copy_(sincos_pos_embed_2d(d, math.isqrt(self.cfg.n_queries)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels.to(self.conv1.weight.dtype))  # (N, width, g, g)
        x = x.flatten(2).transpose(1, 2)  # (N, g*g, width)
        x = x + resize_pos_embed(self.positional_embedding, x.shape[1])
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(self.attn_pool(x))
        return x @ self.proj
