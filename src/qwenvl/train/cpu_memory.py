"""Keep freed memory inside the process while training on the CPU (glibc only).

glibc serves every allocation above 32 MB with a fresh ``mmap`` and gives it back on ``free``. A training
step allocates several such buffers (the dense ``wte`` gradient, the ``lm_head`` weight cast and its
gradient: vocab x hidden each) and so page-faults them in, zero page by zero page, on every step; on
the 2-core benchmark machine that was ~20% of a mid-size step. Inside :func:`keep_freed_memory` glibc
takes memory from the heap instead and keeps what is freed for the next step (RSS stays at its peak);
the usual behaviour is restored and the surplus returned to the OS on exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import platform
import sys
from collections.abc import Iterator

__all__ = ["keep_freed_memory"]

logger = logging.getLogger(__name__)

# mallopt parameters and glibc's defaults (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the block, large CPU buffers are reused instead of re-mapped; yields whether it is active."""
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    logger.debug("glibc malloc: keeping freed memory for the training loop")
    try:
        yield True
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
