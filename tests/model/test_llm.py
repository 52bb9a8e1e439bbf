"""RoPE pieces of the LM: the roll-based rotation equals the official rotate-half formula bit for bit."""

from __future__ import annotations

import pytest
import torch

from qwenvl.model.llm import apply_rope, rope_cos_sin, rope_inv_freq


def _rotate_half_reference(x: torch.Tensor, positions: torch.Tensor, alpha: torch.Tensor, base: float) -> torch.Tensor:
    hd = x.shape[-1]
    inv_freq = 1.0 / (base * alpha.double().pow(hd / (hd - 2))).float()[:, None].pow(
        torch.arange(0, hd, 2, dtype=torch.float32)[None] / hd)
    emb = torch.cat([positions.float()[:, :, None] * inv_freq[:, None, :]] * 2, dim=-1).unsqueeze(1)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()).type_as(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_equals_rotate_half_exactly(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    b, nh, t, hd = 2, 3, 7, 16
    x = torch.randn(b, nh, t, hd, generator=g).to(dtype)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4]])  # second row left-padded
    alpha = torch.tensor([1.0, 3.0])
    cos, sin = rope_cos_sin(positions, alpha, hd, 10000.0)
    assert torch.equal(apply_rope(x, cos, sin), _rotate_half_reference(x, positions, alpha, 10000.0))
    # the inverse frequencies kept in the KV cache give the same tables
    cos2, sin2 = rope_cos_sin(positions, alpha, hd, 10000.0, rope_inv_freq(alpha, hd, 10000.0))
    assert torch.equal(cos, cos2) and torch.equal(sin, sin2)
