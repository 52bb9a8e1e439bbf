"""The Qwen-VL tokenizer: tiktoken BPE over ``qwen.tiktoken`` plus the image-path id layout.

Matches the official ``tokenization_qwen.py`` of Qwen-VL id for id (DESIGN.md section 1, "Tokenizer"):

- text is NFC-normalized, then encoded by tiktoken with the Qwen pre-tokenizer regex; special tokens are
  allowed in text by default;
- every closed ``<img>PATH</img>`` becomes ``<img>``, the UTF-8 bytes of PATH as ids 0..255, ``<imgpad>``
  up to 256 ids, ``</img>`` (258 ids in all). The model never reads these bytes (the processor loads the
  image itself), but keeping the official layout keeps positions, prompts and checkpoints interchangeable.

Where the official code crashes we raise a ``ValueError`` that names the problem (path too long, unclosed
``<img>``, special token inside a path) or, for decoding, degrade gracefully (see :meth:`QwenTokenizer.decode`).
"""

from __future__ import annotations

import base64
import bisect
import functools
import hashlib
import logging
import numbers
import os
import threading
import unicodedata
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, Literal

import regex
import tiktoken

from .config import (
    BOX_END_ID,
    BOX_START_ID,
    ENDOFTEXT_ID,
    IM_END_ID,
    IM_START_ID,
    IMG_END_ID,
    IMG_PAD_ID,
    IMG_START_ID,
    IMG_TOKEN_SPAN,
    QUAD_END_ID,
    QUAD_START_ID,
    REF_END_ID,
    REF_START_ID,
    TOKENIZER_SIZE,
)

__all__ = [
    "IMAGE_SPECIAL_TOKENS",
    "PAT_STR",
    "SPECIAL_TOKENS",
    "VOCAB_FILE_NAME",
    "QwenTokenizer",
    "image_path_problem",
]

logger = logging.getLogger(__name__)

VOCAB_FILE_NAME = "qwen.tiktoken"
NUM_RANKS = ENDOFTEXT_ID  # BPE ranks are 0..151642; the special tokens follow them
OFFICIAL_VOCAB_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
EMBEDDING_ROWS = 151936  # ids TOKENIZER_SIZE..EMBEDDING_ROWS-1 exist only in the model's embedding

PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The Qwen-VL tags (the official ``IMAGE_ST``): the chat template allows only these inside user content.
IMAGE_SPECIAL_TOKENS: tuple[str, ...] = (
    "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>",
)


def _special_tokens() -> dict[str, int]:
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    names += [f"<|extra_{i}|>" for i in range(205)]
    names += list(IMAGE_SPECIAL_TOKENS)
    table = {name: ENDOFTEXT_ID + i for i, name in enumerate(names)}
    # The config constants and this table describe the same ids; a mismatch would silently shift every tag.
    expected = {
        "<|endoftext|>": ENDOFTEXT_ID, "<|im_start|>": IM_START_ID, "<|im_end|>": IM_END_ID,
        "<ref>": REF_START_ID, "</ref>": REF_END_ID, "<box>": BOX_START_ID, "</box>": BOX_END_ID,
        "<quad>": QUAD_START_ID, "</quad>": QUAD_END_ID,
        "<img>": IMG_START_ID, "</img>": IMG_END_ID, "<imgpad>": IMG_PAD_ID,
    }
    if any(table[k] != v for k, v in expected.items()) or len(table) + NUM_RANKS != TOKENIZER_SIZE:
        raise RuntimeError("special-token table disagrees with the ids in qwenvl.config")
    return table


SPECIAL_TOKENS: dict[str, int] = _special_tokens()
_ID_TO_SPECIAL: dict[int, str] = {v: k for k, v in SPECIAL_TOKENS.items()}

# tiktoken's regex engine gives up on very long inputs ("Max stack size exceeded for backtracking", older
# versions panicked with a Rust stack overflow). Long texts are cut into chunks of about this many characters,
# but only at points where the cut cannot change a single token (see ``_safe_chunks``).
CHUNK_CHARS = 100_000

# A letter or digit, then one character that the pre-tokenizer may glue in front of a letter run
# (anything but a letter, digit, CR or LF), then a letter. Cutting right before that middle character is
# invisible to the tokenizer: every pre-token ends at the letter/digit (nothing in the regex runs from a
# letter or digit into a following non-letter), and the pre-token starting at the cut is the same whether
# or not the text before it is present. Splitting inside a special token is excluded separately.
_SAFE_CUT = regex.compile(r"(?<=[\p{L}\p{N}])(?=[^\r\n\p{L}\p{N}]\p{L})")
_SPECIAL_RE = regex.compile("|".join(regex.escape(t) for t in SPECIAL_TOKENS))
_NO_SPECIAL: frozenset[str] = frozenset()


_ENCODINGS: dict[str, tiktoken.Encoding] = {}  # by sha256 of the vocabulary file
_ENCODINGS_LOCK = threading.Lock()


def _encoding_for(path: Path) -> tiktoken.Encoding:
    """The tiktoken ``Encoding`` of a ``.tiktoken`` file, shared by content.

    Parsing 151,643 lines takes a noticeable fraction of a second and a checkpoint's vocabulary is nearly always
    the bundled file, so encodings are cached by the file's sha256 (an ``Encoding`` is immutable and thread-safe).
    """
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    with _ENCODINGS_LOCK:
        enc = _ENCODINGS.get(digest)
        if enc is None:
            if digest != OFFICIAL_VOCAB_SHA256:
                logger.warning("%s is not the official Qwen vocabulary (sha256 %s); ids may differ", path, digest)
            enc = tiktoken.Encoding(
                "qwen-vl", pat_str=PAT_STR, mergeable_ranks=_parse_ranks(data, path), special_tokens=SPECIAL_TOKENS
            )
            if enc.n_vocab != TOKENIZER_SIZE:
                raise ValueError(f"tokenizer has {enc.n_vocab} ids, expected {TOKENIZER_SIZE}")
            _ENCODINGS[digest] = enc
    return enc


def _parse_ranks(data: bytes, path: Path) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file (one "base64-token rank" per line) and check it is complete."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: not a 'base64 rank' line: {line[:80]!r}") from e
    if len(ranks) != NUM_RANKS or set(ranks.values()) != set(range(NUM_RANKS)):
        raise ValueError(
            f"{path} has {len(ranks)} BPE ranks, expected exactly the ranks 0..{NUM_RANKS - 1} of qwen.tiktoken"
        )
    return ranks


def _bundled_vocab() -> Path:
    return Path(__file__).resolve().parent / "vocab" / VOCAB_FILE_NAME


def _as_id_list(ids: Any) -> list[int]:
    """Accept an int, a sequence of ints, or a 1-D tensor/array (anything with ``tolist``)."""
    if isinstance(ids, int):
        return [ids]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
        if isinstance(ids, int):
            return [ids]
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise ValueError(f"token ids must be an int or a sequence of ints, got {type(ids).__name__}")
    out = list(ids)
    if set(map(type, out)) <= {int}:  # plain ints (what tolist() gives): checked at C speed, a long prompt in ms
        return out
    if out and isinstance(out[0], (list, tuple)):
        raise ValueError("decode takes one sequence of ids; use batch_decode for a batch")
    for i in out:  # a float (ids of a float tensor, a mean) would be truncated into another token silently
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise ValueError(f"token ids must be integers, got {i!r}")
    return [int(i) for i in out]


def _safe_chunks(text: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut ``text`` into pieces of at most about ``max_chars`` characters without changing its tokens.

    A piece can be longer when no safe cut exists in its window (e.g. one huge run of whitespace).
    """
    if len(text) <= max_chars:
        return [text]
    inside_special: set[int] = set()
    for m in _SPECIAL_RE.finditer(text):
        inside_special.update(range(m.start() + 1, m.end()))
    cuts = [m.start() for m in _SAFE_CUT.finditer(text) if m.start() not in inside_special]
    chunks: list[str] = []
    start = 0
    while len(text) - start > max_chars:
        k = bisect.bisect_right(cuts, start + max_chars) - 1  # the last cut inside the window ...
        if k < 0 or cuts[k] <= start:
            k = bisect.bisect_right(cuts, start + max_chars)  # ... else the first one after it
            if k == len(cuts):
                break
        chunks.append(text[start : cuts[k]])
        start = cuts[k]
    chunks.append(text[start:])
    return chunks


def image_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be the text of an ``<img>PATH</img>`` span (what :meth:`QwenTokenizer.encode` would
    refuse), or None: a special token inside it, text that is not valid Unicode, more than 256 bytes."""
    special = _SPECIAL_RE.search(path)
    if special:
        return f"holds the special token {special.group()}"
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid Unicode text (a lone surrogate)"
    if size > IMG_TOKEN_SPAN:
        return f"is {size} bytes long (UTF-8), more than the {IMG_TOKEN_SPAN} that fit between <img> and </img>"
    return None


def image_spans(ids: list[int], strict: bool = True) -> list[tuple[int, int]]:
    """``(start, end)`` index pairs of ``<img>``..``</img>`` in ``ids`` (both tags included at the ends).

    As the official code: find the next ``<img>``, then the next ``</img>`` after it. An ``<img>`` with no
    later ``</img>`` raises when ``strict``, else ends the scan (a generation may stop mid-span).
    """
    spans: list[tuple[int, int]] = []
    pos = 0
    n = len(ids)
    while pos < n:
        try:
            s = ids.index(IMG_START_ID, pos)
        except ValueError:
            break
        try:
            e = ids.index(IMG_END_ID, s + 1)
        except ValueError:
            if strict:
                raise ValueError(
                    f"unclosed <img> at token {s}: every <img> needs a later </img> around the image path"
                ) from None
            break
        spans.append((s, e))
        pos = e + 1
    return spans


# transformers' and the official remote code's tokenizer attributes that this one lacks: what to use instead
_INSTEAD = {
    "draw_bbox_on_latest_picture": "qwenvl.grounding.parse_grounding(response) gives the boxes and "
                                   "draw_boxes(image, objects) draws them",
    "apply_chat_template": "processor([messages]) gives a chat prompt's inputs, processor.build_messages_prompt"
                           "(messages) its text and ids",
    "convert_tokens_to_ids": "use token_to_id(token)",
    "eos_token": "eos_token_id is the id of <|endoftext|>",
    "pad_token": "pad_token_id is the id of <|endoftext|>",
    "padding_side": "the processor pads on the left (as generation needs)",
    "to_list_format": "qwenvl.grounding.parse_grounding(text) parses the <ref>/<box> tags of an answer",
}


class QwenTokenizer:
    """The official Qwen-VL tokenizer (151,860 ids), without ``transformers``.

    Build it with :meth:`from_pretrained`. ``encode``/``decode`` match the official ``tokenizer.encode`` /
    ``tokenizer.decode`` exactly on everything the official code accepts.
    """

    def __init__(self, vocab_file: str | Path, errors: str = "replace") -> None:
        path = Path(vocab_file).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer vocabulary not found: {path}")
        self.vocab_file = path
        self.errors = errors
        self._enc = _encoding_for(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str] | None = None, errors: str = "replace", *,
                        trust_remote_code: bool | None = None) -> QwenTokenizer:
        """Use ``path/qwen.tiktoken`` (or ``path`` itself if it is the file); else the bundled vocabulary.
        ``trust_remote_code`` (transformers' habit) changes nothing: no code from the folder runs.

        A checkpoint folder without its own vocabulary is normal (ours are saved without one); the official
        file is bundled so nothing is downloaded at run time.
        """
        if path is not None:
            p = Path(path)
            if p.is_file():
                return cls(p, errors)
            if (p / VOCAB_FILE_NAME).is_file():
                return cls(p / VOCAB_FILE_NAME, errors)
            if not p.exists():
                raise FileNotFoundError(f"checkpoint folder not found: {p}")
        return cls(_bundled_vocab(), errors)

    # ---- ids -------------------------------------------------------------------------------------
    @property
    def eod_id(self) -> int:
        return ENDOFTEXT_ID

    @property
    def eos_token_id(self) -> int:
        return ENDOFTEXT_ID

    @property
    def pad_token_id(self) -> int:
        return ENDOFTEXT_ID

    @property
    def im_start_id(self) -> int:
        return IM_START_ID

    @property
    def im_end_id(self) -> int:
        return IM_END_ID

    @property
    def img_start_id(self) -> int:
        return IMG_START_ID

    @property
    def img_end_id(self) -> int:
        return IMG_END_ID

    @property
    def img_pad_id(self) -> int:
        return IMG_PAD_ID

    @property
    def vocab_size(self) -> int:
        return TOKENIZER_SIZE

    def __len__(self) -> int:
        return TOKENIZER_SIZE

    def __repr__(self) -> str:
        return f"QwenTokenizer(vocab_file={str(self.vocab_file)!r}, size={TOKENIZER_SIZE})"

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(SPECIAL_TOKENS)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most bytes one token stands for: its longest BPE token's (128 in Qwen's vocabulary, a run of spaces)
        or special token's. Computed once, from the BPE ranks (converting every id took ~0.1-0.2 s)."""
        return max(max(map(len, self._enc.token_byte_values())), max(len(s.encode()) for s in SPECIAL_TOKENS))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # transformers' and the official remote code's ``tokenizer(text, return_tensors="pt")``: here the model
        # reads pixels, not the paths in <img> spans, so its inputs come from the processor
        raise TypeError("QwenTokenizer is not callable: processor(text) gives the model's inputs (input_ids, "
                        "attention_mask and the pixels of the <img> spans); tokenizer.encode(text) gives the ids")

    def __getattr__(self, name: str) -> Any:
        # only for names the normal lookup lacks: what transformers' and the official tokenizer have instead
        if name in _INSTEAD:
            raise AttributeError(f"QwenTokenizer has no {name}: {_INSTEAD[name]}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ---- encode ----------------------------------------------------------------------------------
    def encode(
        self,
        text: str,
        allowed_special: Collection[str] | str = "all",
        disallowed_special: Collection[str] | str = (),
    ) -> list[int]:
        """Text -> ids, as the official ``tokenizer.encode`` (NFC, specials allowed, image paths as bytes).

        Raises ``ValueError`` for an ``<img>`` without a later ``</img>``, a path over 256 bytes, a special
        token between ``<img>`` and ``</img>`` (the official code crashes on these), and for a text with a
        single whitespace run too long for tiktoken's regex engine (about a million characters).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        text = unicodedata.normalize("NFC", text)
        # a str other than "all" would be read as a set of one-character tokens
        for name, value in (("allowed_special", allowed_special), ("disallowed_special", disallowed_special)):
            if isinstance(value, str) and value != "all":
                raise ValueError(f"{name} must be 'all' or a set of tokens, got {value!r}")
        allowed: Literal["all"] | set[str] = "all" if isinstance(allowed_special, str) else set(allowed_special)
        if not isinstance(disallowed_special, str):
            disallowed_special = set(disallowed_special)
        ids: list[int] = []
        for chunk in _safe_chunks(text):
            try:
                if allowed == "all" and not disallowed_special:
                    ids += self._encode_all_special(chunk)
                else:
                    ids += self._enc.encode(chunk, allowed_special=allowed, disallowed_special=disallowed_special)
            except ValueError as e:
                if "Regex error" not in str(e):
                    raise
                raise ValueError(
                    f"cannot tokenize this text ({len(text)} characters): {e}. Long runs of whitespace "
                    "(about a million characters) are beyond tiktoken's regex engine"
                ) from e
        return self._encode_image_spans(ids)

    def _encode_all_special(self, text: str) -> list[int]:
        """``encode(text, allowed_special="all")`` of tiktoken, done as tiktoken does it: the text between special
        tokens encoded with no special token allowed, each special token as its id. Handing tiktoken the set of
        217 special tokens costs ~35 us a call (the set is converted on every call), ~13x the encoding of a short
        text. (tiktoken's ``encode_ordinary`` would be as fast, but on a text beyond its regex engine it aborts
        with a Rust panic instead of ``encode``'s ValueError.)"""
        ids: list[int] = []
        pos = 0
        for m in _SPECIAL_RE.finditer(text):
            if m.start() > pos:
                ids += self._enc.encode(text[pos : m.start()], allowed_special=_NO_SPECIAL, disallowed_special=())
            ids.append(SPECIAL_TOKENS[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self._enc.encode(text[pos:], allowed_special=_NO_SPECIAL, disallowed_special=())
        return ids

    def _encode_image_spans(self, ids: list[int]) -> list[int]:
        """Rewrite each ``<img>`` BPE-of-path ``</img>`` into the fixed 258-id byte layout."""
        if IMG_START_ID not in ids:
            return ids
        out: list[int] = []
        pos = 0
        for s, e in image_spans(ids, strict=True):
            out += ids[pos:s]
            inner = ids[s + 1 : e]
            bad = [i for i in inner if i >= ENDOFTEXT_ID]
            if bad:
                raise ValueError(
                    f"special token {_ID_TO_SPECIAL.get(bad[0], bad[0])} inside <img>...</img> at token {s}: "
                    "the text between <img> and </img> must be a plain image path"
                )
            path = self._enc.decode_bytes(inner)
            if len(path) > IMG_TOKEN_SPAN:
                shown = path[:64].decode("utf-8", "replace")
                raise ValueError(
                    f"image path is {len(path)} bytes long (UTF-8), more than the {IMG_TOKEN_SPAN} bytes that "
                    f"fit between <img> and </img>: {shown!r}..."
                )
            out.append(IMG_START_ID)
            out += list(path)
            out += [IMG_PAD_ID] * (IMG_TOKEN_SPAN - len(path))
            out.append(IMG_END_ID)
            pos = e + 1
        out += ids[pos:]
        return out

    # ---- decode ----------------------------------------------------------------------------------
    def decode(self, ids: Any, skip_special_tokens: bool = False, errors: str | None = None) -> str:
        """Ids -> text, as the official ``tokenizer.decode``; ``<img>`` spans come back as ``<img>PATH</img>``.

        Differences, all where the official code crashes: ids 151860..151935 (rows of the model's embedding
        without a token; a random or badly trained model can emit them) decode to the empty string; a path of
        exactly 256 bytes (no ``<imgpad>``) decodes; an ``<img>`` without ``</img>`` (generation stopped
        inside a span) or a span holding non-byte ids decodes token by token. Path bytes that are not UTF-8
        follow ``errors``. ``skip_special_tokens`` drops ids >= 151643 (the path text stays, as officially).
        Ids below 0 or above 151935 raise ``ValueError``.
        """
        ids = _as_id_list(ids)
        errors = errors or self.errors
        out = bytearray()
        pos = 0
        for s, e in image_spans(ids, strict=False):
            out += self._decode_plain(ids[pos:s], skip_special_tokens)
            inner = ids[s + 1 : e]
            path_ids = inner[: inner.index(IMG_PAD_ID)] if IMG_PAD_ID in inner else inner
            if all(0 <= i < 256 for i in path_ids):
                if not skip_special_tokens:
                    out += b"<img>"
                out += bytes(path_ids)
                if not skip_special_tokens:
                    out += b"</img>"
            else:
                out += self._decode_plain(ids[s : e + 1], skip_special_tokens)
            pos = e + 1
        out += self._decode_plain(ids[pos:], skip_special_tokens)
        return out.decode("utf-8", errors=errors)

    def _decode_plain(self, ids: list[int], skip_special_tokens: bool) -> bytes:
        keep = []
        for i in ids:
            if not 0 <= i < EMBEDDING_ROWS:
                raise ValueError(f"token id {i} is out of range: ids are 0..{EMBEDDING_ROWS - 1}")
            if i >= TOKENIZER_SIZE or (skip_special_tokens and i >= ENDOFTEXT_ID):
                continue
            keep.append(i)
        return self._enc.decode_bytes(keep)

    def batch_decode(self, batch: Iterable[Any], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    def image_paths(self, ids: Any) -> list[str]:
        """The image paths held by the ``<img>`` spans of ``ids``, in order.

        Raises ``ValueError`` for an unclosed span, non-byte ids before the padding, or bytes that are not
        UTF-8: the processor calls this to know which images to load, so a bad span must not pass silently.
        """
        ids = _as_id_list(ids)
        paths = []
        for s, e in image_spans(ids, strict=True):
            inner = ids[s + 1 : e]
            path_ids = inner[: inner.index(IMG_PAD_ID)] if IMG_PAD_ID in inner else inner
            if not all(0 <= i < 256 for i in path_ids):
                raise ValueError(f"malformed <img> span at token {s}: the ids before <imgpad> must be bytes 0..255")
            try:
                paths.append(bytes(path_ids).decode("utf-8"))
            except UnicodeDecodeError as err:
                raise ValueError(f"<img> span at token {s} holds a path that is not UTF-8: {err}") from err
        return paths

    # ---- tokens ----------------------------------------------------------------------------------
    def convert_ids_to_tokens(self, ids: Any) -> list[bytes | str]:
        """BPE tokens as their bytes, special tokens as their text (as the official); unused rows as ``""``."""
        out: list[bytes | str] = []
        for i in _as_id_list(ids):
            if i in _ID_TO_SPECIAL:
                out.append(_ID_TO_SPECIAL[i])
            elif 0 <= i < NUM_RANKS:
                out.append(self._enc.decode_single_token_bytes(i))
            elif TOKENIZER_SIZE <= i < EMBEDDING_ROWS:
                out.append("")
            else:
                raise ValueError(f"token id {i} is out of range: ids are 0..{EMBEDDING_ROWS - 1}")
        return out

    def token_to_id(self, token: str | bytes) -> int:
        """The id of a special token (``"<img>"``) or of a BPE token given as bytes (or as its text)."""
        if isinstance(token, str) and token in SPECIAL_TOKENS:
            return SPECIAL_TOKENS[token]
        raw = token.encode("utf-8") if isinstance(token, str) else token
        try:
            return self._enc.encode_single_token(raw)
        except KeyError:
            raise ValueError(f"{token!r} is not a single token of the vocabulary") from None

    # ---- list format -----------------------------------------------------------------------------
    @staticmethod
    def from_list_format(list_format: Iterable[dict[str, Any]]) -> str:
        """``[{"image": p}, {"text": t}, {"box": [...], "ref": r}]`` -> prompt text, as the official code.

        Image k (from 1) becomes ``Picture k: <img>p</img>\\n``; a text is kept as is; a ref becomes
        ``<ref>r</ref>`` and each box ``<box>(x1,y1),(x2,y2)</box>`` with integer (``%d``) coordinates.
        """
        text = ""
        num_images = 0
        for ele in list_format:
            if not isinstance(ele, dict):
                raise ValueError(f"unsupported list-format element (expected a dict): {ele!r}")
            if "image" in ele:
                if not isinstance(ele["image"], (str, os.PathLike)):
                    raise ValueError(f"a list-format image is a path or URL, got a {type(ele['image']).__name__} "
                                     "(pass pixels with images=)")
                if "</img>" in str(ele["image"]):  # the span would end there: another file would be read
                    raise ValueError(f"a list-format image path cannot hold '</img>': {str(ele['image'])!r}")
                num_images += 1
                text += f"Picture {num_images}: <img>{ele['image']}</img>\n"
            elif "text" in ele:
                if not isinstance(ele["text"], str):
                    raise ValueError(f"a list-format text must be a str, got {type(ele['text']).__name__}")
                text += ele["text"]
            elif "box" in ele:
                if "ref" in ele:
                    text += f"<ref>{ele['ref']}</ref>"
                try:
                    boxes = [tuple(box) for box in ele["box"]]
                except TypeError as err:
                    raise ValueError(f"'box' must be a list of boxes [[x1, y1, x2, y2], ...], got {ele['box']!r}") from err
                for box in boxes:
                    if len(box) != 4:
                        raise ValueError(f"a box needs 4 numbers (x1, y1, x2, y2), got {box!r}")
                    try:
                        # %d as the official code: floats truncate, strings are refused
                        text += "<box>(%d,%d),(%d,%d)</box>" % tuple(box)  # noqa: UP031
                    except (TypeError, ValueError, OverflowError) as err:  # a string; NaN or infinity
                        raise ValueError(f"box coordinates must be numbers (not NaN or infinite), got {box!r}") from err
            else:
                raise ValueError(f"unsupported list-format element (no image/text/box key): {ele!r}")
        return text
