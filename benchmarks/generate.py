"""Decode and prefill speed against the machine's own limits, all measured in the same run.

    python benchmarks/generate.py                 # mid-size random model (hidden 1024, 8 layers, real vocab)
    python benchmarks/generate.py --preset tiny   # quick check

Decode runs with the weights prepacked for oneDNN (``QwenVL.prepack_cpu_weights``, what ``qwenvl.inference.load``
does on the CPU); the plain ``nn.Linear`` path is timed too, for comparison. Prints:
  * the weight-read floor: a batch-1 pass over every LM matrix (lm_head included), timed here with F.linear
    and with the prepacked kernel, with the statistic decode is timed with (the mean over as many consecutive
    passes as decode steps, best of ``--repeat`` rounds); the single fastest pass is printed too;
  * batch-1 decode time per token in fp32 and bf16, and fp32 decode / floor (target <= 1.05);
  * bf16 decode speed-up over fp32 (target >= 1.8 on CPUs with native bf16 matmul);
  * batch-8 decode throughput over batch 1 (target >= 6);
  * prefill of a 270-token one-image prompt (bf16, logits for the last position only): achieved FLOP/s
    over the bf16 matmul peak measured here (target >= 0.5).
Speed is never asserted; these machines are noisy, so compare numbers from one run only.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time

import torch
import torch.nn.functional as F

from qwenvl import QwenVL
from qwenvl.config import IMG_END_ID, IMG_PAD_ID, IMG_START_ID
from qwenvl.generation import SamplingParams, stream_tokens
from qwenvl.model.linear import PackedLinear, can_prepack, cpu_gemv_default, set_cpu_gemv


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


def pass_times(fn, passes: int, repeat: int) -> tuple[float, float]:  # noqa: ANN001
    """Seconds per call as decode is timed (the mean over ``passes`` consecutive calls, best of ``repeat``
    rounds), and the fastest single call among those same calls."""
    best_mean = best_single = float("inf")
    for _ in range(repeat):
        start = last = time.perf_counter()
        for _ in range(passes):
            fn()
            now = time.perf_counter()
            best_single, last = min(best_single, now - last), now
        best_mean = min(best_mean, (last - start) / passes)
    return best_mean, best_single


def weight_floor(model: QwenVL, passes: int, repeat: int) -> dict[str, float]:
    """Seconds for one batch-1 product with every LM matrix, with F.linear and with prepacked weights: what a
    decode step cannot beat. ``plain`` / ``prepacked`` use decode's statistic (:func:`pass_times`, ``passes`` =
    the decode steps timed), ``*_best_single`` the fastest single pass among the same passes (a lower bound
    that a mean over many steps never reaches on a noisy machine, so not the one to compare decode with)."""
    mats = lm_matrices(model)
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in mats}

    def plain() -> None:
        for w in mats:
            F.linear(xs[w.shape[1]], w)

    plain()
    out = dict(zip(("plain", "plain_best_single"), pass_times(plain, passes, repeat)))
    if not can_prepack(mats[0].dtype):
        return {**out, "prepacked": float("inf"), "prepacked_best_single": float("inf")}
    packed = []
    for w in mats:
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        layer.weight = torch.nn.Parameter(w, requires_grad=False)
        packed.append(PackedLinear(layer))

    def prepacked() -> None:
        for layer in packed:
            layer(xs[layer.in_features])

    prepacked()
    return {**out, **dict(zip(("prepacked", "prepacked_best_single"), pass_times(prepacked, passes, repeat)))}


def prompt(length: int, with_image: bool, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    span = [IMG_START_ID] + list(b"demo.jpeg") + [IMG_PAD_ID] * (256 - 9) + [IMG_END_ID] if with_image else []
    text = torch.randint(1000, 100000, (length - len(span),), generator=g).tolist()
    return text[:4] + span + text[4:]


def decode_seconds_per_step(model: QwenVL, batch: int, new_tokens: int, prompt_len: int, repeat: int) -> float:
    ids = torch.tensor([prompt(prompt_len, False, seed=b) for b in range(batch)])
    params = SamplingParams(max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1)

    def run() -> float:
        it = stream_tokens(model, ids, params=params)
        next(it)  # prefill + first token
        t = time.perf_counter()
        n = sum(1 for _ in it)
        return (time.perf_counter() - t) / n

    with torch.no_grad():
        run()
        return min(run() for _ in range(repeat))


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
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    res: dict[str, float | str] = {"machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
                                   "torch": torch.__version__, "preset": args.preset}
    res["peak_fp32_gflops"] = matmul_peak(torch.float32) / 1e9
    res["peak_bf16_gflops"] = matmul_peak(torch.bfloat16) / 1e9

    model = QwenVL.from_config(args.preset, seed=0).float()
    n, r = args.new_tokens, args.repeat
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        model = model.to(dtype)
        floor = weight_floor(model, n, r)
        res[f"floor_{tag}_ms"] = min(floor["plain"], floor["prepacked"]) * 1e3
        res[f"floor_{tag}_f_linear_ms"] = floor["plain"] * 1e3
        res[f"floor_{tag}_best_single_pass_ms"] = min(floor["plain_best_single"], floor["prepacked_best_single"]) * 1e3
        res[f"decode_{tag}_b1_plain_ms"] = decode_seconds_per_step(model, 1, n, args.prompt_len, r) * 1e3
        if tag == "bf16":  # the other choice of the one-row bf16 kernel on plain weights, for comparison
            set_cpu_gemv(not cpu_gemv_default())
            res["decode_bf16_b1_plain_other_kernel_ms"] = decode_seconds_per_step(model, 1, n, args.prompt_len,
                                                                                  r) * 1e3
            set_cpu_gemv(cpu_gemv_default())
        res[f"decode_{tag}_b8_plain_ms"] = decode_seconds_per_step(model, 8, n, args.prompt_len, r) * 1e3
        flops_270 = prefill_flops(model, 270, 1)  # from the plain layers' shapes
        packed = model.prepack_cpu_weights() > 0
        suffix = "" if packed else "_plain"  # where packing is unavailable the plain numbers stand in
        if packed:
            res[f"decode_{tag}_b1_ms"] = decode_seconds_per_step(model, 1, n, args.prompt_len, r) * 1e3
            res[f"decode_{tag}_b8_ms"] = decode_seconds_per_step(model, 8, n, args.prompt_len, r) * 1e3
        else:
            res[f"decode_{tag}_b1_ms"] = res[f"decode_{tag}_b1{suffix}_ms"]
            res[f"decode_{tag}_b8_ms"] = res[f"decode_{tag}_b8{suffix}_ms"]
        if tag == "bf16":
            ids = torch.tensor([prompt(270, True, seed=0)])
            pixels = torch.randn(1, 3, model.config.visual.image_size, model.config.visual.image_size)
            with torch.no_grad():
                model(ids, images=pixels, logits_to_keep=1)
                t = best_of(functools.partial(model, ids, images=pixels, logits_to_keep=1), r)
            res["prefill_270_bf16_ms"] = t * 1e3
            res["prefill_270_bf16_gflops"] = flops_270 / t / 1e9
        model.unpack_cpu_weights()

    ratios = {
        "fp32 decode / weight floor (<= 1.05)": res["decode_fp32_b1_ms"] / res["floor_fp32_ms"],
        "fp32 decode / fastest single floor pass": res["decode_fp32_b1_ms"] / res["floor_fp32_best_single_pass_ms"],
        "bf16 decode / bf16 weight floor": res["decode_bf16_b1_ms"] / res["floor_bf16_ms"],
        "fp32 decode, prepacked / plain": res["decode_fp32_b1_ms"] / res["decode_fp32_b1_plain_ms"],
        "batch-8 / batch-1 throughput, bf16, plain weights": 8 * res["decode_bf16_b1_plain_ms"]
        / res["decode_bf16_b8_plain_ms"],
        "bf16 decode speed-up over fp32 (>= 1.8)": res["decode_fp32_b1_ms"] / res["decode_bf16_b1_ms"],
        "bf16 batch-1 decode, plain (row kernel) / prepacked": res["decode_bf16_b1_plain_ms"]
        / res["decode_bf16_b1_ms"],
        "bf16 decode speed-up over fp32, best of each": min(res["decode_fp32_b1_ms"], res["decode_fp32_b1_plain_ms"])
        / min(res["decode_bf16_b1_ms"], res["decode_bf16_b1_plain_ms"]),
        "batch-8 / best batch-1 throughput, bf16": 8 * min(res["decode_bf16_b1_ms"], res["decode_bf16_b1_plain_ms"])
        / res["decode_bf16_b8_ms"],
        "batch-8 / batch-1 throughput, fp32 (>= 6)": 8 * res["decode_fp32_b1_ms"] / res["decode_fp32_b8_ms"],
        "batch-8 / batch-1 throughput, bf16 (>= 6)": 8 * res["decode_bf16_b1_ms"] / res["decode_bf16_b8_ms"],
        "prefill FLOP/s / bf16 peak (>= 0.5)": res["prefill_270_bf16_gflops"] / res["peak_bf16_gflops"],
    }
    for k, v in res.items():
        print(f"{k:<28} {v:.2f}" if isinstance(v, float) else f"{k:<28} {v}")
    print()
    for k, v in ratios.items():
        print(f"{k:<44} {v:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**res, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
