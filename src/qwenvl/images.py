"""Image loading and the official Qwen-VL image transform.

The transform is a *fact* of the model (DESIGN.md section 1, "Vision tower"): ``convert("RGB")``, PIL bicubic
resize to ``image_size`` x ``image_size``, scale to [0, 1], normalize with the CLIP mean/std. Any other resize
path (torch interpolate, antialias differences, another library) gives different pixels and so a different
model output, which is why only PIL is used here.

Loading is where user input goes wrong (missing file, a text file named ``.jpg``, a truncated download, a
decompression bomb), so every failure becomes an :class:`ImageError` that names the image and the problem.
As the official code, EXIF orientation is not applied.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .config import CLIP_MEAN, CLIP_STD

__all__ = ["MAX_IMAGE_PIXELS", "ImageError", "ImageSource", "load_image", "pixel_values", "preprocess"]

# PIL's own hard limit (2x Image.MAX_IMAGE_PIXELS): larger images are refused before decoding.
MAX_IMAGE_PIXELS = 178_956_970

ImageSource = str | os.PathLike | bytes | bytearray | Image.Image


class ImageError(ValueError):
    """An image could not be loaded: the message names the image and the problem."""


def _describe(src: object) -> str:
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    if isinstance(src, str) and src.startswith("data:"):
        return src[:40] + ("..." if len(src) > 40 else "")
    return str(src)


def _decode_data_url(url: str) -> bytes:
    """``data:image/png;base64,....`` -> bytes (only base64 payloads: that is what images use)."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise ImageError(f"malformed data URL (no comma): {_describe(url)}")
    if not header.endswith(";base64"):
        raise ImageError(f"data URL is not base64-encoded (expected 'data:image/...;base64,'): {_describe(url)}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"data URL has invalid base64: {e}") from e


def _open(fp: BinaryIO, name: str, max_pixels: int) -> Image.Image:
    """Open and fully decode; every PIL failure becomes an ImageError naming ``name``."""
    try:
        with warnings.catch_warnings():
            # We check the size ourselves below with a clear message; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(
                    f"image {name} is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels} "
                    "(a decompression bomb?)"
                )
            img.load()  # decode now, so a truncated or corrupt file fails here and not inside the model
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"image {name} is too large to decode safely: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"cannot decode image {name}: not a PNG/JPEG/GIF/BMP/WEBP/... file") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot decode image {name}: {e} (truncated or corrupt file?)") from e
    return img


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    if img.width == 0 or img.height == 0:
        raise ImageError(f"image {name} has zero size ({img.width}x{img.height})")
    # Exactly the official conversion (palette, RGBA, L, CMYK, ... -> RGB; alpha is dropped, not blended).
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(
    src: ImageSource, base_dir: str | os.PathLike | None = None, *, max_pixels: int = MAX_IMAGE_PIXELS
) -> Image.Image:
    """Load ``src`` as an RGB ``PIL.Image``.

    ``src`` is a path (relative ones are resolved against ``base_dir``), a ``PIL.Image``, the raw bytes of an
    image file, or a ``data:image/...;base64,...`` URL. http(s) URLs are refused: nothing is downloaded at run
    time. Raises :class:`ImageError` (a ``ValueError``) naming the image and the problem.
    """
    if isinstance(src, Image.Image):
        return _to_rgb(src, "<PIL image>")
    if isinstance(src, (bytes, bytearray)):
        if not src:
            raise ImageError("image bytes are empty (zero size)")
        return _to_rgb(_open(io.BytesIO(bytes(src)), _describe(src), max_pixels), _describe(src))
    if not isinstance(src, (str, os.PathLike)):
        raise ImageError(f"cannot load an image from a {type(src).__name__}: pass a path, bytes, or a PIL image")
    text = os.fspath(src)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    lowered = text[:8].lower()
    if lowered.startswith(("http://", "https://")):
        raise ImageError(
            f"image URLs are not downloaded: {text}. Download the file and pass its path (or bytes) instead"
        )
    if lowered.startswith("data:"):
        data = _decode_data_url(text)
        if not data:
            raise ImageError("data URL holds no data (zero size)")
        return _to_rgb(_open(io.BytesIO(data), _describe(text), max_pixels), _describe(text))
    if not text:
        raise ImageError("empty image path")
    path = Path(text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir).expanduser() / path
    path = path.absolute()
    if not path.exists():
        raise ImageError(f"image not found: {path}")
    if not path.is_file():
        raise ImageError(f"image path is not a file: {path}")
    if path.stat().st_size == 0:
        raise ImageError(f"image file {path} is empty (zero size)")
    try:
        with path.open("rb") as fp:  # closed even when decoding fails; the pixels are loaded before it closes
            img = _open(fp, str(path), max_pixels)
    except ImageError:
        raise
    except OSError as e:
        raise ImageError(f"cannot read image {path}: {e}") from e
    return _to_rgb(img, str(path))


def preprocess(image: Image.Image, image_size: int = 448) -> torch.Tensor:
    """The official transform: PIL bicubic resize, [0, 1], CLIP normalization -> float32 [3, S, S]."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = image.resize((image_size, image_size), Image.BICUBIC)
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    x = x.to(torch.float32).div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return x.sub(mean).div(std)


def pixel_values(
    sources: list[ImageSource], image_size: int = 448, base_dir: str | os.PathLike | None = None
) -> torch.Tensor:
    """Load and transform several images -> float32 [N, 3, S, S] (N may be 0)."""
    if not sources:
        return torch.empty(0, 3, image_size, image_size)
    return torch.stack([preprocess(load_image(s, base_dir), image_size) for s in sources])
