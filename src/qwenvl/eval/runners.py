"""Benchmark runners: grounding (RefCOCO protocol), VQA and captioning, batched, greedy, in-process scoring.

Each runner reads a dataset file, builds the official Qwen-VL prompt per sample, generates greedily in
batches (left-padded batches give the same tokens as single prompts), scores with :mod:`qwenvl.eval.metrics`
and returns an :class:`EvalResult` (optionally written atomically as JSON, with every prediction).

Protocols (Qwen-VL's ``eval_mm`` scripts):

- grounding: prompt ``<img>{image}</img><ref>{expression}</ref><box>``, greedy, ``max_new_tokens=28``,
  ``min_new_tokens=10``, stop at ``<|endoftext|>``. The prompt ends in ``<box>``, so the continuation starts
  ``(x1,y1),(x2,y2)</box>``: the first box in it is mapped to pixels with ``x / 999 * W`` and is correct
  when its IoU with the target is >= 0.5. No parseable box = wrong.
- VQA: ``<img>{image}</img>{question} Answer:``, ``max_new_tokens=10``, ``min_new_tokens=1``; the answer
  (special tokens dropped, stripped) is scored with the VQAv2 accuracy and its normalization.
- captioning: ``<img>{image}</img>Describe the image in English:``, ``max_new_tokens=30``,
  ``min_new_tokens=8``; CIDEr(-D) over the whole set.

Input formats (one JSON object per line; blank lines are skipped; image paths are read under the media
policy of :class:`qwenvl.images.MediaPolicy` with ``image_dir`` (default: the working directory) as the media
folder: relative paths resolve there and, unless ``allow_any_local_path=True``, nothing outside it is read):

- grounding: ``{"image": "...", "sent": "the man on the left", "bbox": [x1, y1, x2, y2], "height": H,
  "width": W}`` with ``bbox`` in pixels of the original image (``bbox_format="xywh"`` reads COCO's
  ``[x, y, w, h]`` instead). ``height``/``width`` may be omitted: they are then read from the image file. Given,
  they scale the predicted boxes as given (as the official evaluation does), with one warning naming how many rows
  give a size that is not their image file's. The box must lie in the image (up to a pixel of overhang).
- VQA: ``{"image": "...", "question": "...", "answers": ["yes", "yes", ...]}`` (VQAv2: the 10 annotators'
  answers; ``{"answer": ...}`` dicts are accepted too) or ``"answer": "yes"`` for a single reference (not all
  blank); optional ``question_id`` (a number or a string, unique).
- captioning: ``{"image": "...", "captions": ["...", ...]}`` (none blank) with an optional unique ``id`` (a
  record without one takes its index, from 0, or, when another record has that id, the first number from the
  number of records up that none has), or
  the COCO-style JSON that Qwen-VL's caption eval reads (``{"images": [{"id", "image"|"file_name"}],
  "annotations": [{"image_id", "caption"}]}``; a ``.json`` file that holds JSON Lines is read as such).

A record's image is its ``image`` only: a ``question`` or ``sent`` holding ``<img>`` or ``</img>`` (the processor
would read the text between them as an image path) is an error naming the line, and so is a prompt template with
an image tag anywhere but in ``<img>{image}</img>`` (:func:`build_prompts`). ``<ref>``/``<box>`` read no file and
stay allowed, as in the official evaluation; reference answers and captions never reach the prompt.

Generation is abstracted as a :data:`GenerateFn` (prompts -> continuation texts), so the runners can be
driven by a real model (:func:`model_generate_fn`) or by a stub in tests. A sample whose prompt the
generator refuses with a ``ValueError`` (an undecodable image, say) does not stop the run: its prediction
gets an ``error`` field and an empty answer (scored as wrong), and ``details["num_errors"]`` counts them.
A run with an ``output`` appends each batch's answers, as it finishes, to ``OUTPUT.partial`` (JSON Lines, removed
once ``OUTPUT`` is written): a run that stops early (Ctrl-C, a full disk, a crash, ``kill -9``) keeps them there,
and ``resume`` (``--resume_from``) generates only the samples after them; once ``OUTPUT`` holds every row of the
partial file it resumed from (``OUTPUT.partial`` or ``OUTPUT.partial-N``), that file is removed too.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image
from tqdm.auto import tqdm

from ..config import IMAGE_TAGS, first_image_tag
from ..fileio import atomic_write_text, error_line, iter_jsonl, json_text, jsonl_line, read_json, shown_path
from ..grounding import denormalize_box, first_box
from ..images import MAX_IMAGE_PIXELS, ImageError, MediaPolicy, open_image
from ..outputs import PartialRows, appeared_during_run, check_output_file
from .metrics import cider, exact_match, grounding_iou, relaxed_correctness, vqa_accuracy

if TYPE_CHECKING:
    from ..model import QwenVL
    from ..processor import Processor

__all__ = [
    "CAPTION_PROMPT",
    "GROUNDING_PROMPT",
    "VQA_PROMPT",
    "CaptionRecord",
    "EvalDataError",
    "EvalResult",
    "GenerateFn",
    "GroundingRecord",
    "VQARecord",
    "build_prompts",
    "check_prompt_template",
    "evaluate_caption",
    "evaluate_grounding",
    "evaluate_vqa",
    "generation_settings",
    "load_caption_data",
    "load_grounding_data",
    "load_vqa_data",
    "model_generate_fn",
    "read_resume",
    "remove_resumed_partial",
    "resumed_answers",
]

logger = logging.getLogger(__name__)

GROUNDING_PROMPT = "<img>{image}</img><ref>{expression}</ref><box>"
VQA_PROMPT = "<img>{image}</img>{question} Answer:"
CAPTION_PROMPT = "<img>{image}</img>Describe the image in English:"

# Prompts -> the text each one continues with (stop token excluded).
GenerateFn = Callable[[Sequence[str]], list[str]]


class EvalDataError(ValueError):
    """An evaluation file is malformed; the message names the file and the line (or entry)."""


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------


def model_generate_fn(
    model: QwenVL,
    processor: Processor,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    chat_format: str = "raw",
    skip_special_tokens: bool = True,
    base_dir: str | os.PathLike | None = None,
    compile: bool = False,
) -> GenerateFn:
    """A :data:`GenerateFn` that runs greedy decoding with ``model`` (``compile``: the decode step under
    ``torch.compile``, as ``generate(..., compile=True)``).

    Images are loaded by the processor from the ``<img>`` paths (relative ones against ``base_dir``).
    ``chat_format`` picks the stop tokens: ``raw`` stops at ``<|endoftext|>`` only, as the official evals do
    even for the chat model; ``chatml`` also at ``<|im_end|>``/``<|im_start|>``. Each continuation is cut at
    its first stop token before decoding.
    """
    from ..generation import STOP_IDS, generate

    if chat_format not in STOP_IDS:
        raise ValueError(f"chat_format must be one of {sorted(STOP_IDS)}, got {chat_format!r}")
    stops = set(STOP_IDS[chat_format])

    def run(prompts: Sequence[str]) -> list[str]:
        inputs = processor(list(prompts), base_dir=base_dir)
        ids = inputs["input_ids"]
        out = generate(
            model, ids, attention_mask=inputs["attention_mask"], images=inputs["images"],
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
            chat_format=chat_format, compile=compile,
        )  # fmt: skip
        texts = []
        for row in out[:, ids.shape[1] :].tolist():
            cut = next((k for k, t in enumerate(row) if t in stops), len(row))
            texts.append(processor.decode(row[:cut], skip_special_tokens=skip_special_tokens))
        return texts

    return run


def _batches(n: int, batch_size: int, first: int = 0) -> Iterator[range]:
    for start in range(first, n, batch_size):
        yield range(start, min(n, start + batch_size))


def _generate_all(
    prompts: Sequence[str], generate_fn: GenerateFn, batch_size: int, progress: bool, desc: str,
    answers: list[str] | None = None, errors: dict[int, str] | None = None,
    on_batch: Callable[[range], None] | None = None,
) -> tuple[list[str], dict[int, str]]:
    """The answer to every prompt ("" for a failed one) and the errors of the failed ones by index.

    ``answers`` and ``errors``, when given, are filled as the batches finish (whole batches only): what they
    hold when an interrupt stops the run is the answers so far. Answers they already hold (a resumed run's) are
    those of the first prompts, which are not generated again. ``on_batch`` is called with the indices of each
    batch once its answers are in."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    answers = [] if answers is None else answers
    errors = {} if errors is None else errors
    with tqdm(total=len(prompts), initial=len(answers), desc=desc, unit="sample", disable=not progress,
              dynamic_ncols=True) as bar:
        for idx in _batches(len(prompts), batch_size, len(answers)):
            batch = [prompts[i] for i in idx]
            failed: dict[int, str] = {}
            try:
                out = generate_fn(batch)
            except ValueError:  # one bad sample: answer the others one by one (same greedy tokens as batched)
                out = []
                for i in idx:
                    try:
                        out += generate_fn([prompts[i]])
                    except ValueError as e:
                        failed[i] = str(e)
                        out.append("")
                        logger.warning("%s: sample %d failed: %s", desc, i, e)
            if len(out) != len(batch):
                raise RuntimeError(f"generate returned {len(out)} answers for {len(batch)} prompts")
            answers.extend(out)
            errors.update(failed)
            if on_batch is not None:
                on_batch(idx)
            bar.update(len(batch))
    return answers, errors


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """What a runner measured. ``score`` is a fraction (0..1) for accuracies, the CIDEr value for captions."""

    task: str
    metric: str
    score: float
    num_samples: int
    predictions: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.metric,
            self.metric: self.score,
            "num_samples": self.num_samples,
            **self.details,
            "settings": self.settings,
            "predictions": self.predictions,
        }

    def save(self, path: str | os.PathLike, replace: bool = True) -> Path:
        """Write :meth:`to_dict` as JSON, atomically (a crash leaves the previous file, never half of one);
        ``replace=False``: a file at ``path`` stays, FileExistsError (:func:`~qwenvl.fileio.atomic_file`)."""
        return atomic_write_text(path, json_text(self.to_dict(), indent=1) + "\n",  # a lone surrogate: escaped
                                 replace=replace)


def _sample(r: Any) -> dict[str, Any]:
    """The fields of a record that its prediction entry repeats, which say which sample it is."""
    if isinstance(r, GroundingRecord):
        return {"image": r.image, "sent": r.sent, "bbox": list(r.bbox)}
    if isinstance(r, VQARecord):
        return {"question_id": r.question_id, "image": r.image, "question": r.question}
    return {"id": r.id, "image": r.image}


_ANSWER_KEY = {"grounding": "answer", "vqa": "answer", "caption": "caption"}  # the answer's field, per task


def generation_settings(prompt: str, max_new_tokens: int, min_new_tokens: int, chat_format: str | None
                        ) -> dict[str, Any]:
    """The settings that decide a run's answers: an output's ``settings`` hold them, and a resumed run must match."""
    return {"prompt": prompt, "max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens,
            "chat_format": chat_format}


PARTIAL_HEADER = "qwenvl_eval_partial"  # the key of a partial file's first line; its value is the format's version


def read_resume(path: str | os.PathLike, what: str = "file to resume from") -> Any:
    """The run to resume from, read from ``path``: the partial file of a run that stopped early (JSON Lines: a
    header ``{"qwenvl_eval_partial": 1, "task", "settings", "num_planned"}``, then one row per answered sample, in
    order) as ``{"task", "settings", "predictions"}``, or the output JSON of an earlier run (complete, or an older
    version's scored ``OUTPUT.partial``) as it is; :func:`resumed_answers` checks either. A file that is neither,
    a malformed line or a row without its answer raises :class:`EvalDataError` naming the file (and the line):
    the partial file holds whole rows only, so no line of it is cut."""
    lines = iter_jsonl(path, EvalDataError, what)  # its file is closed when it goes (on return, or an error)
    try:
        _, head = next(lines)
    except (EvalDataError, StopIteration):  # "{" opening an output JSON (indented), or an empty file
        head = None
    if not (isinstance(head, dict) and PARTIAL_HEADER in head):
        try:
            return read_json(path, EvalDataError, what)
        except EvalDataError:
            if head is None:
                raise
            raise EvalDataError(f"{path}:1: not the header of a qwenvl eval partial file (no {PARTIAL_HEADER!r}), "
                                "and the file is not the output JSON of qwenvl eval either") from None
    return _partial_run(path, head, lines)


def _partial_run(path: str | os.PathLike, head: dict[str, Any], lines: Iterator[tuple[int, dict[str, Any]]]
                 ) -> dict[str, Any]:
    """The run a partial file holds (``{"task", "settings", "predictions"}``, see :func:`read_resume`): its header
    ``head`` (it has :data:`PARTIAL_HEADER`) checked and its rows read from ``lines``, the lines after it."""
    if head[PARTIAL_HEADER] != 1 or not isinstance(head.get("task"), str) or not isinstance(head.get("settings"), dict):
        raise EvalDataError(f"{path}:1: not the header of a qwenvl eval partial file of format 1 (it needs "
                            f"{PARTIAL_HEADER!r}: 1, 'task' and 'settings')")
    key = _ANSWER_KEY.get(head["task"], "answer")
    rows = []
    for lineno, row in lines:
        if not isinstance(row.get(key), str) or not isinstance(row.get("error", ""), str):
            raise EvalDataError(f"{path}:{lineno}: not a row of a qwenvl eval partial file (it needs {key!r}, a "
                                "string)")
        rows.append(row)
    return {"task": head["task"], "settings": head["settings"], "predictions": rows}


def resumed_answers(resume: Any, task: str, records: Sequence[Any], generation: dict[str, Any]
                    ) -> tuple[list[str], dict[int, str]]:
    """The answers (and errors) of an earlier run ``resume`` (:func:`read_resume`: its output JSON, as
    :meth:`EvalResult.to_dict`, or its partial file's rows) to reuse: its predictions, in order, as far as they go,
    when they are for the samples ``records`` starts with, made with the same ``generation`` settings."""
    if not isinstance(resume, dict) or resume.get("task") != task or not isinstance(resume.get("predictions"), list) \
            or not isinstance(resume.get("settings"), dict):
        raise EvalDataError(f"the run to resume from is not the output of a {task} evaluation")
    for key, value in generation.items():
        if resume["settings"].get(key) != value:
            raise EvalDataError(f"the run to resume from used {key} {resume['settings'].get(key)!r}, this one "
                                f"{value!r}: its answers would not be this run's")
    answers: list[str] = []
    errors: dict[int, str] = {}
    for k, (old, r) in enumerate(zip(resume["predictions"], records)):
        new = _sample(r)
        if not isinstance(old, dict) or any(old.get(f) != v for f, v in new.items()) \
                or not isinstance(old.get(_ANSWER_KEY[task]), str):
            raise EvalDataError(f"prediction {k} of the run to resume from is not for sample {k} of this data "
                                f"({r.where}): resume with the same data")
        answers.append(old[_ANSWER_KEY[task]])
        if isinstance(old.get("error"), str):
            errors[k] = old["error"]
    return answers, errors


def _run(
    records: Sequence[Any], prompts: Sequence[str], generate_fn: GenerateFn, batch_size: int, progress: bool,
    desc: str, output: str | os.PathLike | None, settings: dict[str, Any] | None,
    score: Callable[[Sequence[Any], list[str], dict[int, str]], EvalResult], resume: Any = None,
    generation: dict[str, Any] | None = None, overwrite: bool = True,
) -> EvalResult:
    """Generate for every record and ``score`` the answers; written to ``output`` (when given) with ``settings``
    added, atomically (an existing file stays whole when the write fails). Without ``overwrite`` a file at
    ``output`` is never replaced: one there at the start is an :class:`~qwenvl.outputs.OutputDirError` (before any
    generation), one that appears during the run a FileExistsError that names it and says where the predictions
    are (``OUTPUT.partial``, kept).

    With an ``output``, each batch's answers go to ``OUTPUT.partial`` (``OUTPUT.partial-2``, ... when that exists:
    :class:`~qwenvl.outputs.PartialRows`) as the batch finishes, and the file is removed once ``output`` is
    written. It is JSON Lines: a header (:data:`PARTIAL_HEADER`, ``task``, the generation ``settings``,
    ``num_planned``), then one row per sample in order (its identity fields as in the output's predictions, the
    answer, ``error`` for a failed one), whole rows only. A run that stops early (Ctrl-C, or SIGTERM under
    ``qwenvl``; an ``output`` that cannot be written; a disk that fills up while it generates; any other error; a
    ``kill -9``) leaves the answers so far there and, unless killed, says in one log line where, how many and the
    score over them; the error goes on. ``resume``: an earlier run's partial file or output (a path, read with
    :func:`read_resume`, or what that returns), whose answers are kept, not generated again; they are the new
    partial file's first rows, so that it alone holds what a later resume needs. Given as a path, a partial file of
    ``output`` is removed once ``output`` is written (:func:`remove_resumed_partial`); the failed run keeps it."""
    resume_path = resume if isinstance(resume, (str, os.PathLike)) else None
    if not overwrite:  # a file there now is said before the run, not after it
        check_output_file(output, {}, overwrite=False, flag="overwrite=True")
    if resume_path is not None:
        resume = read_resume(resume_path)
    answers: list[str] = []
    errors: dict[int, str] = {}
    if resume is not None:
        answers, errors = resumed_answers(resume, desc, records, generation or {})
    kept = PartialRows(output) if output is not None else None

    def row(k: int) -> dict[str, Any]:  # sample k's row of a partial file
        return {**_sample(records[k]), _ANSWER_KEY[desc]: answers[k], **({"error": errors[k]} if k in errors else {})}

    def keep(idx: range) -> None:  # one append a sample (kept.rows counts them), the header with the first
        assert kept is not None
        for k in idx:
            rows: list[dict[str, Any]] = [row(k)]
            if kept.rows == 0:
                rows.insert(0, {PARTIAL_HEADER: 1, "task": desc, "settings": generation or {},
                                "num_planned": len(records)})
            kept.append("".join(jsonl_line(row) for row in rows))

    said = False  # the error says where the rows are
    try:
        if kept is not None and answers:
            keep(range(len(answers)))
        if resume is not None:
            logger.info("resuming: the answers to the first %d of %d samples are the earlier run's%s", len(answers),
                        len(records), f" (this run keeps them, with its own, in {kept.path})" if kept and kept.rows else "")
        _generate_all(prompts, generate_fn, batch_size, progress, desc, answers, errors,
                      keep if kept is not None else None)
        result = score(records, answers, errors)
        result.settings.update(settings or {})
        if output is not None:
            try:
                result.save(output, replace=overwrite)
            except FileExistsError as e:  # created by something else during the run: left as it is
                if kept is None or e.filename is None or Path(e.filename) != Path(output):
                    raise
                kept.close()
                said = bool(kept.rows)
                where = f"; {_kept_text(str(kept.path), kept.rows, records, answers, errors, score)}" if said else ""
                raise FileExistsError(appeared_during_run(output) + where) from None
    except BaseException as e:  # Ctrl-C, a full disk, a crash: the rows are in the file, said in one line
        if kept is not None:
            kept.close()
            if kept.rows and not said:
                _say_kept(e, str(kept.path), kept.rows, records, answers, errors, score)
        raise
    if kept is not None:
        kept.discard()
    if resume_path is not None and output is not None:
        remove_resumed_partial(resume_path, output, desc, generation or {}, [row(k) for k in range(len(records))])
    return result


def remove_resumed_partial(path: str | os.PathLike, output: str | os.PathLike, task: str,
                           generation: dict[str, Any], rows: Sequence[dict[str, Any]]) -> bool:
    """After a resumed run wrote ``output``: remove ``path``, the file it resumed from, when that is one of our
    partial files of ``output`` (``OUTPUT.partial`` or ``OUTPUT.partial-N`` in its folder, a regular file whose
    first line is the :data:`PARTIAL_HEADER` of ``task`` run with the ``generation`` settings) and each of its rows
    is the row, in ``rows``, that ``output`` holds for the same sample (it is read again now: what it holds, not
    what it held when the run began). Anything else stays: a complete output, a file of another name or folder,
    one with rows ``output`` does not hold (a ``--limit`` below them). Returns whether it was removed."""
    src, out = Path(path), Path(output)
    if re.fullmatch(re.escape(out.name) + r"\.partial(-[0-9]+)?", src.name) is None:
        return False
    try:
        if not stat.S_ISREG(src.lstat().st_mode) or not src.parent.samefile(out.parent):
            return False
        lines = iter_jsonl(src, EvalDataError)  # one read: its header, then (only if it is ours) its rows
        _, head = next(lines)  # a complete output (JSON) fails here, on its "{": never read as a partial file
        if PARTIAL_HEADER not in head:
            return False
        earlier = _partial_run(src, head, lines)
    except (OSError, ValueError, StopIteration):  # gone, unreadable, empty, not JSON lines (EvalDataError is a
        return False  # ValueError): not ours to touch
    done = earlier["predictions"]
    if earlier["task"] != task or earlier["settings"] != generation or len(done) > len(rows) \
            or any(old != new for old, new in zip(done, rows)):
        logger.info("kept %s: it holds rows that %s does not", src, out)
        return False
    try:
        src.unlink()
    except OSError as e:  # the run succeeded: only its leftover stays
        logger.warning("could not remove %s (its rows are in %s): %s", src, out, e)
        return False
    logger.info("removed %s, resumed from: its %d rows are in %s", src, len(done), out)
    return True


def _say_kept(e: BaseException, path: str, done: int, records: Sequence[Any], answers: list[str],
              errors: dict[int, str], score: Callable[[Sequence[Any], list[str], dict[int, str]], EvalResult]) -> None:
    """Log where the rows of a run that ``e`` stopped are (``done`` of them), with the score over those."""
    why = "interrupted" if isinstance(e, KeyboardInterrupt) else error_line(e)
    logger.warning("%s: %s", why, _kept_text(path, done, records, answers, errors, score))


def _kept_text(path: str, done: int, records: Sequence[Any], answers: list[str], errors: dict[int, str],
               score: Callable[[Sequence[Any], list[str], dict[int, str]], EvalResult]) -> str:
    """Where the rows of a run that stopped are (``done`` of them, in ``path``), with the score over those."""
    which = f"all {done}" if done == len(records) else f"the first {done} of {len(records)}"
    try:
        partial = score(records[:done], answers[:done], {k: v for k, v in errors.items() if k < done})
        scored = f"; {partial.metric} over those {done}: {partial.score:.4f}"
    except (Exception, KeyboardInterrupt):  # noqa: BLE001 - the score is a bonus: the line and the error go on
        scored = ""
    return f"the predictions for {which} samples are in {path} (JSON Lines, to resume from{scored})"


# ---------------------------------------------------------------------------------------------------------
# Reading datasets
# ---------------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; errors name the file and the line."""
    return iter_jsonl(path, EvalDataError, what="evaluation data")


def _require(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise EvalDataError(f"{where}: missing key {key!r} (has: {', '.join(sorted(obj)) or 'nothing'})")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = "number" if kind == (int, float) else kind.__name__ if isinstance(kind, type) else \
            " or ".join(k.__name__ for k in kind)
        raise EvalDataError(f"{where}: {key!r} must be a {names}, got {value!r}")
    return value


def media_policy(image_dir: str | os.PathLike | None, allow_any_local_path: bool) -> MediaPolicy:
    """Which image files the data may name: those under ``image_dir`` (default: the working directory)."""
    return MediaPolicy(image_dir if image_dir is not None else ".", allow_any_local_path)


def _image_path(image: str, policy: MediaPolicy, where: str, known: dict[str, Path] | None = None) -> Path:
    """The file ``image`` names, checked; ``known`` (image -> file) keeps the answers of one file's earlier lines:
    a benchmark names each image in several samples, and resolving a path takes a few syscalls."""
    if known is not None and image in known:
        return known[image]
    try:
        path = policy.resolve(image)
    except ImageError as e:
        raise EvalDataError(f"{where}: {e}") from None
    if not path.is_file():  # a folder, a FIFO: there, but no image file (said as the processor says it)
        raise (FileNotFoundError(f"{where}: image not found: {path}") if not path.exists() else
               EvalDataError(f"{where}: image path is not a file: {path}"))
    if known is not None:
        known[image] = path
    return path


def _check_prompt_image(image: str, where: str) -> None:
    # The path travels inside <img>...</img>: it must fit the 256-byte span and hold no tags.
    if len(image.encode("utf-8")) > 256:
        raise EvalDataError(f"{where}: image path is longer than the 256 bytes that fit in <img>...</img>")
    if "<" in image and ">" in image:
        raise EvalDataError(f"{where}: image path {image!r} looks like it holds a tag")


# The processor reads the text between <img> and </img> as an image path. A record's image is its 'image' only: in
# its text (a question, a referring expression) they would make it read a file the record does not name (any local
# file with allow_any_local_path, whose "cannot decode image" error tells that it exists; one in image_dir without).
_IMAGE_SPAN = "<img>{image}</img>"  # the one place a prompt template may hold them


def _check_text(text: str, key: str, where: str) -> None:
    """Refuse ``text``, the field ``key`` of the record at ``where``, when it holds an image tag."""
    tag = first_image_tag(text)
    if tag is not None:
        raise EvalDataError(f"{where}: {key!r} holds {tag}: <img> tags in the data's text are not allowed; a record's "
                            "image is its 'image'")


def _finite_number(v: Any) -> bool:
    """A JSON number that is a finite float (not a bool; an integer too large for a float is not)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond float range
        return False


def _optional_id(obj: dict[str, Any], key: str, where: str) -> Any:
    """``obj[key]`` when it is a number or a string; None when absent or null; anything else is an error."""
    value = obj.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, str))):
        raise EvalDataError(f"{where}: {key!r} must be a number or a string, got {_short(value)}")
    return value


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# How far (pixels) a target box may overhang its image: COCO's boxes, traced on polygons, can overshoot by a
# fraction of a pixel. Beyond that the box is not pixels of this image (the model's [0, 1000) grid, say).
_BOX_SLACK = 1.0


@dataclass
class GroundingRecord:
    image: str
    sent: str
    bbox: tuple[float, float, float, float]  # pixels, x1 y1 x2 y2
    width: float
    height: float
    where: str = ""


def _read_size(path: Path, where: str) -> tuple[int, int]:
    """(width, height) from the file's header: no decoding, and no trust in what it claims."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_image(path) as im:
                w, h = im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # ImageError: PostScript
        raise EvalDataError(f"{where}: cannot read the size of {path}: {e}") from None
    if w * h > MAX_IMAGE_PIXELS:
        raise EvalDataError(f"{where}: image {path} is {w}x{h} = {w * h} pixels, more than the limit of "
                            f"{MAX_IMAGE_PIXELS} (a decompression bomb?)")
    return w, h


def load_grounding_data(
    path: str | os.PathLike, image_dir: str | os.PathLike | None = None, bbox_format: str = "xyxy",
    *, allow_any_local_path: bool = False,
) -> list[GroundingRecord]:
    """Read a grounding JSONL file (see the module docstring); every image must exist under the media policy."""
    if bbox_format not in ("xyxy", "xywh"):
        raise ValueError(f"bbox_format must be 'xyxy' or 'xywh', got {bbox_format!r}")
    policy = media_policy(image_dir, allow_any_local_path)
    path = Path(path)
    records = []
    known: dict[str, Path] = {}
    sizes: dict[Path, tuple[int, int] | None] = {}  # (width, height) of each file; None: unreadable (to a row that
    # gives its size, which does not need it; a row that does reads it again, and says why it cannot)
    mismatched: list[tuple[str, float, float, str, int, int]] = []  # (where, given w, h, image, actual w, h)
    for lineno, obj in _read_jsonl(path):
        where = f"{path}:{lineno}"
        image = _require(obj, "image", str, where)
        sent = _require(obj, "sent", str, where)
        _check_text(sent, "sent", where)
        box = _require(obj, "bbox", list, where)
        if len(box) != 4 or not all(_finite_number(v) for v in box):
            raise EvalDataError(f"{where}: 'bbox' must be 4 finite numbers, got {_short(box)}")
        x1, y1, a, b = (float(v) for v in box)
        bbox = (x1, y1, x1 + a, y1 + b) if bbox_format == "xywh" else (x1, y1, a, b)
        if not (bbox[2] > bbox[0] and bbox[3] > bbox[1]):  # no IoU with it can reach the threshold
            hint = "width and height must be positive" if bbox_format == "xywh" else \
                "x2 > x1 and y2 > y1 are needed (COCO's [x, y, w, h]? use bbox_format xywh / --bbox_format xywh)"
            raise EvalDataError(f"{where}: 'bbox' {_short(box)} is an empty or reversed box: {hint}")
        _check_prompt_image(image, where)
        file = _image_path(image, policy, where, known)
        if "width" in obj or "height" in obj:
            width_, height_ = _require(obj, "width", (int, float), where), _require(obj, "height", (int, float), where)
            if not (_finite_number(width_) and _finite_number(height_) and width_ > 0 and height_ > 0):
                raise EvalDataError(f"{where}: width and height must be positive finite numbers, got "
                                    f"{_short(width_)}x{_short(height_)}")
            width, height = float(width_), float(height_)
            if file not in sizes:  # to warn of a size that is not the image's (an image whose header cannot be
                try:  # read is left to the model to refuse: an error of that sample, as when the size is omitted)
                    sizes[file] = _read_size(file, where)
                except EvalDataError:
                    sizes[file] = None
            actual = sizes[file]
            if actual is not None and (float(actual[0]), float(actual[1])) != (width, height):
                mismatched.append((where, width, height, image, *actual))
        else:
            size = sizes.get(file)
            if size is None:  # not read yet, or unreadable for a row that gave its size: this one needs it
                size = sizes[file] = _read_size(file, where)
            w, h = size
            if not (w > 0 and h > 0):
                raise EvalDataError(f"{where}: width and height must be positive finite numbers, got {w}x{h}")
            width, height = float(w), float(h)
        if min(bbox) < -_BOX_SLACK or bbox[2] > width + _BOX_SLACK or bbox[3] > height + _BOX_SLACK:
            hint = "x + w and y + h must stay in it" if bbox_format == "xywh" else \
                "it must be pixels of the original image ([x1, y1, x2, y2]), not the model's [0, 1000) grid"
            raise EvalDataError(f"{where}: 'bbox' {_short(box)} lies outside the {width:g}x{height:g} image: {hint}")
        records.append(GroundingRecord(image, sent, bbox, width, height, where))
    if not records:
        raise EvalDataError(f"{path}: no samples")
    if mismatched:
        where, width, height, image, w, h = mismatched[0]
        logger.warning("%s: %d of %d rows give a width x height that is not their image's size (the first, %s, gives "
                       "%gx%g for %s, which is %dx%d): their boxes are scaled by the given size, as the official "
                       "evaluation does", path, len(mismatched), len(records), where, width, height, image, w, h)
    return records


@dataclass
class VQARecord:
    image: str
    question: str
    answers: list[str]
    question_id: Any = None
    where: str = ""


def _answers(obj: dict[str, Any], where: str) -> list[str]:
    if "answers" in obj:
        raw = obj["answers"]
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise EvalDataError(f"{where}: 'answers' must be a non-empty list, got {raw!r}")
        out = []
        for a in raw:
            a = a.get("answer") if isinstance(a, dict) else a
            if not isinstance(a, str):
                raise EvalDataError(f"{where}: every answer must be a string (or {{'answer': str}}), got {a!r}")
            out.append(a)
    elif "answer" in obj:
        out = [_require(obj, "answer", str, where)]
    else:
        raise EvalDataError(f"{where}: missing key 'answers' (or 'answer')")
    if not any(a.strip() for a in out):  # a blank answer would "match" every empty prediction
        raise EvalDataError(f"{where}: every reference answer is blank")
    return out


def load_vqa_data(
    path: str | os.PathLike, image_dir: str | os.PathLike | None = None, *, allow_any_local_path: bool = False
) -> list[VQARecord]:
    """Read a VQA JSONL file (see the module docstring); every image must exist under the media policy."""
    policy = media_policy(image_dir, allow_any_local_path)
    path = Path(path)
    records = []
    seen: dict[Any, str] = {}
    known: dict[str, Path] = {}
    for lineno, obj in _read_jsonl(path):
        where = f"{path}:{lineno}"
        image = _require(obj, "image", str, where)
        question = _require(obj, "question", str, where)
        _check_text(question, "question", where)
        question_id = _optional_id(obj, "question_id", where)
        if question_id is not None:
            first = seen.setdefault(question_id, where)
            if first != where:  # a file concatenated with itself, say: the question would count twice
                raise EvalDataError(f"{where}: question_id {question_id!r} is also the question_id of {first}: "
                                    "ids must be unique")
        answers = _answers(obj, where)
        _check_prompt_image(image, where)
        _image_path(image, policy, where, known)
        records.append(VQARecord(image, question, answers, question_id, where))
    if not records:
        raise EvalDataError(f"{path}: no samples")
    return records


@dataclass
class CaptionRecord:
    image: str
    captions: list[str]
    id: Any = None
    where: str = ""


def _coco_captions(path: Path) -> list[tuple[str, dict[str, Any]]] | None:
    """The entries of a COCO-style caption file, or None when the ``.json`` file is JSON Lines (the JSONL format,
    which grounding and VQA data of any name are read in): a first line that is a JSON value of its own with more
    after it, or a single caption record."""
    try:
        data = read_json(path, EvalDataError)
    except EvalDataError as e:
        cause = e.__cause__
        if isinstance(cause, json.JSONDecodeError) and cause.msg == "Extra data" \
                and "\n" not in cause.doc[: cause.pos].strip():
            return None
        raise
    if isinstance(data, dict) and "captions" in data and "images" not in data and "annotations" not in data:
        return None
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise EvalDataError(f"{path}: a .json caption file must hold 'images' and 'annotations' (COCO style)")
    if not isinstance(data["images"], list) or not isinstance(data["annotations"], list):
        raise EvalDataError(f"{path}: 'images' and 'annotations' must be lists (COCO style)")
    refs: dict[Any, list[str]] = {}
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise EvalDataError(f"{path}: annotations[{k}] needs 'image_id' and a string 'caption'")
        if not isinstance(ann["image_id"], (int, float, str)):
            raise EvalDataError(f"{path}: annotations[{k}]: 'image_id' must be a number or a string")
        refs.setdefault(ann["image_id"], []).append(ann["caption"])
    out = []
    for k, img in enumerate(data["images"]):
        where = f"{path}: images[{k}]"
        if not isinstance(img, dict) or "id" not in img:
            raise EvalDataError(f"{where}: needs 'id' and 'image' (or 'file_name')")
        if not isinstance(img["id"], (int, float, str)):
            raise EvalDataError(f"{where}: 'id' must be a number or a string")
        image = img.get("image", img.get("file_name"))
        if image is None:  # said as "'image' must be a str" by the row check, a name the COCO file does not use
            raise EvalDataError(f"{where}: needs 'image' or 'file_name' (the image's path)")
        out.append((where, {"id": img["id"], "image": image, "captions": refs.get(img["id"], [])}))
    ids = {img["id"] for img in data["images"]}
    unmatched = [i for i in refs if i not in ids]
    if unmatched:  # a subset of the images (the Karpathy test split of val2014's captions), or ids of another type
        logger.warning("%s: %d image_id(s) of 'annotations' name no entry of 'images' (the first: %r): their captions "
                       "are not used", path, len(unmatched), unmatched[0])
    return out


def load_caption_data(
    path: str | os.PathLike, image_dir: str | os.PathLike | None = None, *, allow_any_local_path: bool = False
) -> list[CaptionRecord]:
    """Read captioning data: JSONL, or COCO-style JSON (see the module docstring); every image must exist
    under the media policy."""
    policy = media_policy(image_dir, allow_any_local_path)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data not found: {shown_path(path)}")
    entries = _coco_captions(path) if path.suffix == ".json" else None
    if entries is None:
        entries = [(f"{path}:{n}", o) for n, o in _read_jsonl(path)]
    records: list[CaptionRecord] = []
    known: dict[str, Path] = {}
    for where, obj in entries:
        image = _require(obj, "image", str, where)
        captions = _require(obj, "captions", list, where)
        if not captions or not all(isinstance(c, str) for c in captions):
            raise EvalDataError(f"{where}: 'captions' must be a non-empty list of strings")
        blank = next((k for k, c in enumerate(captions) if not c.strip()), None)
        if blank is not None:  # it would add 0 to the mean over the references: a lower CIDEr for nothing
            raise EvalDataError(f"{where}: captions[{blank}] is blank")
        cid = _optional_id(obj, "id", where)
        _check_prompt_image(image, where)
        _image_path(image, policy, where, known)
        records.append(CaptionRecord(image, captions, cid, where))
    if not records:
        raise EvalDataError(f"{path}: no samples")
    seen: dict[str, str] = {}  # id (as CIDEr keys it) -> where
    for r in records:
        if r.id is not None and seen.setdefault(str(r.id), r.where) != r.where:
            raise EvalDataError(f"{r.where}: caption id {r.id!r} is also the id of {seen[str(r.id)]}: ids must be "
                                "unique")
    spare = (n for n in itertools.count(len(records)) if str(n) not in seen)  # no index: never an implicit id
    for k, r in enumerate(records):
        if r.id is None:  # its index, unless another record has that id (a file numbering its ids from 1)
            r.id = k if str(k) not in seen else next(spare)
    return records


# ---------------------------------------------------------------------------------------------------------
# Runners
# ---------------------------------------------------------------------------------------------------------


def _resolve_generate(
    generate_fn: GenerateFn | None,
    model: QwenVL | None,
    processor: Processor | None,
    image_dir: str | os.PathLike | None,
    allow_any_local_path: bool,
    **kw: Any,
) -> GenerateFn:
    if generate_fn is not None:
        return generate_fn
    if model is None:
        raise ValueError("pass a model (and optionally a processor) or a generate_fn")
    if processor is None:
        from ..processor import Processor

        processor = Processor(image_size=model.config.visual.image_size, chat_format="raw",
                              allow_any_local_path=allow_any_local_path)
    return model_generate_fn(model, processor, base_dir=image_dir, **kw)


def _mark_error(entry: dict[str, Any], errors: dict[int, str], k: int) -> dict[str, Any]:
    """Add the ``error`` of sample ``k``, if it failed, to its prediction entry."""
    if k in errors:
        entry["error"] = errors[k]
    return entry


def fill_prompt(template: str, **fields: str) -> str:
    """``template`` with ``fields`` filled in; a template that cannot be filled is a ValueError saying which fields
    it may use."""
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"prompt template {template!r} cannot be filled ({e!r}); it may use {', '.join('{' + k + '}' for k in fields)}"
        ) from e


# Each task's template fields -> the record attribute that fills them.
PROMPT_FIELDS = {"grounding": {"image": "image", "expression": "sent"}, "vqa": {"image": "image", "question": "question"},
                 "caption": {"image": "image"}}


def check_prompt_template(template: str, what: str = "prompt template") -> None:
    """Refuse a template (``what``: how to name it) with an image tag anywhere but in ``<img>{image}</img>``: the
    text of an ``<img>`` span is read as an image path, and only the record's image may be one."""
    tag = first_image_tag(template.replace(_IMAGE_SPAN, ""))
    if tag is not None:
        raise ValueError(f"{what} {template!r}: {tag} outside {_IMAGE_SPAN}; an <img> span of the prompt may hold only "
                         "{image}, the record's image (other text there would be read as an image path)")


def build_prompts(task: str, template: str, records: Sequence[Any]) -> list[str]:
    """The prompt of each record of ``task``: ``template`` filled with its fields (:data:`PROMPT_FIELDS`).

    Raises ValueError for a template that :func:`check_prompt_template` refuses or that cannot be filled, and
    :class:`EvalDataError` naming the record for a prompt holding an image tag that is not one of the template's
    ``<img>{image}</img>`` (a record in memory whose text holds one, or text that completes one of the template's)."""
    check_prompt_template(template)
    spans = template.count(_IMAGE_SPAN)
    prompts = []
    for k, r in enumerate(records):
        values = {name: getattr(r, attr) for name, attr in PROMPT_FIELDS[task].items()}
        prompt = fill_prompt(template, **values)
        if prompt.count(IMAGE_TAGS[0]) != spans or prompt.count(IMAGE_TAGS[1]) != spans:  # filling only adds
            where = r.where or f"sample {k}"
            for name, attr in PROMPT_FIELDS[task].items():
                _check_text(values[name], attr, where)
            raise EvalDataError(f"{where}: the prompt template and this record's text together hold an image tag "
                                "(<img> or </img>), which the data's text may not")
        prompts.append(prompt)
    return prompts


def evaluate_grounding(
    data: str | os.PathLike | Sequence[GroundingRecord],
    *,
    model: QwenVL | None = None,
    processor: Processor | None = None,
    generate_fn: GenerateFn | None = None,
    image_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    prompt: str = GROUNDING_PROMPT,
    max_new_tokens: int = 28,
    min_new_tokens: int = 10,
    chat_format: str = "raw",
    bbox_format: str = "xyxy",
    threshold: float = 0.5,
    output: str | os.PathLike | None = None,
    progress: bool = True,
    allow_any_local_path: bool = False,
    compile: bool = False,
    settings: dict[str, Any] | None = None,
    resume: dict[str, Any] | str | os.PathLike | None = None,
    overwrite: bool = True,
) -> EvalResult:
    """Acc@``threshold`` of referring-expression grounding with the official Qwen-VL protocol.

    ``data`` is a JSONL path or records from :func:`load_grounding_data`. ``prompt`` may use ``{image}``
    and ``{expression}``; when it ends in ``<box>`` the continuation is read as the inside of that box.
    Predicted boxes (normalized to [0, 1000)) are mapped to pixels with ``x / 999 * W``. ``settings``: entries
    added to the result's (and the output's) ``settings``, in each runner. ``resume``, in each runner: a run on the
    same data with the same generation settings that stopped early, its ``OUTPUT.partial`` (JSON Lines, written
    as the batches finish) or an output JSON (a path, or what :func:`read_resume` returns): its answers are kept
    and only the samples after them are generated. ``overwrite=False``, in each runner: a file at ``output``,
    there at the start or appearing during the run, is never replaced (an error, the predictions kept in
    ``OUTPUT.partial``).
    """
    check_threshold(threshold)
    records = data if not isinstance(data, (str, os.PathLike)) else load_grounding_data(
        data, image_dir, bbox_format, allow_any_local_path=allow_any_local_path)
    run = _resolve_generate(generate_fn, model, processor, image_dir, allow_any_local_path, max_new_tokens=max_new_tokens,
                            min_new_tokens=min_new_tokens, chat_format=chat_format, skip_special_tokens=False,
                            compile=compile)
    prompts = build_prompts("grounding", prompt, records)
    opens_box = prompt.rstrip().endswith("<box>")

    generation = generation_settings(prompt, max_new_tokens, min_new_tokens, chat_format)

    def score(records: Sequence[GroundingRecord], answers: list[str], errors: dict[int, str]) -> EvalResult:
        return _score_grounding(records, answers, errors, opens_box, threshold,
                                settings={**generation, "iou_threshold": threshold, "scale": 999})

    result = _run(records, prompts, run, batch_size, progress, "grounding", output, settings, score, resume,
                  generation, overwrite)
    logger.info("grounding: Acc@%.1f = %.4f (%d/%d correct, %d without a box)", threshold, result.score,
                result.details["num_correct"], result.num_samples, result.details["num_unparseable"])
    return result


def _score_grounding(records: Sequence[GroundingRecord], answers: list[str], errors: dict[int, str],
                     opens_box: bool, threshold: float, settings: dict[str, Any]) -> EvalResult:
    predictions, correct, unparsed = [], 0, 0
    for k, (r, answer) in enumerate(zip(records, answers)):
        box = None if k in errors else first_box("<box>" + answer if opens_box else answer)
        entry: dict[str, Any] = {"image": r.image, "sent": r.sent, "bbox": list(r.bbox), "answer": answer}
        _mark_error(entry, errors, k)
        if box is None:
            unparsed += 1
            entry.update(pred_box_norm=None, pred_bbox=None, iou=0.0, correct=False)
        else:
            px = denormalize_box(box, r.width, r.height)
            overlap = grounding_iou(px, r.bbox)  # reversed corners: a miss, as in the official eval
            ok = overlap >= threshold
            correct += ok
            entry.update(pred_box_norm=list(box.as_tuple()), pred_bbox=[round(v, 2) for v in px.as_tuple()],
                         iou=round(overlap, 4), correct=ok)
        predictions.append(entry)
    n = len(records)
    return EvalResult(
        task="grounding", metric="accuracy", score=correct / n, num_samples=n, predictions=predictions,
        settings=settings, details={"num_correct": correct, "num_unparseable": unparsed, "num_errors": len(errors)},
    )


VQA_METRICS = ("auto", "vqa", "exact_match", "relaxed")


def check_threshold(threshold: float, name: str = "threshold") -> None:
    """An IoU threshold must be in (0, 1]: at 0 any box counts, above 1 none, NaN compares False."""
    if not 0 < threshold <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {threshold}")


def resolve_vqa_metric(records: Sequence[VQARecord], metric: str) -> str:
    """The metric ``metric`` means for ``records`` (``auto``: ``vqa`` when every question has several reference
    answers, else ``exact_match``); ``vqa`` for a question with one reference is an error (it would score 0)."""
    if metric not in VQA_METRICS:
        raise ValueError(f"metric must be one of {', '.join(VQA_METRICS)}, got {metric!r}")
    if metric == "auto":
        return "vqa" if all(len(r.answers) > 1 for r in records) else "exact_match"
    if metric == "vqa":
        single = next((k for k, r in enumerate(records) if len(r.answers) < 2), None)
        if single is not None:
            raise EvalDataError(f"{records[single].where or f'question {single}'}: this question has one reference answer, and its VQAv2 accuracy is "
                                "always 0 (leaving out its only annotator leaves nothing to match): use "
                                "--metric exact_match (or auto)")
    return metric


def _vqa_sample_score(metric: str, answer: str, refs: Sequence[str]) -> float:
    if metric == "vqa":
        return vqa_accuracy(answer, refs)
    if metric == "exact_match":
        return exact_match(answer, refs)
    return float(max(relaxed_correctness(answer, t) for t in refs))


def evaluate_vqa(
    data: str | os.PathLike | Sequence[VQARecord],
    *,
    model: QwenVL | None = None,
    processor: Processor | None = None,
    generate_fn: GenerateFn | None = None,
    image_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    prompt: str = VQA_PROMPT,
    max_new_tokens: int = 10,
    min_new_tokens: int = 1,
    chat_format: str = "raw",
    metric: str = "auto",
    output: str | os.PathLike | None = None,
    progress: bool = True,
    allow_any_local_path: bool = False,
    compile: bool = False,
    settings: dict[str, Any] | None = None,
    resume: dict[str, Any] | str | os.PathLike | None = None,
    overwrite: bool = True,
) -> EvalResult:
    """VQA accuracy (0..1) with the official prompt; ``prompt`` may use ``{image}`` and ``{question}``.

    ``metric``: ``vqa`` (VQAv2 accuracy, for 10-annotator answers; a question with one reference is an error),
    ``exact_match`` (GQA/AI2D style),
    ``relaxed`` (ChartQA), or ``auto``: ``vqa`` when every sample has several reference answers, else
    ``exact_match`` (the VQAv2 formula scores 0 against a single reference: leaving out its only annotator
    leaves nothing to match).
    """
    if metric not in VQA_METRICS:
        raise ValueError(f"metric must be one of {', '.join(VQA_METRICS)}, got {metric!r}")
    records = data if not isinstance(data, (str, os.PathLike)) else load_vqa_data(
        data, image_dir, allow_any_local_path=allow_any_local_path)
    metric = resolve_vqa_metric(records, metric)
    run = _resolve_generate(generate_fn, model, processor, image_dir, allow_any_local_path, max_new_tokens=max_new_tokens,
                            min_new_tokens=min_new_tokens, chat_format=chat_format, skip_special_tokens=True,
                            compile=compile)
    prompts = build_prompts("vqa", prompt, records)

    generation = generation_settings(prompt, max_new_tokens, min_new_tokens, chat_format)

    def score(records: Sequence[VQARecord], answers: list[str], errors: dict[int, str]) -> EvalResult:
        predictions, total = [], 0.0
        for k, (r, answer) in enumerate(zip(records, answers)):
            answer = answer.strip()
            value = 0.0 if k in errors else _vqa_sample_score(metric, answer, r.answers)
            total += value
            predictions.append(_mark_error({"question_id": r.question_id, "image": r.image, "question": r.question,
                                            "answer": answer, "references": r.answers, "score": value}, errors, k))
        n = len(records)
        return EvalResult(
            task="vqa", metric="accuracy", score=total / n, num_samples=n, predictions=predictions,
            settings={**generation, "vqa_metric": metric},
            details={"num_errors": len(errors)},
        )  # fmt: skip

    result = _run(records, prompts, run, batch_size, progress, "vqa", output, settings, score, resume, generation,
                  overwrite)
    logger.info("vqa (%s): accuracy = %.4f over %d questions", metric, result.score, result.num_samples)
    return result


def evaluate_caption(
    data: str | os.PathLike | Sequence[CaptionRecord],
    *,
    model: QwenVL | None = None,
    processor: Processor | None = None,
    generate_fn: GenerateFn | None = None,
    image_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    prompt: str = CAPTION_PROMPT,
    max_new_tokens: int = 30,
    min_new_tokens: int = 8,
    chat_format: str = "raw",
    output: str | os.PathLike | None = None,
    progress: bool = True,
    allow_any_local_path: bool = False,
    compile: bool = False,
    settings: dict[str, Any] | None = None,
    resume: dict[str, Any] | str | os.PathLike | None = None,
    overwrite: bool = True,
) -> EvalResult:
    """Corpus CIDEr(-D) of greedy captions with the official prompt (``prompt`` may use ``{image}``)."""
    records = data if not isinstance(data, (str, os.PathLike)) else load_caption_data(
        data, image_dir, allow_any_local_path=allow_any_local_path)
    run = _resolve_generate(generate_fn, model, processor, image_dir, allow_any_local_path, max_new_tokens=max_new_tokens,
                            min_new_tokens=min_new_tokens, chat_format=chat_format, skip_special_tokens=True,
                            compile=compile)
    prompts = build_prompts("caption", prompt, records)

    generation = generation_settings(prompt, max_new_tokens, min_new_tokens, chat_format)

    def score(records: Sequence[CaptionRecord], raw: list[str], errors: dict[int, str]) -> EvalResult:
        captions = [c.strip() for c in raw]
        keys = [str(r.id) for r in records]
        value, per_image = cider(dict(zip(keys, captions)), {k: r.captions for k, r in zip(keys, records)})
        predictions = [_mark_error({"id": r.id, "image": r.image, "caption": c, "references": r.captions,
                                    "cider": per_image[k]}, errors, i)
                       for i, (r, c, k) in enumerate(zip(records, captions, keys))]
        return EvalResult(
            task="caption", metric="cider", score=value, num_samples=len(records), predictions=predictions,
            settings=dict(generation), details={"num_errors": len(errors)},
        )  # fmt: skip

    result = _run(records, prompts, run, batch_size, progress, "caption", output, settings, score, resume,
                  generation, overwrite)
    logger.info("caption: CIDEr = %.4f over %d images", result.score, result.num_samples)
    return result


