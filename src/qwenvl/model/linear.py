"""``linear(x, layer)``: ``F.linear`` with a fast path for one-row bf16/fp16 products on the CPU (decode).

PyTorch's CPU matrix-vector product in bf16 runs at a fraction of the memory bandwidth (slower than
fp32 even though it reads half the bytes). Decode at batch 1 is nothing but such products, so for them we
use a small compiled reduction that reads each weight once, converts to fp32 in registers and
accumulates in fp32 -- the same arithmetic as a bf16 matmul with fp32 accumulation. Everything else
(prefill, batches, training, GPUs, fp32) goes to ``F.linear`` unchanged. If compilation is unavailable
(no C++ compiler), the fast path switches itself off and logs why.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

_HALF = (torch.bfloat16, torch.float16)
_enabled = os.environ.get("QWENVL_CPU_GEMV", "1") != "0"


def cpu_gemv_default() -> bool:
    """Whether the fast path is on unless switched (``QWENVL_CPU_GEMV=0`` turns it off)."""
    return os.environ.get("QWENVL_CPU_GEMV", "1") != "0"

_gemv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def _row_dot(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # x: (1, K) half, w: (N, K) half -> (1, N) half; fp32 accumulation
    return (w.float() * x.float()).sum(-1, keepdim=False).unsqueeze(0).to(x.dtype)


def set_cpu_gemv(enabled: bool) -> None:
    """Switch the CPU one-row fast path on or off (e.g. to compare against ``F.linear``)."""
    global _enabled
    _enabled = enabled


def _fast(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    global _gemv, _enabled
    if _gemv is None:
        # one specialization per weight shape and dtype (a handful per model): allow plenty of them
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 256))
        _gemv = torch.compile(_row_dot, dynamic=False, fullgraph=True)
    try:
        return _gemv(x, w)
    except Exception as e:  # noqa: BLE001 -- any compile/runtime failure: fall back for good
        _enabled = False
        logger.warning("CPU bf16 matrix-vector fast path disabled (%s: %s); using F.linear",
                       type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    if type(layer) is not nn.Linear:  # a wrapped layer (e.g. a peft LoRA adapter): run its own forward
        return layer(x)
    w, b = layer.weight, layer.bias
    if (
        _enabled
        and x.dtype in _HALF
        and x.device.type == "cpu"
        and x.numel() == x.shape[-1]
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        and not torch.compiler.is_compiling()
    ):
        y = _fast(x.reshape(1, -1), w)
        if y is not None:
            y = y.reshape(*x.shape[:-1], w.shape[0])
            return y if b is None else y + b
    return F.linear(x, w, b)
