"""MindSpore ``.ckpt`` files, read and written without MindSpore.

The format is protobuf (MindSpore's ``checkpoint.proto``, proto2)::

    message Checkpoint  { repeated Value value = 1; }
    message Value       { required string tag = 1;
                          oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }
    message TensorProto { repeated int64 dims = 1; required string tensor_type = 2;
                          required bytes tensor_content = 3; }

``mindspore.save_checkpoint`` writes one serialized ``Checkpoint`` holding one ``Value`` per piece and
concatenates them (protobuf merges concatenated messages, so the file parses as one list). A tensor's content is
its row-major bytes in native (little-endian) order; a tensor over 512 MiB is written as several consecutive
Values with the same tag and dims, each holding the next slice of the bytes (MindSpore before 2.3 split on
element boundaries into near-equal slices, later ones cut every 512 MiB; a reader joins whatever it finds).
``tensor_type`` is the dtype's name (``Float32``, ``Float16``, ``BFloat16``, ``Int32``, ...; ``str`` for
strings). Scalars have no dims (old files write ``[0]``, which MindSpore reads as a scalar). A file saved with
``crc_check=True`` ends with ``b"crc_num"`` and a 10-byte big-endian CRC32 of everything before it.

Reading is streamed: :func:`scan` walks the file once, reading only the small headers and noting where each
tensor's bytes lie, and :func:`read_tensor` reads one tensor when it is needed. A :class:`CrcCheck` checks a
trailer on the way: the pieces :func:`read_tensor` reads anyway are summed as they come, and only what nobody
read (headers, skipped tensors) is read again at the end. :class:`CkptWriter` writes tensor by tensor, casting
in blocks, byte-identical to what MindSpore 2.x writes for the same tensors (with ``crc_check=True`` too).
"""

from __future__ import annotations

import io
import math
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import BinaryIO

import torch

from .checkpoint import CheckpointError, check_cast, iter_tensor_bytes

__all__ = ["CODE_OF_DTYPE", "DTYPE_OF_CODE", "SLICE_BYTES", "CkptTensor", "CkptWriter", "CrcCheck", "read_tensor",
           "scan"]

# tensor_type <-> torch dtype (MindSpore's tensor_to_ms_type; "Int4" packed pairs and "str" have no torch twin)
DTYPE_OF_CODE: dict[str, torch.dtype] = {
    "Float32": torch.float32, "Float16": torch.float16, "BFloat16": torch.bfloat16, "Float64": torch.float64,
    "Int8": torch.int8, "UInt8": torch.uint8, "Int16": torch.int16, "UInt16": torch.uint16,
    "Int32": torch.int32, "UInt32": torch.uint32, "Int64": torch.int64, "UInt64": torch.uint64, "Bool": torch.bool,
}
CODE_OF_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPE_OF_CODE.items()}
STR_CODE = "str"  # a string (save_checkpoint's append_dict); 4 bytes (UTF-32) per character
SLICE_BYTES = 512 * 2**20  # save_checkpoint's slice size (SLICE_SIZE = 512 * 1024 KB)
_CRC_TRAILER = 17  # b"crc_num" + 10 bytes
_CRC_BLOCK = 16 * 2**20  # bytes read at a time to sum what read_tensor did not read
_MAX_HEADER = 1 << 20  # a tag or dtype name longer than this is not a checkpoint
_MAX_DIMS = 64  # more dimensions than any tensor has (a crafted file could list millions: memory, not data)


class CkptFormatError(CheckpointError):
    """A file is not a MindSpore checkpoint, is truncated or corrupt, or holds something we cannot read."""


@dataclass(frozen=True)
class CkptTensor:
    """One tensor of a checkpoint: its name, dtype code, shape and where its bytes lie in the file."""

    name: str
    code: str
    shape: tuple[int, ...]
    pieces: tuple[tuple[int, int], ...]  # (offset, length) of each slice, in order

    @property
    def nbytes(self) -> int:
        return sum(n for _off, n in self.pieces)

    @property
    def dtype(self) -> torch.dtype | None:
        """The torch dtype (None for a string)."""
        return DTYPE_OF_CODE.get(self.code)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# ---- reading ---------------------------------------------------------------------------------------------
class _Reader:
    """Varints and length-delimited fields of a protobuf stream, reading only what is asked for."""

    def __init__(self, f: BinaryIO, end: int, path: str) -> None:
        self.f, self.end, self.path = f, end, path
        self.pos = 0

    def fail(self, msg: str) -> CkptFormatError:
        return CkptFormatError(f"{self.path}: {msg}")

    def varint(self, limit: int, what: str) -> int:
        result = shift = 0
        while True:
            if self.pos >= limit:
                raise self.fail(f"truncated or corrupt file: {what} runs past byte {limit}")
            b = self.f.read(1)
            if not b:
                raise self.fail(f"truncated file: {what} at byte {self.pos}")
            self.pos += 1
            result |= (b[0] & 0x7F) << shift
            if not b[0] & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise self.fail(f"corrupt file: bad varint in {what} at byte {self.pos}")

    def length(self, limit: int, what: str) -> int:
        n = self.varint(limit, what)
        if self.pos + n > limit:
            if limit >= self.end and self.pos + n > self.end:
                raise self.fail(f"truncated file: {what} needs {n} bytes at byte {self.pos}, "
                                f"the file ends at byte {self.end}")
            raise self.fail(f"corrupt file: {what} ({n} bytes at byte {self.pos}) overruns its message")
        return n

    def read(self, n: int, what: str) -> bytes:
        if n > _MAX_HEADER:
            raise self.fail(f"corrupt file: {what} of {n} bytes at byte {self.pos}")
        data = self.f.read(n)
        if len(data) != n:
            raise self.fail(f"truncated file: {what} at byte {self.pos}")
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        self.pos += n
        self.f.seek(self.pos)

    def skip_fixed(self, n: int, limit: int, what: str) -> None:
        """Skip a fixed-width field (8 or 4 bytes), which must end inside its message."""
        if self.pos + n > limit:
            raise self.fail(f"truncated or corrupt file: {what} runs past byte {limit}")
        self.skip(n)

    def skip_field(self, wire: int, limit: int, what: str) -> None:
        if wire == 0:
            self.varint(limit, what)
        elif wire == 1:
            self.skip_fixed(8, limit, what)
        elif wire == 2:
            self.skip(self.length(limit, what))
        elif wire == 5:
            self.skip_fixed(4, limit, what)
        else:
            raise self.fail(f"corrupt file: unexpected protobuf wire type {wire} in {what} at byte {self.pos}")


def _parse_tensor(r: _Reader, limit: int, name: str) -> tuple[str | None, tuple[int, ...], tuple[int, int] | None]:
    what = f"tensor {name!r}"
    dims: list[int] = []
    code: str | None = None
    content: tuple[int, int] | None = None
    while r.pos < limit:
        key = r.varint(limit, what)
        field, wire = key >> 3, key & 7
        if field == 1 and wire == 0:
            dims.append(r.varint(limit, what))
        elif field == 1 and wire == 2:  # packed dims
            n = r.length(limit, what)
            stop = r.pos + n
            while r.pos < stop and len(dims) <= _MAX_DIMS:
                dims.append(r.varint(stop, what))
        elif field == 2 and wire == 2:
            raw = r.read(r.length(limit, what), what)
            try:
                code = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise r.fail(f"corrupt file: {what} has a dtype code that is not text") from None
        elif field == 3 and wire == 2:
            n = r.length(limit, what)
            content = (r.pos, n)
            r.skip(n)
        else:
            r.skip_field(wire, limit, what)
        if len(dims) > _MAX_DIMS:
            raise r.fail(f"corrupt file: {what} has more than {_MAX_DIMS} dimensions")
    if any(d >= 1 << 62 for d in dims):
        raise r.fail(f"corrupt file: {what} has a negative or huge dimension {dims}")
    return code, tuple(dims), content


def _parse_value(r: _Reader, limit: int, index: int) -> tuple[str, str, tuple[int, ...], tuple[int, int]]:
    name: str | None = None
    tensor: tuple[str | None, tuple[int, ...], tuple[int, int] | None] | None = None
    while r.pos < limit:
        what = f"tensor {name!r}" if name is not None else f"entry {index}"
        key = r.varint(limit, what)
        field, wire = key >> 3, key & 7
        if field == 1 and wire == 2:
            raw = r.read(r.length(limit, what), what)
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise r.fail(f"corrupt file or not a MindSpore checkpoint: entry {index} has a name that is not text") \
                    from None
        elif field == 2 and wire == 2:
            n = r.length(limit, what)
            stop = r.pos + n
            tensor = _parse_tensor(r, stop, name if name is not None else f"#{index}")
        elif field == 3 and wire == 2:
            raise r.fail(f"tensor {name!r} is a MapParameter (maptensor), which qwenvl cannot convert")
        else:
            r.skip_field(wire, limit, what)
    if name is None:
        raise r.fail(f"corrupt file or not a MindSpore checkpoint: entry {index} has no name")
    code, dims, content = tensor if tensor is not None else (None, (), None)
    if code is None or content is None:
        raise r.fail(f"corrupt file: tensor {name!r} has no dtype or no data")
    return name, code, dims, content


def _name_at(r: _Reader, end: int, index: int) -> str:
    """``tensor 'name'`` of the Value starting at the reader's position if its name can be read, else ``entry N``."""
    start = r.pos
    try:
        if r.varint(end, "") == 0x0A:
            n = r.varint(end, "")
            if r.pos + n <= end:
                return f"tensor {r.read(n, '').decode('utf-8')!r}"
    except (CkptFormatError, UnicodeDecodeError):
        pass
    finally:
        r.pos = start
        r.f.seek(start)
    return f"entry {index}"


def _element_size(code: str) -> int:
    return 4 if code == STR_CODE else torch.empty((), dtype=DTYPE_OF_CODE[code]).element_size()


def _file_size(f: BinaryIO) -> int:
    return os.fstat(f.fileno()).st_size


def _trailer(f: BinaryIO, size: int) -> int | None:
    """The CRC32 stored in the ``crc_num`` trailer of a file of ``size`` bytes, None if it has none."""
    if size < _CRC_TRAILER:
        return None
    f.seek(size - _CRC_TRAILER)
    tail = f.read(_CRC_TRAILER)
    return int.from_bytes(tail[7:], "big") if tail[:7] == b"crc_num" else None


def scan(path: str | os.PathLike[str]) -> list[CkptTensor]:
    """Every tensor of a checkpoint in file order (slices joined), reading only headers.

    A ``crc_num`` trailer is skipped, not checked: that needs every byte (:class:`CrcCheck`, as the tensors are
    read), and a scan reads a few KB of a file of many GB.

    Raises :class:`CkptFormatError` (one line, naming the tensor where it can) for a file that is not a
    checkpoint, is truncated, holds a dtype code we do not know, or whose sizes disagree with their dims.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = _file_size(f)
        end = size if _trailer(f, size) is None else size - _CRC_TRAILER
        f.seek(0)
        r = _Reader(f, end, path)
        if end == 0:
            raise r.fail("not a MindSpore checkpoint (empty file)")
        out: list[CkptTensor] = []
        seen: set[str] = set()
        index = 0
        while r.pos < end:
            key = r.varint(end, f"entry {index}")
            if key != 0x0A:  # field 1 (value), length-delimited: MindSpore writes nothing else
                if index == 0:
                    raise r.fail("not a MindSpore checkpoint (it does not start with a protobuf Checkpoint.value)")
                raise r.fail(f"corrupt file: unexpected data at byte {r.pos - 1} after tensor {out[-1].name!r}")
            n = r.varint(end, f"entry {index}")
            if r.pos + n > end:
                raise r.fail(f"truncated file: {_name_at(r, end, index)} needs {n} bytes at byte {r.pos}, "
                             f"the file ends at byte {end}")
            stop = r.pos + n
            name, code, dims, content = _parse_value(r, stop, index)
            _add_piece(out, seen, name, code, dims, content, r)
            index += 1
    return [_checked(t, path) for t in out]


def _add_piece(out: list[CkptTensor], seen: set[str], name: str, code: str, dims: tuple[int, ...],
               content: tuple[int, int], r: _Reader) -> None:
    if code not in DTYPE_OF_CODE and code != STR_CODE:
        raise r.fail(f"tensor {name!r} has dtype code {code!r}, which qwenvl cannot read "
                     f"(known: {', '.join(DTYPE_OF_CODE)}, str)")
    if out and out[-1].name == name:  # the next slice of a large tensor
        prev = out[-1]
        if prev.code != code or prev.shape != dims:
            raise r.fail(f"corrupt file: the slices of tensor {name!r} disagree on dtype or shape")
        out[-1] = CkptTensor(name, code, dims, (*prev.pieces, content))
        return
    if name in seen:
        raise r.fail(f"corrupt file: tensor {name!r} appears twice")
    seen.add(name)
    out.append(CkptTensor(name, code, dims, (content,)))


def _checked(t: CkptTensor, path: str) -> CkptTensor:
    """``t`` with its size checked against its dims (a scalar written with dims [0] gets shape ())."""
    if t.code == STR_CODE:
        return t
    if t.shape == (0,) and t.nbytes == _element_size(t.code):
        t = replace(t, shape=())  # old files write a scalar's dims as [0]; MindSpore reads it as a scalar
    need = t.numel * _element_size(t.code)
    if t.nbytes != need:
        raise CkptFormatError(f"{path}: corrupt file: tensor {t.name!r} holds {t.nbytes} bytes, "
                              f"but {t.code}{list(t.shape)} needs {need}")
    return t


def read_tensor(f: io.BufferedIOBase, t: CkptTensor, crc: CrcCheck | None = None) -> torch.Tensor | str:
    """The data of ``t`` from the open checkpoint ``f`` (a string for a ``str`` entry); ``crc`` sums its bytes."""
    buf = bytearray(t.nbytes)
    view = memoryview(buf)
    pos = 0
    path = getattr(f, "name", "checkpoint")
    for offset, n in t.pieces:
        f.seek(offset)
        got = f.readinto(view[pos:pos + n])
        if got != n:
            raise CkptFormatError(f"{path}: truncated file: tensor {t.name!r} ends early "
                                  "(the file changed while read?)")
        if crc is not None:
            crc.add(offset, view[pos:pos + n])
        pos += n
    if t.code == STR_CODE:
        try:
            return bytes(buf).decode("utf-32-le").rstrip("\0")
        except UnicodeDecodeError:
            raise CkptFormatError(f"{path}: corrupt file: string {t.name!r} is not UTF-32 text") from None
    dtype = DTYPE_OF_CODE[t.code]
    if not buf:
        return torch.empty(t.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(t.shape)


# ---- the crc_num trailer ------------------------------------------------------------------------------------
_CRC_POLY = 0xEDB88320  # CRC-32 (zlib's), reflected


def _multmodp(a: int, b: int) -> int:
    """a x b modulo the CRC polynomial (zlib's multmodp; bit 31 is x^0)."""
    m, p = 1 << 31, 0
    while a:
        if a & m:
            p ^= b
            a ^= m
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1
    return p


_X2N = [1 << 30]  # x^(2^k) modulo the polynomial, k = 0..31
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC32 of A + B from crc1 = crc32(A), crc2 = crc32(B) and len(B) (zlib's crc32_combine)."""
    p, k = 1 << 31, 3  # x^0; len2 bytes are 8 * len2 = 2^3 * len2 bits
    while len2:
        if len2 & 1:
            p = _multmodp(_X2N[k & 31], p)
        len2 >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


class CrcCheck:
    """The ``crc_num`` trailer of a checkpoint, checked without a second read of the tensors.

    :func:`read_tensor` (given this) hands over each piece it reads, whose CRC32 is taken there; :meth:`verify`
    then reads only the rest (headers and the tensors nobody read), in file order, joins the pieces' CRCs in
    (:func:`crc32_combine`) and compares the CRC32 of everything before the trailer (what MindSpore's
    ``load_checkpoint(crc_check=True)`` sums) with the stored one. :meth:`of` gives None for a file without one.
    """

    def __init__(self, path: str, end: int, stored: int) -> None:
        self.path, self.end, self.stored = path, end, stored
        self.pieces: dict[int, tuple[int, int]] = {}  # offset -> (length, CRC32)
        self.verified = False

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> CrcCheck | None:
        path = os.fspath(path)
        with open(path, "rb") as f:
            size = _file_size(f)
            stored = _trailer(f, size)
        return None if stored is None else cls(path, size - _CRC_TRAILER, stored)

    def add(self, offset: int, data: bytes | memoryview) -> None:
        self.pieces[offset] = (len(data), zlib.crc32(data))

    def _sum(self, f: BinaryIO, start: int, stop: int, crc: int) -> int:
        f.seek(start)
        while start < stop:
            block = f.read(min(_CRC_BLOCK, stop - start))
            if not block:
                raise CkptFormatError(f"{self.path}: truncated file: it ends at byte {start}, before its CRC "
                                      f"trailer at byte {self.end} (the file changed while read?)")
            crc = zlib.crc32(block, crc)
            start += len(block)
        return crc

    def verify(self, f: BinaryIO) -> None:
        """Raise :class:`CkptFormatError` unless the file's bytes give the stored CRC32 (reads what was not read)."""
        crc = pos = 0
        for offset in sorted(self.pieces):
            n, piece = self.pieces[offset]
            crc = crc32_combine(self._sum(f, pos, offset, crc), piece, n)
            pos = offset + n
        crc = self._sum(f, pos, self.end, crc)
        if crc != self.stored:
            raise CkptFormatError(f"{self.path}: corrupt file: its crc_num trailer says CRC32 {self.stored}, its "
                                  f"bytes give {crc} (damaged since MindSpore wrote it?)")
        self.verified = True


# ---- writing ---------------------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload_len: int) -> bytes:
    """The key and length of a length-delimited field."""
    return _varint(number << 3 | 2) + _varint(payload_len)


def _value_header(name: str, dims: Sequence[int], code: str, content_len: int) -> bytes:
    """Everything of one serialized ``Checkpoint{value: [Value{tag, tensor}]}`` up to the content bytes."""
    tag = name.encode("utf-8")
    type_ = code.encode("utf-8")
    tensor_head = b"".join(b"\x08" + _varint(d) for d in dims) + _field(2, len(type_)) + type_ \
        + _field(3, content_len)
    tensor_len = len(tensor_head) + content_len
    value_head = _field(1, len(tag)) + tag + _field(2, tensor_len)
    value_len = len(value_head) + tensor_len
    return _field(1, value_len) + value_head + tensor_head


class CkptWriter:
    """Write tensors to an open binary file in MindSpore's checkpoint format, one at a time.

    ``write(name, parts, dtype)``: the tensor is the concatenation of ``parts`` along dim 0 (so a padded or
    regrouped tensor never has to exist in one piece), cast to ``dtype`` on the way. A cast that would turn
    finite values into infinities raises :class:`CheckpointError` before anything of the tensor is written.
    Counts what it wrote. ``crc_check``: :meth:`finish` ends the file with the ``crc_num`` trailer of
    ``save_checkpoint(..., crc_check=True)`` (the CRC32 of every byte written), which ``load_checkpoint(...,
    crc_check=True)`` verifies.
    """

    def __init__(self, f: BinaryIO, crc_check: bool = False) -> None:
        self.f = f
        self.crc: int | None = 0 if crc_check else None
        self.tensors = 0
        self.bytes = 0
        self.dtypes: dict[str, int] = {}

    def write(self, name: str, parts: torch.Tensor | Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> None:
        parts = [parts] if isinstance(parts, torch.Tensor) else list(parts)
        if not parts:
            raise ValueError(f"nothing to write for {name}")
        dtype = dtype or parts[0].dtype
        if dtype not in CODE_OF_DTYPE:
            raise CheckpointError(f"cannot write {name}: MindSpore has no dtype for {dtype}")
        shape = list(parts[0].shape)
        if len(parts) > 1:
            if any(list(p.shape[1:]) != shape[1:] for p in parts):
                raise ValueError(f"parts of {name} disagree beyond dim 0: {[list(p.shape) for p in parts]}")
            shape[0] = sum(p.shape[0] for p in parts)
        check_cast(f"cannot write {name}", parts, dtype)
        itemsize = torch.empty((), dtype=dtype).element_size()
        total = math.prod(shape) * itemsize
        stream = _ByteStream(block for p in parts for block in iter_tensor_bytes(p, dtype))
        code = CODE_OF_DTYPE[dtype]
        for start in range(0, max(total, 1), SLICE_BYTES):  # an empty tensor still gets its one entry
            n = min(SLICE_BYTES, total - start)
            header = _value_header(name, shape, code, n)
            self.f.write(header)
            if self.crc is not None:
                self.crc = zlib.crc32(header, self.crc)
            self.crc = stream.copy_to(self.f, n, self.crc)
        self.tensors += 1
        self.bytes += total
        self.dtypes[code] = self.dtypes.get(code, 0) + 1

    def finish(self) -> None:
        """End the file: the ``crc_num`` trailer with ``crc_check``, else nothing."""
        if self.crc is not None:
            self.f.write(b"crc_num" + self.crc.to_bytes(10, "big"))


class _ByteStream:
    """Bytes from a sequence of blocks, handed out ``n`` at a time (a slice may end inside a block)."""

    def __init__(self, blocks: Iterable[memoryview]) -> None:
        self.blocks = iter(blocks)
        self.left = memoryview(b"")

    def copy_to(self, f: BinaryIO, n: int, crc: int | None = None) -> int | None:
        """Write the next ``n`` bytes; return ``crc`` (a running CRC32, None: none) updated with them."""
        while n:
            if not self.left:
                self.left = next(self.blocks)
            take = min(n, len(self.left))
            f.write(self.left[:take])
            if crc is not None:
                crc = zlib.crc32(self.left[:take], crc)
            self.left = self.left[take:]
            n -= take
        return crc
