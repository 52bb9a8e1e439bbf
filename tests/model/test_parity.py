"""Parity with the official implementation on the golden checkpoint (fp32)."""

from __future__ import annotations

import torch

from qwenvl.config import IMG_START_ID


def _images_for(case_ids: list[int], pixels: torch.Tensor) -> torch.Tensor | None:
    n = sum(1 for i in case_ids if i == IMG_START_ID)
    return pixels[:n] if n else None


def test_vision_tower_matches_official(golden_model, golden_expected):
    t = golden_expected["tensors"]
    with torch.no_grad():
        out = golden_model.encode_images(t["pixels"])
    assert out.shape == t["visual"].shape == (2, 256, 128)
    torch.testing.assert_close(out, t["visual"], atol=2e-3, rtol=0)


def test_logits_match_official(golden_model, golden_expected):
    t = golden_expected["tensors"]
    for k, case in enumerate(golden_expected["cases"]):
        ids = torch.tensor([case["input_ids"]])
        with torch.no_grad():
            logits = golden_model(ids, images=_images_for(case["input_ids"], t["pixels"])).logits[0]
        assert logits.shape == (ids.shape[1], 151936)
        got = logits[case["logit_positions"]]
        torch.testing.assert_close(got, t[f"logits_{k}"], atol=2e-3, rtol=0)


def test_greedy_tokens_match_official(golden_model, golden_expected):
    t = golden_expected["tensors"]
    for case in golden_expected["cases"]:
        ids = torch.tensor([case["input_ids"]])
        out = golden_model.generate(ids, images=_images_for(case["input_ids"], t["pixels"]),
                                    max_new_tokens=10, min_new_tokens=10)
        assert out[0, ids.shape[1]:].tolist() == case["greedy_10"]


def test_logits_to_keep_selects_positions(golden_model, golden_expected):
    case = golden_expected["cases"][2]
    ids = torch.tensor([case["input_ids"]])
    with torch.no_grad():
        full = golden_model(ids).logits
        last = golden_model(ids, logits_to_keep=1).logits
        some = golden_model(ids, logits_to_keep=torch.tensor([0, 5])).logits
    assert last.shape == (1, 1, 151936)
    torch.testing.assert_close(last[0, 0], full[0, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(some[0], full[0, [0, 5]], atol=1e-5, rtol=0)


def test_kept_positions_reach_lm_head_with_standard_strides(golden_model, golden_expected):
    # With a strided slice, torch.matmul (weights that need no gradient) multiplies by a copy of the whole
    # expanded lm_head weight (bmm); standard strides fold the rows into one mm.
    case = golden_expected["cases"][2]
    ids = torch.tensor([case["input_ids"]] * 2)
    seen = []
    hook = golden_model.lm_head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            golden_model(ids, logits_to_keep=1)
            golden_model(ids[:1], logits_to_keep=2)
    finally:
        hook.remove()
    assert [x.shape[:2] for x in seen] == [(2, 1), (1, 2)]
    for x in seen:
        assert x.stride() == torch.empty(x.shape).stride()
