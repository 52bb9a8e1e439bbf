"""Atomic file and folder writes: results appear whole or not at all, and no temporaries are left."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path

import pytest

from qwenvl import fileio
from qwenvl.fileio import atomic_dir, atomic_write_bytes, atomic_write_text, json_text


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- files ----


def test_write_text_creates_parents_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "report.txt"
    assert atomic_write_text(target, "héllo\r\nworld") == target
    assert target.read_bytes() == "héllo\r\nworld".encode()  # no newline translation
    assert _names(target.parent) == ["report.txt"]


def test_write_bytes_replaces_and_keeps_mode(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    atomic_write_bytes(target, b"new", fsync=False)
    assert target.read_bytes() == b"new"
    assert _mode(target) == 0o640
    assert _names(tmp_path) == ["f.bin"]


def test_new_file_mode_follows_umask(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    atomic_write_text(target, "x")
    assert _mode(target) == 0o666 & ~fileio._umask()


def test_failed_write_keeps_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")

    def boom(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert _names(tmp_path) == ["f.txt"]


def test_a_ctrl_c_during_the_cleanup_of_a_failed_write_waits_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    # a full disk, then Ctrl-C while the temporary file is being removed: it raised there and left the file
    import errno
    import signal

    target = tmp_path / "f.txt"
    target.write_text("old")
    real = fileio.write_error

    def ctrl_c_meanwhile(*args: object) -> OSError | None:
        os.kill(os.getpid(), signal.SIGINT)  # delivered before kill returns
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(fileio, "write_error", ctrl_c_meanwhile)
    with pytest.raises(KeyboardInterrupt), caplog.at_level("WARNING"), fileio.atomic_file(target) as f:
        f.write(b"new")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert target.read_text() == "old" and _names(tmp_path) == ["f.txt"]
    assert [r.getMessage() for r in caplog.records] == [
        f"SIGINT came while {target} was being saved: acted on now that the save has ended"]


def test_write_over_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        atomic_write_text(tmp_path / "d", "x")
    assert _names(tmp_path) == ["d"]


def test_write_over_a_pipe_device_or_link_to_one_is_refused(tmp_path: Path) -> None:
    # os.replace would put a regular file in place of a named pipe, or (run as root) of /dev/null or the
    # /dev/stdout link: none of them is a file we wrote
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "to-pipe").symlink_to(tmp_path / "pipe")
    for name in ("pipe", "to-pipe"):
        with pytest.raises(FileExistsError, match="not a regular file"):
            atomic_write_text(tmp_path / name, "x")
    assert stat.S_ISFIFO((tmp_path / "pipe").lstat().st_mode) and (tmp_path / "to-pipe").is_symlink()
    assert _names(tmp_path) == ["pipe", "to-pipe"]  # no temporary left either


def test_a_write_that_may_not_replace_keeps_what_appeared_while_it_ran(tmp_path: Path) -> None:
    # replace=False: published with link(2), which never replaces (os.replace did, silently)
    target = tmp_path / "out.json"
    with pytest.raises(FileExistsError) as info, fileio.atomic_file(target, replace=False) as f:
        f.write(b"ours")
        target.write_text("theirs")  # another writer, between the start and the end of the write
    assert (info.value.errno, info.value.filename) == (errno.EEXIST, str(target))
    assert target.read_text() == "theirs" and _names(tmp_path) == ["out.json"]  # no temporary file left
    (tmp_path / "link").symlink_to("out.json")
    for name in ("out.json", "link"):  # there at the start, or a link to it: refused before anything is written
        with pytest.raises(FileExistsError):
            atomic_write_text(tmp_path / name, "ours", replace=False)
    assert target.read_text() == "theirs" and (tmp_path / "link").is_symlink()
    assert atomic_write_text(tmp_path / "new.json", "ours", replace=False).read_text() == "ours"
    assert _mode(tmp_path / "new.json") == 0o666 & ~fileio._umask() and (tmp_path / "new.json").stat().st_nlink == 1
    # a dangling link, there at the start or made meanwhile: nothing to lose, replaced (check_output_file lets it be)
    (tmp_path / "dangling").symlink_to("nowhere")
    atomic_write_text(tmp_path / "dangling", "ours", replace=False)
    with fileio.atomic_file(tmp_path / "appeared", replace=False) as f:
        f.write(b"ours")
        (tmp_path / "appeared").symlink_to("nowhere")
    for name in ("dangling", "appeared"):
        assert not (tmp_path / name).is_symlink() and (tmp_path / name).read_text() == "ours"
    assert _names(tmp_path) == ["appeared", "dangling", "link", "new.json", "out.json"]


@pytest.mark.parametrize("refusal", [errno.EPERM, errno.EOPNOTSUPP], ids=["EPERM", "EOPNOTSUPP"])
def test_a_write_that_may_not_replace_works_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               refusal: int) -> None:
    # FAT, exFAT and some FUSE filesystems have no hard links: a check, then a rename
    def no_links(*args: object, **kwargs: object) -> None:
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(fileio.os, "link", no_links)
    target = tmp_path / "out.json"
    assert atomic_write_text(target, "ours", replace=False).read_text() == "ours"
    target.unlink()
    with pytest.raises(FileExistsError) as info, fileio.atomic_file(target, replace=False) as f:
        f.write(b"ours")
        target.write_text("theirs")
    assert info.value.filename == str(target) and target.read_text() == "theirs" and _names(tmp_path) == ["out.json"]


# ---- folders ----


def test_atomic_dir_creates(tmp_path: Path) -> None:
    target = tmp_path / "ckpt" / "step-1"
    with atomic_dir(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        assert not target.exists()  # invisible until the block succeeds
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"w")
        atomic_write_text(tmp / "config.json", "{}")
    assert _names(target) == ["config.json", "sub"]
    assert (target / "sub" / "w.bin").read_bytes() == b"w"
    assert _names(target.parent) == ["step-1"]
    assert _mode(target) == 0o777 & ~fileio._umask()


def test_atomic_dir_replaces_existing(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("stale")
    with atomic_dir(target) as tmp:
        (tmp / "fresh.txt").write_text("fresh")
        assert (target / "stale.txt").exists()  # old version still readable meanwhile
    assert _names(target) == ["fresh.txt"]
    assert _names(tmp_path) == ["out"]  # neither temp nor old copy left behind


@pytest.mark.parametrize("exc", [RuntimeError("fail"), KeyboardInterrupt()])
def test_atomic_dir_failure_keeps_old_and_cleans_up(tmp_path: Path, exc: BaseException) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(type(exc)), atomic_dir(target) as tmp:
        (tmp / "half.txt").write_text("half")
        raise exc
    assert _names(target) == ["old.txt"]
    assert _names(tmp_path) == ["out"]


def test_atomic_dir_failure_without_old(tmp_path: Path) -> None:
    with pytest.raises(ValueError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
        raise ValueError
    assert _names(tmp_path) == []


def test_atomic_dir_rename_in_failure_restores_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_rename = os.rename
    calls: list[tuple[str, str]] = []

    def flaky_rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # 1: old away, 2: new in (fails), 3: old back
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(fileio.os, "rename", flaky_rename)
    with pytest.raises(OSError, match="rename failed"), atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert len(calls) == 3 and calls[2][1] == "out"
    assert _names(target) == ["old.txt"]
    assert _names(tmp_path) == ["out"]


def test_atomic_dir_over_file_is_refused_upfront(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("file")
    with pytest.raises(NotADirectoryError), atomic_dir(tmp_path / "out"):
        pytest.fail("the body must not run")
    assert _names(tmp_path) == ["out"]
    assert (tmp_path / "out").read_text() == "file"


def test_atomic_dir_replaces_symlink_not_its_target(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with atomic_dir(link) as tmp:
        (tmp / "new.txt").write_text("new")
    assert not link.is_symlink() and _names(link) == ["new.txt"]
    assert _names(real) == ["keep.txt"]
    assert _names(tmp_path) == ["link", "real"]


def test_old_copy_that_cannot_be_deleted_only_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "out"
    target.mkdir()

    def no_rmtree(path: object, *args: object, **kwargs: object) -> None:
        raise PermissionError("busy")

    monkeypatch.setattr(fileio.shutil, "rmtree", no_rmtree)
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _names(target) == ["new.txt"]
    assert "could not delete the previous version" in caplog.text
    leftovers = [n for n in _names(tmp_path) if n != "out"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.qwenvl-old-")


def test_a_second_ctrl_c_while_a_failed_folder_is_deleted_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Ctrl-C during a save, then again while its staging folder (gigabytes of a checkpoint) is being deleted: the
    # second cut the deletion and left a hidden .out.qwenvl-tmp-* folder until the next run in the folder
    import signal

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real = fileio.shutil.rmtree

    def ctrl_c_meanwhile(path: str | os.PathLike[str], *args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # delivered before kill returns
        real(path, *args, **kwargs)  # type: ignore[arg-type]

    with pytest.raises(KeyboardInterrupt) as caught, caplog.at_level("WARNING"), atomic_dir(target) as tmp:
        for i in range(4):
            (tmp / f"shard-{i}.bin").write_bytes(b"w" * 1000)
        monkeypatch.setattr(fileio.shutil, "rmtree", ctrl_c_meanwhile)
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C
    assert isinstance(caught.value.__context__, KeyboardInterrupt)  # the second, acted on once the folder is gone
    assert _names(tmp_path) == ["out"] and _names(target) == ["old.txt"]
    assert [r.getMessage() for r in caplog.records] == [
        f"SIGINT came while {target} was being saved: acted on now that the save has ended"]


# a library user's process (no handler of ours) replaces a folder and gets SIGTERM between the two renames
_TERMINATED_BETWEEN_THE_RENAMES = """
import os, signal, sys
from qwenvl import fileio
def fault_point(name):
    if name == "atomic_dir.swapped_out":
        os.kill(os.getpid(), signal.SIGTERM)
fileio.fault_point = fault_point
with fileio.atomic_dir(sys.argv[1]) as tmp:
    (tmp / "new.txt").write_text("new")
"""


def test_sigterm_between_the_renames_of_a_replaced_folder_waits_for_the_second(tmp_path: Path) -> None:
    # the old folder renamed away, the process ended by SIGTERM before the new one was renamed in: the folder was
    # missing (its old version in a hidden .out.qwenvl-old-* sibling), with no run of ours to put it back
    import signal
    import subprocess
    import sys

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    run = subprocess.run([sys.executable, "-c", _TERMINATED_BETWEEN_THE_RENAMES, str(target)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == -signal.SIGTERM, run.stderr  # still ended by the signal, once the folder is in place
    assert _names(tmp_path) == ["out"] and (target / "new.txt").read_text() == "new" and _names(target) == ["new.txt"]
    assert f"SIGTERM came while {target} was being saved: acted on now that the save has ended" in run.stderr


@pytest.mark.parametrize(("text", "said"), [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # Python's parser recurses once per level
    ("[" + "1" * 5000 + "]", "4300 digits"),  # int() refuses such numbers (CPython's limit)
], ids=["deep", "long-int"])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_json_that_python_cannot_parse_is_a_one_line_error_naming_the_file(tmp_path: Path, text, said,
                                                                           suffix) -> None:
    file = tmp_path / f"data{suffix}"
    file.write_text(text + "\n")
    with pytest.raises(ValueError, match=said) as caught:
        fileio.read_json_records(file)
    assert str(file) in str(caught.value) and "\n" not in str(caught.value)
    if suffix == ".jsonl":
        with pytest.raises(ValueError, match=f"{file}:1: .*{said}"):
            list(fileio.iter_jsonl(file))
    else:
        with pytest.raises(ValueError, match=said):
            fileio.read_json(file)


@pytest.mark.parametrize("ending", ["\n", "\r\n", ""])
def test_a_line_cut_short_is_said_at_its_end(tmp_path: Path, ending: str) -> None:
    # a line missing its closing brace was said at "column 1" (of the line after its newline)
    file = tmp_path / "data.jsonl"
    file.write_text('{"a": 1}\n{"image": "x.jpg", "b": 2' + ending, encoding="utf-8", newline="")
    with pytest.raises(ValueError, match=r"data.jsonl:2: invalid JSON: Expecting ',' delimiter \(column 26\)$"):
        list(fileio.iter_jsonl(file))  # predict's and eval's reader
    with pytest.raises(ValueError, match=r"data.jsonl:2: invalid JSON: Expecting ',' delimiter \(column 26\)$"):
        fileio.read_json_records(file)


def test_jsonl_lines_end_at_newlines_only(tmp_path: Path) -> None:
    # JSON strings may hold U+2028, U+0085 and the like unescaped; str.splitlines() cut such a valid line in two
    file = tmp_path / "data.jsonl"
    file.write_text('{"a": "x\u2028y"}\n{"b": "p\u0085q"}\r\n\n{"c": 3}\n', encoding="utf-8")
    assert fileio.read_json_records(file) == [{"a": "x\u2028y"}, {"b": "p\u0085q"}, {"c": 3}]
    assert [n for n, _ in fileio.iter_jsonl(file)] == [1, 2, 4]
    file.write_text('{"a": "x\u2028y"}\n{"b": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"data.jsonl:2: invalid JSON"):  # the line number counts newlines
        fileio.read_json_records(file)


def test_a_byte_order_mark_starting_a_json_file_is_read_past(tmp_path: Path) -> None:
    # a data file saved by a Windows editor starts with U+FEFF: "line 1: invalid JSON: Unexpected UTF-8 BOM"
    bom = "\ufeff"
    (tmp_path / "a.json").write_text(bom + '[{"a": 1}]', encoding="utf-8")
    (tmp_path / "a.jsonl").write_text(bom + '{"a": 1}\n{"b": "\ufeff"}\n', encoding="utf-8")
    assert fileio.read_json(tmp_path / "a.json") == fileio.read_json_records(tmp_path / "a.json") == [{"a": 1}]
    want = [{"a": 1}, {"b": "\ufeff"}]  # only the mark that starts the file goes
    assert fileio.read_json_records(tmp_path / "a.jsonl") == want
    assert [obj for _n, obj in fileio.iter_jsonl(tmp_path / "a.jsonl")] == want


@pytest.mark.parametrize("kind", ["folder", "pipe", "device"])
def test_readers_refuse_what_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    # a folder was a raw IsADirectoryError, a named pipe blocked forever, /dev/zero filled the memory;
    # iter_jsonl called an existing folder "not found"
    path = tmp_path / f"data.{kind}"
    if kind == "folder":
        path.mkdir()
    elif kind == "pipe":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    for suffix in (".json", ".jsonl"):
        named = path.with_suffix(suffix)
        path.rename(named)
        for read in (fileio.read_json, fileio.read_json_records, lambda p: list(fileio.iter_jsonl(p))):
            with pytest.raises(ValueError, match=f"{named} is not a regular file"):
                read(named)
        path = named
    with pytest.raises(FileNotFoundError, match="data file not found"):
        fileio.read_json_records(tmp_path / "missing.json")


def test_error_line_is_one_line_of_an_exception() -> None:
    from qwenvl.fileio import error_line

    assert error_line(ValueError("bad value\n  at line 2")) == "bad value"
    assert error_line(RuntimeError("Error(s) in loading state_dict for PeftModel:\n\tMissing key(s): x\n\tmore")) \
        == "Error(s) in loading state_dict for PeftModel: Missing key(s): x"
    assert error_line(TypeError("\n\n")) == "TypeError" and error_line(KeyError()) == "KeyError"
    assert error_line(OSError("x" * 500)) == "x" * 297 + "..."


def test_a_yaml_key_set_twice_in_one_mapping_is_refused(tmp_path: Path) -> None:
    # PyYAML kept the last value without a word: "seed: 1 ... seed: 2" trained with seed 2
    from qwenvl.fileio import read_yaml

    f = tmp_path / "c.yaml"
    f.write_text("seed: 1\nlora:\n  r: 8\n  alpha: 16\nseed: 2\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(f))}:5: 'seed' is set twice in one mapping$"):
        read_yaml(f)
    f.write_text("a:\n  r: 8\n  r: 9\n")
    with pytest.raises(ValueError, match=r":3: 'r' is set twice"):
        read_yaml(f)
    f.write_text("a: {r: 8}\nb: {r: 8}\n")  # the same key in two mappings is fine
    assert read_yaml(f) == {"a": {"r": 8}, "b": {"r": 8}}


@pytest.mark.parametrize(("text", "said"), [
    ("seed: 2001-02-30\n", "cannot read '2001-02-30': day is out of range for month"),
    ("seed: " + "1" * 5000 + "\n", "cannot read '" + "1" * 40 + "': Exceeds the limit (4300 digits)"),], ids=["date", "long-int"])
def test_a_yaml_value_python_cannot_build_is_one_line_naming_the_file(tmp_path: Path, text: str, said: str) -> None:
    # Python's own ValueError came out without the file or line ("day is out of range for month")
    from qwenvl.fileio import read_yaml

    f = tmp_path / "c.yaml"
    f.write_text("lr: 1.0e-5\n" + text)
    with pytest.raises(ValueError, match=re.escape(f"{f}:2: {said}")):
        read_yaml(f)


def test_a_file_given_for_a_folder_is_said_to_be_no_folder(tmp_path: Path) -> None:
    # "checkpoint folder not found: README.md" for a file that is there
    from qwenvl.fileio import require_folder

    (tmp_path / "README.md").write_text("x")
    with pytest.raises(NotADirectoryError, match=rf"^checkpoint folder {re.escape(str(tmp_path / 'README.md'))} is "
                       "not a folder$"):
        require_folder(tmp_path / "README.md")
    with pytest.raises(FileNotFoundError, match="^dataset_dir folder not found: "):
        require_folder(tmp_path / "gone", "dataset_dir folder")
    assert require_folder(tmp_path) == tmp_path


@pytest.mark.parametrize("text", ['[\n  {"a": 1},\n  {"a": 2}\n]\n', '\n[{"a": 1},\n {"a": 2}]\n'])
def test_a_json_list_given_for_json_lines_is_said_to_be_one(tmp_path: Path, text: str) -> None:
    # an indented data.json given where JSON Lines are read said "line 1: invalid JSON: Expecting value"
    file = tmp_path / "data.json"
    file.write_text(text)
    with pytest.raises(ValueError, match=r"data.json:\d: the file is a JSON list \(it starts with '\['\), not JSON "
                                         r"Lines \(one JSON object per line\)$"):
        list(fileio.iter_jsonl(file))
    assert fileio.read_json_records(file) == [{"a": 1}, {"a": 2}]  # a reader of lists still reads it
    file.write_text('{"a": 1}\n[1,\n')  # a bad line after the first is just invalid JSON
    with pytest.raises(ValueError, match=r"data.json:2: invalid JSON"):
        list(fileio.iter_jsonl(file))


@pytest.mark.parametrize(("row", "kind"), [
    ("null", "null"), ("true", "true"), ("false", "false"), ("[1]", "list"), ('"x"', "string"), ("3", "number"),
    ("2.5", "number"),
])
def test_a_row_that_is_no_object_is_named_in_json_words(tmp_path: Path, row: str, kind: str) -> None:
    # a null row said "got NoneType", a string "got str"
    file = tmp_path / "data.jsonl"
    file.write_text('{"a": 1}\n' + row + "\n")
    with pytest.raises(ValueError, match=rf"data.jsonl:2: expected a JSON object, got {kind}$"):
        list(fileio.iter_jsonl(file))


def test_a_key_twice_in_one_row_is_refused(tmp_path: Path) -> None:
    # json kept the last of two equal keys silently: {"image": "a.png", "image": "b.png"} lost a.png unseen
    file = tmp_path / "data.jsonl"
    file.write_text('{"a": 1}\n\n{"image": "a.png", "text": "x", "image": "b.png"}\n')
    for read in (fileio.iter_jsonl, fileio.read_json_records):
        with pytest.raises(ValueError, match=r'data.jsonl:3: the key "image" appears twice in one object$'):
            list(read(file))
    file.write_text('{"a": {"b": 1, "b": 2}}\n')  # in a nested object too
    with pytest.raises(ValueError, match=r'data.jsonl:1: the key "b" appears twice'):
        list(fileio.iter_jsonl(file))
    file.write_text('{"a": 1, "b": {"a": 2}}\n')  # the same key in different objects is fine
    assert list(fileio.iter_jsonl(file)) == [(1, {"a": 1, "b": {"a": 2}})]


def test_json_text_is_utf8_unless_it_holds_a_lone_surrogate() -> None:
    # the one writer of predict's rows and eval's outputs: "\ud800" (JSON read from a data file) cannot be UTF-8
    assert json_text({"q": "déjà"}) == '{"q": "déjà"}'
    assert json_text({"q": "déjà \ud800"}) == '{"q": "d\\u00e9j\\u00e0 \\ud800"}'
    assert json.loads(json_text({"q": "déjà \ud800"}, indent=1)) == {"q": "déjà \ud800"}
    json_text({"q": "\ud800"}, indent=1).encode("utf-8")


def test_jsonl_line_escapes_what_str_splitlines_splits_at() -> None:
    # the one JSON Lines writer (predict's rows, eval's partial rows, data-convert): U+2028, U+2029 and U+0085 were
    # written as they are by predict and eval, and a reader splitting with str.splitlines broke the row there
    rows = [{"q": "a\u2028b\u2029c\x85d déjà"}, {"q": "\ud800\u2028"}, {"q": "plain"}]
    text = "".join(fileio.jsonl_line(row) for row in rows)
    assert [json.loads(line) for line in text.splitlines()] == rows
    assert fileio.jsonl_line({"q": "déjà\u2028"}) == '{"q": "déjà\\u2028"}\n'
