"""``inference.load`` onto a CUDA device, run on the CPU: ``torch.cuda``'s functions are stand-ins that record what
load asks of them, and the device copies are made on the CPU (a clone stands for each copy a GPU would get)."""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode

from qwenvl import cli, inference, quantize
from qwenvl.config import QwenVLConfig
from qwenvl.model import QwenVL
from qwenvl.quantize import Int8Linear, copied_bytes, lm_linears


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two CUDA devices with ``free`` bytes each (set ``two_gpus["free"]``); ``set`` lists the
    devices ``torch.cuda.set_device`` was given, ``asked`` those ``mem_get_info`` was asked about."""
    gpus = {"free": 2**40, "set": [], "asked": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: gpus["set"].append(str(device)))

    def mem_get_info(device=None):
        gpus["asked"].append(str(device))
        return gpus["free"], 2 * gpus["free"]

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: gpus.get("cached", 0))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    return gpus


class _DeviceCopies(TorchFunctionMode):
    """``Tensor.to`` of the LM's linear weights (found by their data) gives new memory, as a move to a GPU does
    (``.to("cpu")`` of a CPU tensor would give the tensor itself); ``most`` is the most of those alive at once."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.sources = {w.data_ptr() for w in weights}
        self.copies: list[StorageWeakRef] = []
        self.most = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.to and args[0].data_ptr() in self.sources and out.dim() == 2:
            out = out.clone() if out.data_ptr() == args[0].data_ptr() else out
            self.copies.append(StorageWeakRef(out.untyped_storage()))
            self.most = max(self.most, sum(not ref.expired() for ref in self.copies))
        return out


def test_int8_on_a_gpu_is_quantized_there_one_layer_at_a_time(golden_dir, two_gpus, monkeypatch) -> None:
    """``load(quantize="int8", device="cuda")`` copied every stored tensor to the GPU and quantized afterwards: the
    9.6B model's peak there was its bf16 size (19.3 GB), not the int8 model's (12.2 GB), so a 16 GB GPU could not
    load it. Now the model is read on the CPU (mapped, as stored) and each linear weight goes to the GPU alone, is
    quantized there and freed; the result is the CPU load's int8 model, bit for bit."""
    calls = []
    optimize = quantize.optimize_for_inference

    def on_the_cpu(model, quantize=None, dtype=None, device=None):  # where "cuda:1" would be, with copies counted
        calls.append((next(model.parameters()).device.type, device))
        copies = _DeviceCopies([layer.weight for _, _, layer in lm_linears(model)])
        with copies:
            optimize(model, quantize, dtype, device="cpu")
        model.copies, model.most_copies = len(copies.copies), copies.most  # type: ignore[attr-defined]
        return model

    monkeypatch.setattr(quantize, "optimize_for_inference", on_the_cpu)
    model, _ = inference.load(golden_dir, dtype="float32", quantize="int8", device="cuda:1")
    assert calls == [("cpu", "cuda:1")] and two_gpus["set"] == []
    assert model.copies == 5 * len(model.transformer.h) + 1  # each linear weight went to the device
    assert model.most_copies == 1  # one at a time
    monkeypatch.undo()

    want, _ = inference.load(golden_dir, dtype="float32", quantize="int8", device="cpu")
    got, want = model.state_dict(), want.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 5 * len(model.transformer.h) + 1


def test_a_model_the_gpu_cannot_hold_is_refused_before_loading(golden_dir, two_gpus, monkeypatch, capsys) -> None:
    """On a GPU the memory check returned at once: a model larger than the GPU's free memory failed midway
    through the load with a torch.OutOfMemoryError traceback. Now one line says what it needs, what the GPU has
    free, and what int8 would need, before any weight is read."""

    def never(*args, **kwargs):
        raise AssertionError("weights read")

    monkeypatch.setattr("qwenvl.checkpoint.load_weights", never)
    meta = QwenVL.on_meta(QwenVLConfig.from_pretrained(golden_dir))
    fp16, int8 = (copied_bytes(meta, q, torch.float16, mapped=False) for q in (None, "int8"))  # stored float16
    argv = ["predict", "--model", str(golden_dir), "--dtype", "float16", "--device", "cuda:1", "--predict_data", "hi",
            "--modal_type", "text"]
    for free, advice in (((fp16 + int8) // 2, f"with --quantize int8 (quantize='int8') it needs {int8 / 1e6:.0f} MB"),
                         (int8 // 2, f"even with --quantize int8 it needs {int8 / 1e6:.0f} MB: use a GPU with more "
                                     "memory")):
        two_gpus["free"] = free
        assert cli.main(argv) == 2
        assert capsys.readouterr().err == (
            f"qwenvl predict: error: loading {golden_dir} in float16 needs {fp16 / 1e6:.0f} MB of GPU memory for its "
            f"weights, and cuda:1 has {free / 1e6:.0f} MB free: {advice}\n")
    assert cli.main([*argv, "--quantize", "int8"]) == 2
    assert capsys.readouterr().err.endswith(f"with int8 weights needs {int8 / 1e6:.0f} MB of GPU memory for its "
                                            f"weights, and cuda:1 has {two_gpus['free'] / 1e6:.0f} MB free: use a GPU "
                                            "with more memory\n")
    assert set(two_gpus["asked"]) == {"cuda:1"}


def test_load_asks_the_gpu_named_and_leaves_the_current_device_alone(golden_dir, two_gpus) -> None:
    """The memory check asks the device named (cuda:1), and load does not make it the current device: a library
    function that changed it would send the caller's later ``device="cuda"`` tensors to GPU 1. "cpu" leaves CUDA
    alone."""
    two_gpus["free"] = 0
    with pytest.raises(ValueError, match="cuda:1 has 0 MB free"):
        inference.load(golden_dir, dtype="float32", device="cuda:1")
    inference.load(golden_dir, dtype="float32", device="cpu")
    assert two_gpus["set"] == [] and two_gpus["asked"] == ["cuda:1"]


def test_memory_pytorch_holds_for_tensors_let_go_counts_as_free(golden_dir, two_gpus) -> None:
    """mem_get_info counts what PyTorch's caching allocator keeps of a model that was let go (load A, del A,
    load B in one process) as used: a load that fits was refused."""
    two_gpus["free"], two_gpus["cached"] = 0, 2**40
    inference.check_memory(golden_dir, torch.float32, None, "cuda:1")
    two_gpus["cached"] = 0
    with pytest.raises(ValueError, match="cuda:1 has 0 MB free"):
        inference.check_memory(golden_dir, torch.float32, None, "cuda:1")


def test_the_rest_reaches_the_device_cast_never_wider(golden_dir) -> None:
    """With a device, the tensors that are not quantized went there as stored and were cast there: a float32
    checkpoint computing in bf16 put its whole remainder on the GPU in float32 first (9.6B: a 17.3 GB peak where
    12.2 GB was counted). They are cast on the host, then moved. The meta device stands in for the GPU."""

    class Moves(TorchFunctionMode):
        """The dtypes of the tensors moved to the device, but the LM weights that int8 quantizes there (each alone,
        as stored)."""

        def __init__(self, quantized: set[int]) -> None:
            super().__init__()
            self.quantized = quantized
            self.dtypes: set[torch.dtype] = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (func is torch.Tensor.to and isinstance(out, torch.Tensor) and out.is_meta and not args[0].is_meta
                    and args[0].data_ptr() not in self.quantized):
                self.dtypes.add(out.dtype)
            return out

    for q in ("int8", None):
        model = QwenVL.from_pretrained(golden_dir, dtype=torch.float32)
        quantized = {layer.weight.data_ptr() for _, _, layer in lm_linears(model)} if q else set()
        with Moves(quantized) as moves:
            quantize.optimize_for_inference(model, q, torch.bfloat16, device="meta")
        assert moves.dtypes and torch.float32 not in moves.dtypes, (q, moves.dtypes)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and all(p.is_meta for p in model.parameters())


def test_int8_layers_let_each_weight_go_as_they_replace_it(monkeypatch) -> None:
    """quantize_int8 kept every replaced nn.Linear in its list until it returned: a model holding the only
    reference to its weights (one already on the GPU) peaked at its whole full-precision LM plus the int8 one."""
    import gc
    import weakref

    model = QwenVL.from_config("tiny", seed=0)
    refs = [weakref.ref(layer.weight) for _, _, layer in lm_linears(model)]
    alive = []
    make = Int8Linear.from_linear.__func__

    def counting(cls, linear, dtype=None, device=None):
        gc.collect()
        alive.append(sum(r() is not None for r in refs))
        return make(cls, linear, dtype, device)

    monkeypatch.setattr(Int8Linear, "from_linear", classmethod(counting))
    assert quantize.quantize_int8(model, torch.float32) == len(refs)
    assert alive == list(range(len(refs), 0, -1))  # the ones not quantized yet, and no other
