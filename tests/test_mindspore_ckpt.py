"""MindSpore's checkpoint format without MindSpore: the fixtures MindSpore wrote, read and rewritten byte for
byte; dtype codes; sliced tensors; crc trailers; and every kind of broken file failing with one clear line."""

from __future__ import annotations

import io
import json
import zlib
from pathlib import Path

import pytest
import torch

from qwenvl import mindspore_ckpt as mc
from qwenvl.mindspore_ckpt import CkptFormatError, CkptWriter, read_tensor, scan

MANIFEST = json.loads((Path(__file__).parent / "fixtures" / "mindformers" / "manifest.json").read_text())


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    with open(path, "wb") as f:
        w = CkptWriter(f)
        for name, t in tensors.items():
            w.write(name, t)
    return path


def _read_all(path: Path) -> dict[str, torch.Tensor | str]:
    with open(path, "rb") as f:
        return {t.name: read_tensor(f, t) for t in scan(path)}


@pytest.mark.parametrize("name", list(MANIFEST["fixtures"]))
def test_fixture_reads_as_mindspore_reads_it_and_rewrites_byte_identical(name, mindformers_ckpt):
    path = mindformers_ckpt(name)
    entries = scan(path)
    # what mindspore.load_checkpoint returned for the same file: names in order, dtypes, shapes
    assert [[t.name, t.code, list(t.shape)] for t in entries] == MANIFEST["fixtures"][name]["tensors"]
    crc_check = MANIFEST["fixtures"][name]["options"].get("crc_check") == "True"  # save_checkpoint(crc_check=True)
    crc = mc.CrcCheck.of(path)
    assert (crc is not None) == crc_check
    out = io.BytesIO()
    with open(path, "rb") as f:
        w = CkptWriter(out, crc_check=crc_check)
        for t in entries:
            w.write(t.name, read_tensor(f, t, crc))
        w.finish()
        if crc is not None:
            crc.verify(f)  # MindSpore's own trailer, checked as load_checkpoint(crc_check=True) checks it
            assert crc.verified
    assert out.getvalue() == path.read_bytes()  # with crc_check: MindSpore's trailer byte for byte
    assert w.tensors == len(entries)


def test_every_dtype_code_and_scalars_round_trip(tmp_path):
    tensors = {
        "f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 3).bfloat16(),
        "f64": torch.randn(2, dtype=torch.float64), "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.tensor([255, 0], dtype=torch.uint8), "i16": torch.tensor([-300], dtype=torch.int16),
        "i32": torch.tensor(7, dtype=torch.int32), "i64": torch.tensor([[1 << 40]]), "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(65536.0),
    }
    path = _write(tmp_path / "all.ckpt", tensors)
    got = _read_all(path)
    assert list(got) == list(tensors)
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
    assert {t.name: t.code for t in scan(path)}["bf16"] == "BFloat16"


def test_bf16_is_stored_as_raw_bfloat16_bytes(tmp_path):
    # 1.0, 2.0 in bfloat16 are 0x3F80, 0x4000 (little endian); MindSpore wrote exactly this in its own files
    path = _write(tmp_path / "b.ckpt", {"a.b": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)})
    assert path.read_bytes() == b'\n\x19\n\x03a.b\x12\x12\x08\x02\x12\x08BFloat16\x1a\x04\x80?\x00@'


def test_large_tensors_are_sliced_and_joined(tmp_path, monkeypatch):
    monkeypatch.setattr(mc, "SLICE_BYTES", 1000)
    t = torch.randn(10, 130)  # 5200 bytes -> 6 entries
    path = _write(tmp_path / "sliced.ckpt", {"big": t, "small": torch.ones(3)})
    entries = scan(path)
    assert [(e.name, len(e.pieces)) for e in entries] == [("big", 6), ("small", 1)]
    assert [n for _o, n in entries[0].pieces] == [1000] * 5 + [200]
    with open(path, "rb") as f:
        assert torch.equal(read_tensor(f, entries[0]), t)
    # a cast while slicing: the slices cut through the cast blocks too
    monkeypatch.setattr("qwenvl.checkpoint.CAST_BLOCK_BYTES", 333)
    path = _write(tmp_path / "cast.ckpt", {})
    with open(path, "wb") as f:
        CkptWriter(f).write("big", [t[:4], t[4:]], torch.float16)
    assert torch.equal(_read_all(path)["big"], t.half())


def test_old_style_uneven_slices_and_scalar_dims_zero(tmp_path):
    # MindSpore < 2.3 split big arrays into near-equal element slices; old files wrote a scalar's dims as [0]
    data = torch.arange(10, dtype=torch.int32)
    raw = b""
    for piece in data.tensor_split(3):
        content = piece.numpy().tobytes()
        raw += mc._value_header("steps", [10], "Int32", len(content)) + content
    raw += mc._value_header("global_step", [0], "Int32", 4) + torch.tensor(5, dtype=torch.int32).numpy().tobytes()
    text = "fine-tune".encode("utf-32-le")
    raw += mc._value_header("note", [0], "str", len(text)) + text
    path = tmp_path / "old.ckpt"
    path.write_bytes(raw)
    got = _read_all(path)
    assert torch.equal(got["steps"], data)
    assert got["global_step"].shape == () and int(got["global_step"]) == 5
    assert got["note"] == "fine-tune"


def test_a_crc_trailer_is_skipped_by_scan_and_checked_by_crc_check(tmp_path):
    # scan reads headers only (a few KB of a file of many GB): it skips the trailer; CrcCheck checks it from what
    # read_tensor reads plus the rest (was: a wrong trailer went unnoticed, as it still does for scan alone)
    path = _write(tmp_path / "c.ckpt", {"w": torch.ones(2)})
    raw = path.read_bytes()
    path.write_bytes(raw + b"crc_num" + (123).to_bytes(10, "big"))
    assert torch.equal(_read_all(path)["w"], torch.ones(2))
    crc = mc.CrcCheck.of(path)
    with open(path, "rb") as f, pytest.raises(CkptFormatError) as e:
        crc.verify(f)
    assert str(e.value) == (f"{path}: corrupt file: its crc_num trailer says CRC32 123, its bytes give "
                            f"{zlib.crc32(raw)} (damaged since MindSpore wrote it?)")
    assert not crc.verified
    path.write_bytes(raw + b"crc_num" + zlib.crc32(raw).to_bytes(10, "big"))
    crc = mc.CrcCheck.of(path)
    with open(path, "rb") as f:
        crc.verify(f)
    assert crc.verified
    assert mc.CrcCheck.of(_write(tmp_path / "plain.ckpt", {"w": torch.ones(2)})) is None  # no trailer


def test_crc_check_writes_the_trailer_and_checks_pieces_read_in_any_order(tmp_path, monkeypatch):
    monkeypatch.setattr(mc, "SLICE_BYTES", 1000)
    tensors = {"big": torch.randn(10, 130), "mid": torch.randn(7).half(), "skipped": torch.randn(300),
               "step": torch.tensor(3, dtype=torch.int32), "empty": torch.ones(0)}
    path = tmp_path / "c.ckpt"
    with open(path, "wb") as f:
        w = CkptWriter(f, crc_check=True)
        for name, t in tensors.items():
            w.write(name, t)
        w.finish()
    raw = path.read_bytes()
    assert raw[-17:] == b"crc_num" + zlib.crc32(raw[:-17]).to_bytes(10, "big")  # what save_checkpoint writes
    entries = {t.name: t for t in scan(path)}
    assert len(entries["big"].pieces) == 6
    for flip in (None, entries["skipped"].pieces[0][0] + 5, entries["big"].pieces[3][0] + 1, 3):
        data = bytearray(raw)
        if flip is not None:  # in a tensor nobody reads, in a slice that is read, in a header
            data[flip] ^= 0x10
        path.write_bytes(data)
        crc = mc.CrcCheck.of(path)
        with open(path, "rb") as f:
            for name in ("step", "big", "mid", "empty", "big"):  # out of file order, one twice, one not at all
                read_tensor(f, entries[name], crc)
            if flip is None:
                crc.verify(f)
                assert crc.verified
            else:
                with pytest.raises(CkptFormatError, match=r"c\.ckpt: corrupt file: its crc_num trailer says"):
                    crc.verify(f)


def test_crc32_combine_is_zlibs():
    for n1, n2 in ((0, 0), (0, 5), (7, 0), (1, 1), (100, 3000), (5000, 70000)):
        a, b = bytes(range(256)) * (n1 // 256 + 1), bytes(reversed(range(256))) * (n2 // 256 + 1)
        a, b = a[:n1], b[:n2]
        assert mc.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b), (n1, n2)


# ---- broken files -----------------------------------------------------------------------------------------
def _error(path: Path) -> str:
    with pytest.raises(CkptFormatError) as e:
        scan(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "text.ckpt").write_text("hello world\n")
    assert "not a MindSpore checkpoint" in _error(tmp_path / "text.ckpt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert "empty file" in _error(tmp_path / "empty.ckpt")
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, tmp_path / "st.ckpt")
    assert "not a MindSpore checkpoint" in _error(tmp_path / "st.ckpt")


def test_truncated_files_name_the_tensor(tmp_path):
    full = _write(tmp_path / "full.ckpt", {"first": torch.ones(4), "second.weight": torch.randn(64, 64)}).read_bytes()
    for cut in (len(full) - 1, len(full) - 5000, len(full) - 16390):
        (tmp_path / "cut.ckpt").write_bytes(full[:cut])
        msg = _error(tmp_path / "cut.ckpt")
        assert "truncated" in msg and "second.weight" in msg, msg


def test_unknown_dtype_code_names_the_tensor(tmp_path):
    raw = _write(tmp_path / "x.ckpt", {"layer.w": torch.ones(2, dtype=torch.float16)}).read_bytes()
    (tmp_path / "x.ckpt").write_bytes(raw.replace(b"Float16", b"Float17"))
    msg = _error(tmp_path / "x.ckpt")
    assert "'layer.w'" in msg and "'Float17'" in msg


def test_sizes_that_disagree_with_dims(tmp_path):
    content = torch.ones(3).numpy().tobytes()
    (tmp_path / "x.ckpt").write_bytes(mc._value_header("w", [4], "Float32", len(content)) + content)
    msg = _error(tmp_path / "x.ckpt")
    assert "'w'" in msg and "12 bytes" in msg and "16" in msg


def test_a_tensor_twice_is_corrupt(tmp_path):
    raw = _write(tmp_path / "x.ckpt", {"a": torch.ones(1), "b": torch.ones(1)}).read_bytes()
    (tmp_path / "x.ckpt").write_bytes(raw + raw[: len(raw) // 2])
    assert "'a' appears twice" in _error(tmp_path / "x.ckpt")


def test_a_million_dimensions_fail_fast_without_a_huge_list(tmp_path):
    # 1 byte per packed dim: a 1 MB file listing 10**6 dims of size 1 (numel 1) took ~100x its size in memory
    dims = b"\x01" * 1_000_000
    body = mc._field(1, len(dims)) + dims + mc._field(2, 7) + b"Float32" + mc._field(3, 4) + b"\0" * 4
    value = mc._field(1, 1) + b"w" + mc._field(2, len(body)) + body
    (tmp_path / "x.ckpt").write_bytes(mc._field(1, len(value)) + value)
    msg = _error(tmp_path / "x.ckpt")
    assert "'w'" in msg and "dimensions" in msg


@pytest.mark.parametrize("key", [b"\x21", b"\x25"])  # field 4 as fixed64 / fixed32, cut off by the file's end
def test_a_fixed_width_field_running_past_its_message_is_corrupt(tmp_path, key):
    raw = _write(tmp_path / "x.ckpt", {"w": torch.ones(1)}).read_bytes()
    value = raw[2:] + key  # the one Value, with a field whose 8 (or 4) bytes lie outside it
    (tmp_path / "x.ckpt").write_bytes(mc._field(1, len(value)) + value)
    assert "'w'" in _error(tmp_path / "x.ckpt")


def test_read_tensor_errors_name_the_file(tmp_path):
    (tmp_path / "s.ckpt").write_bytes(mc._value_header("note", [], "str", 3) + b"abc")  # not whole UTF-32 chars
    (entry,) = scan(tmp_path / "s.ckpt")
    with open(tmp_path / "s.ckpt", "rb") as f, pytest.raises(CkptFormatError, match=r"s\.ckpt: .*'note'"):
        read_tensor(f, entry)


def test_a_cast_that_overflows_to_inf_is_refused_before_writing(tmp_path):
    out = io.BytesIO()
    w = CkptWriter(out)
    w.write("ok", torch.tensor([65504.0, -1.0]), torch.float16)  # the largest float16 is fine
    size = len(out.getvalue())
    with pytest.raises(mc.CheckpointError, match=r"'?big.*1 of 3 values.*1e\+06.*float16.*--dtype") as e:
        w.write("big", [torch.ones(1), torch.tensor([1e6, 2.0])], torch.float16)
    assert "\n" not in str(e.value)
    assert len(out.getvalue()) == size and w.tensors == 1  # nothing of it was written
    w.write("wide", torch.tensor([1e6]), torch.bfloat16)  # bfloat16 holds it
    w.write("inf", torch.tensor([float("inf")]), torch.float16)  # already infinite: not an overflow of the cast
