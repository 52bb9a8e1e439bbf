"""Inference layer swaps (qwenvl.quantize): int8 weight-only layers and row-product linears, applied from
outside the model; eager and compiled decoding agree; int8 stays close to full precision."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qwenvl import QwenVL
from qwenvl.generation import SamplingParams, compiled_decode_step, stream_tokens
from qwenvl.hardware import fp32_product_path
from qwenvl.quantize import (
    Int8Linear,
    RowLinear,
    compile_options,
    optimize_for_inference,
    quantize_weight,
    use_row_products,
)


def _golden(golden_dir, quantize=None) -> QwenVL:
    return optimize_for_inference(QwenVL.from_pretrained(golden_dir, dtype=torch.float32).eval(), quantize)


def test_quantize_weight_is_symmetric_per_output_channel() -> None:
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 64)[:, None]
    q, scales = quantize_weight(w)
    assert q.dtype == torch.int8 and scales.shape == (64,)
    assert int(q.abs().amax(1).min()) == 127  # every row uses the full range
    err = (q.float() * scales[:, None] - w).abs()
    assert bool((err <= scales[:, None] / 2 + 1e-7).all())  # rounding error at most half a step
    assert torch.equal(quantize_weight(torch.zeros(3, 4))[0], torch.zeros(3, 4, dtype=torch.int8))


def test_int8_layer_matches_the_dequantized_product() -> None:
    lin = nn.Linear(48, 40, bias=True)
    layer = Int8Linear.from_linear(lin)
    x = torch.randn(2, 5, 48)
    want = nn.functional.linear(x, layer.dequantize(), lin.bias)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), lin(x), rtol=0.05, atol=0.02)
    compiled = torch.compile(layer, fullgraph=True)  # one row: the reduction over int32-packed weights
    torch.testing.assert_close(compiled(x[:1, :1]), want[:1, :1], rtol=1e-5, atol=1e-5)
    odd = Int8Linear.from_linear(nn.Linear(45, 7))  # columns not a multiple of 4: stored in the usual order
    assert odd.groups == 1
    torch.testing.assert_close(torch.compile(odd, fullgraph=True)(x[:1, :1, :45]),
                               nn.functional.linear(x[:1, :1, :45], odd.dequantize(), odd.bias), rtol=1e-5, atol=1e-5)


def test_int8_weights_are_stored_interleaved_for_four_per_int32_load() -> None:
    """Stored column 4 i + j is column j K/4 + i; read as int32, element i packs one weight of each quarter of
    the input (little-endian byte j = quarter j), and the packed product equals the plain one."""
    lin = nn.Linear(8, 3, bias=False)
    layer = Int8Linear.from_linear(lin)
    q = torch.round(layer.dequantize() / layer.scales[:, None]).to(torch.int8)
    assert torch.equal(layer.weight, q[:, [0, 2, 4, 6, 1, 3, 5, 7]])
    x = torch.randn(1, 8)
    torch.testing.assert_close(layer._packed_row_product(x) * layer.scales, x @ layer.dequantize().T)


@pytest.mark.parametrize("few_rows", ["slices", "transposed"])
@pytest.mark.parametrize("shape", [(1, 48), (3, 48), (2, 4, 48), (12, 48), (13, 48), (2, 9, 48)])
def test_sliced_products_equal_the_plain_product(shape, few_rows, monkeypatch) -> None:
    """Eager CPU paths over slices of the weight's rows (few-row fp32 products, int8 dequantization) give the
    plain product, whatever the number of rows and however the slices fall (here 16 rows per slice of 40)."""
    import qwenvl.quantize as qz

    monkeypatch.setattr(qz, "_SLICE_BYTES", 16 * 48 * 4)
    monkeypatch.setattr(qz, "_BIG_SLICE_BYTES", 16 * 48 * 4)
    lin = nn.Linear(48, 40).requires_grad_(False)
    rows = RowLinear(48, 40).requires_grad_(False)
    rows.load_state_dict(lin.state_dict())
    rows.few_rows = few_rows
    q = Int8Linear.from_linear(lin)
    x = torch.randn(shape)
    torch.testing.assert_close(rows(x), lin(x), rtol=1e-5, atol=1e-5)
    want = nn.functional.linear(x, q.dequantize(), lin.bias)
    torch.testing.assert_close(q(x), want, rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)  # with gradients wanted: the plain product (the sliced one writes into a buffer)
    rows.weight.requires_grad_(True)
    rows(x).sum().backward()
    assert x.grad is not None and rows.weight.grad is not None


@pytest.mark.parametrize("path", ["avx512", "amd", "avx2"])
def test_fp32_products_follow_the_machine(path, monkeypatch) -> None:
    """Each machine path (hardware.fp32_product_path) sets the layers up as documented, keeps the weights as
    they are (row-major, values unchanged) and computes the same products: slices for 2-12 rows with MKL's
    AVX-512 code, transposed products for 2-32 rows and compiled one-row reductions on AMD CPUs, F.linear
    elsewhere; int8 layers with fp32 activations multiply their dequantized slices transposed on AMD CPUs."""
    import qwenvl.quantize as qz

    monkeypatch.setattr(qz, "fp32_product_path", lambda: path)
    model = QwenVL.from_config("tiny", seed=0)
    optimize_for_inference(model)
    layer = model.lm_head
    assert isinstance(layer, RowLinear)
    assert (layer.few_rows, layer.fp32_row_reduction) == {"avx512": ("slices", False), "amd": ("transposed", True),
                                                          "avx2": ("plain", False)}[path]
    assert layer.weight.is_contiguous()
    # compiled steps keep inductor's option that stores multi-read element-wise results, except where 2-8-row
    # products are reductions (it would store those products in full)
    assert compile_options(model) == (None if path == "amd" else {"realize_acc_reads_threshold": 1})
    fresh = QwenVL.from_config("tiny", seed=0)
    for name, p in fresh.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], p, rtol=0, atol=0)
    sliced, transposed = [], []
    monkeypatch.setattr(qz, "_sliced", lambda *a: sliced.append(a) or qz._sliced_product(a[0], a[1], a[0].dtype, a[2]))
    monkeypatch.setattr(qz, "_transposed_product", lambda *a: transposed.append(a) or qz.F.linear(*a))
    with torch.no_grad():
        for rows in (8, 20, 40):
            x = torch.randn(rows, layer.in_features)
            torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
    assert len(sliced) == (1 if path == "avx512" else 0)  # 8 rows
    assert len(transposed) == (2 if path == "amd" else 0)  # 8 and 20 rows
    q = QwenVL.from_config("tiny", seed=0)
    optimize_for_inference(q, "int8")
    assert q.lm_head.transposed_slices is q.lm_head.few_row_reductions is (path == "amd")
    assert compile_options(q) == (None if path == "amd" else {"realize_acc_reads_threshold": 1})
    # bf16 activations: the plain int8 path on every kind of CPU, and the option kept
    q = QwenVL.from_config("tiny", seed=0, dtype=torch.bfloat16)
    optimize_for_inference(q, "int8")
    assert q.lm_head.transposed_slices is q.lm_head.few_row_reductions is False
    assert compile_options(q) == {"realize_acc_reads_threshold": 1}


@pytest.mark.parametrize("rows", [1, 2, 5, 12, 13, 32, 33])
@pytest.mark.parametrize("transposed", [False, True])
def test_products_transposed_equal_plain(rows, transposed) -> None:
    """The transposed product and the sliced products (fp32 and int8, either orientation) equal ``F.linear``."""
    import qwenvl.quantize as qz

    lin = nn.Linear(48, 40).requires_grad_(False)
    x = torch.randn(rows, 48)
    torch.testing.assert_close(qz._transposed_product(x, lin.weight), x @ lin.weight.T, rtol=1e-5, atol=1e-5)
    got = qz._sliced_product(x, lin.weight, torch.float32, 16 * 48 * 4, transposed)
    torch.testing.assert_close(got, x @ lin.weight.T, rtol=1e-5, atol=1e-5)
    q = Int8Linear.from_linear(lin)
    q.transposed_slices = transposed
    with torch.no_grad():
        torch.testing.assert_close(q(x), nn.functional.linear(x, q.dequantize(), lin.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 6, 7, 40])
def test_bf16_rows_take_pytorchs_int8_product(rows, monkeypatch) -> None:
    """int8 layers multiply up to 12 bf16 rows (CPU, no gradients) with PyTorch's int8 weight-only product, by
    the stored (interleaved) weight and the rows in the same order, and more rows over dequantized slices: both
    the product by the dequantized weight, in bf16."""
    calls = []
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(a) or real(*a))
    lin = nn.Linear(64, 40).to(torch.bfloat16).requires_grad_(False)
    q = Int8Linear.from_linear(lin)
    assert q.groups == 4
    x = torch.randn(2, rows, 64).to(torch.bfloat16)
    with torch.no_grad():
        got = q(x)
    assert len(calls) == (1 if 2 * rows <= 12 else 0) and got.dtype == torch.bfloat16 and got.shape == (2, rows, 40)
    want = nn.functional.linear(x.float(), q.dequantize(), lin.bias.float())
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("n", [48, 20, 6, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_reduction_reads_blocks_of_rows_and_sums_as_unsplit(n, dtype) -> None:
    """A compiled one-row product reads the weight as the largest of 8/4/2/1 equal row blocks that divides its
    rows, and every output is the same sum as the unsplit reduction's, bit for bit (eager and compiled)."""
    import qwenvl.quantize as qz

    assert qz._row_streams(n) == {48: 8, 20: 4, 6: 2, 7: 1}[n]
    g = torch.Generator().manual_seed(n)
    w, x = torch.randn(n, 40, generator=g).to(dtype), torch.randn(1, 1, 40, generator=g)
    unsplit = (w.float() * x.reshape(1, -1)).sum(-1).reshape(1, 1, n)
    assert torch.equal(qz._row_product(x, w), unsplit)
    compiled = torch.compile(qz._row_product, fullgraph=True)
    plain = torch.compile(lambda x, w: (w.float() * x.reshape(1, -1)).sum(-1).reshape(1, 1, n), fullgraph=True)
    assert torch.equal(compiled(x, w), plain(x, w))


def test_few_row_reductions_pad_to_buckets_and_equal_the_product() -> None:
    """Compiled products of 2-8 rows are one reduction per row over rows padded to 2, 4 or 8: the results equal
    ``F.linear``'s (fp32 and bf16 weights, and int8 layers against their dequantized weight), and row counts in
    one bucket share a graph (3 graphs for 2-8 rows)."""
    import qwenvl.quantize as qz

    graphs = []

    def backend(gm, example_inputs):  # counts compilations, runs the captured graph as it is
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(qz._row_product, fullgraph=True, dynamic=True, backend=backend)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(24, 40, generator=g).to(dtype)
        for rows in range(2, 9):
            x = torch.randn(rows, 1, 40, generator=g)
            want = nn.functional.linear(x, w.float())
            torch.testing.assert_close(compiled(x, w), want, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 6  # buckets 2, 4 and 8, for each weight dtype
    torch._dynamo.reset()
    inductor = torch.compile(qz._row_product, fullgraph=True, dynamic=True)
    for rows in (3, 8):
        x = torch.randn(rows, 40, generator=g)
        torch.testing.assert_close(inductor(x, w), nn.functional.linear(x, w.float()), rtol=1e-5, atol=1e-5)
    # int8 layers: the same buckets over the packed weight, equal to the product by the dequantized weight
    q = Int8Linear.from_linear(nn.Linear(40, 24).requires_grad_(False))
    q.few_row_reductions = True
    torch._dynamo.reset()
    layer = torch.compile(q, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for rows in (1, 3, 8):
            x = torch.randn(rows, 40, generator=g)
            want = nn.functional.linear(x, q.dequantize(), q.bias)
            torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_swaps_cover_the_language_model_only(golden_dir) -> None:
    model = _golden(golden_dir, "int8")
    n_blocks = len(model.transformer.h)
    int8 = [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]
    assert len(int8) == 5 * n_blocks + 1 and "lm_head" in int8
    assert not any(n.startswith("transformer.visual") for n in int8)
    assert model.dtype == torch.float32 and not any(p.requires_grad for p in model.parameters())
    lm_bytes = {n: b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith(".weight")}
    plain = _golden(golden_dir)
    fp32_bytes = sum(plain.get_submodule(n.rsplit(".", 1)[0]).weight.numel() * 4 for n in lm_bytes)
    assert sum(lm_bytes.values()) * 4 == fp32_bytes  # int8 weights: a quarter of fp32
    rows = [n for n, m in plain.named_modules() if type(m) is RowLinear]
    assert len(rows) == 5 * n_blocks + 1
    assert plain.state_dict().keys() == QwenVL.from_pretrained(golden_dir).state_dict().keys()
    with pytest.raises(ValueError, match="quantize must be one of none, int8"):
        optimize_for_inference(plain, "int4")


def test_int8_logits_stay_close_to_fp32(golden_dir, golden_expected) -> None:
    """On the golden checkpoint (846 positions): the next-token choice agrees at >= 95% of positions, and
    where it differs the fp32 choice was a near-tie (top-2 margin within twice that position's largest
    logit error). Measured: 816 / 846 = 96.5%, largest logit error 0.11 (logits' std 0.14), every flip at a
    margin < 0.044."""
    from qwenvl import Processor

    processor = Processor.from_pretrained(golden_dir, base_dir=golden_dir)
    ref, q = _golden(golden_dir), _golden(golden_dir, "int8")
    agree = total = 0
    worst = 0.0
    with torch.no_grad():
        for text in golden_expected["texts"]:
            inputs = processor(text)
            a, b = ref(**inputs).logits[0], q(**inputs).logits[0]
            same = a.argmax(-1) == b.argmax(-1)
            top2 = a.topk(2, dim=-1).values
            err = (a - b).abs().amax(-1)
            assert bool(((top2[:, 0] - top2[:, 1]) <= 2 * err)[~same].all())
            agree += int(same.sum())
            total += a.shape[0]
            worst = max(worst, float(err.max()))
    assert total >= 200
    assert agree / total >= 0.95, (agree, total, worst)
    assert worst < float(a.std()), worst


@pytest.mark.parametrize(("quantize", "path", "batch"), [(None, None, 2), ("int8", None, 2), (None, "amd", 3),
                                                           (None, "amd", 5), ("int8", "amd", 5), (None, "avx512", 2),
                                                           ("int8", "avx512", 3)])
def test_compiled_decoding_equals_eager(golden_dir, quantize, path, batch) -> None:
    """Compiled greedy decoding (with the model's compile options) gives eager decoding's tokens, for one
    sequence and a left-padded batch; with the layers set up for another machine's path on any machine ("amd":
    batches of 2-8 rows as padded reductions, no options; "avx512": sliced products, the option)."""
    model = _golden(golden_dir, quantize)
    if path is not None:
        use_row_products(model, path)
    assert (compile_options(model) is None) is ((path or fp32_product_path()) == "amd")
    step = compiled_decode_step("cpu", compile_options(model))
    torch._dynamo.reset()
    ids = torch.randint(1000, 50000, (batch, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    params = SamplingParams(max_new_tokens=6, min_new_tokens=6)
    eager = torch.stack(list(stream_tokens(model, ids, mask, params=params)), 1)
    one = torch.stack(list(stream_tokens(model, ids[:1], params=params, step_fn=step)), 1)
    assert torch.equal(eager[:1], one)
    batched = torch.stack(list(stream_tokens(model, ids, mask, params=params, step_fn=step)), 1)
    assert torch.equal(eager, batched)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_lora_adapters_keep_their_layers(golden_dir, quantize) -> None:
    """A model with (unmerged) LoRA adapters: only the model's own layers are swapped. The adapters' lora_A/lora_B
    were quantized too, and peft casts the input to lora_A.weight's dtype: int8, so the adapters added garbage."""
    import peft  # a dev dependency: the tests never skip for want of it

    def adapted() -> QwenVL:
        torch.manual_seed(0)
        model = QwenVL.from_pretrained(golden_dir, dtype=torch.float32).eval()
        peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*\.attn\.c_attn", bias="none"),
                                     model)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)  # peft starts B at 0: make the adapter count
        return model

    ids = torch.tensor([[785, 6722, 315, 9625, 374, 12095, 13]])
    with torch.no_grad():
        ref = adapted()(input_ids=ids).logits
        base = QwenVL.from_pretrained(golden_dir, dtype=torch.float32).eval()(input_ids=ids).logits
        model = optimize_for_inference(adapted(), quantize)
        lora_layers = {n: type(m) for n, m in model.named_modules() if ".lora_A." in n or ".lora_B." in n}
        assert lora_layers and set(lora_layers.values()) == {nn.Linear}
        got = model(input_ids=ids).logits
    assert float((ref - base).abs().max()) > 0.5  # the adapter matters
    tol = 1e-5 if quantize is None else 0.3  # int8 weights: ~0.14 here (quantized adapters: 5.5)
    assert float((got - ref).abs().max()) < tol


def test_int8_bf16_rows_of_any_width(tmp_path) -> None:
    """bf16 rows through an int8 layer whose in_features is not a multiple of 16: PyTorch's int8 product read past
    the rows (a segfault on an AVX-512 CPU for in_features 20, 24, 1000, ...). Run in a child process, so that a
    crash fails this test rather than the whole session."""
    import subprocess
    import sys

    code = """
import torch
from torch import nn
from qwenvl.quantize import Int8Linear
torch.manual_seed(0)
for k in (20, 24, 36, 1000, 5):
    lin = nn.Linear(k, 7).to(torch.bfloat16).requires_grad_(False)
    q = Int8Linear.from_linear(lin)
    for rows in (1, 5, 12):
        x = torch.randn(rows, k).to(torch.bfloat16)
        with torch.no_grad():
            got = q(x).float()
        want = nn.functional.linear(x.float(), q.dequantize(), lin.bias.float())
        torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])


def test_int8_bf16_rows_compile_in_one_graph() -> None:
    # the int8 layer's few-row bf16 path must stay traceable (a data_ptr() check made torch.compile fail on it)
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(64, 32).to(torch.bfloat16).requires_grad_(False))
    compiled = torch.compile(layer, fullgraph=True)
    for rows in (4, 10):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


def test_load_int8_quantizes_the_weights_as_stored(golden_dir, monkeypatch) -> None:
    """``load(..., quantize="int8")`` read every weight in the compute dtype and quantized after: computing in
    fp32, the LM's linear weights all existed in fp32 first (Qwen-VL-Chat: a ~39 GB peak for a ~17 GB model).
    They are quantized from the checkpoint's own dtype now (the golden one's: float16), to the same numbers."""
    from qwenvl.inference import load

    seen = []
    from_linear = Int8Linear.from_linear.__func__

    def spy(cls, linear, *args, **kwargs):
        seen.append(linear.weight.dtype)
        return from_linear(cls, linear, *args, **kwargs)

    monkeypatch.setattr(Int8Linear, "from_linear", classmethod(spy))
    model, processor = load(golden_dir, dtype="float32", quantize="int8", allowed_media_dir=golden_dir)
    assert len(seen) == 5 * len(model.transformer.h) + 1 and set(seen) == {torch.float16}
    floats = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    assert {t.dtype for t in floats} == {torch.float32}
    monkeypatch.undo()
    before = _golden(golden_dir, "int8")  # the fp32 model quantized, as load did it
    inputs = processor("Picture 1: <img>images/cat.png</img>\nWhat is it?")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before(**inputs).logits)


def test_a_compute_dtype_the_weights_overflow_is_refused_naming_them() -> None:
    from qwenvl.checkpoint import CheckpointError

    model = QwenVL.from_config("tiny", seed=0)
    with torch.no_grad():
        model.transformer.visual.ln_post.weight[0] = 1e5
    with pytest.raises(CheckpointError, match=r"cannot compute in float16: transformer\.visual\.ln_post\.weight: 1 "):
        optimize_for_inference(model, "int8", dtype=torch.float16)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_copied_bytes_are_what_load_holds(golden_dir, quantize) -> None:
    from qwenvl.config import QwenVLConfig
    from qwenvl.inference import load
    from qwenvl.quantize import copied_bytes

    model, _ = load(golden_dir, dtype="float32", quantize=quantize)  # stored float16: every tensor is a copy
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    meta = QwenVL.on_meta(QwenVLConfig.from_pretrained(golden_dir))
    assert copied_bytes(meta, quantize, torch.float32, mapped=False) == held
    assert copied_bytes(meta, None, torch.float16, mapped=True) == 0  # read in place


def test_a_model_the_memory_cannot_hold_is_refused_before_loading(golden_dir, monkeypatch, capsys) -> None:
    """Qwen-VL-Chat in fp32 (the default on CPUs without native bf16) needs 38.6 GB: on a 24 GB machine the load
    was killed minutes in. Now one line says so before any weight is read, and what int8 would need."""
    from qwenvl import cli, hardware
    from qwenvl.config import QwenVLConfig
    from qwenvl.quantize import copied_bytes

    def never(*args, **kwargs):
        raise AssertionError("weights read")

    monkeypatch.setattr("qwenvl.checkpoint.load_weights", never)
    meta = QwenVL.on_meta(QwenVLConfig.from_pretrained(golden_dir))
    fp32, int8 = (copied_bytes(meta, q, torch.float32, mapped=False) for q in (None, "int8"))
    argv = ["predict", "--model", str(golden_dir), "--dtype", "float32", "--predict_data", "hi", "--modal_type", "text"]
    for available, advice in (((fp32 + int8) // 2, f"with --quantize int8 (quantize='int8') it needs {int8 / 1e6:.0f} MB"),
                              (int8 // 2, f"even with --quantize int8 it needs {int8 / 1e6:.0f} MB: use a machine with "
                                          "more memory")):
        monkeypatch.setattr(hardware, "available_memory", lambda available=available: available)
        assert cli.main(argv) == 2
        assert capsys.readouterr().err == (
            f"qwenvl predict: error: loading {golden_dir} in float32 needs {fp32 / 1e6:.0f} MB of memory for its "
            f"weights, and this machine has {available / 1e6:.0f} MB available (RAM + swap): {advice}\n")
    assert cli.main([*argv, "--quantize", "int8"]) == 2
    assert "with int8 weights needs" in capsys.readouterr().err


def test_int8_layers_off_the_cpu_keep_the_plain_products(monkeypatch) -> None:
    """The CPU paths (transposed slices, compiled few-row reductions) are set up only for weights on the CPU: on a
    GPU an AMD host's fp32 path made compiled 2-8-row products padded reductions (86 vs 64 us an 11,008 x 4,096
    product on an H200). The meta device stands in for a GPU."""
    import qwenvl.quantize as qz

    monkeypatch.setattr(qz, "fp32_product_path", lambda: "amd")
    on_cpu = QwenVL.from_config("tiny", seed=0)
    qz.quantize_int8(on_cpu)
    assert on_cpu.lm_head.few_row_reductions and on_cpu.lm_head.transposed_slices
    elsewhere = QwenVL.on_meta("tiny")
    assert qz.quantize_int8(elsewhere) == len(elsewhere.transformer.h) * 5 + 1
    layers = [m for m in elsewhere.modules() if isinstance(m, Int8Linear)]
    assert layers and not any(m.few_row_reductions or m.transposed_slices for m in layers)


def test_compiled_products_off_the_cpu_are_not_rewritten_to_pytorchs_int8_product(monkeypatch) -> None:
    """Off the CPU an int8 layer multiplies by the dequantized weight. Compiled, a 3-D input (a decode step's
    (B, 1, K)) times bf16 scales matched inductor's weight-only int8 pattern, which put in
    aten._weight_int8pack_mm: on an H200 15x slower than this product (a batch-8 decode step of the 9.6B model took
    145 ms). The layer scales in fp32 instead, with the same numbers. ``_cpu_no_grad`` False stands in for GPU
    weights (it is what sends them this way)."""
    import qwenvl.quantize as qz

    monkeypatch.setattr(qz, "_cpu_no_grad", lambda x, weight: False)
    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(256, 512).to(torch.bfloat16), torch.bfloat16)
    x = torch.randn(8, 1, 256, dtype=torch.bfloat16)
    compiled = torch.compile(q, dynamic=True, fullgraph=True)
    with torch.no_grad():
        eager = q(x)
        compiled(x)  # compiles
        with torch.profiler.profile() as prof:
            got = compiled(x)
    assert "aten::_weight_int8pack_mm" not in {e.key for e in prof.key_averages()}
    want = (nn.functional.linear(x.float(), q.dequantize()) + q.bias.float()).to(torch.bfloat16)
    torch.testing.assert_close(eager, want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got, eager, rtol=1e-2, atol=1e-2)
