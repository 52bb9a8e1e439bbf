"""What the hardware computes natively, and the compute dtype chosen from it.

bf16 is the default only where the device multiplies bf16 matrices natively: CUDA GPUs that support it,
and CPUs with AVX512-BF16 or AMX-BF16 (x86) or the BF16 extension (Arm). Elsewhere bf16 products are
emulated (on an AVX2-only x86 CPU ~40-70x slower than fp32), so fp32 is the default there.

The CPU's flags come from ``/proc/cpuinfo`` (Linux). oneDNN, which runs PyTorch's CPU bf16 matrix products,
can be capped to an older instruction set with ``ONEDNN_MAX_CPU_ISA`` (e.g. ``AVX2``); such a cap removes
native bf16 as well, and this module honours it, so a capped run gets the defaults of that older CPU. fp32
products run in MKL (x86 builds), capped with ``MKL_ENABLE_INSTRUCTIONS``, and ATen's own kernels with
``ATEN_CPU_CAPABILITY``: to see on an AVX-512 machine what an AVX2-only CPU gets, cap all three.
"""

from __future__ import annotations

import functools
import getpass
import logging
import os
import platform
import re
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads in the functions that need it: the CLI says bad input before it loads
    import torch

__all__ = ["available_memory", "cpu_flags", "cpu_summary", "cpu_vendor", "default_dtype", "fp32_product_path",
           "mkl_runs_avx512", "pick_device", "resolve_bf16", "supports_bf16"]

logger = logging.getLogger(__name__)

_X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# oneDNN ISA caps below which bf16 products are no longer native (names as oneDNN spells them, upper case)
_ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first CPU's ``key: value`` lines of ``/proc/cpuinfo``; empty where that file does not exist."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if not line.strip():  # a blank line ends the first CPU's block
                    break
                if sep:
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def available_memory() -> int | None:
    """Bytes of memory a new allocation can still get: ``MemAvailable`` + ``SwapFree`` of ``/proc/meminfo``
    (None where that file does not exist)."""
    sizes: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("MemAvailable", "SwapFree") and value.split():
                    sizes[key] = int(value.split()[0]) * 1024  # kB
    except (OSError, ValueError):
        return None
    return sum(sizes.values()) if "MemAvailable" in sizes else None


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (x86 ``flags`` / Arm ``Features`` of the first CPU in ``/proc/cpuinfo``);
    empty where that file does not exist."""
    info = _cpuinfo()
    return frozenset(info.get("flags", info.get("Features", "")).split())


def cpu_vendor() -> str:
    """The x86 ``vendor_id`` of ``/proc/cpuinfo`` (``GenuineIntel``, ``AuthenticAMD``, ...); empty elsewhere."""
    return _cpuinfo().get("vendor_id", "")


def _onednn_cap() -> str | None:
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap.strip().upper() if cap else None


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    if _onednn_cap() in _ONEDNN_ISAS_WITHOUT_BF16:
        return False
    return any(f in flags for f in _X86_BF16_FLAGS) or "bf16" in flags  # "bf16": Arm's FEAT_BF16


# MKL_ENABLE_INSTRUCTIONS values that keep MKL's kernels below AVX-512 (MKL's own spelling, upper case)
_MKL_ISAS_BELOW_AVX512 = {"SSE4_2", "AVX", "AVX2"}


def mkl_runs_avx512(flags: frozenset[str] | None = None) -> bool:
    """Whether PyTorch's fp32 matrix products (MKL's sgemm on x86 builds) run AVX-512 code here: MKL is in
    this build, the CPU has AVX-512F and ``MKL_ENABLE_INSTRUCTIONS`` does not cap MKL below it.

    On CPUs other than AMD's it decides how few-row fp32 products run (:mod:`qwenvl.quantize`): MKL's AVX-512
    sgemm repacks the whole weight for a product of a few rows, its AVX2 sgemm does not lose as much (measured
    in that module)."""
    import torch

    flags = cpu_flags() if flags is None else flags
    cap = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "").strip().upper()
    return torch.backends.mkl.is_available() and "avx512f" in flags and cap not in _MKL_ISAS_BELOW_AVX512


def supports_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` multiplies bf16 matrices natively (not by emulation)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        if torch.version.hip:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        # compute capability 8 (Ampere) and newer, as torch.cuda.is_bf16_supported checks it, but of this device:
        # that function asks the current one (GPU 0 unless set), so cuda:1 on a host with a V100 and an A100 got
        # the V100's answer
        index = torch.cuda.current_device() if device.index is None else device.index
        return torch.cuda.get_device_properties(index).major >= 8
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return device.type in ("xpu", "mps")


def default_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The compute dtype to use on ``device`` when the user did not choose: bf16 where native, else fp32."""
    import torch

    return torch.bfloat16 if supports_bf16(device) else torch.float32


def _device_words(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu with native bf16" if cpu_has_native_bf16() else "cpu without native bf16"
    return f"{device.type} with bf16" if supports_bf16(device) else f"{device.type} without bf16"


def resolve_bf16(choice: bool | str | None, device: str | torch.device, what: str = "training") -> bool:
    """Whether to compute in bf16: ``choice`` True/False as given, None or "auto" from the hardware.

    Logs the decision in one line; an explicit True where bf16 is emulated warns that it will be slow.
    """
    import torch

    device = torch.device(device)
    native = supports_bf16(device)
    if isinstance(choice, str):
        low = choice.strip().lower()
        if low not in ("auto", "true", "false"):
            raise ValueError(f"bf16 must be auto, true or false, got {choice!r}")
        choice = None if low == "auto" else low == "true"
    if choice is None:
        logger.info("%s: %s in %s", _device_words(device), what, "bfloat16" if native else "float32")
        return native
    use = bool(choice)
    if use and not native:
        logger.warning("%s: bf16 was asked for, but bf16 products are emulated here and run many times slower "
                       "than float32 (drop --bf16 true / use --dtype float32 for speed)", _device_words(device))
    return use


def fp32_product_path(flags: frozenset[str] | None = None, vendor: str | None = None) -> str:
    """Which fp32 CPU product suits this machine's MKL for decoding (:mod:`qwenvl.quantize` measures each):

    * ``"amd"``: an AMD CPU (with MKL in the build), AVX2 or AVX-512: MKL's product of a few rows by a
      row-major weight streams ~3x faster written as the weight times the rows transposed, and a compiled
      product of 1-8 rows is faster as a reduction (measured on a Zen 3 EPYC, AVX2, and a Zen 4 EPYC, AVX-512);
    * ``"avx512"``: another CPU whose MKL runs AVX-512 code (:func:`mkl_runs_avx512`; measured on Xeons);
    * ``"avx2"``: any other CPU (e.g. an Intel CPU whose MKL runs its AVX2 code), where plain ``F.linear``
      measured best."""
    import torch

    vendor = cpu_vendor() if vendor is None else vendor
    if vendor == "AuthenticAMD" and torch.backends.mkl.is_available():
        return "amd"
    return "avx512" if mkl_runs_avx512(flags) else "avx2"


def cpu_summary() -> str:
    """One line about this machine's CPU for benchmark output: model, cores, the flags that decide speed."""
    import torch

    model = _cpuinfo().get("model name") or platform.processor() or platform.machine()
    keep = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")) or f in ("bf16", "asimd", "sve"))
    cap = _onednn_cap()
    extra = f", ONEDNN_MAX_CPU_ISA={cap}" if cap else ""
    if os.environ.get("ATEN_CPU_CAPABILITY"):  # ATen's own kernels capped too (e.g. avx2 on an AVX-512 CPU)
        extra += f", ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']}"
    if os.environ.get("MKL_ENABLE_INSTRUCTIONS"):  # MKL's fp32 products (sgemm) capped too (e.g. AVX2)
        extra += f", MKL_ENABLE_INSTRUCTIONS={os.environ['MKL_ENABLE_INSTRUCTIONS']}"
    if os.environ.get("THP_MEM_ALLOC_ENABLE"):  # huge pages for large tensors (qwenvl.cli.use_huge_pages)
        extra += f", THP_MEM_ALLOC_ENABLE={os.environ['THP_MEM_ALLOC_ENABLE']}"
    vendor = cpu_vendor()
    vendor = f"{vendor}, " if vendor and vendor not in model else ""
    return (f"{model}, {vendor}{os.cpu_count()} cores, {torch.get_num_threads()} threads, flags: {' '.join(keep) or 'none'}"
            f"{extra}; native bf16: {'yes' if cpu_has_native_bf16() else 'no'}; torch {torch.__version__}")


def separate_compile_cache() -> str | None:
    """Give ``torch.compile`` a cache folder of its own for the instruction set that ``ATEN_CPU_CAPABILITY``
    asks for (``torchinductor_<user>_avx2`` beside inductor's default folder) and return it; None when that
    variable is unset or ``TORCHINDUCTOR_CACHE_DIR`` is already set (an operator's own setting wins).

    Why: inductor's cache does not tell kernels generated for one capability from another's. Seen here with
    torch 2.13: decoding compiled under ``ATEN_CPU_CAPABILITY=avx2`` and then, on the same machine, without
    it, reused the AVX2 kernel sources but built them for AVX-512, and the process died of heap corruption
    (``malloc(): unaligned tcache chunk detected``); with a folder per capability both run. :func:`qwenvl.cli.main`
    calls this before any command runs; the benchmarks call it too. It changes only an environment variable
    and nothing when the variable is unset, which is how PyTorch runs unless told otherwise."""
    cap = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if not cap or os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return None
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"torchinductor_{user}_{cap}")
    path = os.path.join(tempfile.gettempdir(), name)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return path


def pick_device(device: str | None) -> str:
    """``device`` checked: one this machine has (cpu, cuda / cuda:N, and mps or xpu where PyTorch has them);
    None or "auto" is cuda when available, else cpu. Anything else is a ValueError (a device PyTorch names but
    this machine lacks, or ``meta``, failed deep inside loading the weights)."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device {device!r} is not a device: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there is no CUDA device {dev.index} (this machine has "
                             f"{torch.cuda.device_count()})")
    elif dev.type in ("mps", "xpu"):
        backend = torch.backends.mps if dev.type == "mps" else torch.xpu
        if not backend.is_available():
            raise ValueError(f"device {device!r}: {dev.type} is not available on this machine")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: qwenvl runs on cpu, cuda, cuda:N (or mps, xpu) or auto")
    return device
