"""LLaVA instruction data -> the Qwen-VL fine-tuning format (the MindFormers ``data_convert`` rule).

LLaVA record::

    {"id": "000000215677", "image": "000000215677.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ..."}, {"from": "gpt", "value": "..."}]}

becomes::

    {"id": "000000215677",
     "conversations": [{"from": "user", "value": "Picture 1: <img>train2014/COCO_train2014_000000215677.jpg</img>\\nWhat is ..."},
                       {"from": "assistant", "value": "..."}]}

Rules (DESIGN.md section 1, "Fine-tuning (stage 3)"):

- ``human`` -> ``user_role_name``, ``gpt`` -> ``assistant_role_name``; any other ``from`` is malformed. The two
  names are MindFormers' flags, which it pairs with the role names of its training config; ``qwenvl finetune``
  reads only ``user`` and ``assistant`` (Qwen-VL-Chat's ChatML roles): any other name is warned of, and equal or
  swapped names are a ``ValueError``.
- The image tag becomes the picture line ``Picture 1: <img>{image_prefix}{image}</img>\\n`` (DESIGN.md's fact):
  ``<image>\\n`` is tried first, then ``\\n<image>``, then (fallback, for data that writes it inline) a bare
  ``<image>``. The tag is taken out of the text and the picture line starts the turn: where LLaVA's own
  training puts the image (its ``preprocess_multimodal`` moves ``<image>`` to the front) and where Qwen-VL's
  prompts put pictures. For the usual leading ``<image>\\n`` this is exactly MindFormers' output.
  MindFormers' ``data_convert.py`` instead replaces the tag where it stands, so a trailing ``\\n<image>``
  glues the picture line to the question (``...in detail.Picture 1: <img>...</img>\\n``, no separator, the
  picture after the question); ``tag_in_place=True`` (``--tag_in_place``) reproduces that byte for byte.
- A record with an ``image`` but no tag in any turn gets the picture line at the start of its first user
  turn (otherwise the image would be silently lost); these are counted in ``ConvertSummary.untagged``.
- The ``image`` key is removed; other record keys are kept. Turns keep only ``from`` and ``value``.
- A record whose image file ``image_location / (image_prefix + image)`` does not exist is dropped and counted.
  The data is not trusted to name files elsewhere: a path that leads out of ``image_location`` (absolute, ``~``,
  ``..`` or a link leading out; :class:`qwenvl.images.MediaPolicy`, which training applies to ``dataset_dir``
  too) makes the record malformed before any file is looked at, with the same reason whether it exists or not;
  ``allow_any_local_path`` (``--allow_any_local_path true``) lets the data name any file, as training's option.
- ``check_images=True`` (``--check_images``) also decodes each image file in full (once per distinct file, with
  :func:`qwenvl.images.check_image`, as the fine-tuning dataset does before step 1): a record whose image does not
  decode (truncated, corrupt, not an image, too large) is dropped and counted with the reason, as one whose file is
  missing, or raises ``ValueError`` with ``strict=True``. Without it only the file's existence is checked.
- A record without an ``image`` key is kept as text-only.
- Malformed records are skipped and listed (index, id, reason), or raise ``ValueError`` with ``strict=True``.
  Malformed means: not an object; ``conversations`` missing, not a list, or empty; a turn that is not an
  object or lacks a string ``from``/``value``; an unknown ``from``; an ``image`` that is not a non-empty
  string; more than one image tag; an image tag in a ``gpt`` turn; an image tag with no ``image`` key; Qwen-VL's
  ``<img>`` or ``</img>`` in any turn (plain text to LLaVA, but the fine-tuning dataset would read the text up to
  ``</img>`` as an image path: a file the record's ``image`` does not name).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenvl.config import first_image_tag
from qwenvl.fileio import atomic_write_text, jsonl_line, read_json_records
from qwenvl.images import ImageError, MediaPolicy, image_problems
from qwenvl.outputs import check_output_file, refusing_appeared
from qwenvl.tokenizer import image_path_problem

__all__ = ["ConvertSummary", "MalformedRecord", "convert_llava", "convert_records"]

logger = logging.getLogger(__name__)

LLAVA_IMAGE_TOKEN = "<image>"
# Tried in this order; the bare token is the fallback.
_IMAGE_TAG_FORMS = (LLAVA_IMAGE_TOKEN + "\n", "\n" + LLAVA_IMAGE_TOKEN, LLAVA_IMAGE_TOKEN)
DEFAULT_IMAGE_PREFIX = "train2014/COCO_train2014_"
MAX_EXAMPLES = 5  # missing-image paths kept in the summary / shown in the log


@dataclass(frozen=True)
class MalformedRecord:
    """A record that was skipped: its position in the input list, its ``id`` (None if absent) and why."""

    index: int
    id: Any
    reason: str

    def __str__(self) -> str:
        named = "" if self.id is None else f" (id={self.id!r})"
        return f"record {self.index}{named}: {self.reason}"


@dataclass
class ConvertSummary:
    """What :func:`convert_llava` did. ``total == written + missing_images + len(bad_images) + len(malformed)``."""

    total: int = 0
    written: int = 0
    text_only: int = 0  # written records without an image
    # written records whose image had no <image> tag (picture put at the start of the first user turn)
    untagged: int = 0
    missing_images: int = 0
    missing_image_examples: list[str] = field(default_factory=list)  # the first MAX_EXAMPLES paths
    malformed: list[MalformedRecord] = field(default_factory=list)
    bad_images: list[MalformedRecord] = field(default_factory=list)  # check_images: records whose image did not decode
    output_path: Path | None = None
    image_files: dict[int, Path] = field(default_factory=dict, repr=False, compare=False)  # record index -> image

    def __str__(self) -> str:
        lines = [
            f"{self.total} records read, {self.written} written ({self.text_only} text-only, "
            f"{self.untagged} with an untagged image), {self.missing_images} dropped for a missing image, "
            + (f"{len(self.bad_images)} for an image that does not decode, " if self.bad_images else "")
            + f"{len(self.malformed)} malformed skipped"
        ]
        if self.missing_images:
            more = self.missing_images - len(self.missing_image_examples)
            lines.append(
                "missing images: "
                + ", ".join(self.missing_image_examples)
                + (f" (and {more} more)" if more > 0 else "")
            )
        lines.extend(f"bad image: {m}" for m in self.bad_images[:MAX_EXAMPLES])
        if len(self.bad_images) > MAX_EXAMPLES:
            lines.append(f"(and {len(self.bad_images) - MAX_EXAMPLES} more bad images)")
        lines.extend(f"malformed {m}" for m in self.malformed[:MAX_EXAMPLES])
        if len(self.malformed) > MAX_EXAMPLES:
            lines.append(f"(and {len(self.malformed) - MAX_EXAMPLES} more malformed records)")
        return "\n".join(lines)


class _Malformed(Exception):
    """Internal: carries the reason a record is rejected."""


def _load_llava(data_path: Path) -> list[Any]:
    return read_json_records(data_path, what="LLaVA data file", items="LLaVA records")


def _replace_image_tag(value: str, picture: str, in_place: bool = False) -> str | None:
    """``value`` with its image tag taken out and ``picture`` in front (``in_place``: ``picture`` where the tag
    stood, as MindFormers), or None if it has none."""
    for form in _IMAGE_TAG_FORMS:
        if form in value:
            return value.replace(form, picture, 1) if in_place else picture + value.replace(form, "", 1)
    return None


def _convert_record(
    record: Any, roles: dict[str, str], image_prefix: str, policy: MediaPolicy, tag_in_place: bool = False
) -> tuple[dict[str, Any], str | None, bool]:
    """Convert one record; return (output record, image path relative to the image root or None, untagged).
    ``policy``: which image paths the record may name (those inside the image root).

    Raises _Malformed.
    """
    if not isinstance(record, dict):
        raise _Malformed(f"expected an object, got {type(record).__name__}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise _Malformed("'conversations' is missing, not a list or empty")
    image = record.get("image")
    if "image" in record and (not isinstance(image, str) or not image):
        raise _Malformed(f"'image' must be a non-empty string, got {image!r}")
    rel_path = None if image is None else image_prefix + image
    if rel_path is not None:
        problem = image_path_problem(rel_path)
        if problem:  # the dataset could not encode the record: a bad record here, not at training time
            raise _Malformed(f"image path {rel_path[:64]!r}{'...' if len(rel_path) > 64 else ''} {problem}")
        try:  # refused without a look at whether the file exists: the reason must not tell
            policy.resolve(rel_path)
        except ImageError as e:
            raise _Malformed(str(e)) from None
    picture = "" if rel_path is None else f"Picture 1: <img>{rel_path}</img>\n"

    out_turns: list[dict[str, str]] = []
    tagged = 0
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _Malformed(f"turn {t} is not an object")
        speaker, value = turn.get("from"), turn.get("value")
        if not isinstance(speaker, str) or not isinstance(value, str):
            raise _Malformed(f"turn {t} needs string 'from' and 'value'")
        if speaker not in roles:
            again = "; is the file converted already?" if speaker in roles.values() else ""
            raise _Malformed(f"turn {t} has unknown 'from' {speaker!r} (expected 'human' or 'gpt'{again})")
        tag = first_image_tag(value)
        if tag is not None:  # text to LLaVA; finetune would read the file it names (the data's text names no file)
            raise _Malformed(f"turn {t} holds {tag}: <img> tags in LLaVA text are not allowed (qwenvl "
                             "finetune would read the text up to </img> as an image path); a record's picture is "
                             "its 'image'")
        replaced = _replace_image_tag(value, picture, tag_in_place)
        if replaced is not None:
            tagged += value.count(LLAVA_IMAGE_TOKEN)  # in the turn as written: the image name may hold one
            if rel_path is None:
                raise _Malformed(f"turn {t} has an {LLAVA_IMAGE_TOKEN} tag but the record has no 'image'")
            if speaker != "human":
                raise _Malformed(
                    f"turn {t} ({speaker!r}) has an {LLAVA_IMAGE_TOKEN} tag; only human turns may"
                )
            value = replaced
        out_turns.append({"from": roles[speaker], "value": value})
    if tagged > 1:
        raise _Malformed(f"{tagged} {LLAVA_IMAGE_TOKEN} tags; a record holds at most one image")

    untagged = rel_path is not None and tagged == 0
    if untagged:
        first_user = next((t for t in out_turns if t["from"] == roles["human"]), None)
        if first_user is None:
            raise _Malformed("the record has an 'image' but no human turn to show it in")
        first_user["value"] = picture + first_user["value"]

    out = {k: v for k, v in record.items() if k not in ("image", "conversations")}
    out["conversations"] = out_turns
    try:  # JSON's \ud800-style escapes can spell lone surrogates, which UTF-8 (the output) cannot hold
        json.dumps(out, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise _Malformed("holds text that is not valid Unicode (a lone surrogate such as \\ud800)") from None
    return out, rel_path, untagged


def convert_records(
    records: list[Any],
    image_location: str | os.PathLike[str],
    user_role_name: str = "user",
    assistant_role_name: str = "assistant",
    image_prefix: str = DEFAULT_IMAGE_PREFIX,
    strict: bool = False,
    tag_in_place: bool = False,
    allow_any_local_path: bool = False,
    check_images: bool = False,
    image_flag: str = "image_location",
) -> tuple[list[dict[str, Any]], ConvertSummary]:
    """Convert already-loaded LLaVA records (see the module docstring); nothing is written.
    ``allow_any_local_path``: image paths may lead out of ``image_location`` (absolute paths, ``..``, links out),
    as training's option of that name allows. ``check_images``: decode every image in full and drop the records
    whose image does not decode (``strict``: raise). ``image_flag``: how messages name ``image_location`` (the
    command line's ``--image_dir``, as typed)."""
    if user_role_name == assistant_role_name or (user_role_name, assistant_role_name) == ("assistant", "user"):
        raise ValueError(f"user_role_name {user_role_name!r} and assistant_role_name {assistant_role_name!r}: the "
                         "questions would be taken for answers")
    for flag, name, role in (("user_role_name", user_role_name, "user"),
                             ("assistant_role_name", assistant_role_name, "assistant")):
        if name != role:  # MindFormers pairs other names with role names in its training config; we have none
            logger.warning("%s %r: qwenvl finetune reads only the roles 'user' and 'assistant' (the ChatML roles of "
                           "Qwen-VL-Chat) and will refuse this file; it is for another trainer", flag, name)
    root = Path(image_location)
    if not root.is_dir():
        raise NotADirectoryError(f"{image_flag} is not a folder: {root}")
    roles = {"human": user_role_name, "gpt": assistant_role_name}
    policy = MediaPolicy(root, allow_any_local_path=allow_any_local_path, root_name=f"{image_flag} {str(root)!r}")

    summary = ConvertSummary(total=len(records))
    kept: list[tuple[int, dict[str, Any], bool]] = []  # (index, converted record, untagged)
    for index, record in enumerate(records):
        try:
            out, rel_path, untagged = _convert_record(record, roles, image_prefix, policy, tag_in_place)
        except _Malformed as e:
            bad = MalformedRecord(index, record.get("id") if isinstance(record, dict) else None, str(e))
            if strict:
                raise ValueError(f"malformed LLaVA {bad}") from None
            logger.debug("skipping malformed %s", bad)
            summary.malformed.append(bad)
            continue
        if rel_path is not None:
            image_file = root / rel_path
            try:
                found = image_file.is_file()
            except OSError:  # a name the file system cannot take (ENAMETOOLONG): no such image
                found = False
            if not found:
                logger.debug("dropping %s", MalformedRecord(index, out.get("id"), f"image not found: {image_file}"))
                summary.missing_images += 1
                if len(summary.missing_image_examples) < MAX_EXAMPLES:
                    summary.missing_image_examples.append(str(image_file))
                continue
            summary.image_files[index] = image_file
        kept.append((index, out, untagged))
    problems: dict[Path, str | None] = {}
    if check_images:
        logger.info("decoding %d image file(s)", len(set(summary.image_files.values())))
        # each file named as the missing ones are (image_location/NAME, as typed), not by its absolute path
        problems = image_problems(summary.image_files.values(), name_as_given=True)
    converted: list[dict[str, Any]] = []
    for index, out, untagged in kept:
        kept_file = summary.image_files.get(index)
        problem = problems.get(kept_file) if kept_file is not None else None
        if problem is not None:
            bad = MalformedRecord(index, out.get("id"), problem)
            if strict:
                raise ValueError(f"LLaVA {bad}")
            logger.debug("dropping %s", bad)
            summary.bad_images.append(bad)
            del summary.image_files[index]
            continue
        summary.text_only += int(kept_file is None)
        summary.untagged += int(untagged)
        converted.append(out)
    summary.written = len(converted)
    return converted, summary


def convert_llava(
    data_path: str | os.PathLike[str],
    image_location: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    user_role_name: str = "user",
    assistant_role_name: str = "assistant",
    image_prefix: str = DEFAULT_IMAGE_PREFIX,
    strict: bool = False,
    tag_in_place: bool = False,
    overwrite: bool = False,
    allow_any_local_path: bool = False,
    check_images: bool = False,
    flag: str = "overwrite=True",
    image_flag: str = "image_location",
) -> ConvertSummary:
    """Convert a LLaVA JSON file (e.g. ``detail_23k.json``) to the Qwen-VL format at ``output_path``.

    The output is UTF-8 JSON written atomically: a list, or one record per line when ``output_path`` ends
    in ``.jsonl`` (the package reads a ``.jsonl`` file as JSON Lines). It is not written at all when
    the input cannot be read (missing file, invalid JSON, top level not a list: FileNotFoundError /
    ValueError naming the file), with ``strict``, when a record is malformed (or, with ``check_images``, its image
    does not decode), when no record converts (malformed, missing its image or with one that does not decode:
    ValueError naming the first), or when ``output_path`` exists
    and ``overwrite`` is not set (:class:`~qwenvl.outputs.OutputDirError`, telling the user to pass ``flag``; also
    for a file created there between that check and the write, which is left as it is).
    Returns the summary (for the caller to show: it is logged only at DEBUG level, so that the command
    line prints it once).
    """
    data_path = Path(data_path)
    check_output_file(output_path, {"data file": data_path})
    records = _load_llava(data_path)
    converted, summary = convert_records(
        records, image_location, user_role_name, assistant_role_name, image_prefix, strict, tag_in_place,
        allow_any_local_path, check_images, image_flag,
    )
    if records and not converted:  # an empty file would only move the question to the fine-tune
        first = (summary.malformed[0] if summary.malformed else summary.bad_images[0] if summary.bad_images
                 else f"image not found: {summary.missing_image_examples[0]}")
        raise ValueError(f"{data_path}: none of its {len(records)} records could be converted, nothing written: "
                         f"{first}" + (f" (and {len(records) - 1} more)" if len(records) > 1 else ""))
    # the images are inputs too: never written over
    check_output_file(output_path, {f"image of record {k}": f for k, f in summary.image_files.items()},
                      overwrite=overwrite, flag=flag)
    if Path(output_path).suffix == ".jsonl":  # the suffix rule of fileio.read_json_records
        text = "".join(jsonl_line(record) for record in converted)
    else:
        text = json.dumps(converted, ensure_ascii=False, indent=1) + "\n"
    with refusing_appeared(output_path, flag):  # without overwrite, a file that appeared since the check above stays
        summary.output_path = atomic_write_text(output_path, text, replace=overwrite)
    logger.debug("converted %s -> %s: %s", data_path, summary.output_path, summary)
    return summary
