"""The AVX512-BF16 CPU kernel: F.linear's numbers for every batch and shape, row results independent of the
batch, packing round trips, compiled decoding on packed weights, and the fallbacks when it cannot be built."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from qwenvl import Processor, QwenVL
from qwenvl.config import ENDOFTEXT_ID
from qwenvl.generation import SamplingParams, stream_tokens
from qwenvl.inference import load
from qwenvl.model import bf16_kernel
from qwenvl.model.linear import Bf16PackedLinear, PackedLinear, can_prepack, onednn_packed, packs_for_compile

needs_kernel = pytest.mark.skipif(not bf16_kernel.available(),
                                  reason=f"bf16 kernel unavailable: {bf16_kernel.unavailable_reason()}")


def _close_to_fp32(got: torch.Tensor, x, w, b) -> None:
    """Within bf16 rounding of the fp32 product (F.linear in bf16 rounds the same way)."""
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-3 * float(want.abs().max()))


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 270])
@pytest.mark.parametrize("n,k", [(16, 2), (80, 34), (1040, 1024), (64, 2816)])
def test_kernel_computes_f_linear(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    _close_to_fp32(bf16_kernel.bf16_packed_linear(x, bf16_kernel.pack(w), b), x, w, b)
    _close_to_fp32(bf16_kernel.bf16_packed_linear(x, bf16_kernel.pack(w), None), x, w, None)


@needs_kernel
def test_each_row_is_computed_the_same_whatever_the_batch():
    # every row accumulates in the same order in every block variant: batch-1 and batch-N decode agree exactly
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 1024, generator=g).bfloat16()
    wp = bf16_kernel.pack(torch.randn(1040, 1024, generator=g).bfloat16())
    full = bf16_kernel.bf16_packed_linear(x, wp, None)
    assert full.shape == (2, 11, 1040)
    for i in range(2):
        for j in range(11):
            assert torch.equal(bf16_kernel.bf16_packed_linear(x[i, j:j + 1], wp, None)[0], full[i, j])
    assert bf16_kernel.bf16_packed_linear(x[:, :0], wp, None).shape == (2, 0, 1040)


def test_pack_round_trips():
    w = torch.randn(48, 10).bfloat16()
    p = bf16_kernel.pack(w)
    assert p.shape == w.shape and not torch.equal(p, w) and torch.equal(bf16_kernel.unpack(p), w)
    assert p[0, :4].tolist() == [w[0, 0].item(), w[0, 1].item(), w[1, 0].item(), w[1, 1].item()]


@needs_kernel
def test_packed_layer_state_dict_and_compile():
    layer = torch.nn.Linear(64, 48).bfloat16()
    packed = Bf16PackedLinear(layer)
    x = torch.randn(3, 5, 64).bfloat16()
    with torch.no_grad():
        _close_to_fp32(packed(x), x, layer.weight, layer.bias)
        compiled = torch.compile(lambda t: packed(t) * 2, fullgraph=True)
        assert torch.equal(compiled(x), packed(x) * 2)
    sd = packed.state_dict()
    assert torch.equal(sd["weight"], layer.weight) and torch.equal(sd["bias"], layer.bias)
    other = Bf16PackedLinear(torch.nn.Linear(64, 48).bfloat16())
    other.load_state_dict(sd)
    assert torch.equal(other.weight, packed.weight)
    assert torch.equal(packed.unpacked().weight, layer.weight)
    buf = io.BytesIO()
    torch.save(packed, buf)  # whole-module pickling too (the operator handle is looked up again)
    buf.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.load(buf, weights_only=False)(x), packed(x))
    with pytest.raises(TypeError, match="dtype"):
        packed(x.float())
    with pytest.raises(ValueError, match="cannot pack"):
        Bf16PackedLinear(torch.nn.Linear(64, 40).bfloat16())  # 40 outputs: not whole blocks of 16


@needs_kernel
def test_prepack_gives_bf16_layers_to_the_kernel_and_the_rest_to_onednn():
    model = QwenVL.from_config("tiny", seed=0, dtype=torch.bfloat16)
    plain = QwenVL.from_config("tiny", seed=0, dtype=torch.bfloat16)
    n = model.prepack_cpu_weights()
    kinds = [type(m) for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(kinds) == n and Bf16PackedLinear in kinds and model.is_prepacked
    assert packs_for_compile(plain) == (PackedLinear not in kinds) and onednn_packed(model) == (PackedLinear in kinds)
    ids = torch.randint(1000, 50000, (2, 12))
    with torch.no_grad():
        a, b = model(ids).logits.float(), plain(ids).logits.float()
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    fp32 = QwenVL.from_config("tiny", seed=0)
    fp32.prepack_cpu_weights()
    assert not any(isinstance(m, Bf16PackedLinear) for m in fp32.modules())


@needs_kernel
def test_compiled_decoding_on_kernel_packed_weights(golden_dir):
    model, _ = load(golden_dir, dtype="bfloat16", device="cpu", batch_size=4, compile=True)
    assert model.is_prepacked and not onednn_packed(model)
    processor = Processor.from_pretrained(golden_dir)
    prompts = ["Hello, how are you today?", "Picture 1: <img>images/cat.png</img>\nDescribe the image in English:"]
    inputs = processor(prompts, base_dir=golden_dir)
    params = SamplingParams(max_new_tokens=6, min_new_tokens=6, stop_token_ids=(ENDOFTEXT_ID,))

    def run(compile: bool) -> torch.Tensor:
        steps = stream_tokens(model, inputs["input_ids"], inputs["attention_mask"], inputs["images"], params,
                              compile=compile)
        return torch.stack(list(steps), 1)

    eager, compiled = run(False), run(True)
    assert eager.shape == (2, 6)
    # bf16: the compiled step fuses the element-wise work and may round differently; most tokens agree
    assert (eager == compiled).float().mean() >= 0.75
    for batch, compile in ((1, True), (1, False), (8, False)):  # the kernel's packing whatever the batch
        other, _ = load(golden_dir, dtype="bfloat16", device="cpu", batch_size=batch, compile=compile)
        assert other.is_prepacked and not onednn_packed(other)


@pytest.mark.skipif(not can_prepack(torch.float32), reason="this torch build has no oneDNN")
def test_compile_with_onednn_packing_is_refused_before_packing(golden_dir):
    with pytest.raises(ValueError, match="oneDNN-prepacked"):
        load(golden_dir, dtype="float32", device="cpu", prepack=True, compile=True)
    model, _ = load(golden_dir, dtype="float32", device="cpu", batch_size=8, compile=True)
    assert not model.is_prepacked  # fp32 packs only for oneDNN: compiled decoding keeps it plain


def _probe(env: dict[str, str]) -> list[str]:
    """available(), unavailable_reason() and the operator's name, plus a product, in a fresh process"""
    code = ("import torch; from qwenvl.model import bf16_kernel as k; print(k.available()); "
            "print(k.unavailable_reason()); ok = k.available(); print(k.operator() if ok else None); "
            "g = torch.Generator().manual_seed(0); x = torch.randn(3, 64, generator=g).bfloat16(); "
            "w = torch.randn(48, 64, generator=g).bfloat16(); "
            "print(k.bf16_packed_linear(x, k.pack(w), None).float().sum().item() if ok else None)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_switched_off_by_environment():
    out = _probe({"QWENVL_BF16_KERNEL": "0"})
    assert out == ["False", "switched off (QWENVL_BF16_KERNEL=0)", "None", "None"]


@needs_kernel
def test_builds_into_the_cache_and_falls_back_step_by_step(tmp_path):
    # no C compiler: no kernel, nothing left in the cache
    out = _probe({"CC": "false", "QWENVL_CACHE_DIR": str(tmp_path)})
    assert out[0] == "False" and "false failed" in out[1]
    assert list((tmp_path / "kernels").iterdir()) == []
    # a C compiler but no C++ one: the kernel runs through the Python operator, same numbers
    python_op = _probe({"CXX": "false", "QWENVL_CACHE_DIR": str(tmp_path)})
    assert python_op[:3] == ["True", "None", "qwenvl.bf16_packed_linear"]
    assert [p.name.split("-")[0] for p in (tmp_path / "kernels").iterdir()] == ["bf16_linear"]
    # both: the C++ operator, built once and then found in the cache
    cpp_op = _probe({"QWENVL_CACHE_DIR": str(tmp_path)})
    assert cpp_op[:3] == ["True", "None", "qwenvl_kernels.bf16_packed_linear"] and cpp_op[3] == python_op[3]
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "kernels").iterdir()) == ["bf16_linear",
                                                                                      "bf16_linear_op"]
    built = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "kernels").iterdir()}
    assert _probe({"QWENVL_CACHE_DIR": str(tmp_path)}) == cpp_op
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "kernels").iterdir()} == built  # not rebuilt
    assert _probe({"QWENVL_BF16_KERNEL": "python"})[2] == "qwenvl.bf16_packed_linear"


@needs_kernel
def test_the_op_refuses_what_the_kernel_cannot_read():
    wp = bf16_kernel.pack(torch.randn(32, 8).bfloat16())
    x = torch.randn(2, 8).bfloat16()
    for bad in [(x.float(), wp, None), (torch.randn(2, 6).bfloat16(), wp, None), (x, wp.float(), None),
                (x, wp, torch.randn(16).bfloat16()), (x, wp, torch.randn(32)), (x, wp.t(), None),
                (x, torch.randn(24, 8).bfloat16(), None)]:
        with pytest.raises((ValueError, RuntimeError), match="bf16_packed_linear"):
            bf16_kernel.bf16_packed_linear(*bad)


@needs_kernel
def test_an_unusable_cache_folder_falls_back_to_a_temporary_one(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    out = _probe({"QWENVL_CACHE_DIR": str(blocker)})
    assert out[:3] == ["True", "None", "qwenvl_kernels.bf16_packed_linear"]
    assert blocker.read_text() == ""
