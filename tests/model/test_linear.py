"""oneDNN-prepacked linear layers: same numbers as F.linear, same state dict, clear errors where they can't go."""

from __future__ import annotations

import pytest
import torch

from qwenvl import Processor, QwenVL
from qwenvl.config import ENDOFTEXT_ID
from qwenvl.generation import SamplingParams, generate, stream_tokens
from qwenvl.inference import load
from qwenvl.model.linear import PackedLinear, can_prepack

needs_fp32 = pytest.mark.skipif(not can_prepack(torch.float32), reason="this torch build has no oneDNN")
needs_bf16 = pytest.mark.skipif(not can_prepack(torch.bfloat16), reason="this CPU has no native bf16 matmul")

BATCH_PROMPTS = [
    "Hello, how are you today? Tell me about the weather in Hangzhou.",
    "Picture 1: <img>images/cat.png</img>\nDescribe the image in English:",
    "Picture 1: <img>images/cat.png</img>\nPicture 2: <img>images/street.jpg</img>\nWhat differs between them?",
    "Picture 1: <img>images/street.jpg</img>\n<ref>the car</ref>",
]


def _tiny(dtype=torch.float32) -> QwenVL:
    return QwenVL.from_config("tiny", seed=0, dtype=dtype)


def _greedy(model, processor, prompts, base_dir, n=10):
    inputs = processor(prompts, base_dir=base_dir)
    params = SamplingParams(max_new_tokens=n, min_new_tokens=n, stop_token_ids=(ENDOFTEXT_ID,))
    steps = list(stream_tokens(model, inputs["input_ids"], inputs["attention_mask"], inputs["images"], params))
    return torch.stack(steps, 1).tolist()


@needs_fp32
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)])
def test_prepacked_model_computes_what_the_plain_one_does(dtype):
    model = _tiny(dtype)
    ids = torch.randint(1000, 50000, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits.float()
        greedy = generate(model, ids, params=SamplingParams(max_new_tokens=6, min_new_tokens=6))
    plain_sd = {k: v.clone() for k, v in model.state_dict().items()}
    n = model.prepack_cpu_weights()
    assert n == sum(1 for m in model.modules() if isinstance(m, PackedLinear)) > 0
    assert model.is_prepacked and isinstance(model.lm_head, PackedLinear)
    with torch.no_grad():
        out = model(ids).logits.float()
    tol = 1e-5 if dtype == torch.float32 else 0.0  # bf16: the same oneDNN kernel as F.linear
    assert (out - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item()) + 1e-6
    assert torch.equal(generate(model, ids, params=SamplingParams(max_new_tokens=6, min_new_tokens=6)), greedy)
    # the state dict is the plain one: same keys, same values, plain tensors
    sd = model.state_dict()
    assert list(sd) == list(plain_sd)
    assert all(torch.equal(sd[k], v) and sd[k].layout == torch.strided for k, v in plain_sd.items())
    assert not any(p.requires_grad for p in model.parameters())  # packed = inference: nothing trains
    assert model.unpack_cpu_weights() == n and not model.is_prepacked
    assert all(p.requires_grad for p in model.parameters())
    unpacked = model.state_dict()
    assert all(torch.equal(unpacked[k], v) for k, v in plain_sd.items())
    assert all(type(m) is not PackedLinear for m in model.modules())


@needs_fp32
def test_prepacked_batch_equals_one_by_one(golden_model, golden_dir):
    model = QwenVL.from_pretrained(golden_dir, dtype=torch.float32)
    model.prepack_cpu_weights()
    processor = Processor.from_pretrained(golden_dir)
    batched = _greedy(model, processor, BATCH_PROMPTS, golden_dir)
    assert batched == [_greedy(model, processor, [p], golden_dir)[0] for p in BATCH_PROMPTS]
    assert batched == _greedy(golden_model, processor, BATCH_PROMPTS, golden_dir)  # == the plain model


@needs_fp32
def test_prepacked_save_load_round_trip(tmp_path):
    model = _tiny()
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    model.prepack_cpu_weights()
    model.save_pretrained(tmp_path / "m")
    again = QwenVL.from_pretrained(tmp_path / "m").state_dict()
    assert all(torch.equal(again[k], v) for k, v in plain.items())
    # loading a state dict into a packed model packs the new weights
    other = _tiny()
    other.prepack_cpu_weights()
    other.load_state_dict(plain)
    loaded = other.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in plain.items())
    bad = dict(plain, **{"lm_head.weight": plain["lm_head.weight"][:, :-1]})
    with pytest.raises(RuntimeError, match="lm_head.weight"):
        other.load_state_dict(bad)


@needs_fp32
def test_prepacked_model_refuses_training_compiling_and_moving():
    model = _tiny()
    model.prepack_cpu_weights()
    ids = torch.randint(1000, 50000, (1, 8))
    assert not any(p.requires_grad for p in model.parameters())
    model(ids)  # grad mode on, nothing requires grad: fine
    model.transformer.wte.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference-only"):
        model(ids, labels=ids)
    with pytest.raises(ValueError, match="prepacked"):
        generate(model, ids, params=SamplingParams(max_new_tokens=2), compile=True)
    with pytest.raises(RuntimeError, match="unpack_cpu_weights"):
        model.to(torch.bfloat16)


def test_prepack_is_a_no_op_where_it_cannot_apply():
    model = _tiny(torch.float16)
    if can_prepack(torch.float16):
        pytest.skip("this CPU packs fp16")
    assert model.prepack_cpu_weights() == 0 and not model.is_prepacked


@needs_fp32
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=needs_bf16)])
def test_load_packs_by_batch_size_and_dtype(golden_dir, dtype):
    from qwenvl.model import bf16_kernel
    from qwenvl.model.linear import cpu_gemv_enabled

    # bf16 weights the AVX512-BF16 kernel takes are packed for every batch size; others stay plain for batch 1
    kernel = dtype == "bfloat16" and bf16_kernel.available()
    model, _ = load(golden_dir, dtype=dtype, device="cpu", batch_size=1)
    assert model.is_prepacked == (kernel or not cpu_gemv_enabled())
    model, _ = load(golden_dir, dtype=dtype, device="cpu", batch_size=8)
    assert model.is_prepacked
    model, _ = load(golden_dir, dtype=dtype, device="cpu", batch_size=8, prepack=False)
    assert not model.is_prepacked
    model, _ = load(golden_dir, dtype=dtype, device="cpu", batch_size=1, prepack=True)
    assert model.is_prepacked
