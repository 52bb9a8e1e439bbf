"""Decode and prefill speed against this machine's own limits, all measured in the same run.

    python benchmarks/generate.py                 # mid-size random model (hidden 1024, 8 layers, real vocab)
    python benchmarks/generate.py --preset tiny   # quick check

Prints the CPU (model, flags, whether bf16 is native) and, for the model as ``qwenvl.inference.load`` gives it
(fp32 here unless the CPU computes bf16 natively; ``--dtype`` to choose), with and without ``--quantize int8``:
  * the memory read bandwidth, measured here on a large tensor (a sum over 1 GiB), and the weight-read floor
    of batch-1 decoding: bytes of the LM matrices (lm_head included) / that bandwidth;
  * batch-1 decode (ms per token, eager and with ``--compile``) and its ratio to the floor (target <= 1.15);
  * int8 batch-1 decode tokens/s over the fp32 tokens/s (target >= 1.7);
  * batch-8 decode throughput over batch 1 (target >= 5);
  * prefill of a 270-token one-image prompt: achieved FLOP/s over the matmul peak measured here (target >= 0.5).

To see on an AVX-512 machine what an AVX2-only CPU gets, cap all three of PyTorch's CPU kernel libraries:
``ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/generate.py``
(MKL runs the fp32 products; capping oneDNN and ATen alone leaves them on AVX-512). The CPU line names the caps.

This machine's memory bandwidth drifts from one minute to the next, so every measurement is taken once per
round, ``--rounds`` rounds in a row, each ratio is computed within a round and the median over rounds is
printed (per-round numbers go to ``--json``); a batch-1 decode is compared with the floor from the bandwidth
read right before and right after it (the mean of the two), not with the round's first reading. Speed is never
asserted; compare numbers from one run only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from qwenvl import QwenVL
from qwenvl.config import IMG_END_ID, IMG_PAD_ID, IMG_START_ID
from qwenvl.generation import SamplingParams, stream_tokens
from qwenvl.hardware import cpu_summary, separate_compile_cache
from qwenvl.inference import resolve_dtype
from qwenvl.quantize import Int8Linear, optimize_for_inference


def best_of(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    return 2 * n**3 / best_of(lambda: a @ b, 5)


def read_bandwidth(gib: float = 1.0) -> float:
    """Bytes per second of one pass reading a large fp32 tensor (a sum: reads only, one output)."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    return x.numel() * 4 / best_of(lambda: x.sum(), 5)


def lm_weight_bytes(model: QwenVL) -> int:
    """Bytes of every LM matrix (blocks + lm_head) as stored: what batch-1 decoding reads per token."""
    total = 0
    for name, m in model.named_modules():
        if name.startswith("transformer.h.") or name == "lm_head":
            if isinstance(m, Int8Linear):
                total += m.weight.numel() + m.scales.numel() * m.scales.element_size()
            elif isinstance(m, torch.nn.Linear):
                total += m.weight.numel() * m.weight.element_size()
    return total


def prompt(length: int, with_image: bool, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    span = [IMG_START_ID] + list(b"demo.jpeg") + [IMG_PAD_ID] * (256 - 9) + [IMG_END_ID] if with_image else []
    text = torch.randint(1000, 100000, (length - len(span),), generator=g).tolist()
    return text[:4] + span + text[4:]


def decoder(model: QwenVL, batch: int, new_tokens: int, prompt_len: int, compile: bool) -> Callable[[], float]:
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


def prefill_flops(model: QwenVL, tokens: int, images: int) -> float:
    cfg = model.config
    lm, v = cfg.lm, cfg.visual
    matrix_params = sum(m.weight.numel() for name, m in model.named_modules()
                        if name.startswith("transformer.h.") and isinstance(m, (torch.nn.Linear, Int8Linear)))
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


def prefiller(model: QwenVL, tokens: int) -> Callable[[], float]:
    ids = torch.tensor([prompt(tokens, True, seed=7)])
    images = torch.randn(1, 3, model.config.visual.image_size, model.config.visual.image_size)

    @torch.no_grad()
    def run() -> float:
        t = time.perf_counter()
        model(ids, images=images, logits_to_keep=1)
        return time.perf_counter() - t

    run()
    return run


def main() -> None:
    separate_compile_cache()  # --compile under ATEN_CPU_CAPABILITY: a cache of its own
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="compute dtype (auto: as qwenvl.inference.load picks it on this machine)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every measurement")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = resolve_dtype(args.dtype, "cpu")  # as qwenvl.inference.load picks it
    n, plen = args.new_tokens, args.prompt_len
    tag = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    res: dict[str, object] = {"cpu": cpu_summary(), "preset": args.preset, "dtype": tag}
    print(f"cpu: {res['cpu']}", flush=True)
    res["peak_gflops"] = matmul_peak(dtype) / 1e9

    models = {tag: optimize_for_inference(QwenVL.from_config(args.preset, seed=0, dtype=dtype).eval()),
              "int8": optimize_for_inference(QwenVL.from_config(args.preset, seed=0, dtype=dtype).eval(), "int8")}
    res["weight_bytes"] = {k: lm_weight_bytes(m) for k, m in models.items()}
    timed: dict[str, Callable[[], float]] = {"bandwidth": lambda: 1.0 / read_bandwidth()}
    for name, model in models.items():
        timed[f"{name}_b1_eager"] = decoder(model, 1, n, plen, compile=False)
        timed[f"{name}_b1_compiled"] = decoder(model, 1, n, plen, compile=True)
        timed[f"{name}_b8_eager"] = decoder(model, 8, n, plen, compile=False)
        timed[f"{name}_b8_compiled"] = decoder(model, 8, n, plen, compile=True)
    timed["prefill"] = prefiller(models[tag], 270)
    res["prefill_gflop"] = prefill_flops(models[tag], 270, 1) / 1e9

    rounds = []
    for r in range(args.rounds):
        got: dict[str, float] = {}
        for k, fn in timed.items():
            if "_b1_" in k:  # its floor from the bandwidth read right before and right after it
                before = timed["bandwidth"]()
                got[k] = fn()
                got[f"bandwidth@{k}"] = (before + timed["bandwidth"]()) / 2
            else:
                got[k] = fn()
        rounds.append(got)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} {v * 1e3:.1f} ms" if not k.startswith("bandwidth") else f"{k} {1 / v / 1e9:.1f} GB/s"
            for k, v in rounds[-1].items()), flush=True)
    res["rounds"] = rounds

    def med(fn: Callable[[dict[str, float]], float]) -> float:
        return statistics.median(fn(r) for r in rounds)

    wb = res["weight_bytes"]
    lines = [f"memory read bandwidth: {med(lambda r: 1 / r['bandwidth']) / 1e9:.1f} GB/s; matmul peak "
             f"({tag}): {res['peak_gflops']:.0f} GFLOP/s"]
    for name in models:
        floor = lambda r, name=name: wb[name] * r["bandwidth"]  # noqa: E731 - seconds to read the weights once
        lines.append(f"{name}: LM matrices {wb[name] / 1e9:.3f} GB, weight-read floor "
                     f"{med(floor) * 1e3:.1f} ms per token")
        for mode in ("eager", "compiled"):
            key = f"{name}_b1_{mode}"
            lines.append(f"  batch-1 decode {mode}: {med(lambda r, k=key: r[k]) * 1e3:.1f} ms/token "
                         f"({med(lambda r, k=key: 1 / r[k]):.1f} tokens/s), / floor "
                         f"{med(lambda r, k=key, nm=name: r[k] / (wb[nm] * r[f'bandwidth@{k}'])):.2f} (the floor "
                         "read around this measurement)")
        for mode in ("eager", "compiled"):
            key, one = f"{name}_b8_{mode}", f"{name}_b1_{mode}"
            lines.append(f"  batch-8 decode {mode}: {med(lambda r, k=key: r[k]) * 1e3:.1f} ms/step, throughput "
                         f"{med(lambda r, k=key, o=one: 8 * r[o] / r[k]):.2f}x batch 1 ({mode}); "
                         f"{med(lambda r, k=key, o=one, nm=name: 8 * min(r[f'{nm}_b1_eager'], r[f'{nm}_b1_compiled']) / r[k]):.2f}x"
                         " the fastest batch 1")
    best = {nm: (lambda r, nm=nm: min(r[f"{nm}_b1_eager"], r[f"{nm}_b1_compiled"])) for nm in models}
    lines.append(f"int8 / {tag} batch-1 tokens/s (fastest of each): {med(lambda r: best[tag](r) / best['int8'](r)):.2f}; "
                 f"compiled vs compiled: {med(lambda r: r[f'{tag}_b1_compiled'] / r['int8_b1_compiled']):.2f}")
    pf = med(lambda r: r["prefill"])
    lines.append(f"prefill, 270-token one-image prompt ({tag}): {pf * 1e3:.0f} ms, "
                 f"{res['prefill_gflop'] / pf:.0f} GFLOP/s = {res['prefill_gflop'] / pf / res['peak_gflops']:.2f} of the "
                 "matmul peak")
    res["summary"] = lines
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
