"""``qwenvl eval grounding|vqa|caption``: run a benchmark with the official Qwen-VL protocol.

Example::

    qwenvl eval grounding --model Qwen-VL --data refcoco_val.jsonl --image_dir coco/ --batch_size 8 \\
        --output results/refcoco_val.json

Input formats are described in :mod:`qwenvl.eval.runners`. The output JSON holds the score, the settings
and every prediction; it is written atomically.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..inference_cli import add_runtime_flags, str2bool
from .runners import CAPTION_PROMPT, GROUNDING_PROMPT, VQA_METRICS, VQA_PROMPT

logger = logging.getLogger(__name__)

_DEFAULTS = {  # task -> (prompt, max_new_tokens, min_new_tokens): the official eval_mm settings
    "grounding": (GROUNDING_PROMPT, 28, 10),
    "vqa": (VQA_PROMPT, 10, 1),
    "caption": (CAPTION_PROMPT, 30, 8),
}


def _common(p: argparse.ArgumentParser, task: str) -> None:
    prompt, max_new, min_new = _DEFAULTS[task]
    p.add_argument("--model", "--load_checkpoint", dest="model", required=True, metavar="DIR",
                   help="checkpoint folder (official layout or ours)")
    p.add_argument("--data", required=True, metavar="FILE", help="evaluation data (see `qwenvl.eval.runners`)")
    p.add_argument("--image_dir", metavar="DIR", help="folder relative image paths are resolved against (default: cwd)")
    p.add_argument("--allow_any_local_path", type=str2bool, default=False, metavar="BOOL",
                   help="which image files the data may name: false (default) reads only files inside --image_dir "
                        "(default: the working directory) and refuses absolute paths outside it, ~, .. and links "
                        "leading out of it; true reads any file you can read")
    p.add_argument("--output", metavar="FILE", help="JSON file for the score and every prediction (written atomically)")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per generation batch (default 8)")
    p.add_argument("--limit", type=int, help="evaluate only the first N samples")
    add_runtime_flags(p)
    p.add_argument("--prompt", default=prompt, help=f"prompt template (default: {prompt!r})")
    p.add_argument("--max_new_tokens", type=int, default=max_new, help=f"default {max_new} (official)")
    p.add_argument("--min_new_tokens", type=int, default=min_new, help=f"default {min_new} (official)")
    p.add_argument("--chat_format", choices=["raw", "chatml"], default="raw",
                   help="stop tokens: raw stops at <|endoftext|> (official, also for the chat model); "
                        "chatml also at <|im_end|>")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``eval`` and its subcommands."""
    p = sub.add_parser("eval", help="evaluate a checkpoint: grounding (RefCOCO), VQA, captioning (CIDEr)")
    tasks = p.add_subparsers(dest="eval_task", metavar="TASK", required=True)

    g = tasks.add_parser("grounding", help="referring expression grounding, Acc@0.5 (RefCOCO/+/g protocol)")
    _common(g, "grounding")
    g.add_argument("--bbox_format", choices=["xyxy", "xywh"], default="xyxy",
                   help="'bbox' in the data: [x1,y1,x2,y2] pixels (default) or COCO [x,y,w,h]")
    g.add_argument("--iou_threshold", type=float, default=0.5)

    v = tasks.add_parser("vqa", help="visual question answering, VQAv2 accuracy")
    _common(v, "vqa")
    v.add_argument("--metric", choices=VQA_METRICS, default="auto",
                   help="auto: VQAv2 accuracy with several answers per question, else exact match")

    c = tasks.add_parser("caption", help="captioning, CIDEr")
    _common(c, "caption")


def _limit(records: list[Any], n: int | None) -> list[Any]:
    if n is None:
        return records
    if n < 1:
        raise ValueError(f"--limit must be >= 1, got {n}")
    return records[:n]


def run(args: argparse.Namespace, extra: list[str] | None = None) -> int:
    from ..inference import load
    from ..outputs import check_output_file
    from . import runners

    task = args.eval_task
    check_output_file(args.output, {"--data file": args.data})
    loaders = {"grounding": runners.load_grounding_data, "vqa": runners.load_vqa_data,
               "caption": runners.load_caption_data}  # fmt: skip
    media = {"allow_any_local_path": args.allow_any_local_path}
    if task == "grounding":
        records = runners.load_grounding_data(args.data, args.image_dir, args.bbox_format, **media)
    else:
        records = loaders[task](args.data, args.image_dir, **media)
    records = _limit(records, args.limit)
    model, processor = load(args.model, args.dtype, args.device, args.image_dir, quantize=args.quantize, **media)
    common: dict[str, Any] = dict(
        model=model, processor=processor, image_dir=args.image_dir, batch_size=args.batch_size,
        prompt=args.prompt, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
        chat_format=args.chat_format, output=args.output, progress=not args.no_progress,
    )  # fmt: skip
    if task == "grounding":
        result = runners.evaluate_grounding(records, threshold=args.iou_threshold, **common)
        line = f"Acc@{args.iou_threshold:g}: {result.score:.4f} ({result.details['num_correct']}/{result.num_samples})"
    elif task == "vqa":
        result = runners.evaluate_vqa(records, metric=args.metric, **common)
        line = f"VQA accuracy ({result.settings['vqa_metric']}): {100 * result.score:.2f} over {result.num_samples}"
    else:
        result = runners.evaluate_caption(records, **common)
        line = f"CIDEr: {result.score:.4f} over {result.num_samples} images"
    print(line)  # the command's answer, for the user
    if args.output:
        print(f"predictions written to {Path(args.output)}")
    failed = result.details.get("num_errors", 0)
    if failed:  # scored as wrong; every other prediction is kept
        where = f"the predictions with an 'error' field in {args.output}" if args.output else "the warnings above"
        raise ValueError(f"{failed} of {result.num_samples} sample(s) failed and were scored as wrong: see {where}")
    return 0
