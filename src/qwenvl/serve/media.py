"""Images of a request: ``data:`` URLs always; http(s) and local files only when the server was told so.

The server loads every image itself, with byte and pixel limits, and hands the processor the decoded
pictures (``images=[...]``): the text of an ``<img>..</img>`` span is then only a name, so nothing written in
a message makes the server open a file or a URL. ``file://`` URLs are read under the processor's media
policy (:class:`qwenvl.images.MediaPolicy`; ``qwenvl serve`` gives it ``--allowed_local_media_path`` as the
media folder, or none). Pixel limits are checked from the image header, before decoding
(:func:`qwenvl.images.load_image`), so a decompression bomb costs nothing; PostScript/EPS, which PIL decodes by
running Ghostscript, is refused there too.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import socket
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from PIL import Image

from ..images import ImageError, MediaPolicy, load_image, shown

__all__ = ["MediaError", "MediaLimits", "decode_image", "fetch_image", "read_image"]


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
    return decode_image(read_image(url, limits, policy), limits)


def read_image(url: str, limits: MediaLimits, policy: MediaPolicy) -> bytes:
    """The bytes of the image at ``url`` (see :func:`fetch_image`), not decoded yet, or MediaError."""
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
        raise MediaError(f"unsupported image URL scheme {shown(scheme)}: use a data:image/...;base64 URL")
    return data


def decode_image(data: bytes, limits: MediaLimits) -> Image.Image:
    """The RGB picture of ``data`` (pixels counted from the header first), or MediaError."""
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
            raise MediaError(f"image URL redirects to a non-http(s) URL: {shown(newurl)}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Deadline:
    """Shuts the sockets of one download when its time is up: each read waits at most the socket timeout, so a
    host that drips its headers or body a byte at a time would otherwise hold the request for hours."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def connection(self, base: type[http.client.HTTPConnection]) -> type[http.client.HTTPConnection]:
        deadline = self

        class Connection(base):  # type: ignore[valid-type,misc]
            def connect(self) -> None:
                super().connect()
                with deadline._lock:
                    deadline._sockets.append(self.sock)
                    if deadline.expired:
                        _shut(self.sock)

        return Connection

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # a read blocked in another thread returns at once


class _HttpHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):  # noqa: ANN001, ANN201 (urllib's signature)
        return self.do_open(self.deadline.connection(http.client.HTTPConnection), req)


class _HttpsHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):  # noqa: ANN001, ANN201 (urllib's signature)
        return self.do_open(self.deadline.connection(http.client.HTTPSConnection), req,
                            context=ssl.create_default_context())


def _download(url: str, limits: MediaLimits) -> bytes:
    """GET ``url`` with a deadline for the whole transfer and a byte limit (no file://, ftp:// redirects)."""
    with _Deadline(limits.remote_timeout) as deadline:
        try:
            return _read_url(url, limits, deadline)
        except MediaError:
            if deadline.expired:
                raise _too_slow(url, limits) from None
            raise


def _too_slow(url: str, limits: MediaLimits) -> MediaError:
    return MediaError(f"image download took more than {limits.remote_timeout:g} s: {shown(url)}")


def _read_url(url: str, limits: MediaLimits, deadline: _Deadline) -> bytes:
    opener = urllib.request.OpenerDirector()
    for handler in (_HttpHandler(deadline), _HttpsHandler(deadline), _HttpOnlyRedirects(),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
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
    except MediaError:
        raise
    except urllib.error.HTTPError as e:
        raise MediaError(f"image URL answered HTTP {e.code}: {shown(url)}") from e
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:  # not HTTP, cut short, ...
        raise MediaError(f"cannot download image {shown(url)}: {shown(str(getattr(e, 'reason', e)))}") from e
    if deadline.expired:  # the socket was shut: what came is cut short
        raise _too_slow(url, limits)
    if not data:
        raise MediaError(f"image URL returned no data: {shown(url)}")
    return bytes(data)


def _local_file(url: str, limits: MediaLimits, policy: MediaPolicy) -> bytes:
    """A file the media policy lets requests name (inside its folder; links resolved first)."""
    if policy.root is None and not policy.allow_any_local_path:
        raise MediaError("local image files are not read by this server (it runs without "
                         "--allowed_local_media_path): send the image as a data: URL")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme and parts.netloc not in ("", "localhost"):
        raise MediaError(f"file URL names another host: {shown(url)}")
    name = urllib.parse.unquote(parts.path if parts.scheme else url)
    try:  # a lone surrogate (JSON "\ud800") names no file: the file system cannot take it
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise MediaError("image path is not valid Unicode text (a lone surrogate)") from None
    try:
        path = policy.resolve(name)
    except ImageError as e:
        raise MediaError(str(e)) from e
    try:
        if not path.is_file():
            raise MediaError(f"image file not found in the allowed media folder: {shown(url)}")
        size = path.stat().st_size
        if size > limits.max_image_bytes:
            raise _too_big(size, limits.max_image_bytes)
        return path.read_bytes()
    except OSError as e:  # a name too long, no permission, ...: the request's fault, not the server's
        raise MediaError(f"cannot read image file {shown(url)}: {e.strerror or e}") from e
