"""``qwenvl demo``: train a tiny Qwen-VL from scratch on synthetic shapes and report what it learned.

    qwenvl demo                      # the full run: 9-10 minutes in fp32 on 2 AVX2 cores
    qwenvl demo --steps 20 --output_dir /tmp/demo   # a quick smoke run
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``demo``."""
    p = sub.add_parser(
        "demo",
        help="train a tiny Qwen-VL from scratch to box coloured shapes; report accuracy before/after, plots",
        description="Generates a synthetic grounding dataset, trains a tiny Qwen-VL from scratch with the "
        "package's trainer, evaluates held-out grounding accuracy (Acc@0.5) before and after, and writes "
        "loss_curve.png, predictions.png, metrics.json and report.md into --output_dir.",
    )
    p.add_argument("--output_dir", default="demo_out", help="report folder (default: demo_out/)")
    p.add_argument("--steps", type=int, help="train only N steps on a small dataset (a quick check; "
                                             "default: the full recipe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--colors", help="comma-separated shape colours (default: red,green,blue,yellow; also known: "
                                    "purple,orange)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--bf16", default="auto", choices=["auto", "true", "false"],
                   help="bf16 autocast (default auto: where the device computes bf16 natively; float32 elsewhere)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true",
                   help="use --output_dir even if it is a non-empty folder qwenvl did not write (only the demo's "
                        "files are replaced; nothing else is deleted)")


def run(args: argparse.Namespace, extra: list[str] | None = None) -> int:
    import torch

    from .run import DemoConfig, eval_command, run_demo

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if not -(2**63) <= args.seed < 2**63:  # torch's seed range (with room for the run's per-phase offsets)
        raise ValueError(f"--seed must be an integer in [-2**63, 2**63), got {args.seed}")
    from ..hardware import pick_device

    pick_device(args.device)  # a bad name fails here, in one line, not deep inside the run
    colors = [c.strip() for c in args.colors.split(",") if c.strip()] if args.colors is not None else None
    if colors is not None and not colors:
        raise ValueError("--colors names no colour")
    shapes = DemoConfig.max_shapes
    if colors is not None and len(colors) < shapes:
        raise ValueError(f"--colors needs at least {shapes} colours (each shape of a picture has its own), "
                         f"got {len(colors)}: {', '.join(colors)}")
    result: Any = run_demo(args.output_dir, steps=args.steps, seed=args.seed, device=args.device, colors=colors,
                           bf16=args.bf16, overwrite=args.overwrite)
    print(f"held-out Acc@0.5: {100 * result.accuracy_before:.1f}% before training, "
          f"{100 * result.accuracy_after:.1f}% after {result.steps} steps "
          f"({result.total_seconds:.0f} s); report: {result.files['report']}")
    print(f"measure it again: {eval_command(args.output_dir)}")
    return 0
