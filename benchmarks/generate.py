"""Decode and prefill speed against the machine's own limits, all measured in the same run.

    python benchmarks/generate.py                 # mid-size random model (hidden 1024, 8 layers, real vocab)
    python benchmarks/generate.py --preset tiny   # quick check

Ways to run decode that are timed: eager on plain weights (one-row products take the compiled row kernel
of ``qwenvl.model.linear``; what ``qwenvl.inference.load`` gives fp32 for batch 1), eager on packed weights
(``QwenVL.prepack_cpu_weights``: bf16 for our AVX512-BF16 kernel where the CPU has it, else oneDNN's
layout; what ``load`` gives bf16 always and fp32 for batches), and the decode step under ``torch.compile``
(``stream_tokens(compile=True)`` / ``--compile``) on plain weights (the one-row products become reductions
inside the graph, fused with the rest of the step) and, for the bf16 kernel, on packed weights (each product
one op call in the graph). Batch 8 is timed on packed weights, eager and (bf16 kernel) compiled, and with
oneDNN's bf16 packing for comparison.

This machine's memory bandwidth drifts by tens of percent from one minute to the next, so a ratio of two
numbers taken minutes apart measures the drift. Every measurement below is therefore taken once per round,
``--rounds`` rounds one after the other, each ratio is computed within a round, and the median over rounds
is printed (the per-round numbers go to ``--json``). Prints:
  * the weight-read floor: a batch-1 pass over every LM matrix (lm_head included) with each product kernel:
    ``F.linear``, the eager row kernel, the prepacked oneDNN kernel, the bf16 kernel (bf16), and all
    products as reductions in one compiled graph (the same code as the compiled decode step's products); the
    floor of a round is the fastest of them. Each is timed as decode is: the mean over as many consecutive
    passes as decode steps;
  * batch-1 decode / floor per way of running (target <= 1.05, fp32);
  * bf16 decode speed-up over fp32 (target >= 1.8 on CPUs with native bf16 matmul);
  * batch-8 decode throughput over batch 1 (target >= 6), and the batch-8 step's FLOP/s over the matmul peak;
  * prefill of a 270-token one-image prompt (bf16, logits for the last position only): achieved FLOP/s
    over the bf16 matmul peak measured here (target >= 0.5).
Speed is never asserted; compare numbers from one run only.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from qwenvl.model.linear import PackedLinear, can_prepack, onednn_packed, prepack_linears

from qwenvl import QwenVL
from qwenvl.config import IMG_END_ID, IMG_PAD_ID, IMG_START_ID
from qwenvl.generation import SamplingParams, stream_tokens
from qwenvl.model import bf16_kernel
from qwenvl.model import linear as qlinear


def best_of(fn, repeat: int) -> float:  # noqa: ANN001
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b
    return 2 * n**3 / best_of(lambda: a @ b, 5)


def lm_matrices(model: QwenVL) -> list[torch.Tensor]:
    mats = [m.weight for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.startswith("transformer.h.")]
    return [*mats, model.lm_head.weight]


def onednn_layers(mats: list[torch.Tensor]) -> list[PackedLinear]:
    """A oneDNN-packed bias-free layer per weight (copies; the weights stay as they are)."""
    layers = []
    for w in mats:
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        layer.weight = torch.nn.Parameter(w.detach().clone(), requires_grad=False)
        layers.append(PackedLinear(layer))
    return layers


def mean_pass_seconds(fn, passes: int) -> float:  # noqa: ANN001
    """Seconds per call as decode is timed: the mean over ``passes`` consecutive calls."""
    start = time.perf_counter()
    for _ in range(passes):
        fn()
    return (time.perf_counter() - start) / passes


def floor_passes(model: QwenVL) -> dict[str, Callable[[], None]]:
    """One batch-1 product with every LM matrix, per product kernel: what a decode step cannot beat."""
    mats = lm_matrices(model)
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in mats}

    def f_linear() -> None:
        for w in mats:
            F.linear(xs[w.shape[1]], w)

    passes = {"f_linear": f_linear}
    if qlinear.cpu_gemv_enabled() and qlinear._fast(xs[mats[0].shape[1]], mats[0]) is not None:

        def row_kernel() -> None:
            for w in mats:
                qlinear._fast(xs[w.shape[1]], w)

        passes["row_kernel"] = row_kernel
    if bf16_kernel.can_pack(mats[0]):
        kernel_packed = [(bf16_kernel.pack(w), xs[w.shape[1]]) for w in mats]
        op = bf16_kernel.operator()

        def bf16_kernel_pass() -> None:
            for wp, x in kernel_packed:
                op(x, wp, None)

        passes["bf16_kernel"] = bf16_kernel_pass
    if can_prepack(mats[0].dtype):
        packed = onednn_layers(mats)

        def prepacked() -> None:
            for layer in packed:
                layer(xs[layer.in_features])

        passes["prepacked"] = prepacked
    for fn in passes.values():
        fn()  # warm-up (compiles the row kernel)
    return passes


def prompt(length: int, with_image: bool, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    span = [IMG_START_ID] + list(b"demo.jpeg") + [IMG_PAD_ID] * (256 - 9) + [IMG_END_ID] if with_image else []
    text = torch.randint(1000, 100000, (length - len(span),), generator=g).tolist()
    return text[:4] + span + text[4:]


def decoder(model: QwenVL, batch: int, new_tokens: int, prompt_len: int, compile: bool = False) -> Callable[[], float]:
    """A function that generates ``new_tokens`` after a prompt and returns the seconds per decode step (the
    prefill and first token excluded). Called once here as a warm-up (and to compile, when compiling)."""
    ids = torch.tensor([prompt(prompt_len, False, seed=b) for b in range(batch)])
    params = SamplingParams(max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1)

    @torch.no_grad()
    def run() -> float:
        it = stream_tokens(model, ids, params=params, compile=compile)
        next(it)  # prefill + first token
        t = time.perf_counter()
        n = sum(1 for _ in it)
        return (time.perf_counter() - t) / n

    run()
    return run


def compiled_pass(model: QwenVL) -> Callable[[], None]:
    """One batch-1 product with every LM matrix as reductions in one compiled graph: the products exactly as
    the compiled decode step computes them, without the rest of the step."""
    mats = [w.detach() for w in lm_matrices(model)]
    xs = [torch.randn(1, w.shape[1], dtype=w.dtype) for w in mats]

    def products(xs: list[torch.Tensor], ws: list[torch.Tensor]) -> list[torch.Tensor]:
        return [qlinear._row_dot(x, w) for x, w in zip(xs, ws)]  # what linear() puts in a compiled graph

    fn = torch.compile(products, fullgraph=True, dynamic=False)
    with torch.no_grad():
        fn(xs, mats)
    return lambda: fn(xs, mats)


def prefill_flops(model: QwenVL, tokens: int, images: int) -> float:
    cfg = model.config
    lm, v = cfg.lm, cfg.visual
    matrix_params = sum(w.numel() for w in lm_matrices(model)[:-1])
    flops = 2 * matrix_params * tokens
    flops += lm.num_hidden_layers * 2 * 2 * tokens * tokens / 2 * lm.hidden_size  # causal attention (QK^T, PV)
    flops += 2 * lm.hidden_size * lm.vocab_size  # lm_head for the last position only
    n = v.grid_size**2
    vit_params = sum(p.numel() for name, p in model.transformer.visual.transformer.named_parameters()
                     if name.endswith("weight") and p.dim() == 2)
    per_image = 2 * n * (3 * v.patch_size**2 * v.width)  # conv1
    per_image += 2 * n * vit_params + v.layers * 4 * n * n * v.width  # ViT blocks + attention
    d, q = v.output_dim, v.n_queries
    per_image += 2 * n * v.width * d + 2 * 4 * d * d * (q + n) / 2 + 4 * q * n * d + 2 * q * d * d  # resampler + proj
    return flops + images * per_image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of every floor and decode measurement")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, plen = args.new_tokens, args.prompt_len

    res: dict[str, float | str] = {"machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
                                   "torch": torch.__version__, "preset": args.preset}
    res["peak_fp32_gflops"] = matmul_peak(torch.float32) / 1e9
    res["peak_bf16_gflops"] = matmul_peak(torch.bfloat16) / 1e9

    # every measurement as a function returning seconds per pass / per step; all are run once per round
    timed: dict[str, Callable[[], float]] = {}
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        plain = QwenVL.from_config(args.preset, seed=0, dtype=dtype)
        res["lm_matrix_params"] = float(sum(w.numel() for w in lm_matrices(plain)))
        for name, fn in {**floor_passes(plain), "compiled": compiled_pass(plain)}.items():
            if name == "f_linear":  # far slower than the others (see the README); timed once, not per round
                res[f"floor_{tag}_f_linear_ms"] = mean_pass_seconds(fn, n) * 1e3
                continue
            timed[f"floor_{tag}_{name}"] = functools.partial(mean_pass_seconds, fn, n)
        timed[f"decode_{tag}_b1_compiled"] = decoder(plain, 1, n, plen, compile=True)
        timed[f"decode_{tag}_b1_eager"] = decoder(plain, 1, n, plen)
        res[f"decode_{tag}_b8_plain_ms"] = decoder(plain, 8, n, plen)() * 1e3  # slow: once, not per round
        packed = QwenVL.from_config(args.preset, seed=0, dtype=dtype)
        if packed.prepack_cpu_weights() > 0:
            timed[f"decode_{tag}_b1_prepacked"] = decoder(packed, 1, n, plen)
            timed[f"decode_{tag}_b8_prepacked"] = decoder(packed, 8, n, plen)
            if not onednn_packed(packed):  # the bf16 kernel's packing: compiled decode works on it
                res["packing_" + tag] = "bf16 kernel"
                timed[f"decode_{tag}_b1_prepacked_compiled"] = decoder(packed, 1, n, plen, compile=True)
                timed[f"decode_{tag}_b8_prepacked_compiled"] = decoder(packed, 8, n, plen, compile=True)
                onednn = QwenVL.from_config(args.preset, seed=0, dtype=dtype).requires_grad_(False)
                n_packed = prepack_linears(onednn, onednn_only=True)
                assert n_packed and onednn_packed(onednn)
                timed[f"decode_{tag}_b8_onednn"] = decoder(onednn, 8, n, plen)
            else:
                res["packing_" + tag] = "oneDNN"
        if tag == "bf16":
            ids = torch.tensor([prompt(270, True, seed=0)])
            pixels = torch.randn(1, 3, plain.config.visual.image_size, plain.config.visual.image_size)
            model = packed if packed.is_prepacked else plain
            with torch.no_grad():
                model(ids, images=pixels, logits_to_keep=1)
                t = best_of(functools.partial(model, ids, images=pixels, logits_to_keep=1), 3)
            res["prefill_270_bf16_ms"] = t * 1e3
            res["prefill_270_bf16_gflops"] = prefill_flops(plain, 270, 1) / t / 1e9

    rounds = []
    for _ in range(args.rounds):
        row = {k: fn() * 1e3 for k, fn in timed.items()}
        for tag in ("fp32", "bf16"):
            row[f"floor_{tag}"] = min(v for k, v in row.items() if k.startswith(f"floor_{tag}_"))
            row[f"decode_{tag}_b1_best"] = min(v for k, v in row.items() if k.startswith(f"decode_{tag}_b1_"))
        rounds.append(row)

    def med(fn: Callable[[dict[str, float]], float]) -> float:
        return statistics.median(fn(row) for row in rounds)

    for k in rounds[0]:
        res[f"{k}_ms"] = med(lambda row, k=k: row[k])
    ratios: dict[str, float] = {}
    for tag in ("fp32", "bf16"):
        for mode in ("compiled", "eager", "prepacked", "prepacked_compiled"):
            key = f"decode_{tag}_b1_{mode}"
            if key in rounds[0]:
                target = " (<= 1.05)" if tag == "fp32" and mode == "compiled" else ""
                ratios[f"{tag} batch-1 decode, {mode.replace('_', ' ')} / floor{target}"] = med(
                    lambda r, k=key, t=tag: r[k] / r[f"floor_{t}"])
    for mode in ("compiled", "eager", "prepacked", "best"):
        key = f"decode_{{}}_b1_{mode}"
        if key.format("fp32") in rounds[0]:
            target = " (>= 1.8)" if mode == "best" else ""
            ratios[f"bf16 decode speed-up over fp32, {mode}{target}"] = med(
                lambda r, k=key: r[k.format("fp32")] / r[k.format("bf16")])
    for tag in ("fp32", "bf16"):
        for mode in ("prepacked", "prepacked_compiled"):
            b8 = f"decode_{tag}_b8_{mode}"
            if b8 not in rounds[0]:
                continue
            name = mode.replace("_", " ")
            ratios[f"{tag} batch-8 / batch-1 throughput, {name} batch 8 / fastest batch 1 (>= 6)"] = med(
                lambda r, b8=b8, t=tag: 8 * r[f"decode_{t}_b1_best"] / r[b8])
            ratios[f"{tag} batch-8 / batch-1 throughput, both {name}"] = med(
                lambda r, b8=b8, t=tag, m=mode: 8 * r[f"decode_{t}_b1_{m}"] / r[b8])
            ratios[f"{tag} batch-8 {name}, achieved FLOP/s / {tag} matmul peak"] = med(
                lambda r, b8=b8: 8 * 2 * res["lm_matrix_params"] / (r[b8] / 1e3)) / (res[f"peak_{tag}_gflops"] * 1e9)
        if f"decode_{tag}_b8_onednn" in rounds[0]:
            ratios[f"{tag} batch-8 decode, oneDNN-prepacked time / bf16-kernel time (eager)"] = med(
                lambda r, t=tag: r[f"decode_{t}_b8_onednn"] / r[f"decode_{t}_b8_prepacked"])
    ratios["prefill FLOP/s / bf16 peak (>= 0.5)"] = res["prefill_270_bf16_gflops"] / res["peak_bf16_gflops"]
    for k, v in res.items():
        print(f"{k:<40} {v:.2f}" if isinstance(v, float) else f"{k:<40} {v}")
    print()
    for k, v in ratios.items():
        print(f"{k:<80} {v:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**res, "ratios": ratios, "rounds": rounds}, f, indent=2)


if __name__ == "__main__":
    main()
