"""KV-cache decoding equals full forward passes, also past seq_length where NTK and LogN are active."""

from __future__ import annotations

import math

import pytest
import torch

from qwenvl import QwenVL
from qwenvl.config import IMG_END_ID, IMG_PAD_ID, IMG_START_ID, LMConfig, QwenVLConfig, VisionConfig
from qwenvl.model.llm import logn_scale, ntk_alpha


def short_context_model(seq_length: int = 32) -> QwenVL:
    cfg = QwenVLConfig(
        lm=LMConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, kv_channels=64,
                    intermediate_size=256, seq_length=seq_length),
        visual=VisionConfig(image_size=56, patch_size=14, width=32, layers=1, heads=2, mlp_ratio=2.0, output_dim=128),
    )
    return QwenVL.from_config(cfg, seed=0).float()


def test_ntk_alpha_and_logn_values():
    assert ntk_alpha(1, 2048) == 1
    assert ntk_alpha(2048, 2048) == 1
    assert ntk_alpha(2049, 2048) == 3
    assert ntk_alpha(4096, 2048) == 3
    assert ntk_alpha(4097, 2048) == 7
    s = logn_scale(torch.tensor([[0, 2047, 2048, 4095]]), 2048)
    torch.testing.assert_close(s, torch.tensor([[1.0, 1.0, math.log(2049) / math.log(2048), math.log(4096) / math.log(2048)]]))


@pytest.mark.parametrize("prompt_len", [10, 40])  # below and beyond seq_length=32
def test_cached_decoding_equals_full_forward(prompt_len):
    model = short_context_model(32)
    torch.manual_seed(1)
    ids = torch.randint(0, 5000, (2, prompt_len + 20))
    steps = ids.shape[1] - prompt_len
    alpha = torch.full((2,), ntk_alpha(prompt_len, 32))  # decode keeps the prefill's alpha
    with torch.no_grad():
        full = model(ids, rope_alpha=alpha).logits
        cache = model.new_cache(2, ids.shape[1])
        pre = model(ids[:, :prompt_len], past_key_values=cache).logits
        step_logits = [pre[:, -1]]
        for i in range(prompt_len, prompt_len + steps - 1):
            step_logits.append(model(ids[:, i : i + 1], past_key_values=cache).logits[:, -1])
    torch.testing.assert_close(pre, full[:, :prompt_len], atol=1e-5, rtol=0)
    got = torch.stack(step_logits, 1)
    torch.testing.assert_close(got, full[:, prompt_len - 1 : -1], atol=1e-5, rtol=0)
    if prompt_len > 32:
        assert float(alpha[0]) == 3.0  # NTK really was active


def test_chunked_prefill_equals_full_forward():
    model = short_context_model(32)
    ids = torch.randint(0, 5000, (1, 50))
    alpha = torch.ones(1)
    with torch.no_grad():
        full = model(ids, rope_alpha=alpha).logits
        cache = model.new_cache(1, 50)
        a = model(ids[:, :20], past_key_values=cache, rope_alpha=alpha).logits
        b = model(ids[:, 20:], past_key_values=cache, rope_alpha=alpha).logits
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=0)


def test_left_padding_matches_unpadded():
    model = short_context_model(32)
    ids = torch.randint(0, 5000, (1, 40))
    padded = torch.cat([torch.full((1, 7), 151643), ids], 1)
    mask = torch.cat([torch.zeros(1, 7, dtype=torch.long), torch.ones(1, 40, dtype=torch.long)], 1)
    with torch.no_grad():
        ref = model(ids).logits
        got = model(padded, attention_mask=mask).logits[:, 7:]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_right_padding_matches_unpadded_and_needs_no_mask():
    """Training batches pad on the right: causal attention alone is exact for the real tokens (logits and the
    gradients of a loss over them), so no mask is built and the kernel may skip the upper triangle."""
    from qwenvl.model.qwenvl import attention_bias

    model = short_context_model(64)
    ids = torch.randint(0, 5000, (2, 40))
    lens = [40, 33]
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 33:] = 0
    assert attention_bias(mask, 40, 0, ids.device) is None
    left = mask.flip(1)
    assert attention_bias(left, 40, 0, ids.device) is not None  # left padding still needs the mask

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return sum(logits[i, : lens[i]].square().mean() for i in range(2))

    model.zero_grad()
    loss(model(ids, attention_mask=mask).logits).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref_logits = [model(ids[i : i + 1, : lens[i]]).logits[0] for i in range(2)]
    sum(x.square().mean() for x in ref_logits).backward()
    with torch.no_grad():
        padded_logits = model(ids, attention_mask=mask).logits
    for i in range(2):
        torch.testing.assert_close(padded_logits[i, : lens[i]], ref_logits[i].detach(), atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)


def _span() -> list[int]:
    return [IMG_START_ID] + [ord("a")] + [IMG_PAD_ID] * 255 + [IMG_END_ID]


def test_image_count_mismatch_raises():
    model = short_context_model()
    ids = torch.tensor([[1, 2] + _span() + [3]])
    pixels = torch.zeros(2, 3, 56, 56)
    with pytest.raises(ValueError, match="1 image span.*2 image"):
        model(ids, images=pixels)
    with pytest.raises(ValueError, match="no images were given"):
        model(ids)


def test_malformed_image_span_raises():
    model = short_context_model()
    ids = torch.tensor([[1, IMG_START_ID, 5, 6, IMG_END_ID, 3]])
    with pytest.raises(ValueError, match="malformed image span"):
        model(ids, images=torch.zeros(1, 3, 56, 56))


def test_image_features_fill_exactly_the_span():
    model = short_context_model()
    ids = torch.tensor([[1, 2] + _span() + [3]])
    feats = torch.randn(1, 256, 128)
    h = model.embed(ids, image_features=feats)
    torch.testing.assert_close(h[0, 3:259], feats[0])
    plain = model.transformer.wte(ids)
    torch.testing.assert_close(h[0, :3], plain[0, :3])  # <img> keeps its own embedding
    torch.testing.assert_close(h[0, 259:], plain[0, 259:])  # </img> too


@pytest.mark.parametrize("shape", [(1, 64, 128), (1, 256, 64), (256, 128)])
def test_image_features_of_the_wrong_shape_are_refused(shape):
    model = short_context_model()
    ids = torch.tensor([[1, 2] + _span() + [3]])
    with pytest.raises(ValueError, match=r"image features must be \(images, 256, 128\)"):
        model.embed(ids, image_features=torch.randn(*shape))


@pytest.mark.parametrize("prompt_len", [10, 40])  # below and beyond seq_length=32
def test_an_all_padding_row_leaves_the_other_rows_as_alone(prompt_len):
    # a batch row with no token at all (attention_mask all 0) raised "math domain error" (dynamic NTK of length 0)
    model = short_context_model(32)
    ids = torch.randint(0, 5000, (2, prompt_len))
    mask = torch.ones(2, prompt_len, dtype=torch.long)
    mask[1] = 0
    with torch.no_grad():
        alone = model(ids[:1]).logits
        cache = model.new_cache(2, prompt_len + 1)
        logits = model(ids, attention_mask=mask, past_key_values=cache).logits
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        step = model(ids[:, :1], attention_mask=step_mask, past_key_values=cache).logits
        alone_step = model(torch.cat([ids[:1], ids[:1, :1]], 1)).logits[:, -1]
    torch.testing.assert_close(logits[:1], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(step[0, -1], alone_step[0], atol=1e-5, rtol=0)
    assert not logits.isnan().any() and not step.isnan().any()


def test_a_padded_decode_step_of_an_all_padding_row_is_not_nan():
    # a decode step whose own mask entry is 0, in a row with no real token, had every key masked: NaN logits
    model = short_context_model(32)
    ids = torch.randint(0, 5000, (2, 6))
    mask = torch.tensor([[1] * 6, [0] * 6])
    with torch.no_grad():
        cache = model.new_cache(2, 7)
        model(ids, attention_mask=mask, past_key_values=cache)
        step_mask = torch.cat([mask, torch.tensor([[1], [0]])], 1)
        step = model(ids[:, :1], attention_mask=step_mask, past_key_values=cache).logits
        alone = model(torch.cat([ids[:1], ids[:1, :1]], 1)).logits[:, -1]
    assert not step.isnan().any()
    torch.testing.assert_close(step[0, -1], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [-1, 151936])
def test_ids_out_of_the_vocabulary_are_refused_with_a_message(bad):
    model = short_context_model()
    with pytest.raises(ValueError, match=rf"input_ids hold {bad}: the model has ids 0..151935"):
        model(torch.tensor([[1, bad, 2]]))


@pytest.mark.parametrize("ids", [torch.tensor([1, 2, 3]), torch.tensor([[1.0, 2.0]]), torch.zeros(1, 0, dtype=torch.long)])
def test_input_ids_of_the_wrong_kind_are_refused_with_a_message(ids):
    model = short_context_model()
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor \(batch, tokens\) with at least one "
                       rf"token; got a {ids.dtype} tensor of shape"):
        model(ids)


def test_a_negative_logits_to_keep_is_refused():
    # it returned the logits of all positions, as 0 does (Hugging Face's slice(-k, None) would drop the first k)
    model = short_context_model()
    with pytest.raises(ValueError, match="logits_to_keep must be 0 .* got -1"):
        model(torch.tensor([[1, 2]]), logits_to_keep=-1)


@pytest.mark.parametrize("shape", [(3, 56, 56), (1, 3, 56, 112), (1, 3, 112, 112), (1, 1, 56, 56), (1, 3, 10, 10)])
def test_pixels_of_the_wrong_shape_are_refused_with_a_message(shape):
    # these ran into the vision tower: tracebacks from broadcasting or conv2d, or (another square size)
    # features from position embeddings interpolated to a grid the model was never given
    model = short_context_model()
    ids = torch.tensor([[1, 2] + _span() + [3]])
    with pytest.raises(ValueError, match=r"images must be float pixels \(images, 3, 56, 56\) from the Processor"):
        model(ids, images=torch.zeros(shape))


def test_pixels_that_are_not_float_are_refused_with_a_message():
    model = short_context_model()
    ids = torch.tensor([[1, 2] + _span() + [3]])
    with pytest.raises(ValueError, match=r"images must be float pixels.*got a torch.uint8 tensor"):
        model(ids, images=torch.zeros(1, 3, 56, 56, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"images must be float pixels.*got a list"):
        model(ids, images=[torch.zeros(3, 56, 56)])
