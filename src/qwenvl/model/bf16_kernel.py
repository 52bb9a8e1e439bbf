"""A bf16 matrix kernel for x86 CPUs with AVX512-BF16, built from ``kernels/`` at first use.

Why: decoding reads every weight once per step. With bf16 weights on this kind of CPU, oneDNN's packed
matmul runs a batch of 8 rows at ~35% of the bf16 peak, so 8 rows cost ~2.3x one row; this kernel keeps
8 rows x 48 outputs of accumulators in registers and feeds each 64-byte weight load to 8 ``vdpbf16ps``
instructions (0.64 of the peak in the compiled decode step), so 8 rows cost ~1.25x one row. One row reads
12 weight streams at once, at the speed fp32 streams (see ``benchmarks/generate.py``).

The weight is stored packed (:func:`pack`): ``[N/16][K/2][16][2]``, the pair layout ``vdpbf16ps`` reads. The C
source is compiled with the C compiler and OpenMP that ``torch.compile`` uses on CPUs (``CC``, else ``cc``;
``-fopenmp``) into ``$QWENVL_CACHE_DIR/kernels`` (default ``~/.cache/qwenvl/kernels``) under a name that
hashes the sources, flags and compilers, so it is built once per machine; loaded with ``ctypes`` and checked
against ``F.linear`` on small cases. A C++ operator around it (``kernels/bf16_linear_op.cpp``, built against
torch's headers with ``CXX``, else ``c++``; ~9 s the first time) is then loaded as
``torch.ops.qwenvl_kernels.bf16_packed_linear``: the dispatcher calls it without Python, ~5 us per call in a
compiled graph instead of ~10 us for ``torch.ops.qwenvl.bf16_packed_linear``, the Python operator kept as
the fallback. Anything missing (not Linux/x86, no ``avx512_bf16`` flag, no C compiler, a failed build or
check) makes :func:`available` False with the reason in :func:`unavailable_reason`, and callers keep the
other paths (oneDNN). ``QWENVL_BF16_KERNEL=0`` switches it off; ``QWENVL_BF16_KERNEL=python`` skips the
C++ operator. Both operators are ``torch.library`` ops, so ``torch.compile`` keeps each product in the graph
as one call.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["available", "bf16_packed_linear", "can_pack", "operator", "pack", "unavailable_reason", "unpack"]

_KERNELS = Path(__file__).with_name("kernels")
_C_SOURCE = _KERNELS / "bf16_linear.c"
_OP_SOURCE = _KERNELS / "bf16_linear_op.cpp"
_ISA = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-fPIC"]
# "fn": the C function (ctypes); "op": the operator to call; "reason": why there is none; "done": loaded
_state: dict[str, object] = {}
_loading = threading.RLock()


def _cpu_has_bf16() -> bool:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512_bf16" in line.split()
    except OSError:
        return False
    return False


def _cache_dir() -> Path:
    root = os.environ.get("QWENVL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qwenvl")
    return Path(root) / "kernels"


def _compiler(env: str, *names: str) -> tuple[str, str]:
    """(path, version text) of the compiler named by ``env`` or the first of ``names`` found."""
    cc = os.environ.get(env) or next((p for p in map(shutil.which, names) if p), None)
    if not cc:
        raise RuntimeError(f"no compiler (set {env}, or install gcc/g++)")
    return cc, _version(cc)


@functools.cache
def _version(compiler: str) -> str:  # part of the cache keys; asked once per compiler and process
    return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout


def _cached_build(name: str, key_parts: list[str | bytes], commands) -> Path:  # noqa: ANN001
    """``commands(workdir, out)`` -> the command lines that build ``out``; run once per key, in a scratch
    folder next to the cache, and renamed into place: a concurrent or interrupted build never leaves a
    partial library behind."""
    h = hashlib.sha256()
    for part in key_parts:
        h.update(part if isinstance(part, bytes) else part.encode())
    filename = f"{name}-{h.hexdigest()[:16]}.so"
    out = _cache_dir() / filename
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent):  # writable?
            pass
    except OSError as e:  # a read-only or broken cache folder: build in a private temporary one instead
        fallback = Path(tempfile.gettempdir()) / f"qwenvl-kernels-{os.getuid()}"
        logger.info("bf16 kernel: cannot use %s (%s); building in %s", out.parent, e, fallback)
        out = fallback / filename
        if out.exists():
            return out
        out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent)
    try:
        tmp = os.path.join(work, "lib.so")
        for cmd in commands(work, tmp):
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                raise RuntimeError(f"{cmd[0]} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _build_c() -> Path:
    cc, version = _compiler("CC", "cc", "gcc")
    return _cached_build("bf16_linear", [_C_SOURCE.read_bytes(), cc, version, *_ISA],
                         lambda work, out: [[cc, *_ISA, "-shared", str(_C_SOURCE), "-o", out]])


def _build_op() -> Path:
    from torch.utils import cpp_extension

    cc, cc_version = _compiler("CC", "cc", "gcc")
    cxx, cxx_version = _compiler("CXX", "c++", "g++")
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"

    def commands(work: str, out: str) -> list[list[str]]:
        obj = os.path.join(work, "bf16_linear.o")
        includes = [f"-I{p}" for p in cpp_extension.include_paths()]
        libs = [f"-L{p}" for p in cpp_extension.library_paths()]
        return [[cc, *_ISA, "-c", str(_C_SOURCE), "-o", obj],
                [cxx, *_ISA, "-std=c++17", abi, *includes, "-shared", str(_OP_SOURCE), obj, *libs, "-lc10",
                 "-ltorch_cpu", "-o", out]]

    parts = [_C_SOURCE.read_bytes(), _OP_SOURCE.read_bytes(), cc, cc_version, cxx, cxx_version, abi,
             torch.__version__, *_ISA]
    return _cached_build("bf16_linear_op", parts, commands)


def _load() -> None:
    mode = os.environ.get("QWENVL_BF16_KERNEL", "1")
    if mode == "0":
        _state["reason"] = "switched off (QWENVL_BF16_KERNEL=0)"
        return
    if not _cpu_has_bf16():
        _state["reason"] = "this CPU has no AVX512-BF16 (or is not Linux x86-64)"
        return
    try:
        lib = ctypes.CDLL(str(_build_c()))
        fn = lib.qwenvl_bf16_linear
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
        _state["fn"] = fn
        _self_check(_call)
    except Exception as e:  # noqa: BLE001 -- any build/load/check failure: keep the other paths
        _state.pop("fn", None)
        _state["reason"] = f"{type(e).__name__}: {e}"
        logger.warning("bf16 CPU kernel unavailable (%s); using oneDNN", _state["reason"])
        return
    _state["op"] = torch.ops.qwenvl.bf16_packed_linear  # the Python operator around the C function
    if mode == "python":  # QWENVL_BF16_KERNEL=python: skip the C++ operator
        return
    try:
        if not hasattr(torch.ops.qwenvl_kernels, "bf16_packed_linear"):
            torch.ops.load_library(str(_build_op()))
            torch.library.register_fake("qwenvl_kernels::bf16_packed_linear")(_fake)
        op = torch.ops.qwenvl_kernels.bf16_packed_linear
        _self_check(op)
        _state["op"] = op
    except Exception as e:  # noqa: BLE001 -- e.g. no C++ compiler or torch headers: the Python operator works
        logger.info("bf16 kernel: C++ operator unavailable (%s: %s); calling it through Python",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")


def _self_check(fn) -> None:  # noqa: ANN001
    g = torch.Generator().manual_seed(0)
    for m, n, k in ((1, 48, 64), (5, 80, 34), (11, 64, 128)):
        x = torch.randn(m, k, generator=g).bfloat16()
        w = torch.randn(n, k, generator=g).bfloat16()
        b = torch.randn(n, generator=g).bfloat16()
        want = F.linear(x.float(), w.float(), b.float())
        got = fn(x, pack(w), b).float()
        err = ((got - want).abs().max() / want.abs().max()).item()
        if not err < 1e-2:
            raise RuntimeError(f"self-check failed for {m}x{k} @ {k}x{n}: relative error {err:.3g}")


def available() -> bool:
    """Whether the kernel is built and usable here (builds it on the first call)."""
    if "done" not in _state:
        with _loading:  # one build and load per process, whichever thread asks first
            if "done" not in _state:
                try:
                    _load()
                finally:
                    _state["done"] = True  # published last: other threads see all of it or wait
    return "fn" in _state


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    return None if available() else str(_state.get("reason"))


def can_pack(w: torch.Tensor) -> bool:
    """Whether this weight can use the kernel: bf16 on the CPU, (N, K) with N % 16 == 0 and even K."""
    return (w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.dim() == 2 and w.shape[0] % 16 == 0
            and w.shape[1] % 2 == 0 and available())


def pack(w: torch.Tensor) -> torch.Tensor:
    """(N, K) weight -> the packed layout, returned with the same (N, K) shape."""
    n, k = w.shape
    return w.detach().reshape(n // 16, 16, k // 2, 2).transpose(1, 2).contiguous().reshape(n, k)


def unpack(wp: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`."""
    n, k = wp.shape
    return wp.reshape(n // 16, k // 2, 16, 2).transpose(1, 2).contiguous().reshape(n, k)


def _call(x: torch.Tensor, wp: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # kept lean: at batch 8 a decode step calls this ~60 times (mid model), ~5 us each
    n, k = wp.shape
    if "fn" not in _state and not available():
        raise RuntimeError(f"the bf16 CPU kernel is unavailable: {unavailable_reason()}")
    if (x.dtype != torch.bfloat16 or wp.dtype != torch.bfloat16 or x.device.type != "cpu" or x.shape[-1] != k
            or n % 16 or k % 2 or not wp.is_contiguous()
            or (bias is not None and (bias.dtype != torch.bfloat16 or tuple(bias.shape) != (n,)))):
        raise ValueError(f"bf16_packed_linear: x {tuple(x.shape)} {x.dtype} on {x.device}, packed weight "
                         f"{tuple(wp.shape)} {wp.dtype}, bias {None if bias is None else (tuple(bias.shape), bias.dtype)}:"
                         " needs bf16 CPU tensors, x's last dim = K, a contiguous packed (N, K) weight with "
                         "N % 16 == 0 and even K, bias (N,)")
    x = x.contiguous()
    y = x.new_empty(x.shape[:-1] + (n,))
    rows = x.numel() // k
    if rows:
        b = None if bias is None else bias.contiguous().data_ptr()
        _state["fn"](x.data_ptr(), wp.data_ptr(), b, y.data_ptr(), rows, n, k, torch.get_num_threads())
    return y


# A plain torch.library op with a CPU kernel: inside a compiled graph each call costs ~10 us, half what a
# torch.library.custom_op costs (its Python wrapper), which at ~60 calls per step is ~0.6 ms per token.
_lib = torch.library.Library("qwenvl", "FRAGMENT")
_lib.define("bf16_packed_linear(Tensor x, Tensor packed_weight, Tensor? bias) -> Tensor")
_lib.impl("bf16_packed_linear", _call, "CPU")


def _fake(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[:-1] + (packed_weight.shape[0],))


torch.library.register_fake("qwenvl::bf16_packed_linear")(_fake)


def operator():  # noqa: ANN201
    """The operator that runs the kernel: ``torch.ops.qwenvl_kernels.bf16_packed_linear`` (C++, ~3 us per call)
    where it builds, else ``torch.ops.qwenvl.bf16_packed_linear`` (Python, ~10 us). Call :func:`available`
    first."""
    if not available():
        raise RuntimeError(f"the bf16 CPU kernel is unavailable: {unavailable_reason()}")
    return _state["op"]


def bf16_packed_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, unpack(packed_weight), bias)`` for bf16 CPU tensors, by the kernel."""
    return operator()(x, packed_weight, bias)
