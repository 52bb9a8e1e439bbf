"""A full disk, a killed writer, SIGTERM, Ctrl-C while deleting: one line naming the file, the user's files as they
were, nothing half-written under a final name, no temporary file left behind."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qwenvl import fileio
from qwenvl.cli import main
from qwenvl.fileio import atomic_dir, atomic_file, atomic_write_bytes, remove_tree
from qwenvl.outputs import LOCK_FILE, claim_output

GOLDEN = Path(__file__).parent / "fixtures" / "qwenvl-tiny"
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write(), fsync() or close() on a full disk: no name


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _no_space_at_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every fsync fails as on a full disk (delayed allocation says ENOSPC there, not at write)."""
    def fsync(fd: int) -> None:
        raise ENOSPC

    monkeypatch.setattr(fileio.os, "fsync", fsync)


def test_a_full_disk_is_an_error_naming_the_file_and_the_old_file_stays(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "answers.jsonl"
    target.write_text("old")
    _no_space_at_fsync(monkeypatch)
    with pytest.raises(OSError) as info:
        atomic_write_bytes(target, b"new")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert str(info.value) == f"[Errno 28] No space left on device: '{target}'"
    assert target.read_text() == "old" and _names(tmp_path) == ["answers.jsonl"]


def test_torch_save_failing_on_a_full_disk_is_said_as_a_full_disk(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.save's zip writer hides the errno: "unexpected pos 704 vs 598"
    hidden = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    with pytest.raises(RuntimeError, match="unexpected pos"), atomic_dir(tmp_path / "ckpt"):
        raise hidden  # free space left: not a full disk, the error goes on as it was
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))
    with pytest.raises(OSError) as info, atomic_dir(tmp_path / "ckpt"):
        raise hidden
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "ckpt")
    assert _names(tmp_path) == []


def test_an_error_reading_an_input_is_not_said_as_a_write_error(tmp_path: Path) -> None:
    source = tmp_path / "missing.bin"
    with pytest.raises(FileNotFoundError) as info, atomic_file(tmp_path / "out.bin"):
        source.read_bytes()
    assert info.value.filename == str(source)


def test_the_temporary_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path: Path) -> None:
    target = tmp_path / "out.ckpt"
    killed = subprocess.run(  # writes half of the file, then dies as under SIGKILL (nothing of Python runs after)
        [sys.executable, "-c", "import os, signal, sys; from qwenvl.fileio import atomic_file\n"
         "with atomic_file(sys.argv[1]) as f:\n    f.write(b'half'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)",
         str(target)], capture_output=True, text=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (dead,) = [p for p in tmp_path.iterdir()]
    assert fileio.is_temporary(dead.name) and dead.read_bytes() == b"half"
    live = tmp_path / ".out.ckpt.qwenvl-tmp-l1ve0000"  # another writer of the same file, still at work: it holds
    live.write_bytes(b"being written")  # the lock of its temporary file (flock: another open file is another holder)
    other = tmp_path / ".other.qwenvl-tmp-k1ll3d00"  # not a temporary file of this target: not looked at
    other.write_bytes(b"x")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        atomic_write_bytes(target, b"whole")
    finally:
        os.close(fd)
    assert _names(tmp_path) == sorted([target.name, live.name, other.name])
    assert target.read_bytes() == b"whole"


def test_ctrl_c_while_an_old_checkpoint_is_deleted_leaves_no_trash(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(name: str) -> None:
        if name == "remove_tree.renamed":
            raise KeyboardInterrupt

    monkeypatch.setattr(fileio, "fault_point", interrupt)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt), claim_output(out, "finetune", overwrite=True):
        (out / "checkpoint-1" / "sub").mkdir(parents=True)
        remove_tree(out / "checkpoint-1")  # pruning: renamed to a trash name, Ctrl-C before it is deleted
    assert _names(out) == ["notes.txt"]  # nothing of ours is left, so our marker goes too


def _llava(tmp_path: Path) -> Path:
    data = tmp_path / "llava.json"
    data.write_text(json.dumps([{"id": "1", "conversations": [{"from": "human", "value": "Hi?"},
                                                              {"from": "gpt", "value": "Hello."}]}]))
    return data


def test_commands_say_a_full_disk_in_one_line_and_keep_the_users_files(tmp_path: Path, capsys,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    data = _llava(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "Hi"}\n')
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "answers.jsonl").write_text("yesterday's answers")
    _no_space_at_fsync(monkeypatch)
    runs = [["data-convert", "--data_path", str(data), "--image_location", str(tmp_path), "--output_path",
             str(out / "answers.jsonl"), "--overwrite"],
            ["predict", "--model", str(GOLDEN), "--jsonl", str(prompts), "--max_new_tokens", "2", "--output",
             str(out / "answers.jsonl"), "--overwrite"]]
    for argv in runs:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == f"qwenvl {argv[0]}: error: [Errno 28] No space left on device: '{out / 'answers.jsonl'}'"
        assert (out / "answers.jsonl").read_text() == "yesterday's answers"
        if argv[0] == "predict":  # the answers made are not lost with the output: they are in OUT.partial
            assert err[-2] == f"the answer is in {out / 'answers.jsonl.partial'} (JSONL, in the prompts' order)"
            assert [json.loads(line)["prompt"] for line in (out / "answers.jsonl.partial").open()] == ["Hi"]
            (out / "answers.jsonl.partial").unlink()
        assert _names(out) == ["answers.jsonl", "notes.txt"]


def test_sigterm_ends_a_command_as_ctrl_c_does(tmp_path: Path) -> None:
    # SIGTERM (kill, timeout, a scheduler's cancel) arrives while the output is being written: the temporary
    # file goes, the message is one line, the exit status 128 + 15
    data = _llava(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    script = ("import os, signal, sys; from qwenvl import fileio; from qwenvl.cli import main\n"
              "def fsync(fd): os.kill(os.getpid(), signal.SIGTERM)\n"
              "fileio.os.fsync = fsync\n"
              "sys.exit(main(sys.argv[1:]))")
    argv = ["data-convert", "--data_path", str(data), "--image_location", str(tmp_path), "--output_path",
            str(out / "data.json")]
    run = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=60)
    assert run.returncode == 128 + signal.SIGTERM, run.stderr
    assert run.stderr.strip().splitlines()[-1] == "terminated (SIGTERM)" and "Traceback" not in run.stderr
    assert _names(out) == ["notes.txt"]
    assert LOCK_FILE not in _names(out)


def test_a_refused_folder_is_left_exactly_as_it_was(tmp_path: Path) -> None:
    # the cleanup of a failed run is for folders it claimed: a user's folder it refuses is not touched at all
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / ".model.qwenvl-tmp-0123abcd").mkdir()
    with pytest.raises(ValueError, match="not written by qwenvl"), claim_output(tmp_path, "convert"):
        pass
    assert _names(tmp_path) == [".model.qwenvl-tmp-0123abcd", "notes.txt"]
