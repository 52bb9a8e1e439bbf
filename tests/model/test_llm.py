"""RoPE, dynamic-NTK and LogN pieces of the LM: equal to the official formulas bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from qwenvl.model.llm import apply_rope, logn_scale, ntk_alpha, rope_cos_sin, rope_inv_freq


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


def test_ntk_alpha_is_one_up_to_seq_length_including_an_empty_row() -> None:
    # an all-padding row of a batch has length 0: log(0) raised "math domain error"
    assert [ntk_alpha(n, 32) for n in (0, 1, 31, 32)] == [1.0] * 4
    assert ntk_alpha(33, 32) == 3.0


def test_logn_scale_equals_the_official_table_bit_for_bit() -> None:
    # fact: the official logn_tensor is torch.tensor([math.log(i, S) if i > S else 1 for i in range(1, 32768)]),
    # computed in float64 and stored in float32; a float32 log(p + 1) / log(S) differs by 1 ulp at many positions
    for seq_length in (32, 2048):
        official = torch.tensor([math.log(i, seq_length) if i > seq_length else 1 for i in range(1, 32768)])
        assert torch.equal(logn_scale(torch.arange(32767)[None], seq_length)[0], official)
