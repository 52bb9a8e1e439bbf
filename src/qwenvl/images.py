"""Image loading and the official Qwen-VL image transform.

The transform is a *fact* of the model (DESIGN.md section 1, "Vision tower"): ``convert("RGB")``, PIL bicubic
resize to ``image_size`` x ``image_size``, scale to [0, 1], normalize with the CLIP mean/std. Any other resize
path (torch interpolate, antialias differences, another library) gives different pixels and so a different
model output, which is why only PIL is used here.

Loading is where user input goes wrong (missing file, a text file named ``.jpg``, a truncated download, a
decompression bomb), so every failure becomes an :class:`ImageError` that names the image and the problem.
Every format PIL decodes itself is read (:func:`open_image`); PostScript/EPS is not, because PIL decodes it by
running Ghostscript, another program, on the file's bytes. As the official code, EXIF orientation is not applied.
16-bit grayscale images (modes ``I;16*`` and ``I``) are scaled to 8 bits first; PIL's own ``convert("RGB")``
clips them to white (every other mode converts exactly as the official code does).

Which local files a path *from text* may name is the :class:`MediaPolicy` (the processor applies it to every
``<img>PATH</img>``): paths resolve under a media root, and anything that leads out of it is refused with one
message that does not depend on whether the file exists.
"""

from __future__ import annotations

import base64
import binascii
import errno
import io
import os
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import CLIP_MEAN, CLIP_STD

if TYPE_CHECKING:  # torch loads where tensors are made: checking images (the CLI, the server) does not need it
    import torch

__all__ = [
    "MAX_IMAGE_PIXELS",
    "ImageError",
    "ImageSource",
    "MediaAccessError",
    "MediaPolicy",
    "as_rgb",
    "check_image",
    "image_problems",
    "load_image",
    "open_image",
    "pixel_values",
    "preprocess",
    "shown",
]

# PIL's own hard limit (2x Image.MAX_IMAGE_PIXELS): larger images are refused before decoding.
MAX_IMAGE_PIXELS = 178_956_970

ImageSource = str | os.PathLike | bytes | bytearray | Image.Image
_Path = TypeVar("_Path", str, Path)


class ImageError(ValueError):
    """An image could not be loaded: the message names the image and the problem."""


class MediaAccessError(ImageError):
    """A path names a file that the media policy does not let us read (the message never says if it exists)."""


def shown(text: str) -> str:
    """``text`` quoted for a message, cut to its first 77 characters and "..." when longer (a path or URL a user
    gave may be megabytes: a data: URL)."""
    return repr(text if len(text) <= 80 else text[:77] + "...")


@dataclass(frozen=True)
class MediaPolicy:
    """Which local files an image path taken from text (``<img>PATH</img>``, a data file) may name.

    ``root``: the media folder. Relative paths resolve against it (``"."``: the working directory at the
    time of the call). ``allow_any_local_path=False`` (the default) reads only files inside ``root``: an
    absolute path must point into it, and ``~``, ``..`` that leaves it, and symbolic links that lead out of it
    are refused. ``root=None`` then reads no local file at all (only images passed as pixels, bytes or
    ``data:`` URLs). ``allow_any_local_path=True`` reads any path the process can read (relative ones against
    ``root``, or the working directory when it is None): for the user's own prompts on their own machine.

    Refusals raise :class:`MediaAccessError` with the same message whether the file exists or not; they call
    ``root`` ``root_name`` (the name the caller knows it by, as ``"image_location 'imgs'"``).
    """

    root: str | os.PathLike | None = "."
    allow_any_local_path: bool = False
    root_name: str = "the media folder"

    def resolve(self, path: str | os.PathLike) -> Path:
        """The file ``path`` names under this policy (not checked for existence); raise if it is refused."""
        text = os.fsdecode(os.fspath(path))
        if not text:
            raise ImageError("empty image path")
        if "\0" in text:
            raise MediaAccessError(f"image path {shown(text)} holds a NUL character")
        try:  # a lone surrogate ("\ud800" in JSON) names no file: the file system cannot take it
            os.fsencode(text)
        except UnicodeEncodeError:
            raise ImageError(f"image path {shown(text)} is not valid Unicode text (a lone surrogate)") from None
        if self.allow_any_local_path:
            p = Path(text).expanduser()
            if not p.is_absolute() and self.root is not None:
                p = Path(self.root).expanduser() / p
            return p.absolute()
        if self.root is None:
            raise MediaAccessError(
                f"image path {shown(text)}: reading local image files is disabled here (no media folder); "
                "pass the image itself (pixels, bytes or a data: URL)"
            )
        given = Path(os.path.normpath(Path(self.root).expanduser().absolute()))
        root = Path(os.path.realpath(given))
        refused = MediaAccessError(
            f"image path {shown(text)} is not allowed: only files inside {self.root_name} are read "
            "(no absolute path outside it, no '~', no '..' or link leading out of it)"
        )
        if text.startswith("~"):
            raise refused
        # First the text itself, without touching the disk: it must stay inside the root (as given or real) ...
        lexical = Path(os.path.normpath(given / text))
        if not (_inside(lexical, given) or _inside(lexical, root)):
            raise refused
        # ... then the file it really is, links followed (realpath does not need the file to exist).
        real = Path(os.path.realpath(lexical))
        if not _inside(real, root):
            raise refused
        return real


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents



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


# PIL opens these by handing the bytes to another program (EPS: Ghostscript): never for images that come from
# data files, prompts or HTTP requests.
_NOT_READ = {"EPS": "PostScript/EPS"}
_EPS_SIGNATURES = (b"%!PS", b"\xc5\xd0\xd3\xc6")  # text and DOS-binary EPS, as PIL's plugin recognizes them


def open_image(fp: str | os.PathLike[str] | BinaryIO, name: str | None = None) -> Image.Image:
    """``PIL.Image.open`` (lazy: reads the header) for every format PIL decodes itself; PostScript/EPS raises
    :class:`ImageError` naming ``name`` (default: the path) (PIL would run Ghostscript on it)."""
    if name is None:
        name = str(fp) if isinstance(fp, (str, os.PathLike)) else "<bytes>"
    if isinstance(fp, (str, os.PathLike)):
        with open(fp, "rb") as f:
            head = f.read(4)
    else:
        at = fp.tell()
        head = fp.read(4)
        fp.seek(at)
    if head.startswith(_EPS_SIGNATURES):
        raise ImageError(f"image {name} is {_NOT_READ['EPS']}, which is not read (PIL decodes it by running "
                         "Ghostscript): use a PNG, JPEG, GIF, BMP, WEBP or TIFF file")
    Image.init()
    return Image.open(fp, formats=[f for f in Image.OPEN if f not in _NOT_READ])


def _open(fp: BinaryIO, name: str, max_pixels: int, decode: bool = True) -> Image.Image:
    """Open and fully decode (the header only without ``decode``); every PIL failure becomes an ImageError naming
    ``name``."""
    try:
        with warnings.catch_warnings():
            # We check the size ourselves below with a clear message; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = open_image(fp, name)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(
                    f"image {name} is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels} "
                    "(a decompression bomb?)"
                )
            if decode:
                img.load()  # decode now, so a truncated or corrupt file fails here and not inside the model
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"image {name} is too large to decode safely: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"cannot decode image {name}: not a PNG/JPEG/GIF/BMP/WEBP/... file") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot decode image {name}: {e} (truncated or corrupt file?)") from e
    except Exception as e:  # noqa: BLE001 - PIL's plugins fail on some corrupt headers with other errors
        # (NotImplementedError from DDS, OverflowError from SPIDER, ...): still a file we cannot decode
        raise ImageError(f"cannot decode image {name}: {type(e).__name__}: {e} (corrupt file?)") from e
    return img


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    if img.width == 0 or img.height == 0:
        raise ImageError(f"image {name} has zero size ({img.width}x{img.height})")
    return as_rgb(img)


def as_rgb(img: Image.Image) -> Image.Image:
    """``img`` in mode RGB, as the model sees it (also what ``grounding.draw_boxes`` draws on)."""
    # 16-bit grayscale: I;16, I;16B, I;16L, I;16N (PNG, TIFF, ...), and I when read from a PNG (PNG has no 32-bit
    # grayscale: older Pillow opens 16-bit PNGs as I). Any other I image keeps PIL's conversion.
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):
        img = _sixteen_to_eight(img)
    if img.mode == "La":  # premultiplied gray + alpha: Pillow converts it to LA only ("La to L not supported")
        img = img.convert("LA")
    # Exactly the official conversion (palette, RGBA, L, CMYK, ... -> RGB; alpha is dropped, not blended).
    return img if img.mode == "RGB" else img.convert("RGB")


def _sixteen_to_eight(img: Image.Image) -> Image.Image:
    """16-bit grayscale -> mode L, 0..65535 onto 0..255 (rounded). ``convert("RGB")`` would clip at 255."""
    a = np.asarray(img).astype(np.int64)  # (H, W); PIL's I;16B is big-endian, numpy reads it as such
    a = (np.clip(a, 0, 65535) + 128) // 257
    return Image.fromarray(a.astype(np.uint8), "L")


def load_image(
    src: ImageSource,
    base_dir: str | os.PathLike | None = None,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    policy: MediaPolicy | None = None,
) -> Image.Image:
    """Load ``src`` as an RGB ``PIL.Image``.

    ``src`` is a path, a ``PIL.Image``, the raw bytes of an image file, or a ``data:image/...;base64,...`` URL.
    http(s) URLs are refused: nothing is downloaded at run time. A path is read under ``policy`` (see
    :class:`MediaPolicy`; its root is ``base_dir`` when that is given). Without a policy the path comes from
    the caller's code and is read as given (relative ones against ``base_dir``). Raises :class:`ImageError`
    (a ``ValueError``) naming the image and the problem.
    """
    img, name = _open_source(src, base_dir, max_pixels, policy)
    return _to_rgb(img, name)


def check_image(
    src: ImageSource,
    base_dir: str | os.PathLike | None = None,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    policy: MediaPolicy | None = None,
    decode: bool = True,
    name: str | None = None,
) -> tuple[int, int]:
    """Decode ``src`` fully (as :func:`load_image`, without the RGB conversion) and return its (width, height).

    For checks made before long work: a truncated or corrupt file fails here, not hours later. ``decode=False``
    reads the header only (milliseconds, for thousands of images): every refusal :func:`load_image` makes, with
    its message, but for pixel data that turns out truncated or corrupt. ``name``: what the messages call the
    file of a path (default: the file it resolves to, an absolute path), as the user knows it.
    """
    img, name = _open_source(src, base_dir, max_pixels, policy, decode, name)
    if img.width == 0 or img.height == 0:
        raise ImageError(f"image {name} has zero size ({img.width}x{img.height})")
    return img.size


def image_problems(paths: Iterable[_Path], policy: MediaPolicy | None = None, *,
                   name_as_given: bool = False) -> dict[_Path, str | None]:
    """Each distinct path of ``paths`` -> why it cannot be used (:func:`check_image`'s message: missing, refused by
    ``policy``, truncated or corrupt), or None; decoded a few at a time (Pillow decodes without the GIL: 6,080 small
    PNGs took 2.7 s instead of 4.5 s on 2 cores). On Ctrl-C the paths not started are not decoded.
    ``name_as_given``: the messages call each file as ``paths`` spells it (default: the file it resolves to)."""

    def problem(path: _Path) -> str | None:
        try:
            check_image(path, policy=policy, name=os.fspath(path) if name_as_given else None)
        except ValueError as e:  # ImageError, MediaAccessError
            return str(e)
        return None

    todo = list(dict.fromkeys(paths))
    if len(todo) < 2:
        return {path: problem(path) for path in todo}
    pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
    try:
        return dict(zip(todo, pool.map(problem, todo)))
    finally:
        pool.shutdown(cancel_futures=True)


def _open_source(
    src: ImageSource, base_dir: str | os.PathLike | None, max_pixels: int, policy: MediaPolicy | None,
    decode: bool = True, name: str | None = None,
) -> tuple[Image.Image, str]:
    """The decoded image of any source kind (opened, its header read, without ``decode``), and its name for
    messages (of a path: ``name``, default the file it resolves to)."""
    if isinstance(src, Image.Image):
        return src, "<PIL image>"
    if isinstance(src, (bytes, bytearray)):
        if not src:
            raise ImageError("image bytes are empty (zero size)")
        return _open(io.BytesIO(bytes(src)), _describe(src), max_pixels, decode), _describe(src)
    if not isinstance(src, (str, os.PathLike)):
        raise ImageError(f"cannot load an image from a {type(src).__name__}: pass a path, bytes, or a PIL image")
    text = os.fsdecode(os.fspath(src))
    lowered = text[:8].lower()
    if lowered.startswith(("http://", "https://")):
        raise ImageError(
            f"image URLs are not downloaded: {shown(text)}. Download the file and pass its path (or bytes) instead"
        )
    if lowered.startswith("file:"):  # as a path it would be looked up as a folder named "file:" (not found)
        raise ImageError(f"file: URLs are not read: {shown(text)}. Pass the path itself")
    if lowered.startswith("data:"):
        data = _decode_data_url(text)
        if not data:
            raise ImageError("data URL holds no data (zero size)")
        return _open(io.BytesIO(data), _describe(text), max_pixels, decode), _describe(text)
    if not text:
        raise ImageError("empty image path")
    if policy is None:
        policy = MediaPolicy(base_dir, allow_any_local_path=True)
    elif base_dir is not None:
        policy = MediaPolicy(base_dir, policy.allow_any_local_path)
    path = policy.resolve(text)
    name = str(path) if name is None else name
    try:
        if not path.exists():
            raise ImageError(_missing(path, name))
        if not path.is_file():
            raise ImageError(f"image path is not a file: {name}")
        if path.stat().st_size == 0:
            raise ImageError(f"image file {name} is empty (zero size)")
    except OSError as e:  # a name too long for the filesystem, a folder we may not look into, ...
        raise ImageError(f"cannot read image {shown(name)}: {e.strerror or e}") from e
    try:
        with path.open("rb") as fp:  # closed even when decoding fails; the pixels are loaded before it closes
            img = _open(fp, name, max_pixels, decode)
    except ImageError:
        raise
    except OSError as e:
        raise ImageError(f"cannot read image {name}: {e}") from e
    return img, name


def _missing(path: Path, name: str) -> str:
    """Why ``path`` (called ``name``), which Path.exists() calls missing, cannot be read: not found, or a link that
    loops (exists() says False for both). Only asked of a path the media policy allows, so no refusal says more
    than another."""
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"image path {shown(name)} cannot be resolved: a link in it loops (it leads back to itself)"
    return f"image not found: {name}"


def preprocess(image: Image.Image, image_size: int = 448) -> torch.Tensor:
    """The official transform: PIL bicubic resize, [0, 1], CLIP normalization -> float32 [3, S, S]."""
    import torch

    if image.mode != "RGB":
        image = image.convert("RGB")
    image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    x = x.to(torch.float32).div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return x.sub(mean).div(std)


def pixel_values(
    sources: list[ImageSource],
    image_size: int = 448,
    base_dir: str | os.PathLike | None = None,
    policy: MediaPolicy | None = None,
) -> torch.Tensor:
    """Load and transform several images -> float32 [N, 3, S, S] (N may be 0); paths as in :func:`load_image`."""
    import torch

    if not sources:
        return torch.empty(0, 3, image_size, image_size)
    return torch.stack([preprocess(load_image(s, base_dir, policy=policy), image_size) for s in sources])
