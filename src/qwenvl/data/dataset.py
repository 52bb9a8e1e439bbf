"""Fine-tuning data: conversation records -> tokenized samples (ids, labels, images) -> padded batches.

The file is the stage-3 format (DESIGN.md section 1, "Fine-tuning")::

    [{"id": "...", "conversations": [{"from": "user", "value": "Picture 1: <img>a/b.jpg</img>\\nWhat is it?"},
                                     {"from": "assistant", "value": "A cat."}]}, ...]

(a ``.jsonl`` file with one record per line works too). Image paths are read under the processor's media
policy with ``dataset_dir`` as the media folder (:class:`qwenvl.images.MediaPolicy`: relative paths resolve
there and, unless the processor has ``allow_any_local_path=True``, nothing outside it is read).

Every record is checked and tokenized when the dataset is built, and every image it names is decoded once
(a truncated or corrupt file is a bad record now, not a crash hours into training), so a bad file fails
before training starts, with messages that name the file position or the record (index and id). Pixels
are loaded per sample in ``__getitem__``.

Truncation to ``max_length`` never cuts through an ``<img>...</img>`` span: when the cut falls inside one,
the sample is cut just before its ``<img>`` and that image is dropped. A sample cut before its first
assistant answer (nothing left to learn but the ChatML frame) is a bad record, and so is one whose every answer
is empty, whose text holds a ChatML marker (``<|im_end|>``, ``<|endoftext|>``: the tokenizer reads them as the
special tokens), or that is still in LLaVA's format (roles ``human``/``gpt``, an ``<image>`` tag, an ``image`` key
and no ``<img>``: ``qwenvl data-convert`` converts it).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import ENDOFTEXT_ID, IM_END_ID, IM_START_ID
from ..fileio import read_json_records
from ..images import image_problems
from ..tokenizer import IMAGE_SPECIAL_TOKENS, SPECIAL_TOKENS, image_spans
from .convert import LLAVA_IMAGE_TOKEN, MalformedRecord

__all__ = ["BadRecord", "ConversationDataset", "DatasetError", "TruncationStats", "answer_labels", "collate", "load_records"]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
MAX_LISTED = 10  # bad records named in one error message


class DatasetError(ValueError):
    """The data file or one of its records cannot be used; the message names the file position or record."""


# How to train on without the bad records, for Python and for the CLI (TrainConfig.skip_bad_samples).
_SKIP_HINT = "skip_bad=True, or --skip_bad_samples true when training,"

# A record that cannot be trained on: its index in the file, its ``id`` and why (the converter's type).
BadRecord = MalformedRecord

# The special tokens that text must not hold: the ChatML frame's and the unused extras (text may hold the Qwen-VL
# tags, IMAGE_SPECIAL_TOKENS, as the official chat template allows). The tokenizer reads them in any text as the
# tokens themselves (as the official one does): "<|im_end|>" in a turn ends it early and opens a frame of its own,
# which an answer would teach the model to write.
_FRAME_MARKERS = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS if t not in IMAGE_SPECIAL_TOKENS))
_CONVERT_HINT = "convert LLaVA data with qwenvl data-convert"


@dataclass
class TruncationStats:
    """What cutting samples to ``max_length`` removed."""

    samples: int = 0  # samples that were cut
    tokens: int = 0  # tokens removed in all
    images: int = 0  # images dropped with them
    labels: int = 0  # learnable labels removed

    def add(self, other: TruncationStats) -> None:
        self.samples += other.samples
        self.tokens += other.tokens
        self.images += other.images
        self.labels += other.labels

    def __str__(self) -> str:
        return (f"{self.samples} sample(s) truncated: {self.tokens} tokens, {self.labels} learnable labels "
                f"and {self.images} image(s) removed")


@dataclass
class _Encoded:
    id: Any
    input_ids: np.ndarray  # (T,) int32
    labels: np.ndarray  # (T,) int32, IGNORE_INDEX where not learned
    image_paths: list[str] = field(default_factory=list)


def load_records(data_path: str | os.PathLike[str]) -> list[Any]:
    """Read a JSON list (or JSON Lines) of records; errors name the file and the position."""
    return read_json_records(data_path, DatasetError, what="training data file")


def truncation_point(ids: Sequence[int] | np.ndarray, max_length: int) -> tuple[int, int]:
    """Where to cut ``ids`` to at most ``max_length`` tokens without splitting an image span.

    Returns ``(cut, images_kept)``: keep ``ids[:cut]`` and the first ``images_kept`` images.
    """
    spans = image_spans([int(i) for i in ids])  # the tokenizer's scan: next <img>, then its </img>
    cut = min(len(ids), max_length)
    for s, e in spans:
        if s < cut <= e:  # the cut falls inside this span: drop it whole
            cut = s
            break
    return cut, sum(1 for _s, e in spans if e < cut)


def answer_labels(ids: np.ndarray, labels: np.ndarray) -> int:
    """How many labels are assistant answer tokens rather than the ChatML frame.

    By the official rule system and user turns only learn ``<|im_start|>``, ``<|im_end|>`` and the ``\\n``
    after it; everything else that is learned is an answer.
    """
    after_end = np.zeros_like(ids, dtype=bool)
    after_end[1:] = ids[:-1] == IM_END_ID
    frame = (ids == IM_START_ID) | (ids == IM_END_ID) | after_end
    learned = labels != IGNORE_INDEX
    learned[0] = False  # the first position is never a target (labels are shifted)
    return int((learned & ~frame).sum())


def _marker_problem(text: str, where: str) -> str | None:
    """Why ``text`` (``where``: what it is) cannot go into a sample as it is, or None."""
    found = _FRAME_MARKERS.search(text)
    if found is None:
        return None
    return (f"{where} holds {found.group()!r}, which reads as the ChatML special token and breaks the conversation "
            "frame (text already formatted as ChatML?)")


def _record_id(record: Any) -> Any:
    return record.get("id") if isinstance(record, dict) else None


class ConversationDataset(Dataset):
    """Tokenized conversations with their images; ``dataset[i]`` -> one sample (see :meth:`__getitem__`).

    Args:
        data_path: the JSON / JSONL file, or the records themselves (a list of dicts).
        processor: a :class:`qwenvl.Processor` (``encode_conversation``, ``pixel_values_for``, ``media_policy``).
        dataset_dir: folder that relative image paths are resolved against (default: the data file's folder,
            or the working directory for in-memory records).
        max_length: longer samples are truncated (``truncate=True``) or rejected.
        max_images: a record with more images is rejected (None: no limit).
        skip_bad: drop bad records (listed in ``self.skipped`` and logged) instead of raising
            :class:`DatasetError` listing them.
        system_message: the ChatML system prompt of every sample.
    """

    def __init__(
        self,
        data_path: str | os.PathLike[str] | Sequence[dict[str, Any]],
        processor: Any,
        dataset_dir: str | os.PathLike[str] | None = None,
        max_length: int = 2048,
        max_images: int | None = None,
        skip_bad: bool = False,
        truncate: bool = True,
        system_message: str = "You are a helpful assistant.",
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if max_images is not None and max_images < 0:
            raise ValueError(f"max_images must be >= 0 or None, got {max_images}")
        problem = _marker_problem(system_message, "system_message")
        if problem:
            raise DatasetError(problem)
        if isinstance(data_path, (str, os.PathLike)):
            self.source = str(data_path)
            records = load_records(data_path)
            default_dir = Path(data_path).parent
        else:
            self.source = "<records>"
            records = list(data_path)
            default_dir = Path.cwd()
        self.processor = processor
        self.dataset_dir = Path(dataset_dir) if dataset_dir is not None else default_dir
        self.max_length = int(max_length)
        self.max_images = max_images
        self.truncate = truncate
        self.system_message = system_message
        self.truncation = TruncationStats()
        self.skipped: list[BadRecord] = []
        self.samples: list[_Encoded] = []
        self._policy = processor.media_policy(self.dataset_dir)
        self._checked: dict[str, str | None] = {}  # image path -> why it cannot be used (None: it decodes)
        # where relative image paths were looked for when the caller named no folder, once one of them is missing
        self._unnamed_dir = None if dataset_dir is not None else (
            "the working directory" if self.source == "<records>" else "the data file's folder")
        self._missing_in_unnamed_dir = False

        # tokenize every record, then decode every image once (threads: Pillow decodes without the GIL), then
        # check and truncate each record
        tokenized: list[tuple[int, Any, tuple[np.ndarray, np.ndarray, list[str]]]] = []
        for index, record in enumerate(records):
            try:
                tokenized.append((index, record, self._tokenize(record)))
            except ValueError as e:
                self.skipped.append(BadRecord(index, _record_id(record), str(e)))
        self._check_images(dict.fromkeys(p for _, _, (_, _, paths) in tokenized for p in paths))
        for index, record, (ids, labels, paths) in tokenized:
            try:
                self.samples.append(self._finish(record, ids, labels, paths))
            except ValueError as e:
                self.skipped.append(BadRecord(index, _record_id(record), str(e)))
        self.skipped.sort(key=lambda bad: bad.index)
        self._report(len(records), skip_bad)

    # ---- building --------------------------------------------------------------------------------------
    def _tokenize(self, record: Any) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``input_ids``, ``labels`` and image paths of one record; raise ValueError with the reason."""
        if not isinstance(record, dict):
            raise ValueError(f"expected an object, got {type(record).__name__}")
        turns = record.get("conversations")
        if not isinstance(turns, list):
            raise ValueError("'conversations' is missing or not a list")
        if not turns:
            raise ValueError("empty conversation (no turns)")
        for t, turn in enumerate(turns):  # what the encoder would take without a word (it checks the shapes)
            who, value = (turn.get("from"), turn.get("value")) if isinstance(turn, dict) else (None, None)
            if who in ("human", "gpt"):
                raise ValueError(f"turn {t} has the LLaVA role {who!r}: {_CONVERT_HINT}")
            if isinstance(value, str) and LLAVA_IMAGE_TOKEN in value:
                raise ValueError(f"turn {t} holds LLaVA's {LLAVA_IMAGE_TOKEN} tag, which is plain text here (a picture "
                                 f"is 'Picture 1: <img>PATH</img>' in the text): {_CONVERT_HINT}")
            problem = _marker_problem(value, f"turn {t}") if isinstance(value, str) else None
            if problem:
                raise ValueError(problem)
        enc = self.processor.encode_conversation(turns, system_message=self.system_message)
        ids = np.asarray(enc["input_ids"], dtype=np.int32)
        labels = np.asarray(enc["labels"], dtype=np.int32)
        if record.get("image") and not enc["image_paths"]:
            raise ValueError("its 'image' key is not read (pictures are 'Picture 1: <img>PATH</img>' in the text), so "
                             f"the picture would be lost: {_CONVERT_HINT}")
        if answer_labels(ids, labels) == 0:  # the model would learn to end its turn at once
            raise ValueError("no answer to learn: every assistant answer is empty")
        return ids, labels, list(enc["image_paths"])

    def _finish(self, record: dict[str, Any], ids: np.ndarray, labels: np.ndarray, paths: list[str]) -> _Encoded:
        """Check the images and the labels of a tokenized record and truncate it; raise ValueError with the reason."""
        if self.max_images is not None and len(paths) > self.max_images:
            raise ValueError(f"{len(paths)} images, more than max_images={self.max_images}")
        for p in paths:
            self._check_image(p)
        if len(ids) > self.max_length:
            if not self.truncate:
                raise ValueError(f"{len(ids)} tokens, more than max_length={self.max_length} (truncation is off)")
            cut, kept = truncation_point(ids, self.max_length)
            removed = TruncationStats(1, len(ids) - cut, len(paths) - kept,
                                      int((labels[max(cut, 1):] != IGNORE_INDEX).sum()))
            ids, labels, paths = ids[:cut], labels[:cut], paths[:kept]
        else:
            removed = TruncationStats()
        if removed.samples and answer_labels(ids, labels) == 0:  # also when the cut left no label at all
            raise ValueError(f"no learnable label within max_length={self.max_length} tokens "
                             "(the first assistant answer starts after the cut)")
        self.truncation.add(removed)
        return _Encoded(record.get("id"), ids, labels, paths)

    def _check_images(self, paths: Iterable[str]) -> None:
        """Decode every path not decoded yet, a few at a time, and remember which ones cannot be used."""
        found = image_problems([p for p in paths if p not in self._checked], policy=self._policy)
        for path, problem in found.items():
            relative = ":" not in path and not os.path.isabs(path)  # not a URL ("http://", "data:")
            if problem is not None and self._unnamed_dir and relative and not os.path.lexists(self.dataset_dir / path):
                self._missing_in_unnamed_dir = True
        self._checked.update(found)

    def _check_image(self, path: str) -> None:
        """Raise ValueError if ``path`` cannot be used (decoded once per dataset: a path shared by many records is
        checked once)."""
        if path not in self._checked:
            self._check_images([path])
        problem = self._checked[path]
        if problem is not None:
            raise ValueError(problem)

    def _report(self, total: int, skip_bad: bool) -> None:
        if total and len(self.skipped) == total and all(_CONVERT_HINT in b.reason for b in self.skipped):
            # a LLaVA file: one line, not one per record (or, skipping them, a warning each and "no usable sample")
            raise DatasetError(f"{self.source}: all {total} record(s) are LLaVA data, not Qwen-VL conversations "
                               f"(the first: {self.skipped[0]})")
        where = (f"relative image paths are read under dataset_dir {self.dataset_dir} ({self._unnamed_dir}): set "
                 "dataset_dir (--dataset_dir when training) to the folder that holds them; "
                 if self._missing_in_unnamed_dir else "")
        if len(self.skipped) == 1 and not skip_bad:  # one line for one problem
            raise DatasetError(f"{self.source}: 1 bad record(s) of {total} ({where}{_SKIP_HINT} drops it): "
                               f"{self.skipped[0]}")
        if self.skipped and not skip_bad:
            shown = [f"  - {b}" for b in self.skipped[:MAX_LISTED]]
            if len(self.skipped) > MAX_LISTED:
                shown.append(f"  ... and {len(self.skipped) - MAX_LISTED} more")
            raise DatasetError("\n".join([f"{self.source}: {len(self.skipped)} bad record(s) of {total} "
                                          f"({where}{_SKIP_HINT} drops them):", *shown]))
        for bad in self.skipped:
            logger.warning("%s: skipping %s", self.source, bad)
        if not self.samples:
            raise DatasetError(f"{self.source}: no usable sample ({total} record(s), {len(self.skipped)} bad"
                               + (f"; {where[:-2]}" if where else "") + ")")
        if self.truncation.samples:
            logger.warning("%s: %s (max_length=%d)", self.source, self.truncation, self.max_length)
        logger.info("%s: %d samples (%d skipped), %d tokens, %d images", self.source, len(self.samples),
                    len(self.skipped), sum(len(s.input_ids) for s in self.samples),
                    sum(len(s.image_paths) for s in self.samples))

    # ---- access ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def lengths(self) -> list[int]:
        return [len(s.input_ids) for s in self.samples]

    def __getitem__(self, i: int) -> dict[str, Any]:
        """``input_ids`` (T,) long, ``labels`` (T,) long, ``images`` (N, 3, S, S) float or None, ``id``."""
        s = self.samples[i]
        images = None
        if s.image_paths:
            try:
                images = self.processor.pixel_values_for(s.image_paths, self.dataset_dir)
            except ValueError as e:  # ImageError: unreadable / corrupt file
                raise DatasetError(f"{self.source}: sample {i} (id={s.id!r}): {e}") from e
        return {
            "input_ids": torch.from_numpy(s.input_ids.astype(np.int64)),
            "labels": torch.from_numpy(s.labels.astype(np.int64)),
            "images": images,
            "id": s.id,
        }


def collate(samples: Sequence[dict[str, Any]], pad_id: int = ENDOFTEXT_ID) -> dict[str, Any]:
    """Right-pad a list of samples to the longest one.

    Returns ``input_ids`` (B, T) long (pads = ``pad_id``), ``labels`` (B, T) long (pads = -100),
    ``attention_mask`` (B, T) long (1 = real token), ``images`` (N, 3, S, S) with the images of all samples
    in order (None when there are none) and ``ids``. Causal attention keeps real tokens from seeing the
    trailing pads, so a training forward may pass ``attention_mask=None``.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    width = max(int(s["input_ids"].numel()) for s in samples)
    b = len(samples)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = int(s["input_ids"].numel())
        input_ids[row, :n] = s["input_ids"]
        labels[row, :n] = s["labels"]
        attention_mask[row, :n] = 1
    images = [s["images"] for s in samples if s.get("images") is not None and len(s["images"])]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "images": torch.cat(images) if images else None,
        "ids": [s.get("id") for s in samples],
    }
