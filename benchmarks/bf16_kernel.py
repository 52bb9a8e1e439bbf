"""The bf16 CPU kernel against oneDNN, product by product (needs a CPU with AVX512-BF16).

    python benchmarks/bf16_kernel.py                # the mid model's LM matrices + single 9.6B-size matrices
    python benchmarks/bf16_kernel.py --rows 1 8 16

For each workload and number of rows it times one pass with our kernel (``qwenvl.model.bf16_kernel``, the
operator ``Bf16PackedLinear`` calls), with oneDNN's packed weights (``PackedLinear``) and with ``F.linear``
on plain weights, once per round, ``--rounds`` rounds in a row (this machine's bandwidth drifts from one
minute to the next), and prints medians: ms per pass, GB/s of weights read, GFLOP/s and oneDNN's time over
the kernel's. Speed is never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from generate import lm_matrices, onednn_layers  # the sibling script (this folder is on sys.path)

from qwenvl import QwenVL
from qwenvl.model import bf16_kernel

# (N, K) of the 9.6B model's LM products: c_attn, w1/w2, mlp c_proj, lm_head
LARGE = {"9.6B c_attn 12288x4096": (12288, 4096), "9.6B w1 11008x4096": (11008, 4096),
         "9.6B mlp c_proj 4096x11008": (4096, 11008), "9.6B lm_head 151936x4096": (151936, 4096)}


def passes(mats: list[torch.Tensor], rows: int) -> dict[str, Callable[[], None]]:
    op = bf16_kernel.operator()
    packed = [bf16_kernel.pack(w) for w in mats]
    onednn = onednn_layers(mats)
    xs = {w.shape[1]: torch.randn(rows, w.shape[1]).bfloat16() for w in mats}
    return {
        "kernel": lambda: [op(xs[w.shape[1]], w, None) for w in packed],
        "oneDNN": lambda: [layer(xs[layer.in_features]) for layer in onednn],
        "F.linear": lambda: [F.linear(xs[w.shape[1]], w) for w in mats],
    }


def seconds(fn: Callable[[], None], min_time: float = 0.2) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not bf16_kernel.available():
        raise SystemExit(f"the bf16 kernel is unavailable here: {bf16_kernel.unavailable_reason()}")
    print(f"operator {bf16_kernel.operator()}, {args.threads} threads, torch {torch.__version__}")
    mid = QwenVL.from_config("mid", seed=0, dtype=torch.bfloat16)
    workloads = {"mid model, every LM matrix": [w.detach() for w in lm_matrices(mid)]}
    workloads.update({name: [torch.randn(n, k).bfloat16()] for name, (n, k) in LARGE.items()})
    print(f"{'workload':<30} {'rows':>4} {'kernel ms':>10} {'GB/s':>6} {'GFLOP/s':>8} "
          f"{'oneDNN ms':>10} {'F.linear ms':>12} {'oneDNN/kernel':>14}")
    with torch.no_grad():
        for name, mats in workloads.items():
            weight_bytes = sum(w.numel() * 2 for w in mats)
            for rows in args.rows:
                fns = passes(mats, rows)
                rounds = [{k: seconds(fn) for k, fn in fns.items()} for _ in range(args.rounds)]
                med = {k: statistics.median(r[k] for r in rounds) for k in fns}
                ratio = statistics.median(r["oneDNN"] / r["kernel"] for r in rounds)
                t = med["kernel"]
                print(f"{name:<30} {rows:>4} {t * 1e3:>10.2f} {weight_bytes / t / 1e9:>6.1f} "
                      f"{2 * rows * weight_bytes / 2 / t / 1e9:>8.0f} {med['oneDNN'] * 1e3:>10.2f} "
                      f"{med['F.linear'] * 1e3:>12.2f} {ratio:>14.2f}", flush=True)


if __name__ == "__main__":
    main()
