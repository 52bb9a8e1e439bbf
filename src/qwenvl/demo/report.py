"""Report figures drawn with PIL only (no plotting dependency): a loss curve and a grid of boxed images."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..fileio import atomic_file
from ..grounding import BoxLike, draw_boxes

__all__ = ["GridItem", "draw_loss_curve", "draw_prediction_grid", "smooth"]

# Box colours that no shape of the synthetic data has (its shapes are red/green/blue/yellow/purple/orange).
TRUE_COLOR = "#ffffff"
PRED_COLOR = "#00e5ff"
OK_TEXT = (20, 140, 40)
BAD_TEXT = (200, 30, 30)
RAW_COLOR = (170, 190, 225)
SMOOTH_COLOR = (31, 119, 180)
AXIS_COLOR = (60, 60, 60)
ACC_COLOR = (230, 120, 20)
GRID_COLOR = (225, 225, 225)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Debiased exponential moving average (TensorBoard-style smoothing)."""
    out, avg = [], 0.0
    for k, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**k))
    return out


def _log_ticks(lo: float, hi: float) -> list[float]:
    ticks = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            t = m * 10.0**e
            if lo <= t <= hi:
                ticks.append(t)
    return ticks


def _tick_label(v: float) -> str:
    return f"{v:g}" if v >= 0.01 else f"{v:.0e}"


def draw_loss_curve(
    losses: Sequence[float],
    path: str | os.PathLike,
    title: str = "training loss",
    size: tuple[int, int] = (900, 520),
    accuracy: Sequence[tuple[int, float]] = (),
) -> Path:
    """PNG of per-step losses (log scale): raw values faint, smoothed values bold.

    ``accuracy``: optional (step, fraction) points, drawn against a 0-100% axis on the right.
    """
    values = [float(v) for v in losses if math.isfinite(v) and v > 0]
    if not values:
        raise ValueError("no finite positive loss values to plot")
    w, h = size
    left, right, top, bottom = 80, 70 if accuracy else 30, 50, 60
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    lo, hi = min(values), max(values)
    lo, hi = (lo / 1.5, hi * 1.5) if lo == hi else (lo / 1.15, hi * 1.15)
    n = len(values)

    def xy(i: float, v: float) -> tuple[float, float]:
        x = left + (w - left - right) * (i / max(1, n - 1))
        y = top + (h - top - bottom) * (math.log(hi) - math.log(v)) / (math.log(hi) - math.log(lo))
        return x, y

    small, big = _font(14), _font(18)
    for t in _log_ticks(lo, hi):
        _, y = xy(0, t)
        draw.line((left, y, w - right, y), fill=GRID_COLOR)
        draw.text((left - 8, y), _tick_label(t), fill=AXIS_COLOR, font=small, anchor="rm")
    step = next(m * 10**e for e in range(12) for m in (1, 2, 5) if n / (m * 10**e) <= 10)
    for s in range(0, n + 1, step):
        x, _ = xy(max(0, s - 1), hi)  # tick at step s (steps count from 1)
        draw.line((x, h - bottom, x, h - bottom + 5), fill=AXIS_COLOR)
        draw.text((x, h - bottom + 8), str(max(1, s)), fill=AXIS_COLOR, font=small, anchor="mt")
    draw.rectangle((left, top, w - right, h - bottom), outline=AXIS_COLOR)
    if n > 1:
        draw.line([xy(i, v) for i, v in enumerate(values)], fill=RAW_COLOR, width=1)
        draw.line([xy(i, v) for i, v in enumerate(smooth(values))], fill=SMOOTH_COLOR, width=3)
    else:
        x, y = xy(0, values[0])
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=SMOOTH_COLOR)
    if accuracy:
        _draw_accuracy(draw, accuracy, n, (left, top, w - right, h - bottom), small)
    draw.text((w / 2, 16), title, fill=(0, 0, 0), font=big, anchor="mt")
    draw.text((w / 2, h - 22), "step", fill=AXIS_COLOR, font=small, anchor="mt")
    draw.text((12, top - 24), "loss (log scale)", fill=AXIS_COLOR, font=small)
    draw.text((w - right, h - 22), f"last {values[-1]:.3f} (smoothed {smooth(values)[-1]:.3f})",
              fill=AXIS_COLOR, font=small, anchor="ra")
    return _save_png(img, path)


def _draw_accuracy(
    draw: ImageDraw.ImageDraw,
    points: Sequence[tuple[int, float]],
    n: int,
    frame: tuple[float, float, float, float],
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
) -> None:
    """Held-out accuracy (fraction) against the right axis; step 0 (untrained) sits on the left edge."""
    x0, y0, x1, y1 = frame

    def xy(step: int, acc: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * max(0, step - 1) / max(1, n - 1), y1 - (y1 - y0) * min(1.0, max(0.0, acc))

    for pct in (0, 25, 50, 75, 100):
        _, y = xy(0, pct / 100)
        draw.line((x1, y, x1 + 5, y), fill=ACC_COLOR)
        draw.text((x1 + 8, y), f"{pct}%", fill=ACC_COLOR, font=font, anchor="lm")
    pts = [xy(s, a) for s, a in points]
    if len(pts) > 1:
        draw.line(pts, fill=ACC_COLOR, width=2)
    for x, y in pts:
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=ACC_COLOR)
    draw.text((x1, y0 - 24), "held-out Acc@0.5", fill=ACC_COLOR, font=font, anchor="ra")


@dataclass
class GridItem:
    """One tile: an image, the true box and the predicted one (pixels; None when nothing was parsed)."""

    image: Image.Image
    caption: str
    true_box: BoxLike
    pred_box: BoxLike | None
    correct: bool


def draw_prediction_grid(
    items: Sequence[GridItem], path: str | os.PathLike, columns: int = 4, tile: int = 224
) -> Path:
    """PNG grid: each image with its true box (white) and predicted box (cyan), the caption underneath."""
    if not items:
        raise ValueError("no images to draw")
    columns = max(1, min(columns, len(items)))
    rows = math.ceil(len(items) / columns)
    caption_h, pad, header = 40, 8, 36
    sheet = Image.new("RGB", (columns * (tile + pad) + pad, header + rows * (tile + caption_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    font, head = _font(13), _font(16)
    draw.text((pad, 10), "held-out images: true box (white) vs predicted box (cyan)", fill=(0, 0, 0), font=head)
    for k, item in enumerate(items):
        r, c = divmod(k, columns)
        scale = tile / max(item.image.size)
        objects: list[tuple[str | None, BoxLike]] = [(None, [v * scale for v in item.true_box])]
        colors = [TRUE_COLOR]
        if item.pred_box is not None:
            objects.append((None, [v * scale for v in item.pred_box]))
            colors.append(PRED_COLOR)
        shown = item.image.convert("RGB").resize(
            (max(1, round(item.image.width * scale)), max(1, round(item.image.height * scale))), Image.Resampling.BICUBIC
        )
        shown = draw_boxes(shown, objects, colors=colors, width=2)
        x, y = pad + c * (tile + pad), header + r * (tile + caption_h + pad)
        sheet.paste(shown, (x, y))
        verdict = "correct" if item.correct else ("no box" if item.pred_box is None else "wrong")
        draw.text((x, y + tile + 4), item.caption, fill=(0, 0, 0), font=font)
        draw.text((x, y + tile + 20), verdict, fill=OK_TEXT if item.correct else BAD_TEXT, font=font)
    return _save_png(sheet, path)


def _save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` as a PNG atomically: complete or not at all, and a link at ``path`` is replaced, not
    written through (PIL's own ``save`` writes into whatever file the link names)."""
    with atomic_file(path) as f:
        image.save(f, format="PNG")
    return Path(path)
