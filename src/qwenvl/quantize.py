"""Inference-time layer swaps, applied to a built model from outside (gpt-fast's ``quantize.py`` pattern).

The model's code never changes: it calls ``self.c_attn(x)`` and friends. :func:`optimize_for_inference`
(called by :func:`qwenvl.inference.load`) replaces the language model's ``nn.Linear`` layers in place:

* ``quantize="int8"``: :class:`Int8Linear`, weight-only int8 with one symmetric scale per output channel
  (``w ~= q * scale``, ``q`` in [-127, 127]). The LM's block matrices and ``lm_head`` are quantized (at the
  real sizes ``lm_head`` is a third of the LM's weight bytes); the vision tower, the embedding and the
  norms keep the compute dtype. Quantized weights take 1/4 of fp32's bytes (+ one scale per row).
* otherwise, on the CPU: :class:`RowLinear`, a plain ``nn.Linear`` (same parameters and state dict) whose
  half-precision one-row products are written as a reduction when they run inside ``torch.compile``, and
  whose fp32 products take the path that measured fastest on the machine's kind of CPU
  (:func:`qwenvl.hardware.fp32_product_path`): on AMD CPUs (the project's own machine type), compiled
  products of 1-8 rows are reductions too and other products of 2-32 rows run transposed; on other CPUs where
  MKL runs AVX-512 code, few-row products (batched decoding, 2-12 rows) run over slices of the weight's rows;
  elsewhere ``F.linear``.

Why AMD CPUs take their path also with AVX-512: it was measured on a Zen 3 EPYC (AVX2) and the slices on
Xeons; on a Zen 4 EPYC (AVX-512 and AVX512-BF16, 2 threads; ``benchmarks/generate.py --dtype float32``, mid
model, one run each) the Xeons' path left a compiled batch-1 fp32 step at 76.7 ms, 2.66x the weight-read floor
(MKL's matrix-vector product read the mid ``lm_head`` at ~13 GB/s, the reduction at ~26-31), a compiled batch-8
step at 152.5 ms and a compiled int8 batch-8 step at 195-500 ms; the AMD path: 30.6 ms (1.15x), 94.3 ms and
54.5 ms.

Why the reductions: batch-1 decoding reads every weight once per token, so its speed is the speed of
streaming the weights. A one-row product written as ``(w * x).sum(-1)`` lets inductor emit one loop that
reads each weight once, in its stored dtype (int8 stays int8 in memory: 1/4 of the fp32 bytes), fused with
the element-wise work around it; ``F.linear(x, q.to(dtype))`` would first write a full-precision copy of
the weight. Everything else (prefill, training, GPUs) runs the ordinary product. fp32 weights take the
reduction on AMD CPUs only: their one-row product is already a matrix-vector product that reads each weight
once, and on an AVX-512 Xeon the compiled reduction was slower than it (mid model, batch-1 compiled decode:
55-63 ms per token with the reduction, 44-47 ms with ``F.linear`` with MKL, oneDNN and ATen capped to AVX2;
57-58 vs 41-44 ms with AVX-512), while on an AMD EPYC (Zen 3, AVX2, 2 threads) MKL's matrix-vector product
streamed the mid model's ``lm_head`` (151,936 x 1,024) at 10.5 GB/s and the reduction at 14.6 GB/s (a plain
sum: 18-21 GB/s in the same minutes). For bf16 weights the
reduction was faster (40-47 ms vs 48-56 ms with AMX).

Why the input is stored first (:func:`_stored`, an identity operator inductor cannot look into): inductor would
inline the element-wise work that produces a product's input (the RMSNorm, say) into the reduction loop and
recompute it for every weight row, which makes the loop compute-bound (bf16 mid model: 19 ms a step against a
12 ms weight-read floor; 12.8 ms with the input stored). The stored input is one token's activations per row,
a few KB. This used to be done only by a compile option of the whole decode step (``realize_acc_reads_threshold=1``,
which stores every element-wise result that reads more than one buffer); that option also made inductor store
the 8-row products below in full (an 8-row step of the mid model took 407-430 ms), so where those run (AMD
CPUs) the decode steps compile with no options (:func:`compile_options`). Elsewhere they keep it: on an
AVX-512 Xeon it also kept inductor from fusing the server's one-query attention with the rotary embedding into
one slow kernel (mid model, 32 slots: 438 ms a step with that kernel, 175 ms with the option, 185 ms eager);
on the AMD EPYC the server's step without it took 149 and 373 ms for 8 and 32 slots (eager 254 and 467 ms).

Why the reduction reads the rows in 8 blocks: written over the whole weight, inductor's loop sums one row at a
time into one vector accumulator, a chain of dependent additions that lets too few reads be in flight (the
mid ``lm_head`` read at 13-17 GB/s where a plain sum reads 17-20). Split into 8 equal blocks of rows
(``weight.chunk(8)``, one reduction each, concatenated), the loop walks the 8 blocks side by side with an
accumulator each: 18-27 GB/s in the same minutes; the 40 block matrices of the mid model 21-24 vs 18-24 GB/s.
Every output is the same sum in the same order, so results are bit-identical. Mid model, batch-1 compiled
decode, fp32, AMD EPYC (2 threads, 4 alternating rounds in one process): 61.5 vs 68.2 ms a token (medians),
1.10 vs 1.33x the weight-read floor, the same tokens.

Why compiled products of 2-8 fp32 rows are reductions on AMD CPUs (batched decoding): one reduction per row
over the same weight, which inductor fuses into one loop that loads each weight once and multiplies it into an
accumulator per row. The mid ``lm_head`` with 8 rows took 55-72 ms this way, against 78-98 ms for MKL's
transposed product (below) and 85-132 ms for ``F.linear``. One row reads it in 29-40 ms: the 8-row loop (per
weight vector one weight load, 8 input loads, 8 multiplies and 8 additions) ran at 30-52 GFLOP/s, with the
weight in cache too, so it is bound by its instructions rather than by memory. The rows are zero-padded to 2,
4 or 8, so a compiled step holds three graphs for 2-8 rows (each compilation takes a minute or more) rather
than seven. Mid model, ``benchmarks/generate.py`` on an AMD EPYC
(AVX2, 2 threads, two runs of 3 rounds): a compiled batch-8 step 126-168 ms (medians 146 and 138) against
175-215 ms with the transposed products; batch 8 gives 3.4-3.6x the tokens/s of compiled batch 1 (2.7x before).
:class:`Int8Linear` does the same over its packed weight (each int32 load unpacked once for all the rows): a
compiled int8 batch-8 step 97-128 ms against 233-263 ms with the dequantized slices (below), 2.1-3.0x the
tokens/s of compiled int8 batch 1 (0.9-1.1x before); the same tokens as eager decoding.

Why int8 rows are stored interleaved: inductor's AVX2 code loads int8 values 8 at a time through a small
stack buffer, which made the compiled int8 reduction slower than fp32 (the mid model's ``lm_head``, one row:
106 ms against 21.5 ms for fp32 ``F.linear``). :class:`Int8Linear` stores each row's columns in the order
``0, K/4, K/2, 3K/4, 1, K/4 + 1, ...``, so that the row read as int32 holds in element ``i`` the weights of
inputs ``i``, ``K/4 + i``, ``K/2 + i`` and ``3K/4 + i``, one per byte. The compiled product then loads 32
weights per 256-bit int32 load, takes each byte out with two shifts (sign-extending), and multiplies it by a
contiguous quarter of the input: every load is a full vector load. The row is read through a float32 view
(``weight.view(torch.float32).view(torch.int32)``): PyTorch's AVX2 ``Vectorized<int32_t>::loadu(ptr, count)``
has no full-vector fast path (it copies the 32 bytes through a stack buffer in two 16-byte halves and reloads
them, a store-forwarding stall on every load), while the float load is one instruction and the float-to-int32
view is a bit cast. Results are bit-identical; the mid model's int8 ``lm_head``, one row, compiled, on an AMD
EPYC (AVX2, 2 threads, two demo trainings running alongside): 78-81 ms read as int32 vs 29-31 ms through
the float view. Mid model, 2 threads, ``benchmarks/generate.py``: on the AMD EPYC 28-34 ms per token, 3.3x
the tokens/s of fp32 decoding in the same run (a busy host) and 2.2x the fastest fp32 decoding measured
there; on an AVX-512 Xeon capped to AVX2 (before the float view), 24-26 ms per token, 1.73-1.97x fp32,
``lm_head`` alone 13.7 ms (with AVX-512 both layouts take 12-15 ms). Eager code multiplies the input in the
same interleaved order (a copy of the activations), so the stored weight is used as it is;
:meth:`Int8Linear.dequantize` gives the weight in the usual order.

Why transposed few-row products on AMD CPUs: ``F.linear(x, w)`` with a few rows ``x`` asks MKL for ``x @ w.T``,
and on an AMD EPYC (Zen 3, AVX2 only, 2 threads) MKL's kernels for that shape reached 14-30 GFLOP/s (the
fp32 peak of a 2048^3 product: 104-174). The same numbers computed as ``(w @ x.T).T`` (the stored (N, K)
weight as the left matrix, the rows as columns) ran 2-4x faster for 2-32 rows and alike at 64: the mid model's
``lm_head`` (medians of 5 alternating rounds) 60 vs 126 ms for 2 rows, 67 vs 249 ms for 4, 98 vs 249 ms
for 8, 170 vs 255 ms for 16, 208 vs 324 ms for 32, 412 vs 424 ms for 64; a (3072, 1024) block matrix 1.70
vs 2.40 ms for 8 rows. Its result comes out (N, rows) and is copied to (rows, N) (rows x N floats, small next
to the weight). Whole mid model in one process (rounds alternating with the previous revision, which stored
the weights column-major for MKL's matrix-vector product): batch-1 compiled decode 58-65 vs 76-90 ms a token,
batch-8 eager 143-226 vs 244-311 ms a step, compiled 137-147 vs 223-287 ms; batch-1 eager lost ~10% (93 vs 80
ms, MKL's one-row product by a column-major weight was the faster one there). Inductor's own prepacked fp32
products (``freezing``) did no better (batch 1 compiled 75-106 ms, batch 8 136-162 ms) and keep a second,
packed copy of every weight. Int8 layers on AMD CPUs multiply each dequantized slice (below) transposed as
well: batch-8 eager 209-258 vs 257-483 ms a step.

Why bf16 rows take PyTorch's own int8 product: with bf16 activations (CPUs with native bf16) an int8 layer
multiplies up to 12 rows, outside ``torch.compile``'s one-row reductions, with ``torch._weight_int8pack_mm``
(the weight as stored, the rows in the same interleaved order). On a Zen 4 EPYC (AVX-512, AVX512-BF16, 2
threads), mid ``lm_head``, one row: 15.5 ms against 42.5 ms dequantizing slices and 26.6 ms for bf16
``F.linear``; 8 rows: 39 vs 58 ms; mid model, ``benchmarks/generate.py``: an eager int8 batch-1 step 25.9 ms
(78-90 before; bf16 eager 44.3; another run: 28.0 vs 39.0), batch 8 eager 59.7 ms (91-96), compiled 58.9 ms
(74). With more rows the dequantized slices multiply faster (270 rows of a (3072, 1024) layer: 5.1 ms against
11.3, ~150 GFLOP/s for the int8 product at every row count), and with fp32 rows the int8 product was 1.5-7x
slower than the slices.

Why the slices: for a few rows of input, the CPU's fp32 matrix product (MKL's sgemm) with AVX-512 repacks
the whole weight on every call, so a batch-8 decode step read the weights about three times instead of once
(lm_head of the mid model: 87 ms for 8 rows vs 30 ms for one). Products over 1 MiB slices of the weight's
rows keep each packed slice in cache: 52 ms. MKL's AVX2 sgemm (an AVX2-only CPU, or ``MKL_ENABLE_INSTRUCTIONS=
AVX2``) loses less there and more to the slices, so fp32 layers slice only where MKL runs AVX-512 code
(:func:`qwenvl.hardware.mkl_runs_avx512`). Mid model, batch-8 eager decode step, medians of 4 alternating
rounds in one process (oneDNN and ATen capped to AVX2): MKL with AVX-512, slices 91 ms vs ``F.linear`` 165
ms; MKL capped to AVX2, slices 137 ms vs ``F.linear`` 128 ms (``benchmarks/generate.py`` measures the whole
step). Int8 weights use the same slices to dequantize: each slice is turned into the compute dtype in cache
and multiplied at once, instead of writing a full-precision copy of the whole weight per call. Inside
``torch.compile`` (a batch decoded with ``--compile``) the sliced product runs as one custom operator
(``qwenvl::sliced_product``), so compiled batches take the same path as eager ones (except batches of 2-8
rows on AMD CPUs, which are reductions; above). Nothing here needs a
C++ compiler unless the caller compiles (``--compile``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .hardware import fp32_product_path

if TYPE_CHECKING:
    from .model.qwenvl import QwenVL

__all__ = ["PATH_ROWS", "QUANTIZE_CHOICES", "InductorOptions", "Int8Linear", "RowLinear", "compile_options",
           "copied_bytes", "optimize_for_inference", "quantize_int8", "use_row_products"]

logger = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("none", "int8")


def _one_row(x: torch.Tensor) -> bool:
    return _rows(x) == 1 and torch.compiler.is_compiling()


def _few_rows_compiled(x: torch.Tensor) -> bool:
    return 1 < _rows(x) <= _REDUCTION_ROWS and torch.compiler.is_compiling()


_ROW_BUCKETS = (2, 4, 8)  # compiled products of 2-8 rows are computed for this many rows (zero-padded)
_REDUCTION_ROWS = _ROW_BUCKETS[-1]  # compiled fp32/int8 products of up to this many rows: reductions on AMD CPUs
_FEW_ROWS = 12  # up to this many input rows, fp32 products run over slices of the weight ("slices", module doc)
_TRANSPOSED_ROWS = 32  # ... or transposed ("transposed"; at 64 rows both ways took the same time)
# Row counts that start another path of these layers (one row, a bucket of reductions, a few, many): a compiled
# step holds one graph for each, so a server that compiles warms it up once per entry (Engine.warm_up).
PATH_ROWS = tuple(sorted({1, *(b // 2 + 1 for b in _ROW_BUCKETS), _REDUCTION_ROWS + 1, _FEW_ROWS + 1,
                          _TRANSPOSED_ROWS + 1}))
# fp32_product_path -> (RowLinear.few_rows, RowLinear.fp32_row_reduction)
_PATHS = {"avx512": ("slices", False), "amd": ("transposed", True), "avx2": ("plain", False)}
_SLICE_BYTES = 1 << 20  # bytes of compute-dtype weight per slice for few rows (fits in L2)
_BIG_SLICE_BYTES = 16 << 20  # ... and for many rows (prefill), where a larger product runs closer to peak
_ROWS_PER_BLOCK = 1024  # rows quantized at a time: the fp32 temporaries stay small next to the weight
# torch._weight_int8pack_mm's CPU kernels read 16 (AVX-512) or 8 (AVX2) inputs per aligned vector load and check
# neither the length nor the alignment: with other in_features it read past the rows (torch 2.13: a segfault or
# wrong numbers for every in_features that is not a multiple of 16), so those layers take the slices instead
_INT8PACK_K = 16
_INT8PACK_ALIGN = 64


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def _cpu_no_grad(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Where the sliced products run: CPU weights, no gradients wanted (they write into buffers)."""
    return weight.device.type == "cpu" and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


def _sliced_product(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, slice_bytes: int,
                    transposed: bool = False) -> torch.Tensor:
    """``x @ weight.T`` in ``dtype``, one slice of the weight's rows at a time (converted to ``dtype`` in a
    reused buffer when it is stored in another dtype, e.g. int8): (..., K) x (N, K) -> (..., N). ``transposed``:
    each slice times the rows transposed (``slice @ x.T``, the product MKL runs faster on AMD CPUs; module doc)."""
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    n, k = weight.shape
    out = torch.empty((n, x2.shape[0]) if transposed else (x2.shape[0], n), dtype=dtype, device=x.device)
    step = max(16, slice_bytes // (k * dtype.itemsize))
    buf = None if weight.dtype == dtype else torch.empty(min(step, n), k, dtype=dtype, device=x.device)
    # split(): one call for all the slices instead of a Python slice of the weight and the output per step (the
    # mid model's lm_head with 8 rows, ~600 slices: a few % up to ~15% faster in one-off timings)
    xt = x2.t()
    for w, o in zip(weight.split(step), out.split(step, 0 if transposed else 1)):
        if buf is not None:
            w = buf[: w.shape[0]].copy_(w)
        if transposed:
            torch.mm(w, xt, out=o)
        else:
            torch.mm(x2, w.t(), out=o)
    if transposed:
        out = out.t().contiguous()
    return out.reshape(*x.shape[:-1], n)


@torch.library.custom_op("qwenvl::sliced_product", mutates_args=())
def _sliced_product_op(x: torch.Tensor, weight: torch.Tensor, slice_bytes: int, transposed: bool) -> torch.Tensor:
    """:func:`_sliced_product` as one opaque operator for ``torch.compile``: inside a compiled decode step a
    batch's products run as they do eagerly (inductor would multiply by a full-precision copy of an int8
    weight made on every call, and repack fp32 weights for every few-row product)."""
    return _sliced_product(x, weight, x.dtype, slice_bytes, transposed)


@_sliced_product_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, slice_bytes: int, transposed: bool) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _sliced(x: torch.Tensor, weight: torch.Tensor, slice_bytes: int, transposed: bool = False) -> torch.Tensor:
    """``x @ weight.T`` in ``x``'s dtype over slices of the weight's rows, eager or compiled."""
    if torch.compiler.is_compiling():
        return _sliced_product_op(x, weight, slice_bytes, transposed)
    return _sliced_product(x, weight, x.dtype, slice_bytes, transposed)


# ``qwenvl::stored``: ``x``, copied, by an operator inductor cannot look into: the element-wise work that produced
# ``x`` (an RMSNorm, say) is computed once into a buffer of a few KB instead of being inlined into a reduction loop
# over the weight, where it would be recomputed for every weight row (module doc). Defined with
# ``torch.library.Library`` rather than ``torch.library.custom_op``: a compiled decode step calls it before every
# one-row and few-row product (41 times a step for the mid model), and the plain definition is cheaper to call
# (~5 vs ~17 us a call on 2 AVX2 cores; ~0.5 ms of a ~36 ms step). Inference only: it has no autograd formula.
_lib = torch.library.Library("qwenvl", "FRAGMENT")
_lib.define("stored(Tensor x) -> Tensor")
_lib.impl("stored", torch.clone, "CompositeExplicitAutograd")


@torch.library.register_fake("qwenvl::stored")
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _stored(x: torch.Tensor) -> torch.Tensor:
    """``x``, copied by the opaque ``qwenvl::stored`` operator (see its definition above)."""
    return torch.ops.qwenvl.stored.default(x)


_ROW_STREAMS = 8  # a one-row reduction reads the weight as this many equal blocks of rows at once


def _row_streams(n: int) -> int:
    """How many equal blocks of an ``n``-row weight a one-row reduction reads side by side (module doc): the
    largest of ``_ROW_STREAMS``, its half, its quarter, ... that divides ``n``."""
    g = _ROW_STREAMS
    while n % g:
        g //= 2
    return g


def _row_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(..., K) with 1 to ``_REDUCTION_ROWS`` rows in all x (N, K) weight -> (..., N) in fp32: reductions that
    read each weight once in its stored dtype and accumulate in fp32 (as a half-precision matmul with fp32
    accumulation). Called under ``torch.compile`` only; the input is stored first (:func:`_stored`).

    One row: the weight's rows are split into equal blocks (:func:`_row_streams`); inductor fuses the blocks'
    reductions into one loop that walks every block at once, with an accumulator each. Every output is summed
    exactly as without the split (bit-identical results). More rows: one reduction per row, which inductor
    fuses into one loop that reads each weight once for all of them; the rows are padded with zeros to 2, 4 or
    8 (:data:`_ROW_BUCKETS`), so that a compiled step holds one graph per bucket instead of one per row count."""
    x2 = _stored(x.reshape(-1, x.shape[-1])).float()
    rows = x2.shape[0]
    if rows == 1:
        y = torch.cat([(w.float() * x2).sum(-1) for w in weight.chunk(_row_streams(weight.shape[0]))])
    else:
        w = weight.float()
        y = torch.stack([(w * row).sum(-1) for row in _padded(x2).unbind()])[:rows]
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _padded(x2: torch.Tensor) -> torch.Tensor:
    """(rows, K) with 2-8 rows -> (bucket, K): zero rows appended up to the smallest of :data:`_ROW_BUCKETS`
    that holds them (a static size: a compiled step holds one graph per bucket)."""
    rows = x2.shape[0]
    bucket = _ROW_BUCKETS[-1]
    for size in _ROW_BUCKETS:
        if rows <= size:
            bucket = size
            break
    return torch.cat([x2, x2.new_zeros(bucket - rows, x2.shape[1])])


def _transposed_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` computed as ``(weight @ x.T).T``: MKL multiplies the row-major (N, K) weight as it is
    stored by a few rows turned into columns (module doc), then the (N, rows) result is made (rows, N)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.mm(weight, x2.t()).t().contiguous()
    return y.reshape(*x.shape[:-1], weight.shape[0])


class RowLinear(nn.Linear):
    """``nn.Linear`` whose products of one row (compiled) and of a few rows (fp32 on the CPU, no gradients) take
    the path that suits the machine (:func:`qwenvl.hardware.fp32_product_path`; see the module doc):

    * ``few_rows``: ``"slices"`` (2-12 rows over 1 MiB slices of the weight), ``"transposed"`` (2-32 rows as
      the weight times the rows transposed) or ``"plain"`` (``F.linear``);
    * ``fp32_row_reduction``: under ``torch.compile`` a one-row fp32 product is a reduction (half-precision
      weights always are)."""

    few_rows = "plain"
    fp32_row_reduction = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fp32 = self.weight.dtype == torch.float32
        # half-precision weights: one-row reductions; fp32: 1-8-row reductions where fp32_row_reduction is set
        if (self.fp32_row_reduction and (_one_row(x) or _few_rows_compiled(x))) if fp32 else _one_row(x):
            y = _row_product(x, self.weight).to(x.dtype)
            return y if self.bias is None else y + self.bias
        if self.few_rows != "plain" and fp32 and _rows(x) > 1 and _cpu_no_grad(x, self.weight):
            if self.few_rows == "slices" and _rows(x) <= _FEW_ROWS:
                y = _sliced(x, self.weight, _SLICE_BYTES)
                return y if self.bias is None else y.add_(self.bias)
            if self.few_rows == "transposed" and _rows(x) <= _TRANSPOSED_ROWS:
                y = _transposed_product(x, self.weight)
                return y if self.bias is None else y.add_(self.bias)
        return F.linear(x, self.weight, self.bias)


class Int8Linear(nn.Module):
    """Weight-only int8 linear layer: ``y = (x @ q.T) * scales + bias`` with ``q`` int8 (out, in) and one
    scale per output channel. Inference only (buffers, no gradients).

    ``weight`` holds ``q`` with each row's columns interleaved in ``groups`` (4 when ``in_features`` is a
    multiple of 4): stored column ``4 * i + j`` is column ``j * in_features / 4 + i``, so that the row viewed
    as int32 packs in element ``i`` one weight of each quarter of the input (see the module doc).
    :meth:`dequantize` gives the weight in the usual layout. ``transposed_slices``: products of 2-12 rows multiply
    each dequantized slice by the rows transposed; ``few_row_reductions``: compiled products of 2-8 rows are
    reductions like one row's (both set by :func:`quantize_int8` on AMD CPUs, for fp32 activations; module doc)."""

    transposed_slices = False
    few_row_reductions = False
    weight: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.groups = 4 if in_features % 4 == 0 and sys.byteorder == "little" else 1
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype or torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype or torch.float32, device=device)
                             if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> Int8Linear:
        """``linear`` quantized (its weight as it is stored, in any float dtype; the scales are computed in
        fp32), with scales and bias in ``dtype``, the compute dtype (default: the weight's), on ``device``
        (default: the weight's). The weight is copied there and quantized there, and that full-precision copy is
        freed on return: ``linear`` itself is left as it was."""
        w = linear.weight.detach().to(device)
        dtype = dtype or w.dtype
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype, device="meta")
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scales = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
        for start in range(0, w.shape[0], _ROWS_PER_BLOCK):  # no second copy of the whole weight
            rows = slice(start, start + _ROWS_PER_BLOCK)
            block, scales[rows] = quantize_weight(w[rows])
            q[rows] = _interleave(block, layer.groups)
        layer.weight, layer.scales = q, scales.to(dtype)
        layer.bias = None if linear.bias is None else linear.bias.detach().to(w.device, dtype, copy=True)
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight ``q * scales`` in the usual column order."""
        n, k = self.weight.shape
        q = self.weight.view(n, k // self.groups, self.groups).transpose(1, 2).reshape(n, k)
        return q.to(dtype) * self.scales.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _one_row(x) or (self.few_row_reductions and _few_rows_compiled(x)):
            y = (self._packed_row_product(x) * self.scales.float()).to(x.dtype)
        else:
            xi = _interleave(x, self.groups)  # the input in the stored column order: the same product
            if not _cpu_no_grad(x, self.weight):
                y = F.linear(xi, self.weight.to(x.dtype))
                # Compiled, scaled in fp32 and rounded once: the same numbers as a multiply in x's dtype (which
                # computes in fp32), but not inductor's weight-only int8 pattern: that rewrites a compiled product
                # of a 3-D input times scales of x's dtype into aten._weight_int8pack_mm, whose CUDA kernel took
                # 939 us for 8 rows of an 11,008 x 4,096 weight on an H200 (this form: 62 us), and a compiled
                # batch-8 decode step of the 9.6B model 145 ms (benchmarks/README.md). Eager code keeps the plain
                # form: two kernels fewer per product (decoding on a GPU is bound by launching them)
                y = ((y * self.scales.float()).to(x.dtype) if torch.compiler.is_compiling()
                     else y * self.scales.to(x.dtype))
            elif x.dtype == torch.bfloat16 and _rows(x) <= _FEW_ROWS and self.in_features % _INT8PACK_K == 0:
                # PyTorch's own int8 product (module doc)
                x2 = xi.reshape(-1, self.in_features).contiguous()
                if not torch.compiler.is_compiling() and x2.data_ptr() % _INT8PACK_ALIGN:
                    x2 = x2.clone()  # its vector loads need aligned rows (compiled code allocates them so)
                y = torch._weight_int8pack_mm(x2, self.weight, self.scales.to(x.dtype))
                y = y.reshape(*x.shape[:-1], self.out_features)
            else:  # CPU: dequantize slice by slice (module doc)
                few = _rows(x) <= _FEW_ROWS
                transposed = few and self.transposed_slices and _rows(x) > 1
                y = _sliced(xi, self.weight, _SLICE_BYTES if few else _BIG_SLICE_BYTES, transposed)
                y = y.mul_(self.scales.to(x.dtype))
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _packed_row_product(self, x: torch.Tensor) -> torch.Tensor:
        """1-8 rows (..., K) -> (..., N) in fp32, unscaled: the weight read as int32, four int8 weights per load,
        each taken out with shifts (byte ``j`` of element ``i`` multiplies input ``j * K / 4 + i``); 2-8 rows
        padded as in :func:`_row_product`, one reduction per row in one loop that unpacks each load once."""
        if self.groups == 1:
            return _row_product(x, self.weight)
        # (N, K / 4) int32, read through a float32 view: inductor then loads full vectors as floats and bit-casts
        # them to int32 in registers (bit-identical). Read as int32 directly, PyTorch's AVX2 vector load copies
        # every 32 bytes through a stack buffer in two halves (a store-forwarding stall): 2.6x slower (module doc).
        w = self.weight.view(torch.float32).view(torch.int32)
        x2 = _stored(x.reshape(-1, x.shape[-1])).float()
        rows = x2.shape[0]
        xs = (x2 if rows == 1 else _padded(x2)).unflatten(-1, (4, -1))
        parts = ((w << 24 >> 24).float(), (w << 16 >> 24).float(), (w << 8 >> 24).float(), (w >> 24).float())
        y = torch.stack([(parts[0] * r[0] + parts[1] * r[1] + parts[2] * r[2] + parts[3] * r[3]).sum(-1)
                         for r in xs.unbind()])[:rows]
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _interleave(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(..., K) -> (..., K) in :class:`Int8Linear`'s stored column order: column ``groups * i + j`` of the result
    is column ``j * K / groups + i`` of ``t`` (int8 weights when quantizing, activations when multiplying)."""
    return t if groups == 1 else t.unflatten(-1, (groups, -1)).transpose(-1, -2).flatten(-2)


def quantize_weight(w: torch.Tensor, rows_per_chunk: int = _ROWS_PER_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (out, in) -> (int8 (out, in), fp32 scales (out,)), w ~= q * scale.

    Works through ``rows_per_chunk`` rows at a time, so the fp32 temporaries stay small next to the weight
    (a 151,936-row ``lm_head`` is never copied whole)."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for start in range(0, w.shape[0], rows_per_chunk):
        wf = w[start : start + rows_per_chunk].float()
        s = wf.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
        q[start : start + rows_per_chunk] = torch.round(wf / s[:, None]).clamp_(-127, 127)
        scales[start : start + rows_per_chunk] = s
    return q, scales


def lm_linears(model: QwenVL) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) for every plain ``nn.Linear`` (or :class:`RowLinear`) of the language model
    (blocks + lm_head). The layers of LoRA adapters (peft's ``lora_A``/``lora_B``/...) are not the model's: they
    keep their class (peft casts the input to ``lora_A.weight``'s dtype, int8 for an :class:`Int8Linear`)."""
    found = []
    for prefix, parent in [*model.transformer.h.named_modules(), ("", model)]:
        if any(part.startswith("lora_") for part in prefix.split(".")):
            continue
        for name, child in parent.named_children():
            if name.startswith("lora_"):
                continue
            if type(child) in (nn.Linear, RowLinear) and (parent is not model or name == "lm_head"):
                found.append((parent, name, child))
    return found


def quantize_int8(model: QwenVL, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> int:
    """Replace the LM's linear layers (blocks and ``lm_head``) by :class:`Int8Linear`, one at a time (the
    full-precision weight of a layer is freed as soon as its int8 copy exists), on the CPU set up for the machine's
    path (:func:`use_row_products`; elsewhere they keep the plain products); their scales and biases in ``dtype``
    (default: each weight's). ``device``: where the int8 layers are made (default: where each weight is): each
    weight is copied there and quantized there, one layer at a time, so the device never holds more than one
    full-precision weight (the rest of the model stays where it is). Returns how many."""
    layers = lm_linears(model)
    count = len(layers)
    where = torch.device(device) if device is not None else layers[0][2].weight.device if layers else None
    while layers:  # each layer is let go as it is replaced: its weight is freed unless the caller holds it
        parent, name, layer = layers.pop(0)
        setattr(parent, name, Int8Linear.from_linear(layer, dtype, device))
        del layer
    if where is not None and where.type == "cpu":  # the CPU's paths: measured on CPUs, for CPUs
        use_row_products(model)
    return count


def use_row_products(model: QwenVL, path: str | None = None) -> int:
    """Turn the LM's ``nn.Linear`` layers into :class:`RowLinear` (same parameters and values) set up for
    ``path`` (None: :func:`qwenvl.hardware.fp32_product_path` decides from the machine): ``"avx512"``: fp32
    products of 2-12 rows over slices of the weight; ``"amd"``: compiled products of 1-8 rows as reductions,
    other products of 2-32 rows transposed; ``"avx2"``: ``F.linear`` (half-precision weights: one-row
    reductions wherever compiled). Its :class:`Int8Linear` layers with fp32 activations are set up for the path
    too ("amd": transposed slices, compiled 2-8-row reductions; with bf16 activations those made a compiled
    batch-1 int8 step of the mid model 7.6x slower on a Zen 4 EPYC: 127.6 vs 16.7 ms). Returns how many
    ``RowLinear`` layers."""
    path = fp32_product_path() if path is None else path
    if path not in _PATHS:
        raise ValueError(f"path must be one of {', '.join(_PATHS)}, got {path!r}")
    few_rows, reduction = _PATHS[path]
    layers = lm_linears(model)
    for _, _, linear in layers:
        linear.__class__ = RowLinear
        layer = cast(RowLinear, linear)  # its class was set on the line above
        layer.few_rows, layer.fp32_row_reduction = few_rows, reduction
    for m in model.modules():
        if isinstance(m, Int8Linear):  # measured with fp32 activations; bf16 ones keep the plain int8 path
            m.transposed_slices = m.few_row_reductions = path == "amd" and m.scales.dtype == torch.float32
    return len(layers)


# torch.compile's ``options`` (inductor's settings)
InductorOptions = dict[str, str | int | bool | Callable[..., Any]]

_STORE_MULTI_READS: InductorOptions = {"realize_acc_reads_threshold": 1}


def compile_options(model: nn.Module) -> InductorOptions | None:
    """Inductor options for compiling a decode step of ``model`` (None: inductor's defaults): on the CPU, unless
    its layers compute products of 2-8 rows as reductions (fp32 or int8), ``realize_acc_reads_threshold=1`` (module doc:
    "Why the input is stored first")."""
    if next(model.parameters()).device.type != "cpu":
        return None
    for m in model.modules():
        if (isinstance(m, RowLinear) and m.fp32_row_reduction and m.weight.dtype == torch.float32
                or isinstance(m, Int8Linear) and m.few_row_reductions):
            return None
    return dict(_STORE_MULTI_READS)


def optimize_for_inference(model: QwenVL, quantize: str | None = None, dtype: torch.dtype | str | None = None,
                           device: torch.device | str | None = None) -> QwenVL:
    """Apply the inference layer swaps in place (see the module doc) and return the model.

    ``quantize``: None/"none" keeps the weights, "int8" quantizes the LM weight-only. ``dtype``: the compute
    dtype (or its name, as ``QwenVL.from_pretrained`` takes it), which every floating weight is cast to
    afterwards (None or "auto": as they are). With int8, the LM's linear weights are quantized from the dtype
    they have (the checkpoint's, say: ``load`` reads them as stored), so they never exist in a wider compute
    dtype: for Qwen-VL-Chat computing in fp32 the load's peak is then about the int8 model (17.3 GB of tensors),
    not the fp32 one (38.6 GB). The model stops requiring gradients (these layers are for inference only).

    ``device``: where the model ends up (default: where it is). ``load`` keeps an int8 model on the CPU (its
    tensors mapped from the files) and passes the GPU here: each linear weight goes there alone, is quantized
    there and freed (:func:`quantize_int8`), then the rest is cast on the host and moved one tensor at a time. The GPU
    then never holds more than the int8 model (plus one tensor while casting): the 9.6B model computing in bf16
    peaks at 12.2 GB of tensors there, where copying it all to the GPU before quantizing peaked at 19.3 GB."""
    from .model.qwenvl import as_dtype

    quantize = quantize or "none"
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    dtype = as_dtype(dtype)  # a name ("bfloat16") failed deep inside the int8 layers
    model.requires_grad_(False)
    if quantize == "int8":
        n = quantize_int8(model, dtype, device)
        logger.info("int8 weight-only: %d linear layers of the language model quantized", n)
    if dtype is not None:  # before the move: the rest goes to the device in the compute dtype, never wider
        from .checkpoint import cast_checked

        cast_checked(model, dtype, f"cannot compute in {str(dtype).removeprefix('torch.')}")
    if device is not None:
        model.to(device)
    if quantize != "int8" and next(model.parameters()).device.type == "cpu":
        use_row_products(model)
    return model


def copied_bytes(model: QwenVL, quantize: str | None, dtype: torch.dtype, mapped: bool) -> int:
    """Bytes of memory the tensors of ``model`` (built on the meta device: only shapes are read) take once
    ``load`` has read its checkpoint and applied :func:`optimize_for_inference` with ``quantize`` and ``dtype``,
    beyond what stays mapped from the files: every tensor in ``dtype``, or for int8 the LM's linear layers as
    int8 weights with ``dtype`` scales (and biases) and the rest in ``dtype``; with ``mapped`` (the checkpoint
    stores ``dtype``, loaded on the CPU) tensors that are not quantized are read in place and take none. On a GPU
    (``mapped`` False) it is also the load's peak there: int8 weights are quantized on it one layer at a time."""
    quantized: set[int] = set()
    total = 0
    if quantize == "int8":
        for _, _, layer in lm_linears(model):
            quantized.update(id(t) for t in layer.parameters())
            extra = layer.out_features * (2 if layer.bias is not None else 1)
            total += layer.weight.numel() + extra * dtype.itemsize
    if not mapped:
        total += sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
                     for t in (*model.parameters(), *model.buffers()) if id(t) not in quantized)
    return total
