"""``qwenvl eval grounding|vqa|caption``: run a benchmark with the official Qwen-VL protocol.

Example::

    qwenvl eval grounding --model Qwen-VL --data refcoco_val.jsonl --image_dir coco/ --batch_size 8 \\
        --output results/refcoco_val.json

Input formats: :data:`DATA_FORMATS` (shown by ``--help`` and in the README; the full rules are in
:mod:`qwenvl.eval.runners`). The prompt and chat format used are logged (stderr) before the run and recorded
in the output JSON's ``settings``, with the score and every prediction; it is written atomically. Each batch's
predictions go to ``OUTPUT.partial`` (JSON Lines) as the batch finishes, and that file is removed once ``OUTPUT``
is written: a run that stops early (Ctrl-C, SIGTERM, a full disk, a crash, ``kill -9``) leaves them there, and
``--resume_from OUTPUT.partial`` (or a complete ``OUTPUT`` of an earlier run) generates only the samples after them;
once ``OUTPUT`` is written, the partial file resumed from is removed too (only ``OUTPUT.partial`` or
``OUTPUT.partial-N`` next to ``OUTPUT``, and only when ``OUTPUT`` holds every row of it).
"""

from __future__ import annotations

import argparse
import logging
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..cli import Once
from ..fileio import shown_path
from ..inference_cli import add_runtime_flags, require_compiler, str2bool
from .runners import CAPTION_PROMPT, GROUNDING_PROMPT, VQA_METRICS, VQA_PROMPT

logger = logging.getLogger(__name__)

_DEFAULTS = {  # task -> (prompt, max_new_tokens, min_new_tokens): the official eval_mm settings
    "grounding": (GROUNDING_PROMPT, 28, 10),
    "vqa": (VQA_PROMPT, 10, 1),
    "caption": (CAPTION_PROMPT, 30, 8),
}

# What --data holds, per task: shown by `qwenvl eval TASK --help` and in the README (tests keep them equal).
DATA_FORMATS = {
    "grounding": """\
--data: JSONL, one referring expression per line: "image" (relative to --image_dir), "sent", "bbox" in pixels
of the original image ([x1, y1, x2, y2]; COCO's [x, y, w, h] with --bbox_format xywh), and optionally
"height"/"width" (else read from the image file; given, they scale the predicted boxes as the official evaluation
does, with a warning when they are not the image file's size). Example:
{"image": "val2014/COCO_val2014_000000000139.jpg", "sent": "the man on the left", "bbox": [10.5, 20, 200, 310.2], "height": 426, "width": 640}
{"image": "val2014/COCO_val2014_000000000285.jpg", "sent": "brown bear", "bbox": [0, 50, 640, 586]}""",
    "vqa": """\
--data: JSONL, one question per line: "image", "question", and the reference answers: "answers" (VQAv2: the
10 annotators' answers, strings or {"answer": ...} objects) or "answer" (one reference, scored by exact
match); optionally "question_id". Example:
{"image": "val2014/COCO_val2014_000000262148.jpg", "question": "Where is he looking?", "answers": ["down", "down", "at table", "skateboard", "down", "table", "down", "down", "down", "down"], "question_id": 262148000}
{"image": "charts/bar_017.png", "question": "What is the highest value?", "answer": "42"}""",
    "caption": """\
--data: JSONL, one image per line: "image", "captions" (the references), optionally "id"; or a COCO-style
.json ({"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}). Example:
{"image": "val2014/COCO_val2014_000000391895.jpg", "captions": ["A man with a red helmet on a small moped on a dirt road.", "Man riding a motor bike on a dirt road on the countryside."], "id": 391895}
{"image": "val2014/COCO_val2014_000000060623.jpg", "captions": ["A young girl inhales with the intent of blowing out a candle."]}""",
}


def _common(p: argparse.ArgumentParser, task: str) -> None:
    prompt, max_new, min_new = _DEFAULTS[task]
    p.add_argument("--model", "--load_checkpoint", dest="model", required=True, metavar="DIR", action=Once,
                   help="checkpoint folder (official layout or ours)")
    p.add_argument("--data", required=True, metavar="FILE", help="evaluation data (format below)")
    p.add_argument("--image_dir", metavar="DIR", help="folder relative image paths are resolved against (default: cwd)")
    p.add_argument("--allow_any_local_path", type=str2bool, default=False, metavar="BOOL",
                   help="which image files the data may name: false (default) reads only files inside --image_dir "
                        "(default: the working directory) and refuses absolute paths outside it, ~, .. and links "
                        "leading out of it; true reads any file you can read")
    p.add_argument("--output", metavar="FILE", help="JSON file for the score and every prediction (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--resume_from", metavar="FILE",
                   help="what a run that stopped early left (OUTPUT.partial, written as its batches finished; or "
                        "an OUTPUT): its predictions are kept and only the samples after them are generated (same "
                        "--data, prompt and token limits); --output's own OUTPUT.partial(-N) is removed once "
                        "--output holds its rows")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per generation batch (default 8)")
    p.add_argument("--limit", type=int, help="evaluate only the first N samples")
    add_runtime_flags(p)
    p.add_argument("--compile", action="store_true",
                   help="decode with torch.compile (a one-off compile of about 20-60 s on a CPU, logged, then each "
                        "token is faster: worth it for large evaluations)")
    given = p.add_mutually_exclusive_group()
    given.add_argument("--prompt", default=prompt, help=f"prompt template (default, the official one: {prompt!r})")
    given.add_argument("--prompt_file", metavar="FILE",
                       help="read the prompt template from FILE, exactly as it is (newlines included; e.g. the "
                            "demo's eval_prompt.txt)")
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

    def task_parser(name: str, help: str) -> argparse.ArgumentParser:
        return tasks.add_parser(name, help=help, description=help, epilog=DATA_FORMATS[name],
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    g = task_parser("grounding", "referring expression grounding, Acc@0.5 (RefCOCO/+/g protocol)")
    _common(g, "grounding")
    g.add_argument("--bbox_format", choices=["xyxy", "xywh"], default="xyxy",
                   help="'bbox' in the data: [x1,y1,x2,y2] pixels (default) or COCO [x,y,w,h]")
    g.add_argument("--iou_threshold", type=float, default=0.5, metavar="T",
                   help="a predicted box is correct when its IoU with the target is >= T, in (0, 1] (default 0.5)")

    v = task_parser("vqa", "visual question answering, VQAv2 accuracy")
    _common(v, "vqa")
    v.add_argument("--metric", choices=VQA_METRICS, default="auto",
                   help="auto: VQAv2 accuracy when every question has several answers, else exact match for all; "
                        "relaxed: ChartQA's relaxed accuracy (numbers within 5%%)")

    c = task_parser("caption", "captioning, CIDEr")
    _common(c, "caption")


def _check_numbers(args: argparse.Namespace) -> None:
    """The generation settings, said before the model loads (not as every sample failing after it)."""
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 <= args.min_new_tokens <= args.max_new_tokens:
        default = args.min_new_tokens == _DEFAULTS[args.eval_task][2]
        hint = f" (the official default for {args.eval_task}): pass --min_new_tokens 0..{args.max_new_tokens} as well" \
            if default else ""
        raise ValueError(f"--min_new_tokens must be in [0, --max_new_tokens = {args.max_new_tokens}], got "
                         f"{args.min_new_tokens}{hint}")
    if args.eval_task == "grounding":
        from .runners import check_threshold

        check_threshold(args.iou_threshold, "--iou_threshold")


def _limit(records: list[Any], n: int | None) -> list[Any]:
    if n is None:
        return records
    if n < 1:
        raise ValueError(f"--limit must be >= 1, got {n}")
    return records[:n]


def run(args: argparse.Namespace, extra: list[str] | None = None) -> int:
    from ..fileio import require_folder
    from ..outputs import check_output_file
    from . import runners

    task = args.eval_task
    _check_numbers(args)
    if args.image_dir:  # else every image would be "not found" under it
        require_folder(args.image_dir, "--image_dir folder")
    check_output_file(args.output, {"--data file": args.data, "--prompt_file": args.prompt_file,
                                    "--resume_from file": args.resume_from},
                      folders={"checkpoint folder": args.model})
    loaders: dict[str, Callable[..., list[Any]]] = {
        "grounding": runners.load_grounding_data, "vqa": runners.load_vqa_data, "caption": runners.load_caption_data}
    media = {"allow_any_local_path": args.allow_any_local_path}
    records: list[Any]  # the records of ``task``
    if task == "grounding":
        records = runners.load_grounding_data(args.data, args.image_dir, args.bbox_format, **media)
    else:
        records = loaders[task](args.data, args.image_dir, **media)
    policy = runners.media_policy(args.image_dir, args.allow_any_local_path)
    first: dict[str, str] = {}  # each image once (a benchmark names it in several samples), by its first sample
    for r in records:
        first.setdefault(r.image, r.where)
    check_output_file(args.output, {f"image of {where}": policy.resolve(image) for image, where in first.items()},
                      overwrite=args.overwrite)  # the images are inputs too
    records = _limit(records, args.limit)
    metric = runners.resolve_vqa_metric(records, args.metric) if task == "vqa" else None
    prompt, protocol = _prompt(args, task)
    runners.fill_prompt(prompt, **{k: "" for k in runners.PROMPT_FIELDS[task]})  # a template that cannot be filled
    runners.check_prompt_template(prompt, protocol)  # an <img> span holding more than {image}
    runners.build_prompts(task, prompt, records)  # text completing an image tag of the template: said now
    used = {name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None}
    unused = [f"{{{k}}}" for k in runners.PROMPT_FIELDS[task] if k not in used]
    if unused:  # may be meant (a text-only baseline), but every sample then shares what the field would have said
        logger.warning("the prompt template uses no %s: %s", " or ".join(unused),
                       "the model sees no picture" if "{image}" in unused else "samples of one image get one prompt")
    if args.resume_from:  # a file of another run is said now, not after the model loads
        resume = runners.read_resume(args.resume_from, "--resume_from file")
        try:
            runners.resumed_answers(resume, task, records, runners.generation_settings(
                prompt, args.max_new_tokens, args.min_new_tokens, args.chat_format))
        except runners.EvalDataError as e:
            raise runners.EvalDataError(f"--resume_from {shown_path(args.resume_from)}: {e}") from None
    elif args.output and Path(f"{args.output}.partial").is_file():  # a run into OUT that stopped: it can go on
        logger.warning("%s.partial holds the predictions of an earlier run that stopped: add --resume_from %s.partial "
                       "to generate only the rest (this run starts over and keeps that file)", shown_path(args.output),
                       shown_path(args.output))
    require_folder(args.model)
    if args.compile:  # no C++ compiler: said before the weights load
        require_compiler(args.device)
    from ..inference import load  # torch: after the checks of the data, the prompt and the folder

    model, processor = load(args.model, args.dtype, args.device, args.image_dir, quantize=args.quantize, **media)
    check_output_file(args.output, {}, overwrite=args.overwrite)  # one created while the weights loaded: said now
    _say_prompt(task, prompt, protocol, args, model.config.generation.chat_format)
    common: dict[str, Any] = dict(
        model=model, processor=processor, image_dir=args.image_dir, batch_size=args.batch_size,
        prompt=prompt, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
        chat_format=args.chat_format, output=args.output, progress=not args.no_progress, compile=args.compile,
        settings={"protocol": protocol},
        resume=args.resume_from or None,  # the path: a partial file of --output goes once --output holds its rows
        overwrite=args.overwrite,  # without it, a file that appears at --output during the run is not replaced
    )  # fmt: skip
    if task == "grounding":
        result = runners.evaluate_grounding(records, threshold=args.iou_threshold, **common)
        line = f"Acc@{args.iou_threshold:g}: {result.score:.4f} ({result.details['num_correct']}/{result.num_samples})"
    elif task == "vqa":
        assert metric is not None  # resolved above for vqa
        result = runners.evaluate_vqa(records, metric=metric, **common)
        line = f"VQA accuracy ({result.settings['vqa_metric']}): {100 * result.score:.2f} over {result.num_samples}"
    else:
        result = runners.evaluate_caption(records, **common)
        line = f"CIDEr: {result.score:.4f} over {result.num_samples} images"
    print(line)  # the command's answer, for the user
    if args.output:
        print(f"predictions written to {shown_path(Path(args.output))}")
    failed = result.details.get("num_errors", 0)
    if failed:  # scored as wrong; every other prediction is kept
        where = (f"the predictions with an 'error' field in {shown_path(args.output)}" if args.output
                 else "the warnings above")
        raise ValueError(f"{failed} of {result.num_samples} sample(s) failed and were scored as wrong: see {where}")
    return 0


def _prompt(args: argparse.Namespace, task: str) -> tuple[str, str]:
    """The prompt template and where it came from: "official", "--prompt" or "--prompt_file FILE"."""
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.exists():
            raise FileNotFoundError(f"--prompt_file {shown_path(path)}: no such file")
        if not path.is_file():  # a folder, /dev/zero (read forever), a FIFO
            raise ValueError(f"--prompt_file {shown_path(path)}: not a file")
        try:
            return path.read_text(encoding="utf-8"), f"--prompt_file {path}"
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompt_file {shown_path(path)}: not UTF-8 text ({e})") from None
    return args.prompt, "official" if args.prompt == _DEFAULTS[task][0] else "--prompt"


def _say_prompt(task: str, prompt: str, protocol: str, args: argparse.Namespace, model_format: str) -> None:
    """One log line (stderr): the prompt and format this score will be for (plus a hint when they may not suit)."""
    logger.info("eval %s: prompt %r (%s), chat_format %s, max_new_tokens %d, min_new_tokens %d", task, prompt,
                protocol, args.chat_format, args.max_new_tokens, args.min_new_tokens)
    if protocol == "official" and model_format == "chatml" and args.chat_format == "raw":
        logger.info("note: the official protocol prompts every checkpoint in the raw format; a model fine-tuned on "
                    "a ChatML prompt of its own (such as the demo's, saved in its eval_prompt.txt) may score far "
                    "lower this way than with --chat_format chatml --prompt_file FILE")
