"""Images of a request: ``data:`` URLs always; http(s) and local files only when the server was told so.

The server loads every image itself, with byte and pixel limits, and hands the processor the decoded
pictures (``images=[...]``): the text of an ``<img>..</img>`` span is then only a name, so nothing written in
a message makes the server open a file or a URL. ``file://`` URLs are read under the processor's media
policy (:class:`qwenvl.images.MediaPolicy`; ``qwenvl serve`` gives it ``--allowed_local_media_path`` as the
media folder, or none). Pixel limits are checked from the image header, before decoding
(:func:`qwenvl.images.load_image`), so a decompression bomb costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from PIL import Image

from ..images import ImageError, MediaPolicy, load_image

__all__ = ["MediaError", "MediaLimits", "fetch_image"]


class MediaError(ValueError):
    """An image URL that is refused or cannot be loaded (the server answers 400)."""


@dataclass
class MediaLimits:
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 40_000_000
    allow_remote: bool = False
    remote_timeout: float = 10.0  # seconds for a whole download


def fetch_image(url: str, limits: MediaLimits, policy: MediaPolicy) -> Image.Image:
    """The RGB picture at ``url`` (``data:``, ``http(s)://``, or ``file://`` read under ``policy``), or MediaError."""
    scheme = url[: url.find(":")].lower() if ":" in url else ""
    if scheme == "data":
        data = _data_url_bytes(url, limits.max_image_bytes)
    elif scheme in ("http", "https"):
        if not limits.allow_remote:
            raise MediaError("image URLs are not fetched by this server (it runs without --allow_remote_images): "
                             "send the image as a data: URL")
        data = _download(url, limits)
    elif scheme == "file" or scheme == "":
        data = _local_file(url, limits, policy)
    else:
        raise MediaError(f"unsupported image URL scheme {scheme!r}: use a data:image/...;base64 URL")
    try:
        return load_image(data, max_pixels=limits.max_image_pixels)
    except ImageError as e:
        raise MediaError(str(e)) from e


def _too_big(n: int, limit: int) -> MediaError:
    return MediaError(f"image is {n} bytes, more than this server's limit of {limit} bytes")


def _data_url_bytes(url: str, limit: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise MediaError("malformed data URL: expected data:image/...;base64,<data>")
    if len(payload) * 3 // 4 > limit:  # checked before decoding anything
        raise _too_big(len(payload) * 3 // 4, limit)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"data URL has invalid base64: {e}") from e
    if not data:
        raise MediaError("data URL holds no data")
    return data


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201 (urllib's signature)
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise MediaError(f"image URL redirects to a non-http(s) URL: {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(url: str, limits: MediaLimits) -> bytes:
    """GET ``url`` with a deadline for the whole transfer and a byte limit (no file://, ftp:// redirects)."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(), _HttpOnlyRedirects(),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    deadline = time.monotonic() + limits.remote_timeout
    request = urllib.request.Request(url, headers={"User-Agent": "qwenvl-serve"})
    try:
        with opener.open(request, timeout=limits.remote_timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limits.max_image_bytes:
                raise _too_big(int(declared), limits.max_image_bytes)
            data = bytearray()
            while chunk := response.read(1 << 16):
                data += chunk
                if len(data) > limits.max_image_bytes:
                    raise _too_big(len(data), limits.max_image_bytes)
                if time.monotonic() > deadline:
                    raise MediaError(f"image download took more than {limits.remote_timeout:g} s: {url}")
    except MediaError:
        raise
    except urllib.error.HTTPError as e:
        raise MediaError(f"image URL answered HTTP {e.code}: {url}") from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise MediaError(f"cannot download image {url}: {getattr(e, 'reason', e)}") from e
    if not data:
        raise MediaError(f"image URL returned no data: {url}")
    return bytes(data)


def _local_file(url: str, limits: MediaLimits, policy: MediaPolicy) -> bytes:
    """A file the media policy lets requests name (inside its folder; links resolved first)."""
    if policy.root is None and not policy.allow_any_local_path:
        raise MediaError("local image files are not read by this server (it runs without "
                         "--allowed_local_media_path): send the image as a data: URL")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme and parts.netloc not in ("", "localhost"):
        raise MediaError(f"file URL names another host: {url}")
    try:
        path = policy.resolve(urllib.parse.unquote(parts.path if parts.scheme else url))
    except ImageError as e:
        raise MediaError(str(e)) from e
    if not path.is_file():
        raise MediaError(f"image file not found in the allowed media folder: {url}")
    size = path.stat().st_size
    if size > limits.max_image_bytes:
        raise _too_big(size, limits.max_image_bytes)
    return path.read_bytes()
