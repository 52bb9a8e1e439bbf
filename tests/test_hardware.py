"""The compute dtype follows what the hardware does natively: bf16 only where it is not emulated."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from qwenvl import hardware

AVX2_ONLY = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma", "f16c"})  # e.g. AMD EPYC without AVX-512
AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_bf16"}
AMX = AVX2_ONLY | {"avx512f", "amx_tile", "amx_bf16"}


@pytest.fixture
def cpu(monkeypatch: pytest.MonkeyPatch):
    """Pretend to run on a CPU with the given flags (and no oneDNN cap)."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)

    def use(flags: frozenset[str]) -> None:
        monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)

    return use


@pytest.mark.parametrize(("flags", "native"), [(AVX2_ONLY, False), (AVX512_BF16, True), (AMX, True),
                                               (frozenset({"fp", "asimd", "bf16"}), True), (frozenset(), False)])
def test_native_bf16_from_cpu_flags(cpu, flags: frozenset[str], native: bool) -> None:
    cpu(flags)
    assert hardware.supports_bf16("cpu") is native
    assert hardware.default_dtype("cpu") == (torch.bfloat16 if native else torch.float32)


def test_a_onednn_isa_cap_below_bf16_means_no_native_bf16(cpu, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu(AMX)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert not hardware.supports_bf16("cpu")
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in hardware.cpu_summary()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert hardware.supports_bf16("cpu")


def test_the_summary_names_every_instruction_set_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    summary = hardware.cpu_summary()
    assert "ATEN_CPU_CAPABILITY=avx2" in summary and "MKL_ENABLE_INSTRUCTIONS=AVX2" in summary


def test_mkl_instruction_set_follows_flags_and_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    mkl = torch.backends.mkl.is_available()
    assert hardware.mkl_runs_avx512(frozenset({"avx2", "avx512f"})) is mkl
    assert not hardware.mkl_runs_avx512(frozenset({"avx2", "fma"}))
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "avx2")
    assert not hardware.mkl_runs_avx512(frozenset({"avx2", "avx512f"}))


def test_fp32_product_path_follows_mkl_and_vendor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    avx2 = frozenset({"avx2", "fma"})
    mkl = torch.backends.mkl.is_available()
    assert hardware.fp32_product_path(avx2, "AuthenticAMD") == ("amd" if mkl else "avx2")
    assert hardware.fp32_product_path(avx2, "GenuineIntel") == "avx2"
    assert hardware.fp32_product_path(frozenset({"avx2", "avx512f"}), "GenuineIntel") == ("avx512" if mkl else "avx2")
    # AMD CPUs with AVX-512 (Zen 4) take the AMD path too: MKL's AVX-512 products measured slower there
    assert hardware.fp32_product_path(frozenset({"avx2", "avx512f"}), "AuthenticAMD") == ("amd" if mkl else "avx2")
    assert hardware.cpu_vendor() == hardware.cpu_vendor().strip()


def test_cpu_flags_are_read_from_this_machine() -> None:
    flags = hardware.cpu_flags()
    summary = hardware.cpu_summary()
    assert "native bf16: " in summary and "threads" in summary
    if "avx2" in flags:
        assert "avx2" in summary


def test_auto_is_logged_and_an_emulated_bf16_request_warns(cpu, caplog: pytest.LogCaptureFixture) -> None:
    cpu(AVX2_ONLY)
    with caplog.at_level(logging.INFO, logger="qwenvl.hardware"):
        assert hardware.resolve_bf16("auto", "cpu") is False
        assert hardware.resolve_bf16(False, "cpu") is False
    assert "cpu without native bf16: training in float32" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qwenvl.hardware"):
        assert hardware.resolve_bf16("true", "cpu") is True
    assert any(r.levelno == logging.WARNING and "emulated" in r.getMessage() for r in caplog.records)
    cpu(AMX)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qwenvl.hardware"):
        assert hardware.resolve_bf16(None, "cpu", "inference") is True
        assert hardware.resolve_bf16(True, "cpu") is True
    assert "cpu with native bf16: inference in bfloat16" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with pytest.raises(ValueError, match="bf16 must be auto, true or false"):
        hardware.resolve_bf16("maybe", "cpu")


@pytest.mark.parametrize(("flags", "dtype"), [(AVX2_ONLY, torch.float32), (AMX, torch.bfloat16)])
def test_load_picks_the_inference_dtype_from_the_hardware(cpu, golden_dir, flags, dtype) -> None:
    from qwenvl.inference import load

    cpu(flags)
    model, _ = load(golden_dir)  # the golden weights are stored in fp16: neither choice is "as stored"
    assert model.dtype == dtype
    model, _ = load(golden_dir, dtype="float16")  # an explicit choice wins
    assert model.dtype == torch.float16


def test_a_capped_instruction_set_gets_a_compile_cache_of_its_own(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert hardware.separate_compile_cache() is None  # torch's own default: nothing changes
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "AVX2")
    path = hardware.separate_compile_cache()
    assert path is not None and os.path.basename(path).startswith("torchinductor_") and path.endswith("_avx2")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == path
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # an operator's own folder wins
    assert hardware.separate_compile_cache() is None
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)


def test_available_memory_reads_meminfo(monkeypatch, tmp_path) -> None:
    import builtins

    from qwenvl import hardware

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\nSwapFree:        1000000 kB\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(meminfo if path == "/proc/meminfo" else path,
                                                                         *a, **k))
    assert hardware.available_memory() == 21_000_000 * 1024
    meminfo.write_text("MemTotal:       24000000 kB\n")  # an old kernel without MemAvailable: unknown
    assert hardware.available_memory() is None
    meminfo.unlink()
    assert hardware.available_memory() is None


def test_cuda_bf16_is_asked_of_the_device_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.cuda.is_bf16_supported asks the current device: on a host with a V100 (7.0) as GPU 0 and an A100
    (8.0) as GPU 1, cuda:1 got the V100's answer (fp32)."""
    from types import SimpleNamespace

    majors = {0: 7, 1: 8}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(major=majors[i]))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: majors[0] >= 8)
    assert hardware.supports_bf16("cuda:1") and hardware.default_dtype("cuda:1") == torch.bfloat16
    assert not hardware.supports_bf16("cuda:0") and not hardware.supports_bf16("cuda")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # torch.cuda.set_device(1): plain "cuda" is GPU 1
    assert hardware.supports_bf16("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not hardware.supports_bf16("cuda:1")
