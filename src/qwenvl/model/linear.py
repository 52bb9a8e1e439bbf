"""Linear layers for CPU inference: ``linear(x, layer)`` and packed weights.

Three ways to make CPU decode read the weights fast (the first two for batches, the third for one row):

* :class:`Bf16PackedLinear` (bf16 weights on CPUs with AVX512-BF16; :mod:`qwenvl.model.bf16_kernel`): the
  weight is packed into pairs for ``vdpbf16ps`` and multiplied by our own kernel, which feeds each weight
  load to up to 8 rows. Measured on the mid benchmark model (2 threads, alternating rounds): a pass over
  every LM matrix takes 11.7 ms for 8 rows (oneDNN's packing: 20.7 ms) and 9.9 ms for one row (the compiled
  reduction below: 12.6 ms), so a batch of 8 costs little more than one row. The product is a
  ``torch.library`` operator, so the decode step still compiles.
* :class:`PackedLinear` (:func:`prepack_linears`, ``QwenVL.prepack_cpu_weights``; every other dtype/CPU): the
  weight is reordered once into oneDNN's blocked layout, the layout its matrix kernels stream fastest.
  Measured on the mid benchmark model (2 threads): a pass over every LM matrix at batch 1 takes 41 ms in fp32
  (67 ms with ``F.linear``) and 25 ms in bf16 (30 ms); at batch 8 it takes 42 / 26 ms (176 / 38 ms with
  ``F.linear``). Packing is for inference only (no autograd; oneDNN's cannot be compiled); it keeps the
  parameter names, and ``state_dict()`` / ``save_pretrained`` write the plain layout. Memory stays ~1x: each
  layer's plain weight is freed once its packed copy exists.
* ``linear(x, layer)``: ``F.linear`` with a fast path for one-row products (batch-1 decode) on unpacked
  CPU weights. PyTorch's CPU matrix-vector products read plain weights well below memory speed (fp32 at
  ~16 GB/s, bf16 at a fraction of that), so for one row we use a small compiled reduction that reads each
  weight once and accumulates in fp32 (for bf16/fp16: converts in registers, the same arithmetic as a half
  matmul with fp32 accumulation). Measured on the mid benchmark model, 2 threads, in alternating rounds: a
  pass over every LM matrix takes 0.73-0.84x the prepacked oneDNN time in fp32, and eager fp32 decode is ~27%
  faster than with prepacked weights. Inside ``torch.compile`` the same reduction is emitted into the graph,
  so inductor fuses it with the surrounding element-wise work (the compiled decode step). Everything else
  (prefill, batches, training, GPUs) goes to ``F.linear`` unchanged. If compilation is unavailable (no C++
  compiler), the eager fast path switches itself off and logs why (``QWENVL_CPU_GEMV=0`` switches it off).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import bf16_kernel

logger = logging.getLogger(__name__)

__all__ = ["Bf16PackedLinear", "PackedLinear", "can_prepack", "cpu_gemv_default", "cpu_gemv_enabled", "linear",
           "onednn_packed", "packs_for_compile", "prepack_linears", "set_cpu_gemv", "unpack_linears"]

_ROW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cpu_gemv_default() -> bool:
    """Whether the fast path is on unless switched (``QWENVL_CPU_GEMV=0`` turns it off)."""
    return os.environ.get("QWENVL_CPU_GEMV", "1") != "0"


_enabled = cpu_gemv_default()

_gemv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def _row_dot(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # x: (1, K), w: (N, K) -> (1, N) in x's dtype; fp32 accumulation
    return (w.float() * x.float()).sum(-1, keepdim=False).unsqueeze(0).to(x.dtype)


def cpu_gemv_enabled() -> bool:
    """Whether the one-row CPU fast path is on now (it switches itself off if it cannot compile)."""
    return _enabled


def set_cpu_gemv(enabled: bool) -> None:
    """Switch the CPU one-row fast path on or off (e.g. to compare against ``F.linear``)."""
    global _enabled
    _enabled = enabled


def _fast(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    global _gemv, _enabled
    if _gemv is None:
        # shapes dynamic: one kernel per dtype serves every weight shape. Specialized per shape it ran no faster
        # (mid model, 2 threads) but compiled once per shape: the first 3-token generate of a process took 12.6 s
        # instead of 3.7 s (inductor's on-disk cache warm). Allow a few more specializations than the default.
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 64))
        _gemv = torch.compile(_row_dot, dynamic=True, fullgraph=True)
    try:
        return _gemv(x, w)
    except Exception as e:  # noqa: BLE001 -- any compile/runtime failure: fall back for good
        _enabled = False
        logger.warning("CPU one-row fast path disabled (%s: %s); using F.linear",
                       type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    if type(layer) is not nn.Linear:  # a wrapped layer (e.g. a peft LoRA adapter): run its own forward
        return layer(x)
    w, b = layer.weight, layer.bias
    if (
        _enabled
        and x.dtype in _ROW_DTYPES
        and x.device.type == "cpu"
        and x.numel() == x.shape[-1]
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    ):
        # compiling: the reduction goes into the graph (inductor fuses it); eager: the compiled kernel
        y = _row_dot(x.reshape(1, -1), w) if torch.compiler.is_compiling() else _fast(x.reshape(1, -1), w)
        if y is not None:
            y = y.reshape(*x.shape[:-1], w.shape[0])
            return y if b is None else y + b
    return F.linear(x, w, b)


# ---- oneDNN-prepacked weights -------------------------------------------------------------------------------


def can_prepack(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether weights of ``dtype`` on ``device`` can be prepacked here (CPU with oneDNN; fp32, or bf16
    where the CPU computes it natively)."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """An inference-only ``nn.Linear`` whose weight is stored in oneDNN's blocked layout (see the module doc).

    ``weight`` is a buffer holding the packed tensor (shape and dtype as the plain one); ``bias`` stays the
    plain parameter. ``state_dict()`` gives the plain weight, and loading a state dict packs it again.
    """

    # the batch size oneDNN is told to expect when choosing the blocking; it serves every batch size, and
    # measured the same at batch 1 as a batch-1 hint
    BATCH_HINT = 8

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self._require_packable(layer.weight)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("weight", self._pack(layer.weight))
        self.bias = layer.bias

    @classmethod
    def _require_packable(cls, w: torch.Tensor) -> None:
        if not can_prepack(w.dtype, w.device):
            raise ValueError(f"cannot prepack a {w.dtype} weight on {w.device} (CPU, float32 or bfloat16 with "
                             "native bf16 support)")

    @classmethod
    def _pack(cls, w: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), cls.BATCH_HINT)

    def _dense(self) -> torch.Tensor:
        return self.weight.to_dense()

    def unpacked(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the same weights."""
        with torch.device("meta"):
            layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        layer.weight = nn.Parameter(self._dense())
        layer.bias = self.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("PackedLinear is inference-only (its weights are prepacked for the CPU); call "
                               "model.unpack_cpu_weights() before training")
        if torch.compiler.is_compiling():
            raise RuntimeError("prepacked CPU weights cannot be compiled; call model.unpack_cpu_weights() first")
        if x.dtype != self.weight.dtype:
            raise TypeError(f"input dtype {x.dtype} does not match the packed weight's {self.weight.dtype}")
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self._dense()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        key = prefix + "weight"
        if key in state_dict:
            w = state_dict[key]
            if tuple(w.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: checkpoint {tuple(w.shape)}, "
                                  f"model {(self.out_features, self.in_features)}")
            else:
                self.weight = self._pack(w.to(self.weight.dtype))
        elif strict:
            missing_keys.append(key)
        if self.bias is not None:
            bkey = prefix + "bias"
            if bkey in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bkey])
            elif strict:
                missing_keys.append(bkey)

    def _apply(self, fn: Callable, recurse: bool = True) -> PackedLinear:  # .to(), .float(), .cuda(), ...
        raise RuntimeError("prepacked CPU weights cannot be moved or cast; call model.unpack_cpu_weights() first")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={self.weight.dtype}, {self.LAYOUT}")

    LAYOUT = "prepacked"


class Bf16PackedLinear(PackedLinear):
    """A bf16 ``nn.Linear`` whose weight is packed for :mod:`qwenvl.model.bf16_kernel` (CPUs with
    AVX512-BF16): batch-8 decode at about the cost of one row. Unlike oneDNN's packing it can be compiled (the
    product is one custom op in the graph). Same contract as :class:`PackedLinear` otherwise."""

    LAYOUT = "bf16-packed"

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__(layer)
        self._op = bf16_kernel.operator()

    @classmethod
    def _require_packable(cls, w: torch.Tensor) -> None:
        if not bf16_kernel.can_pack(w):
            raise ValueError(f"cannot pack a {w.dtype} {tuple(w.shape)} weight on {w.device} for the bf16 kernel "
                             f"(bf16, out_features % 16 == 0, even in_features; kernel: "
                             f"{bf16_kernel.unavailable_reason() or 'available'})")

    @classmethod
    def _pack(cls, w: torch.Tensor) -> torch.Tensor:
        return bf16_kernel.pack(w.detach())

    def __getstate__(self) -> dict:  # the operator handle does not pickle; it is looked up again on load
        return {k: v for k, v in super().__getstate__().items() if k != "_op"}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._op = bf16_kernel.operator()

    def _dense(self) -> torch.Tensor:
        return bf16_kernel.unpack(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("Bf16PackedLinear is inference-only (its weights are packed for the CPU kernel); "
                               "call model.unpack_cpu_weights() before training")
        if x.dtype != torch.bfloat16:
            raise TypeError(f"input dtype {x.dtype} does not match the packed weight's torch.bfloat16")
        bias = None if self.bias is None else self.bias.detach()
        return self._op(x, self.weight, bias)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def prepack_linears(root: nn.Module, onednn_only: bool = False) -> int:
    """Replace every plain ``nn.Linear`` under ``root`` with a packed one, one at a time (each plain weight is
    dropped once packed): :class:`Bf16PackedLinear` where the bf16 kernel takes the weight (unless
    ``onednn_only``), else :class:`PackedLinear`. Returns how many were packed."""
    chosen = [(n, m) for n, m in root.named_modules() if type(m) is nn.Linear]
    for name, layer in chosen:
        kernel = not onednn_only and bf16_kernel.can_pack(layer.weight)
        packed = Bf16PackedLinear(layer) if kernel else PackedLinear(layer)
        _replace(root, name, packed)
    return len(chosen)


def packs_for_compile(root: nn.Module) -> bool:
    """Whether :func:`prepack_linears` would give every linear layer under ``root`` to the bf16 kernel (the
    packing ``torch.compile`` can run)."""
    return all(bf16_kernel.can_pack(m.weight) for m in root.modules() if type(m) is nn.Linear)


def onednn_packed(root: nn.Module) -> bool:
    """Whether any layer under ``root`` holds oneDNN-packed weights (which ``torch.compile`` cannot run)."""
    return any(type(m) is PackedLinear for m in root.modules())


def unpack_linears(root: nn.Module) -> int:
    """Undo :func:`prepack_linears`: every :class:`PackedLinear` becomes a plain ``nn.Linear`` again."""
    chosen = [(n, m) for n, m in root.named_modules() if isinstance(m, PackedLinear)]
    for name, layer in chosen:
        _replace(root, name, layer.unpacked())
    return len(chosen)
