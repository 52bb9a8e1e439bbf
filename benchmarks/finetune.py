"""Fine-tuning speed on the CPU against the machine's own matmul peak, measured in the same run.

    python benchmarks/finetune.py                    # tiny and mid presets, the trainer's step
    python benchmarks/finetune.py --presets mid --compare   # + bf16 weights / no recompute / foreach AdamW

Each configuration runs in a fresh subprocess (so its peak memory is its own): 2 samples x 512 tokens per
step with one image each (~200 labelled tokens per sample), stage-3 trainability (ViT frozen; resampler
and LM trained), AdamW, grad clipping. Per configuration it prints the best step time over ``--steps``
steps, tokens/s, peak RSS, and the achieved FLOP/s:

    (6 x LM matrix params x tokens + 6 x hidden x vocab x labelled tokens + 3 x resampler matmul FLOPs) / time

over the peak of a 2048^3 matmul in the training dtype (bf16 where the CPU has it natively, else fp32: as
``bf16: auto`` trains) timed in the same subprocess just before (target >= 40%). The
frozen ViT's forward and attention scores are not counted (they cost time all the same). Speed is never
asserted; the machine is shared and noisy, so compare rows of one run only and repeat for the best.

Modes:
  autocast      the trainer's step (qwenvl.train.trainer._train_step): fp32 master weights, bf16 autocast
                where bf16 is native (else plain fp32)
  bf16-weights  bf16 weights in the model, fp32 master copy in the optimizer, fp32 gradients copied out
With --compare each preset also runs without activation recompute, with foreach instead of fused AdamW,
and with glibc told to keep freed memory (``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:...``: large buffers are
reused instead of mapped and page-faulted in on every step). Every run asks for transparent huge pages as
``qwenvl finetune`` does (``THP_MEM_ALLOC_ENABLE=1``, printed in the CPU line; ``THP_MEM_ALLOC_ENABLE=0`` in the
environment turns that off).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

from qwenvl.cli import use_huge_pages

use_huge_pages()  # what `qwenvl finetune` does, before torch loads (qwenvl.cli.use_huge_pages)

import torch  # noqa: E402

from qwenvl.config import IMG_END_ID, IMG_PAD_ID, IMG_START_ID, QwenVLConfig  # noqa: E402

SEQ = 512
# glibc keeps freed memory for reuse instead of unmapping large buffers (set before the process starts)
KEEP_FREED = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647"
BATCH = 2
LABELLED = 200  # answer tokens per sample


def matmul_peak(n: int = 2048, repeat: int = 5) -> float:
    from qwenvl.hardware import default_dtype

    a = torch.randn(n, n, dtype=default_dtype("cpu"))
    b = torch.randn(n, n, dtype=default_dtype("cpu"))
    a @ b
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def synthetic_samples(config: QwenVLConfig, n: int, seed: int = 0, seq: int = SEQ, labelled: int = LABELLED
                      ) -> list[dict[str, Any]]:
    """``n`` samples of ``seq`` tokens: 20 prompt tokens, one image span, text, a ``labelled``-token answer."""
    g = torch.Generator().manual_seed(seed)
    size = config.visual.image_size
    samples = []
    for _ in range(n):
        ids = torch.randint(0, 150000, (seq,), generator=g)
        ids[20] = IMG_START_ID
        ids[21:277] = IMG_PAD_ID
        ids[277] = IMG_END_ID
        labels = torch.full((seq,), -100)
        labels[-labelled:] = ids[-labelled:]
        samples.append({"input_ids": ids, "labels": labels, "images": torch.randn(1, 3, size, size, generator=g)})
    return samples


def step_flops(config: QwenVLConfig, tokens: int, labelled: int, images: int) -> float:
    lm, vis = config.lm, config.visual
    h, f = lm.hidden_size, lm.ffn_dim
    lm_params = lm.num_hidden_layers * (3 * h * h + h * h + 3 * h * f)
    d, n_kv, q = vis.output_dim, vis.grid_size**2, vis.n_queries
    kv_proj = 2 * n_kv * vis.width * d if vis.width != d else 0
    resampler = kv_proj + 2 * q * d * d * 3 + 2 * 2 * n_kv * d * d + 2 * 2 * q * n_kv * d
    return 6 * lm_params * tokens + 6 * h * lm.vocab_size * labelled + 3 * resampler * images


# ---- one configuration (runs in a subprocess) ------------------------------------------------------------
def _bf16_weights_step(model: torch.nn.Module, max_norm: float, lr: float) -> Any:
    """A train step over bf16 weights with an fp32 master copy in the optimizer (the alternative to autocast)."""
    params = [p for p in model.parameters() if p.requires_grad]
    master = [p.detach().float().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(master, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step(micro: list[dict[str, Any]]) -> float:
        counts = [int((b["labels"][:, 1:] != -100).sum()) for b in micro]
        total = sum(counts)
        loss_sum = 0.0
        for b, n in zip(micro, counts):
            out = model(b["input_ids"], images=b["images"].to(torch.bfloat16), labels=b["labels"])
            (out.loss * (n / total)).backward()
            loss_sum += float(out.loss) * n
        for p, m in zip(params, master):
            m.grad = p.grad.float()
            p.grad = None
        torch.nn.utils.clip_grad_norm_(master, max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_copy_(params, master)
        return loss_sum / total

    return step


def run_one(preset: str, mode: str, steps: int, checkpointing: bool, foreach: bool, cache: bool) -> dict[str, Any]:
    from qwenvl.model import QwenVL
    from qwenvl.train import TrainConfig
    from qwenvl.train import trainer as T

    peak = max(matmul_peak() for _ in range(2))
    cfg = TrainConfig(preset=preset, batch_size=BATCH, max_steps=steps + 1, gradient_checkpointing=checkpointing,
                      bf16="auto", warmup_steps=0, device="cpu")
    model = QwenVL.from_config(preset, dtype=torch.float32, seed=0)
    samples = synthetic_samples(model.config, BATCH * (steps + 1))
    model = T._prepare_model(cfg, model, torch.device("cpu"))
    run = T._setup_run(cfg, model, samples, torch.device("cpu"))
    if foreach:
        run.optimizer.defaults["fused"] = None
        for g in run.optimizer.param_groups:
            g["fused"], g["foreach"] = None, True
    if mode == "bf16-weights":
        model.to(torch.bfloat16)
        bf16_step = _bf16_weights_step(model, cfg.max_grad_norm, cfg.learning_rate)

        def step() -> float:
            return bf16_step(T._next_micro_batches(run))
    else:
        def step() -> float:
            return T._train_step(run, T._next_micro_batches(run))[0]

    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
    best = min(times[1:])  # the first step pays for allocation
    labelled = BATCH * (LABELLED - 0)
    flops = step_flops(model.config, BATCH * SEQ, labelled, BATCH)
    return {
        "preset": preset, "mode": mode, "recompute": checkpointing, "adamw": "foreach" if foreach else "fused", "malloc_cache": cache,
        "step_s": best, "tokens_per_s": BATCH * SEQ / best, "achieved_gflops": flops / best / 1e9,
        "peak_gflops": peak / 1e9, "mfu_vs_peak": flops / best / peak, "peak_rss_gb": _peak_rss_gb(),
        "step_times": times, "loss": loss, "threads": torch.get_num_threads(),
    }


def _peak_rss_gb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 2**20


# ---- driver ------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "mid"])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    ap.add_argument("--compare", action="store_true",
                    help="also time bf16 weights, no activation recompute and foreach AdamW")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # JSON: one configuration, run in this process
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(steps=args.steps, **json.loads(args.one))))
        return

    configs = []
    for preset in args.presets:
        base = {"preset": preset, "mode": "autocast", "checkpointing": True, "foreach": False, "cache": False}
        configs.append(base)
        if args.compare:
            configs += [{**base, "mode": "bf16-weights"}, {**base, "checkpointing": False},
                        {**base, "foreach": True}, {**base, "cache": True}]
    from qwenvl.hardware import cpu_summary

    print(f"# {cpu_summary()}; {BATCH} x {SEQ} tokens/step, 1 image/sample, {LABELLED} labelled/sample")
    header = f"{'preset':6} {'mode':12} {'recompute':9} {'adamw':7} {'malloc':6} {'step s':>7} {'tok/s':>7} " \
             f"{'GFLOP/s':>8} {'peak':>6} {'of peak':>7} {'RSS GB':>7}"
    print(header)
    for spec in configs:
        cmd = [sys.executable, __file__, "--steps", str(args.steps), "--threads", str(args.threads),
               "--one", json.dumps(spec)]
        env = {**os.environ, "GLIBC_TUNABLES": KEEP_FREED} if spec["cache"] else None
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if out.returncode != 0:
            print(f"{spec['preset']:6} {spec['mode']:12} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        cache = "cache" if r["malloc_cache"] else "glibc"
        print(f"{r['preset']:6} {r['mode']:12} {str(r['recompute']):9} {r['adamw']:7} {cache:6} {r['step_s']:7.2f} "
              f"{r['tokens_per_s']:7.0f} {r['achieved_gflops']:8.1f} {r['peak_gflops']:6.0f} "
              f"{r['mfu_vs_peak']:7.1%} {r['peak_rss_gb']:7.2f}", flush=True)


if __name__ == "__main__":
    main()
