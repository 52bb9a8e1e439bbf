"""A synthetic grounding task: images with a few coloured shapes, and requests to box one of them.

Every image shows between ``min_shapes`` and ``max_shapes`` non-overlapping shapes, each with its own colour,
on a plain background. Each image yields one sample that names one shape ("the red circle") and its box. The data is
written in the two formats the rest of the package reads:

- ``train.json``: the fine-tuning format (DESIGN.md, "Fine-tuning"): a JSON list of
  ``{"id", "conversations": [{"from": "user", "value": "Picture 1: <img>images/x.png</img>\\nBox the red
  circle"}, {"from": "assistant", "value": "<ref>the red circle</ref><box>(x1,y1),(x2,y2)</box>"}]}`` with
  box coordinates normalized to [0, 1000) (``normalize_box``), image paths relative to the dataset folder;
- ``eval.jsonl``: the ``qwenvl eval grounding`` format, one object per line with ``image``, ``sent``,
  ``bbox`` ([x1, y1, x2, y2] pixels), ``height`` and ``width``.

Everything is drawn from one seeded ``random.Random``: the same seed gives the same files, byte for byte.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import random
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from ..fileio import atomic_write_text
from ..grounding import format_box, normalize_box
from ..outputs import read_marker, record_files

__all__ = [
    "COLORS",
    "SHAPES",
    "ShapeSpec",
    "SyntheticConfig",
    "SyntheticDataset",
    "SyntheticSample",
    "make_dataset",
    "render_sample",
]

logger = logging.getLogger(__name__)

# Saturated, well separated colours: after the bicubic resize and CLIP normalization each still sits in
# its own corner of RGB space, so a patch's colour alone tells which shape it belongs to.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 210, 20),
    "purple": (150, 40, 190),
    "orange": (255, 130, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
STYLES: tuple[str, ...] = ("ask", "ref", "ref_first", "ref_both")  # conversation forms, see SyntheticSample
# The CLIP mean colour: it normalizes to ~0, so background patches embed to (almost) nothing but their position
# while shape patches are dominated by their colour. The ViT's LayerNorms then turn "where the shapes are" into
# features that even the untrained model carries (a linear probe on its averaged image features finds the
# shape's x-centre with R^2 ~0.9 at initialization, vs ~0 on a near-white background), and training starts
# from there instead of having to discover where things are.
BACKGROUND = (122, 117, 104)


@dataclass(frozen=True)
class ShapeSpec:
    """One drawn shape; ``box`` is its tight bounding box in pixels (x1, y1, x2, y2), x2/y2 exclusive."""

    color: str
    shape: str
    box: tuple[int, int, int, int]

    @property
    def expression(self) -> str:
        return f"the {self.color} {self.shape}"


@dataclass(frozen=True)
class SyntheticSample:
    """One image and the shape a request asks to box (``target`` indexes ``shapes``)."""

    image: str  # path relative to the dataset folder
    width: int
    height: int
    shapes: tuple[ShapeSpec, ...]
    target: int

    @property
    def target_shape(self) -> ShapeSpec:
        return self.shapes[self.target]

    @property
    def expression(self) -> str:
        return self.target_shape.expression

    def conversation(self, sample_id: str, style: str = "ask", ask_all: bool = False) -> dict:
        """The sample in the official fine-tuning format, coordinates normalized to [0, 1000).

        ``style="ask"``: the user asks "Box the red circle", the assistant answers
        ``<ref>the red circle</ref><box>(x1,y1),(x2,y2)</box>``. ``style="ref"``: the user's turn ends with
        ``<ref>the red circle</ref>`` and the assistant answers only ``<box>(x1,y1),(x2,y2)</box>`` (the
        grounding-pretraining form: shorter, and nothing to learn but the box).

        ``ask_all``: after the target, one more question-answer turn per other shape of the image (a multi-turn
        conversation in the same format), so one image teaches every shape on it, and the same picture with
        a different expression needs a different box.
        """
        if style not in STYLES:
            raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
        order = [self.target] + ([i for i in range(len(self.shapes)) if i != self.target] if ask_all else [])
        conversations = []
        for k, index in enumerate(order):
            shape = self.shapes[index]
            norm = normalize_box(shape.box, self.width, self.height)
            picture = f"Picture 1: <img>{self.image}</img>\n" if k == 0 else ""
            if style == "ask":
                turn = (picture + question(shape.expression), format_box(norm, ref=shape.expression))
            elif style in ("ref_first", "ref_both"):  # the request before the picture: image tokens can see it
                # ref_both: the answer names it again, in the official <ref>..</ref><box> form
                turn = (f"<ref>{shape.expression}</ref>\n" + picture,
                        format_box(norm, ref=shape.expression if style == "ref_both" else None))
            else:
                turn = (picture + f"<ref>{shape.expression}</ref>", format_box(norm))
            conversations += [{"from": "user", "value": turn[0]}, {"from": "assistant", "value": turn[1]}]
        return {"id": sample_id, "conversations": conversations}

    def eval_record(self) -> dict:
        """The sample as one line of ``qwenvl eval grounding`` input (box in pixels)."""
        return {
            "image": self.image,
            "sent": self.expression,
            "bbox": list(self.target_shape.box),
            "height": self.height,
            "width": self.width,
        }


def question(expression: str) -> str:
    """The user's request for one shape ("Box the red circle")."""
    return f"Box {expression}"


@dataclass
class SyntheticConfig:
    """How the images look. Sizes are fractions of the image side."""

    image_size: int = 224
    min_shapes: int = 1
    max_shapes: int = 3
    min_size: float = 0.25
    max_size: float = 0.45
    colors: Sequence[str] = field(default_factory=lambda: tuple(COLORS))
    kinds: Sequence[str] = SHAPES
    grid: int = 1  # shapes' positions and sizes are multiples of this many pixels (1 = anywhere)

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        unknown = [c for c in self.colors if c not in COLORS]
        if unknown:
            raise ValueError(f"unknown colours {unknown}; known: {', '.join(COLORS)}")
        # a colour given twice would draw two shapes of it in one picture, and "the red circle" could name either
        repeated = [f"{c} {'twice' if n == 2 else f'{n} times'}"
                    for c, n in collections.Counter(self.colors).items() if n > 1]
        if repeated:
            raise ValueError(f"colours must differ (each shape of a picture has its own), got {', '.join(repeated)}")
        bad = [s for s in self.kinds if s not in SHAPES]
        if bad:
            raise ValueError(f"unknown shapes {bad}; known: {', '.join(SHAPES)}")
        if not 1 <= self.min_shapes <= self.max_shapes <= len(self.colors):
            raise ValueError(
                f"need 1 <= min_shapes <= max_shapes <= {len(self.colors)} (each shape gets its own colour), "
                f"got {self.min_shapes} and {self.max_shapes}"
            )
        if not 0 < self.min_size <= self.max_size < 1:
            raise ValueError(f"need 0 < min_size <= max_size < 1, got {self.min_size}, {self.max_size}")
        if not 1 <= self.grid <= self.image_size // 4:
            raise ValueError(f"grid must be in [1, image_size / 4], got {self.grid}")
        if self.grid > 1 and round(self.min_size * self.image_size) // self.grid < 1:
            raise ValueError(f"min_size {self.min_size:.0%} of {self.image_size} px is under one grid step of {self.grid} px")


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _draw_shape(draw: ImageDraw.ImageDraw, spec: ShapeSpec) -> None:
    x1, y1, x2, y2 = spec.box
    fill = COLORS[spec.color]
    # PIL's shapes include their last pixel: draw to x2 - 1 so the box is exactly the painted extent.
    if spec.shape == "circle":
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
    elif spec.shape == "square":
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
    else:
        draw.polygon([((x1 + x2 - 1) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=fill)


def render_sample(rng: random.Random, cfg: SyntheticConfig) -> tuple[Image.Image, list[ShapeSpec]]:
    """Draw one image: ``min_shapes..max_shapes`` non-overlapping shapes, distinct colours, random kinds."""
    side, g = cfg.image_size, cfg.grid
    lo, hi = max(4, round(cfg.min_size * side)), max(4, round(cfg.max_size * side))
    lo, hi, cells = max(1, -(-lo // g)), max(1, hi // g), side // g  # sizes and positions in grid steps
    count = rng.randint(cfg.min_shapes, cfg.max_shapes)
    for _attempt in range(100):
        colors = rng.sample(list(cfg.colors), count)
        specs: list[ShapeSpec] = []
        for color in colors:
            for _try in range(50):
                kind = rng.choice(list(cfg.kinds))
                w = rng.randint(lo, max(lo, hi))
                h = rng.randint(lo, max(lo, hi)) if kind == "triangle" else w  # circles and squares stay round/square
                x, y = rng.randint(0, cells - w) * g, rng.randint(0, cells - h) * g
                w, h = w * g, h * g
                box = (x, y, x + w, y + h)
                if all(not _overlaps(box, s.box, gap=2) for s in specs):
                    specs.append(ShapeSpec(color, kind, box))
                    break
            else:
                break  # no room left: start the image over
        if len(specs) == count:
            image = Image.new("RGB", (side, side), BACKGROUND)
            draw = ImageDraw.Draw(image)
            for spec in specs:
                _draw_shape(draw, spec)
            return image, specs
    raise ValueError(
        f"cannot place {count} shapes of size up to {cfg.max_size:.0%} without overlap; "
        "use fewer or smaller shapes"
    )


@dataclass
class SyntheticDataset:
    """Where :func:`make_dataset` put things."""

    root: Path
    train_json: Path
    eval_jsonl: Path
    train: list[SyntheticSample]
    eval: list[SyntheticSample]


def _make_split(
    root: Path, split: str, count: int, rng: random.Random, cfg: SyntheticConfig
) -> list[SyntheticSample]:
    folder = root / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    _claim_pictures(folder, [f"{i:06d}.png" for i in range(count)])
    samples = []

    def save(image: Image.Image, rel: str) -> None:
        image.save(root / rel, format="PNG", compress_level=1)  # lossless either way; 1 writes ~35% faster

    # drawn in order (one random stream), encoded by threads: Pillow's PNG encoder releases the GIL (2 cores:
    # 1.2 s instead of 1.8 s per 1,000 images)
    workers = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: collections.deque[Future[None]] = collections.deque()
        for i in range(count):
            image, specs = render_sample(rng, cfg)
            rel = f"images/{split}/{i:06d}.png"
            pending.append(pool.submit(save, image, rel))
            samples.append(SyntheticSample(rel, cfg.image_size, cfg.image_size, tuple(specs),
                                           rng.randrange(len(specs))))
            if len(pending) > 8 * workers:  # a few images in flight, not the whole split in memory
                pending.popleft().result()  # an error writing an image is raised here
        for job in pending:
            job.result()
    return samples


def _claim_pictures(folder: Path, names: list[str]) -> None:
    """Make ``folder``'s marker list exactly ``names``, the pictures about to be written there, after deleting
    those an earlier run wrote (its marker lists them) that this run does not rewrite: a run with fewer
    pictures leaves none of the earlier run's behind, and a file we did not write is never touched."""
    marker = read_marker(folder)
    keep = set(names)
    for name in marker["files"] if marker else []:
        entry = folder / name
        if name not in keep and Path(name).name == name and (entry.is_file() or entry.is_symlink()):
            entry.unlink()
    record_files(folder, names, command="demo", replace=True)


def _asked(sample: SyntheticSample, each_shape: bool) -> list[SyntheticSample]:
    """The sample as drawn, or one copy per shape of its image, each asking for that shape."""
    if not each_shape:
        return [sample]
    return [dataclasses.replace(sample, target=t) for t in range(len(sample.shapes))]


def make_dataset(
    root: str | Path,
    n_train: int,
    n_eval: int,
    seed: int = 0,
    config: SyntheticConfig | None = None,
    style: str = "ask",
    ask_all: bool = False,
    each_shape: bool = False,
) -> SyntheticDataset:
    """Write ``n_train`` training and ``n_eval`` held-out samples under ``root`` (images/, train.json, eval.jsonl).

    ``style``, ``ask_all``: the conversation form, see :meth:`SyntheticSample.conversation`.
    ``each_shape``: every training image yields one conversation per shape on it (the same picture with
    different requests and boxes), instead of one for a randomly chosen shape; held-out images always yield one.

    Held-out images are drawn from the same distribution but are different images (a separate stream of
    the seeded generator), so evaluation measures generalization, not memorization.

    ``root`` may hold an earlier call's data: its pictures that this call does not rewrite are deleted (a
    marker in each ``images/<split>`` folder lists the pictures written there), so the folders hold this
    call's pictures only; files it did not write are kept.
    """
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"need at least one training and one held-out sample, got {n_train} and {n_eval}")
    cfg = config or SyntheticConfig()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    train = _make_split(root, "train", n_train, random.Random(f"{seed}-train"), cfg)
    held_out = _make_split(root, "eval", n_eval, random.Random(f"{seed}-eval"), cfg)
    train_json = atomic_write_text(
        root / "train.json",
        json.dumps([s.conversation(f"shapes-{i:06d}" + (f"-{s.target}" if each_shape else ""), style, ask_all)
                    for i, sample in enumerate(train)
                    for s in _asked(sample, each_shape)], ensure_ascii=False, indent=1),
    )
    eval_jsonl = atomic_write_text(
        root / "eval.jsonl", "".join(json.dumps(s.eval_record(), ensure_ascii=False) + "\n" for s in held_out)
    )
    logger.info("synthetic grounding data: %d training and %d held-out images in %s", n_train, n_eval, root)
    return SyntheticDataset(root, train_json, eval_jsonl, train, held_out)
