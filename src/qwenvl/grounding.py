"""Boxes as Qwen-VL reads and writes them: parse, convert, format, compare and draw.

Qwen-VL grounds objects in plain text: ``<ref>a dog</ref><box>(x1,y1),(x2,y2)</box>``, optionally several
``<box>`` after one ``<ref>``, boxes with no ``<ref>``, and ``<quad>(x1,y1),...,(x4,y4)</quad>`` for
quadrilaterals. Coordinates in that text are integers normalized to [0, 1000) of the image width and height
(``int(x / W * 1000)``); the official grounding eval maps them back with ``x_norm / 999 * W``.

Units are explicit per function: *normalized* means the [0, 1000) integer grid of the text, *pixels* means
image coordinates. :class:`Box` itself carries no unit; the function that made it says which one it holds.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import shutil
import subprocess
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

from PIL import Image, ImageColor, ImageDraw, ImageFont

from .images import as_rgb

logger = logging.getLogger(__name__)

NORM_GRID = 1000  # the text grid: integer coordinates 0..999
EVAL_SCALE = 999  # the official grounding eval divides by 999, not 1000

__all__ = [
    "Box",
    "BoxLike",
    "GroundedObject",
    "Quad",
    "denormalize_box",
    "denormalize_objects",
    "draw_boxes",
    "first_box",
    "format_box",
    "iou",
    "normalize_box",
    "parse_grounding",
]


@dataclass(frozen=True)
class Box:
    """An axis-aligned box ``(x1, y1, x2, y2)``; pixels or normalized, as the producing function says."""

    x1: float
    y1: float
    x2: float
    y2: float

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    def __iter__(self) -> Iterator[float]:
        # Lets a Box go wherever a 4-sequence goes (iou, normalize_box, unpacking).
        return iter(self.as_tuple())


@dataclass(frozen=True)
class Quad:
    """A quadrilateral as four ``(x, y)`` corners in the order the model wrote them."""

    points: tuple[tuple[float, float], tuple[float, float], tuple[float, float], tuple[float, float]]


@dataclass
class GroundedObject:
    """One referring expression and the boxes/quads written right after it.

    ``ref`` is None for boxes that follow no ``<ref>``. A ``<ref>`` followed by no box still yields an object
    (with empty ``boxes``) so callers can see that the model named something it did not locate.
    """

    ref: str | None
    boxes: list[Box] = field(default_factory=list)
    quads: list[Quad] = field(default_factory=list)


BoxLike = Box | Sequence[float]

# ---------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------

_NUM = r"[-+]?\d+(?:\.\d+)?"
_POINT = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
# Between two points: whitespace and at most one comma. Written so that a run of whitespace can be matched one
# way only: "\s*,?\s*" splits a run of n spaces n ways when no "(" follows, and the engine tries them all, which
# made a long run of spaces in model text (a few hundred thousand: a minute) cost quadratic time.
_SEP = r"\s*(?:,\s*)?"
# Points separated by an optional comma; the whole tag body must be points and nothing else.
_POINTS_BODY = re.compile(rf"\s*\(\s*{_NUM}\s*,\s*{_NUM}\s*\)(?:{_SEP}\(\s*{_NUM}\s*,\s*{_NUM}\s*\))*\s*")
_TAG = re.compile(r"<(/?)(ref|box|quad)>")
# What the official refcoco eval looks for in text decoded without special tokens: "(x1,y1),(x2,y2)".
_BARE_BOX = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\){_SEP}\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")


def _parse_points(body: str, expected: int) -> list[tuple[float, float]] | None:
    """Points of a ``<box>``/``<quad>`` body, or None when it is not exactly ``expected`` points."""
    if not _POINTS_BODY.fullmatch(body):
        return None
    points = [(float(x), float(y)) for x, y in _POINT.findall(body)]
    if not all(math.isfinite(v) for point in points for v in point):  # digits beyond a float: garbage, not a box
        return None
    return points if len(points) == expected else None


def parse_grounding(text: str) -> list[GroundedObject]:
    """Objects in model text, coordinates **normalized** (as written, [0, 1000) for a well-behaved model).

    Boxes and quads attach to the nearest preceding ``<ref>`` when only whitespace or other boxes separate
    them (the official tokenizer attaches a box to a ref only when the ref immediately precedes it; allowing
    whitespace makes us robust to spacing). Tags that are unclosed, nested, stray closers, or whose body is
    not exactly 2 (box) / 4 (quad) points are skipped; anything else in the text (special tokens like
    ``<|im_end|>``, prose, trailing garbage) is ignored. Never raises on any string.
    """
    objects: list[GroundedObject] = []
    current: GroundedObject | None = None  # object that following boxes may still attach to
    chain_end = 0  # text position after which only whitespace keeps `current` open
    tags = list(_TAG.finditer(text))
    i = 0
    while i < len(tags):
        opening = tags[i]
        closing = tags[i + 1] if i + 1 < len(tags) else None
        is_pair = (
            opening.group(1) == ""
            and closing is not None
            and closing.group(1) == "/"
            and closing.group(2) == opening.group(2)
        )
        if not is_pair:
            # Stray closer, unclosed opener, or another tag before the closer: skip this one tag.
            current = None
            i += 1
            continue
        assert closing is not None
        kind, body = opening.group(2), text[opening.end() : closing.start()]
        attached = current is not None and text[chain_end : opening.start()].strip() == ""
        if kind == "ref":
            current = GroundedObject(ref=body.strip() or None)
            objects.append(current)
        else:
            points = _parse_points(body, expected=2 if kind == "box" else 4)
            if points is not None:
                if not attached:
                    current = GroundedObject(ref=None)
                    objects.append(current)
                assert current is not None
                if kind == "box":
                    (x1, y1), (x2, y2) = points
                    current.boxes.append(Box(x1, y1, x2, y2))
                else:
                    current.quads.append(Quad((points[0], points[1], points[2], points[3])))
            elif not attached:
                current = None
        chain_end = closing.end()
        i += 2
    return objects


def first_box(text: str) -> Box | None:
    """The first box in ``text``, **normalized**, or None.

    Prefers the first well-formed ``<box>...</box>``. Failing that, takes the first bare
    ``(x1,y1),(x2,y2)`` anywhere in the text, as the official refcoco eval does: its prompt ends in ``<box>``
    and it decodes without special tokens, so the answer holds no tags at all.
    """
    for obj in parse_grounding(text):
        if obj.boxes:
            return obj.boxes[0]
    for match in _BARE_BOX.finditer(text):
        x1, y1, x2, y2 = (float(v) for v in match.groups())
        if all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            return Box(x1, y1, x2, y2)
    return None


# ---------------------------------------------------------------------------------------------------------
# Conversions and formatting
# ---------------------------------------------------------------------------------------------------------


def _four(box: BoxLike) -> tuple[float, float, float, float]:
    if isinstance(box, (str, bytes)):  # "1234" would iterate into four digits
        raise ValueError(f"a box is 4 numbers (x1, y1, x2, y2), got a {type(box).__name__}: {box!r}")
    try:
        values = tuple(float(v) for v in box)
    except TypeError:  # not iterable, or an item that is not a number (None, a list)
        raise ValueError(f"a box is 4 numbers (x1, y1, x2, y2), got {box!r}") from None
    if len(values) != 4:
        raise ValueError(f"a box needs 4 numbers (x1, y1, x2, y2), got {len(values)}")
    return values


def _check_size(width: float, height: float) -> None:
    try:
        ok = width > 0 and height > 0 and math.isfinite(width) and math.isfinite(height)
    except TypeError:  # a str, None
        ok = False
    if not ok:
        raise ValueError(f"image width and height must be positive numbers, got {width!r}x{height!r}")


def _check_scale(scale: float) -> None:
    try:
        ok = scale > 0 and math.isfinite(scale)
    except TypeError:  # a str, None
        ok = False
    if not ok:
        raise ValueError(f"scale must be a positive number, got {scale!r}")


def _finite(box: BoxLike) -> tuple[float, float, float, float]:
    values = _four(box)
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"box coordinates must be finite numbers, got {values}")
    return values


def _norm_coord(value: float, size: float) -> int:
    scaled = value / size * NORM_GRID
    if not math.isfinite(scaled):  # finite inputs whose quotient overflows: far outside the image
        return NORM_GRID - 1 if scaled > 0 else 0
    return min(max(int(scaled), 0), NORM_GRID - 1)


def normalize_box(box_px: BoxLike, width: float, height: float) -> tuple[int, int, int, int]:
    """**Pixels** -> **normalized**: ``int(x / W * 1000)`` clamped to [0, 999], the official training recipe.

    The clamp matters at the right/bottom edge (x = W would give 1000, outside the grid the model saw).
    Corner order is kept as given.
    """
    _check_size(width, height)
    x1, y1, x2, y2 = _finite(box_px)
    return (_norm_coord(x1, width), _norm_coord(y1, height), _norm_coord(x2, width), _norm_coord(y2, height))


def denormalize_box(box_norm: BoxLike, width: float, height: float, scale: float = EVAL_SCALE) -> Box:
    """**Normalized** -> **pixels**: ``x / scale * W``.

    ``scale=999`` (default) reproduces the official grounding eval; ``scale=1000`` inverts ``normalize_box``
    exactly up to truncation and is what the official drawing helper uses.
    """
    _check_size(width, height)
    _check_scale(scale)
    x1, y1, x2, y2 = _finite(box_norm)
    return Box(x1 / scale * width, y1 / scale * height, x2 / scale * width, y2 / scale * height)


def denormalize_objects(
    objects: Iterable[GroundedObject], width: float, height: float, scale: float = EVAL_SCALE
) -> list[GroundedObject]:
    """``parse_grounding`` output (**normalized**) mapped to **pixels**, ready for :func:`draw_boxes`."""
    _check_size(width, height)
    _check_scale(scale)  # also when no object has a box
    out = []
    for obj in objects:
        boxes = [denormalize_box(b, width, height, scale) for b in obj.boxes]
        quads = [
            Quad(tuple((x / scale * width, y / scale * height) for x, y in q.points))  # type: ignore[arg-type]
            for q in obj.quads
        ]
        out.append(GroundedObject(ref=obj.ref, boxes=boxes, quads=quads))
    return out


def format_box(box_norm: BoxLike, ref: str | None = None) -> str:
    """``<ref>ref</ref><box>(x1,y1),(x2,y2)</box>`` (the ref part only when given) from **normalized** ints.

    Raises ValueError for non-integers or values outside [0, 999]: that almost always means pixel
    coordinates were passed, which the model would read as a different box.
    """
    values = _four(box_norm)
    ints = []
    for v in values:
        if not v.is_integer() or not 0 <= v < NORM_GRID:
            raise ValueError(
                f"normalized box coordinates must be integers in [0, {NORM_GRID - 1}], got {values}"
            )
        ints.append(int(v))
    prefix = "" if ref is None else f"<ref>{ref}</ref>"
    return f"{prefix}<box>({ints[0]},{ints[1]}),({ints[2]},{ints[3]})</box>"


# ---------------------------------------------------------------------------------------------------------
# IoU
# ---------------------------------------------------------------------------------------------------------


def iou(a: BoxLike, b: BoxLike) -> float:
    """Intersection over union of two boxes in the same units (pixels in practice).

    Same convention as the official Qwen-VL refcoco eval (torchvision ``box_iou``): continuous coordinates,
    area = (x2 - x1) * (y2 - y1) with no +1. Unlike it, reversed corners are sorted first (torchvision would
    yield a negative area) and a zero union gives 0.0 instead of NaN (NaN >= 0.5 is False there, so a miss
    either way).
    """
    ax1, ay1, ax2, ay2 = _four(a)
    bx1, by1, bx2, by2 = _four(b)
    ax1, ax2 = sorted((ax1, ax2))
    ay1, ay2 = sorted((ay1, ay2))
    bx1, bx2 = sorted((bx1, bx2))
    by1, by2 = sorted((by1, by2))
    inter_w = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    inter_h = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = inter_w * inter_h
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    if union <= 0.0 or not math.isfinite(union):
        return 0.0
    return inter / union


# ---------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

# Tableau 10: distinct, readable with white text on most of them.
DEFAULT_COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip

# Tried when fontconfig is absent (macOS, Windows, minimal containers); absent files are skipped.
_COMMON_FONT_PATHS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/Supplemental/Arial Unicode.ttf",
    "C:/Windows/Fonts/msyh.ttc",
    "C:/Windows/Fonts/arialuni.ttf",
)
_NOTDEF_PROBE = "\U0010fffd"  # a private-use code point no real font maps: renders as .notdef


@functools.lru_cache(maxsize=64)
def _font_from_file(path: str, size: int) -> Font | None:
    try:
        return ImageFont.truetype(path, size)
    except (OSError, ValueError):  # missing file, bitmap-only color emoji font at this size, ...
        return None


@functools.lru_cache(maxsize=8)
def _default_font(size: int) -> Font:
    return ImageFont.load_default(size=size)


def _glyph_signature(font: Font, text: str) -> tuple[tuple[int, int], bytes]:
    mask = font.getmask(text)
    return mask.size, bytes(mask)


def _has_glyph(font: Font, char: str) -> bool:
    """Whether ``font`` draws ``char`` as itself rather than as the .notdef box (or not at all)."""
    if char.isspace() or unicodedata.category(char) == "Cf":  # invisible by design (ZWJ, ...)
        return True
    try:
        return _glyph_signature(font, char) != _glyph_signature(font, _NOTDEF_PROBE)
    except (UnicodeError, OSError, ValueError):  # the bitmap fallback font only encodes Latin-1
        return False


@functools.lru_cache(maxsize=1024)
def _system_font_paths(char: str) -> tuple[str, ...]:
    """Font files that may hold ``char``: fontconfig's best match first, then common locations."""
    paths: list[str] = []
    fc_match = shutil.which("fc-match")
    if fc_match is not None:
        try:
            found = subprocess.run(
                [fc_match, "-f", "%{file}", f":charset={ord(char):x}"],
                capture_output=True, text=True, timeout=5, check=False,
            ).stdout.strip()  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            found = ""
        if found:
            paths.append(found)
    paths.extend(p for p in _COMMON_FONT_PATHS if p not in paths)
    return tuple(paths)


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _label_runs(
    label: str, size: int, font_path: str | None = None, system_fonts: bool = True
) -> list[tuple[str, Font]]:
    """Split ``label`` into (text, font) runs so every character is drawn by a font that has it.

    Fonts tried per character: ``font_path``, Pillow's bundled Aileron (ASCII only), then system fonts.
    A character no font has is written as its ``\\uXXXX`` escape, so the loss is visible, never silent.
    """
    chain: list[Font] = []
    if font_path is not None:
        user_font = _font_from_file(font_path, size)
        if user_font is None:
            logger.warning("could not load font %s; using fallbacks", font_path)
        else:
            chain.append(user_font)
    default = _default_font(size)
    chain.append(default)
    runs: list[tuple[str, Font]] = []
    missing: list[str] = []
    for char in unicodedata.normalize("NFC", label):
        if char.isspace():  # a newline or tab (a ref may hold one) would make the label multiline text
            char = " "
        font = next((f for f in chain if _has_glyph(f, char)), None)
        if font is None and system_fonts:
            for path in _system_font_paths(char):
                candidate = _font_from_file(path, size)
                if candidate is not None and _has_glyph(candidate, char):
                    font = candidate
                    break
        piece = char
        if font is None:
            missing.append(char)
            piece, font = _escape(char), default
        if runs and runs[-1][1] is font:
            runs[-1] = (runs[-1][0] + piece, font)
        else:
            runs.append((piece, font))
    if missing:  # each character once, the label cut short: a long reference made a 10 KB log line
        logger.warning("no available font draws %s of label %s; drawing them escaped",
                       _clipped("".join(dict.fromkeys(missing))), _clipped(label))
    return runs


def _clipped(text: str, limit: int = 60) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _text_color(color: str | tuple[int, ...]) -> tuple[int, int, int]:
    rgb = ImageColor.getrgb(color) if isinstance(color, str) else tuple(color)
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if luminance > 160 else (255, 255, 255)


def _draw_label(
    draw: ImageDraw.ImageDraw,
    anchor: tuple[float, float],
    runs: list[tuple[str, Font]],
    color: str | tuple[int, ...],
    image_size: tuple[int, int],
    pad: int,
) -> None:
    """Label on a filled background above the box corner ``anchor`` (inside the box when no room above)."""
    widths = [draw.textlength(text, font=font) for text, font in runs]
    boxes = [draw.textbbox((0, 0), text, font=font) for text, font in runs]
    text_w = sum(widths)
    text_h = max(b[3] for b in boxes) if boxes else 0
    total_w, total_h = text_w + 2 * pad, text_h + 2 * pad
    x = min(max(anchor[0], 0), max(image_size[0] - total_w, 0))
    y = anchor[1] - total_h if anchor[1] - total_h >= 0 else anchor[1]
    draw.rectangle((x, y, x + total_w, y + total_h), fill=color)
    fg = _text_color(color)
    cursor = x + pad
    for (text, font), w in zip(runs, widths):
        draw.text((cursor, y + pad), text, fill=fg, font=font)
        cursor += w


_DRAW_LIMIT = 2.0**30  # Pillow draws far outside the image, but fails on coordinates beyond its integers


def _drawable(values: Iterable[float]) -> tuple[float, ...]:
    """Coordinates clamped to where Pillow can draw them (what is that far outside the image is not seen)."""
    values = tuple(float(v) for v in values)
    if any(math.isnan(v) for v in values):
        raise ValueError(f"cannot draw coordinates that are not numbers: {values}")
    return tuple(min(max(v, -_DRAW_LIMIT), _DRAW_LIMIT) for v in values)


def _near_image(box: tuple[float, ...], size: tuple[int, int], width: int) -> tuple[float, ...]:
    """A sorted box's corners moved to at most ``width + 1`` pixels outside the image: the same pixels are drawn.

    Pillow draws a wide outline's sides pixel by pixel over their whole length, inside the image or not: a
    model's garbage box ``(0,0),(999999999,999999999)`` took seconds per box. The outline of a side beyond
    the margin lies wholly outside the image wherever it is, so moving it to the margin changes nothing seen.
    """
    margin = width + 1
    x1, y1, x2, y2 = box
    lo_x, hi_x, lo_y, hi_y = -margin, size[0] + margin, -margin, size[1] + margin
    return (min(max(x1, lo_x), hi_x), min(max(y1, lo_y), hi_y), min(max(x2, lo_x), hi_x), min(max(y2, lo_y), hi_y))


# Modes that carry transparency (La, RGBa: premultiplied alpha; P: a palette that may name a transparent entry).
_ALPHA_MODES = ("LA", "La", "PA", "RGBa")


def _canvas(image: Image.Image) -> Image.Image:
    """A copy of ``image`` to draw in color on: RGBA when it has transparency (kept), else RGB as the model sees
    it (``load_image``'s conversion: 16-bit grayscale scaled to 8 bits, where PIL's own would clip it white)."""
    if image.mode in ("RGB", "RGBA"):
        return image.copy()
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        # Pillow converts La to RGBA only through LA; a palette's transparency survives only into RGBA
        return (image.convert("LA") if image.mode == "La" else image).convert("RGBA")
    return as_rgb(image)


def draw_boxes(
    image: Image.Image,
    objects: Sequence[GroundedObject | tuple[str | None, BoxLike]],
    colors: Sequence[str | tuple[int, int, int]] | None = None,
    width: int = 3,
    font_size: int | None = None,
    font_path: str | None = None,
    system_fonts: bool = True,
) -> Image.Image:
    """A copy of ``image`` with each object's boxes/quads outlined and labelled; boxes in **pixels**.

    ``objects`` are :class:`GroundedObject` (e.g. ``denormalize_objects(parse_grounding(text), W, H)``) or
    ``(label, box)`` pairs. Each object gets one color (cycling through ``colors``), so the several boxes of
    one ref read as one thing; every box carries the label. Labels use ``font_path`` if given, then Pillow's
    bundled font, then system fonts (``system_fonts``) for characters it lacks (CJK, emoji); anything still
    unrenderable is drawn as a ``\\uXXXX`` escape. Never downloads anything.
    """
    for name, value in (("width", width), ("font_size", font_size)):
        # Pillow draws an outline pixel by pixel of its width (a width of 10**9 never ends) and FreeType fails
        # on huge fonts: sizes beyond any picture's are refused
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000):
            raise ValueError(f"{name} must be an integer from 1 to 1000, got {value!r}")
    palette = list(colors) if colors else list(DEFAULT_COLORS)
    out = _canvas(image)
    size = font_size or max(12, round(min(out.size) / 40))
    pad = max(1, size // 6)
    draw = ImageDraw.Draw(out)
    for index, item in enumerate(objects):
        if isinstance(item, GroundedObject):
            label, boxes, quads = item.ref, [_drawable(_four(b)) for b in item.boxes], item.quads
        else:
            label, box = item
            boxes, quads = [_drawable(_four(box))], []
        color = palette[index % len(palette)]
        runs = _label_runs(label, size, font_path, system_fonts) if label else []
        for x1, y1, x2, y2 in boxes:
            x1, x2 = sorted((x1, x2))
            y1, y2 = sorted((y1, y2))
            draw.rectangle(_near_image((x1, y1, x2, y2), out.size, width), outline=color, width=width)
            if runs:
                _draw_label(draw, (x1, y1), runs, color, out.size, pad)
        for quad in quads:
            points = [cast(tuple[float, float], _drawable(p)) for p in quad.points]  # a Quad's corners: (x, y)
            draw.line(points + [points[0]], fill=color, width=width, joint="curve")
            if runs:
                _draw_label(draw, min(points, key=lambda p: (p[1], p[0])), runs, color, out.size, pad)
    return out
