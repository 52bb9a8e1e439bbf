"""Output folders (qwenvl.outputs): ours or refused, inputs untouched, one run per folder, crash leftovers cleaned."""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from qwenvl.checkpoint import load_state_dict, save_pretrained
from qwenvl.config import QwenVLConfig
from qwenvl.fileio import clean_temporary, is_temporary, remove_tree, temp_name
from qwenvl.model import QwenVL
from qwenvl.outputs import (
    LOCK_FILE,
    MARKER_FILE,
    OutputDirError,
    acquire_lock,
    check_output_file,
    check_separate,
    claim_output,
    read_marker,
    record_files,
)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _user_folder(path: Path) -> dict[str, bytes]:
    (path / "photos").mkdir(parents=True)
    (path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    (path / "notes.txt").write_text("my notes")
    (path / "model-card.md").write_text("# my model")
    (path / "model.safetensors.md5").write_text("0123")
    return _tree(path)


@pytest.fixture(scope="module")
def tiny() -> tuple[dict[str, torch.Tensor], QwenVLConfig]:
    model = QwenVL.from_config("tiny", seed=0)
    return model.state_dict(), model.config


# ---- inputs vs outputs -------------------------------------------------------------------------------------
def test_output_that_is_contains_or_lies_inside_an_input_is_refused(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "ckpt"
    src.mkdir()
    for out, word in ((src, "is the SOURCE"), (tmp_path, "contains the SOURCE"), (src / "sub", "lies inside")):
        with pytest.raises(OutputDirError, match=word):
            check_separate(out, {"SOURCE": src})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputDirError, match="contains the SOURCE"):
        check_separate(".", {"SOURCE": "ckpt"})  # the current directory, spelled "."
    (tmp_path / "link").symlink_to(src)
    with pytest.raises(OutputDirError, match="is the SOURCE"):
        check_separate("link", {"SOURCE": src})  # another name for the same folder
    check_separate(tmp_path / "elsewhere", {"SOURCE": src, "unused": None})
    check_separate(src / "out", {"data": src}, may_lie_inside=("data",))  # allowed for that label only


def test_output_file_that_is_an_input_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text("{}\n")
    with pytest.raises(OutputDirError, match="is the --jsonl file"):
        check_output_file(tmp_path / "." / "prompts.jsonl", {"--jsonl file": data})
    check_output_file(tmp_path / "answers.jsonl", {"--jsonl file": data, "--config file": None})


def test_output_file_check_takes_an_input_name_too_long_to_exist(tmp_path: Path) -> None:
    # an image path of a prompt with a name part over 255 bytes: Path.exists() raised "[Errno 36] File name too
    # long" and the whole predict run stopped; such a file cannot exist, so it is not the output file
    out = tmp_path / "answers.jsonl"
    out.write_text("old\n")
    check_output_file(out, {"image of prompt 1": "y" * 256, "image of prompt 2": tmp_path / ("y" * 256)})
    os.symlink("loop", tmp_path / "loop")  # [Errno 40] Too many levels of symbolic links: neither
    check_output_file(out, {"image of prompt 3": tmp_path / "loop" / "x.png"})
    (tmp_path / "same.jsonl").hardlink_to(out)
    with pytest.raises(OutputDirError, match="is the image of prompt 4"):  # the check still works
        check_output_file(out, {"image of prompt 1": "y" * 256, "image of prompt 4": tmp_path / "same.jsonl"})



def test_output_file_check_takes_an_input_with_a_nul_character(tmp_path: Path) -> None:
    # a config's load_checkpoint "a\0b" with predict --output: os.path.realpath raised "embedded null byte", the
    # whole message of the error; such a path names no file, so the output is neither it nor inside it
    out = tmp_path / "answers.jsonl"
    check_output_file(out, {"--config file": "a\0b", "image of prompt 1": tmp_path / "a\0b.png"},
                      folders={"checkpoint folder": f"{tmp_path}\0x"})
    with pytest.raises(OutputDirError, match="lies inside the checkpoint folder"):  # the check still works
        check_output_file(out, {"image of prompt 1": "a\0b.png"}, folders={"checkpoint folder": tmp_path})

def test_an_input_path_that_cannot_name_a_file_matches_no_output(tmp_path: Path, monkeypatch) -> None:
    # a lone surrogate (a JSON "\\ud800") raised a bare UnicodeEncodeError, NUL in check_separate a bare "embedded
    # null byte", and a relative path once the current folder was deleted a bare FileNotFoundError (getcwd): none
    # can be the output, nor hold it (their own checks say what is wrong with them)
    out = tmp_path / "answers.jsonl"
    impossible = {"image of prompt 1": "\ud800.png", "image of prompt 2": tmp_path / "a\0b.png",
                  "image of prompt 3": "y" * 256, "image of prompt 4": tmp_path / ("y" * 256)}
    check_output_file(out, impossible, folders={"checkpoint folder": f"{tmp_path}/\ud800", "SOURCE": "y" * 300})
    check_separate(tmp_path / "run", {"load_checkpoint": "a\0b", "training data": "\ud800.json",
                                      "dataset_dir": f"{tmp_path}/y{'y' * 300}"})
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    check_output_file(out, {"--data file": "prompts.jsonl"}, folders={"checkpoint folder": "ckpt"})
    check_separate(tmp_path / "run", {"load_checkpoint": "ckpt"})
    # the checks still work beside them
    with pytest.raises(OutputDirError, match="is the image of prompt 5"):
        check_output_file(out, {**impossible, "image of prompt 5": tmp_path / "x" / ".." / "answers.jsonl"})
    with pytest.raises(OutputDirError, match="lies inside the SOURCE"):
        check_output_file(out, impossible, folders={"checkpoint folder": "a\0b", "SOURCE": tmp_path})
    with pytest.raises(OutputDirError, match="contains the training data"):
        check_separate(tmp_path, {"load_checkpoint": "a\0b", "training data": tmp_path / "d.json"})
    with pytest.raises(OutputDirError, match="lies inside the load_checkpoint"):
        check_separate(tmp_path / "run", {"training data": "\ud800.json", "load_checkpoint": tmp_path})


@pytest.mark.parametrize("name", ["a\0b", "\ud800"])
def test_an_output_path_that_cannot_name_a_file_is_a_one_line_error_naming_it(tmp_path: Path, name: str) -> None:
    # a YAML's output_dir "out\0x": `qwenvl finetune` said only "error: embedded null byte"
    for check in (lambda: check_separate(tmp_path / name, {"load_checkpoint": None}, what="output_dir"),
                  lambda: check_output_file(tmp_path / name, {})):
        with pytest.raises(OutputDirError, match=r"^the (output_dir|output file) .* cannot be a file name") as e:
            check()
        assert repr(os.fspath(tmp_path / name)) in str(e.value) and "\n" not in str(e.value)


def test_output_file_that_is_a_pipe_or_device_is_refused(tmp_path: Path) -> None:
    # not a file we wrote (nor is /dev/null or the /dev/stdout link): the atomic write would replace it
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "to-pipe").symlink_to(tmp_path / "pipe")
    for name in ("pipe", "to-pipe"):
        for overwrite in (False, True):
            with pytest.raises(OutputDirError, match="is not a regular file"):
                check_output_file(tmp_path / name, {}, overwrite=overwrite)
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    check_output_file(tmp_path / "dangling", {}, overwrite=False)  # nothing there to lose


# ---- claiming a folder -------------------------------------------------------------------------------------
def test_new_or_empty_folder_is_claimed_marked_and_unlocked_after(tmp_path: Path) -> None:
    for out in (tmp_path / "new" / "deep", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        with claim_output(out, "convert") as root:
            assert (root / LOCK_FILE).is_file()
            holder = json.loads((root / LOCK_FILE).read_text())
            assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert read_marker(out)["command"] == "convert"
        assert sorted(p.name for p in out.iterdir()) == [MARKER_FILE]  # the lock is gone


def test_failed_run_leaves_an_empty_folder_empty_and_keeps_what_it_wrote(tmp_path: Path) -> None:
    # a run that failed in an existing empty folder left our marker there (the folder then passed for ours)
    out = tmp_path / "empty"
    out.mkdir()
    with pytest.raises(RuntimeError, match="bad source"), claim_output(out, "convert"):
        raise RuntimeError("bad source")
    assert out.is_dir() and list(out.iterdir()) == []
    with pytest.raises(RuntimeError, match="disk full"), claim_output(out, "convert") as root:
        (root / "model.safetensors").write_bytes(b"half")  # written, then the run failed: kept, and listed as ours
        record_files(root, ["model.safetensors"])
        raise RuntimeError("disk full")
    assert sorted(p.name for p in out.iterdir()) == [MARKER_FILE, "model.safetensors"]
    assert read_marker(out)["files"] == ["model.safetensors"]


@pytest.mark.parametrize("stop", [RuntimeError("bad source"), KeyboardInterrupt()])
def test_failed_run_with_overwrite_leaves_a_users_folder_as_it_found_it(tmp_path: Path, stop: BaseException) -> None:
    # a run given overwrite that failed (or was stopped) before writing anything left its marker in the user's
    # folder: a later run without overwrite then wrote there with no refusal
    out = tmp_path / "mine"
    before = _user_folder(out)
    with pytest.raises(type(stop)), claim_output(out, "convert", overwrite=True):
        raise stop
    assert _tree(out) == before and not (out / MARKER_FILE).exists() and not (out / LOCK_FILE).exists()
    with pytest.raises(OutputDirError, match="not empty and was not written by qwenvl"), claim_output(out, "convert"):
        pytest.fail("must not get here")


def test_failed_run_with_overwrite_keeps_the_marker_of_what_it_wrote(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    _user_folder(out)
    with pytest.raises(RuntimeError, match="disk full"), claim_output(out, "convert", overwrite=True) as root:
        (root / "model.safetensors").write_bytes(b"half")  # recorded: ours, to replace or delete later
        record_files(root, ["model.safetensors"])
        raise RuntimeError("disk full")
    assert read_marker(out)["files"] == ["model.safetensors"]
    with claim_output(out, "convert"):  # ours now: no overwrite needed
        pass
    # a run that wrote an entry without recording it yet (finetune's checkpoint-STEP, a demo's data/): kept too
    other = tmp_path / "other"
    before = _user_folder(other)
    with pytest.raises(KeyboardInterrupt), claim_output(other, "finetune", overwrite=True) as root:
        (root / "checkpoint-2").mkdir()
        raise KeyboardInterrupt
    assert read_marker(other)["files"] == [] and (other / "checkpoint-2").is_dir()
    with claim_output(other, "finetune"):  # --resume_training needs no overwrite
        pass
    assert {p.name for p in other.iterdir()} == {MARKER_FILE, "checkpoint-2", *(name.split("/")[0] for name in before)}


@pytest.mark.parametrize("text", ["{not json", "[" * 100_000 + "]" * 100_000, '{"a": ' * 100_000 + "1" + "}" * 100_000],
                         ids=["not-json", "deep-list", "deep-object"])
def test_a_damaged_marker_is_read_as_ours_but_damaged(tmp_path: Path, text: str) -> None:
    # a marker nested too deeply raised RecursionError (a traceback from `qwenvl convert`), not read as damaged
    (tmp_path / MARKER_FILE).write_text(text)
    assert read_marker(tmp_path) == {"written_by": "qwenvl", "command": "unknown", "files": []}


def test_a_lock_file_nested_too_deeply_reads_as_held_by_an_unknown_run(tmp_path: Path) -> None:
    # the lock file's holder was read with json.loads: "[" * 4000 raised RecursionError, a traceback from any command
    (tmp_path / LOCK_FILE).write_text("[" * 100_000)
    lock = acquire_lock(tmp_path, "convert")  # no live holder: taken over
    lock.release()


_KILLED_IN_CLAIM = """
import os, signal, sys
from qwenvl.outputs import claim_output
with claim_output(sys.argv[1], "convert", overwrite=True) as root:
    if len(sys.argv) > 2:
        (root / sys.argv[2]).write_text("ours")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_run_killed_before_writing_does_not_make_a_users_folder_ours(tmp_path: Path, caplog, tiny) -> None:
    # kill -9 leaves the marker (and the lock): it named no file and the folder held only what the run found there,
    # so the folder is still the user's: refused without overwrite (by save_pretrained too), and the refusal of a
    # claim leaves it as the user had it
    out = tmp_path / "mine"
    before = _user_folder(out)
    killed = subprocess.run([sys.executable, "-c", _KILLED_IN_CLAIM, str(out)], timeout=120)
    assert killed.returncode == -9 and (out / MARKER_FILE).is_file()
    with pytest.raises(OutputDirError, match=r"not empty and was not written by qwenvl .*overwrite=True"):
        save_pretrained(*tiny, out)
    with (caplog.at_level(logging.WARNING, logger="qwenvl.outputs"),
          pytest.raises(OutputDirError, match=r"not empty and was not written by qwenvl \(model-card.md, "),
          claim_output(out, "convert")):
        pytest.fail("must not get here")
    assert "taking over the lock of a run that is no longer running" in caplog.text
    assert _tree(out) == before and not (out / LOCK_FILE).exists()
    # one that wrote an entry before it was killed made the folder ours (its next run cleans up after it)
    killed = subprocess.run([sys.executable, "-c", _KILLED_IN_CLAIM, str(out), "trainer_state.json"], timeout=120)
    assert killed.returncode == -9
    with claim_output(out, "convert"):
        pass
    assert read_marker(out)["files"] == [] and (out / "trainer_state.json").read_text() == "ours"
    # in an empty folder, the killed run's marker is taken over like its lock
    empty = tmp_path / "empty"
    empty.mkdir()
    assert subprocess.run([sys.executable, "-c", _KILLED_IN_CLAIM, str(empty)], timeout=120).returncode == -9
    with pytest.raises(RuntimeError), claim_output(empty, "convert"):
        raise RuntimeError("bad source")
    assert list(empty.iterdir()) == []


def test_a_checkpoint_folder_a_killed_run_only_claimed_is_not_deleted_as_ours(tmp_path: Path) -> None:
    # `qwenvl convert ... run/checkpoint-2 --overwrite` killed before writing left its marker in the user's folder:
    # is_ours said yes, and finetune's pruning (save_total_limit) or --overwrite deleted the user's files as ours
    from qwenvl.outputs import is_ours
    from qwenvl.train.state import STATE_FILE, prune_checkpoints

    theirs, ours = tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4"
    for folder in (theirs, ours):
        folder.mkdir(parents=True)
        (folder / STATE_FILE).write_bytes(b"state")
    record_files(ours, [STATE_FILE], command="finetune")
    killed = subprocess.run([sys.executable, "-c", _KILLED_IN_CLAIM, str(theirs)], timeout=120)
    assert killed.returncode == -9 and (theirs / MARKER_FILE).is_file()
    assert not is_ours(theirs) and is_ours(ours)
    assert prune_checkpoints(tmp_path / "run", 1) == []
    assert (theirs / STATE_FILE).read_bytes() == b"state"
    # a run killed after it wrote there did make it ours
    killed = subprocess.run([sys.executable, "-c", _KILLED_IN_CLAIM, str(theirs), "model.safetensors"], timeout=120)
    assert killed.returncode == -9 and is_ours(theirs)


def test_output_folder_that_is_a_dangling_link_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "out").symlink_to(tmp_path / "gone")  # was a raw FileExistsError from mkdir
    with pytest.raises(OutputDirError, match="is a symbolic link to .*gone, which does not exist"), \
            claim_output(tmp_path / "out", "convert"):
        pytest.fail("must not get here")
    assert (tmp_path / "out").is_symlink() and not (tmp_path / "gone").exists()


def test_output_folder_under_a_file_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("mine")  # was "[Errno 20] Not a directory: 'afile/sub/run'" from mkdir
    with pytest.raises(OutputDirError, match=r"^the output folder .*afile/sub/run cannot be created: .*afile is a "
                                             r"file, not a folder$"), claim_output(tmp_path / "afile/sub/run", "demo"):
        pytest.fail("must not get here")
    assert (tmp_path / "afile").read_text() == "mine"


def test_foreign_non_empty_folder_is_refused_and_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    before = _user_folder(out)
    with (pytest.raises(OutputDirError, match=r"not empty and was not written by qwenvl .*--overwrite") as e,
          claim_output(out, "convert")):
        pytest.fail("must not get here")
    assert "\n" not in str(e.value)
    assert _tree(out) == before and not (out / LOCK_FILE).exists() and not (out / MARKER_FILE).exists()
    with claim_output(out, "convert", overwrite=True):
        pass
    assert {k: v for k, v in _tree(out).items() if k != MARKER_FILE} == before


def test_second_run_is_refused_naming_the_holder(tmp_path: Path) -> None:
    with (claim_output(tmp_path / "out", "finetune"),
          pytest.raises(OutputDirError, match=rf"in use by another qwenvl run \(pid {os.getpid()} on host "),
          claim_output(tmp_path / "out", "convert")):
        pytest.fail("two runs in one folder")
    with claim_output(tmp_path / "out", "convert"):  # free again once the first run is over
        pass


HOLD = "import sys, time; from qwenvl.outputs import acquire_lock; acquire_lock(sys.argv[1], 'test'); " \
       "print('locked', flush=True); time.sleep(60)"


def test_lock_of_another_process_then_its_stale_lock_after_kill_9(tmp_path: Path, caplog) -> None:
    out = tmp_path / "out"
    out.mkdir()
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirError, match=rf"in use by another qwenvl run \(pid {child.pid} on host"):
            acquire_lock(out, "convert")
    finally:
        child.kill()  # SIGKILL: the lock file stays, naming a process that no longer exists
        child.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == child.pid
    with caplog.at_level(logging.WARNING, logger="qwenvl.outputs"):
        lock = acquire_lock(out, "convert")
    assert f"taking over the lock of a run that is no longer running (pid {child.pid}" in caplog.text
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (out / LOCK_FILE).exists()


def test_unlocked_lock_file_of_a_live_process_on_this_host_is_respected(tmp_path: Path) -> None:
    """A filesystem without working flock: the lock file still names a live process, so we do not take it."""
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(OutputDirError, match=rf"pid {os.getppid()} .*still running.*delete .*{LOCK_FILE}"):
        acquire_lock(tmp_path, "convert")


def test_a_lock_file_whose_pid_is_not_a_number_names_no_live_process(tmp_path: Path, caplog) -> None:
    """A damaged lock file ("pid": true) was taken as naming pid 1 (a bool is an int), always alive: the folder was
    blocked until the file was deleted by hand."""
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": True, "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING, logger="qwenvl.outputs"):
        acquire_lock(tmp_path, "convert").release()
    assert "taking over the lock of a run that is no longer running" in caplog.text


def test_a_lock_file_naming_a_pid_reused_by_a_later_process_is_taken_over(tmp_path: Path, caplog) -> None:
    """A run killed in a container; after a restart another process has its pid. That process started after the
    lock was taken: it is not the holder, and the folder is not blocked until the lock file is deleted by hand."""
    later = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        an_hour_ago = (datetime.datetime.now().astimezone() - datetime.timedelta(hours=1)).isoformat(timespec="seconds")
        (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": later.pid, "host": socket.gethostname(),
                                                      "command": "finetune", "started": an_hour_ago}))
        with caplog.at_level(logging.WARNING, logger="qwenvl.outputs"):
            acquire_lock(tmp_path, "convert").release()
        assert f"taking over the lock of a run that is no longer running (pid {later.pid}" in caplog.text
    finally:
        later.communicate(b"")


# where acquire_lock may be stopped between making the lock file and returning its RunLock: right after each function
# it calls there (module, name), as a Ctrl-C landing then is; the folder has no lock file ("none"), or that of a run
# that is gone: its pid no longer runs ("dead"), or now runs a process started after that run's lock ("reused")
_ALWAYS = ["os.open", "fcntl.flock", "same_file", "_holder", "RunLock", "json.dumps", "os.ftruncate", "os.pwrite",
           "os.fsync"]
_LOCK_STOPS = [*(("none", s) for s in _ALWAYS), *(("dead", s) for s in [*_ALWAYS, "_pid_alive", "logger.warning"]),
               *(("reused", s) for s in [*_ALWAYS, "_pid_alive", "_started_after", "logger.warning"])]


@pytest.mark.parametrize(("previous", "step"), _LOCK_STOPS)
def test_acquire_lock_stopped_anywhere_leaves_no_lock_of_its_own(tmp_path: Path, monkeypatch, previous: str,
                                                                 step: str) -> None:
    # Ctrl-C inside acquire_lock after the lock file was made left it, and the open file holding the flock when it
    # came after flock: the folder kept a lock file until the next run took it over, and in this process it stayed
    # locked ("in use by another qwenvl run", naming this very process)
    import qwenvl.outputs

    out = tmp_path / "out"
    out.mkdir()
    before, later = None, None
    if previous != "none":
        later = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        if previous == "dead":
            later.communicate(b"")
        started = datetime.datetime.now().astimezone() - datetime.timedelta(hours=1)
        before = json.dumps({"pid": later.pid, "host": socket.gethostname(), "command": "finetune",
                             "started": started.isoformat(timespec="seconds")})
        (out / LOCK_FILE).write_text(before)
    where, _, name = step.rpartition(".")
    owner = {"os": os, "fcntl": fcntl, "json": json, "logger": qwenvl.outputs.logger, "": qwenvl.outputs}[where]
    real, real_open, lock_fds, stopped = getattr(owner, name), os.open, [], []

    def open_lock(*args: Any, **kwargs: Any) -> int:
        fd = real_open(*args, **kwargs)
        if Path(args[0]) == out / LOCK_FILE:
            lock_fds.append(fd)
        return fd

    def ran_then_stopped(*args: Any, **kwargs: Any) -> Any:
        result = (open_lock if step == "os.open" else real)(*args, **kwargs)
        if (Path(args[0]) != out / LOCK_FILE) if step == "os.open" else (where in ("os", "fcntl")
                                                                          and args[0] not in lock_fds):
            return result  # another file of this process
        if not stopped:  # once: what acquire_lock does on its way out runs as it is
            stopped.append(step)
            raise KeyboardInterrupt
        return result

    fds = len(os.listdir("/proc/self/fd"))
    try:
        monkeypatch.setattr(os, "open", open_lock)
        monkeypatch.setattr(owner, name, ran_then_stopped)
        with pytest.raises(KeyboardInterrupt):
            acquire_lock(out, "convert").release()
        monkeypatch.undo()
        assert stopped == [step]
        if step in ("os.open", "RunLock"):  # the descriptor never reached acquire_lock: lost (it holds no lock)
            os.close(lock_fds[0])
        assert len(os.listdir("/proc/self/fd")) == fds
        left = sorted(p.name for p in out.iterdir())
        # the lock file of a run that is gone is that run's: left as it was unless this run had taken it over
        assert left == [] or (before is not None and left == [LOCK_FILE] and (out / LOCK_FILE).read_text() == before)
        acquire_lock(out, "convert").release()  # the folder is free, in this process too
        assert list(out.iterdir()) == []
    finally:
        if later is not None and later.returncode is None:
            later.communicate(b"")


def test_a_folder_made_for_a_run_stopped_while_taking_its_lock_goes_again(tmp_path: Path, monkeypatch) -> None:
    # Ctrl-C (here: as the lock file's bytes went to disk) left the new folder behind, holding the lock file
    import qwenvl.outputs

    real_fsync = os.fsync

    def fsync_then_stopped(fd: int) -> None:
        real_fsync(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(qwenvl.outputs.os, "fsync", fsync_then_stopped)
    with pytest.raises(KeyboardInterrupt), claim_output(tmp_path / "new" / "out", "convert"):
        pytest.fail("must not get here")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"] and list((tmp_path / "new").iterdir()) == []
    (tmp_path / "mine").mkdir()  # a folder that was there stays, as it was
    with pytest.raises(KeyboardInterrupt), claim_output(tmp_path / "mine", "convert"):
        pytest.fail("must not get here")
    assert list((tmp_path / "mine").iterdir()) == []


def test_a_filesystem_without_locks_is_a_one_line_error_naming_the_folder(tmp_path: Path, monkeypatch) -> None:
    import errno
    import fcntl

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))  # an NFS mount with "nolock", say

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(OutputDirError, match=rf"cannot lock {tmp_path / LOCK_FILE}: No locks available .*local disk"):
        acquire_lock(tmp_path, "convert")


# ---- leftovers of killed runs ------------------------------------------------------------------------------
def test_only_our_temporary_names_are_cleaned_and_an_interrupted_swap_is_undone(tmp_path: Path) -> None:
    ours = [temp_name("checkpoint-4"), temp_name("model.safetensors"), temp_name("checkpoint-2", "trash"),
            ".publish.qwenvl-tmp-abc_123", ".trainer_state.json.qwenvl-tmp-x1y2z3w4"]
    for name in ours:
        assert is_temporary(name), name
        (tmp_path / name).mkdir()
        (tmp_path / name / "half").write_text("x")
    theirs = [".cache", ".notes.txt.tmp", "model-card.md", ".x.old-1234", "model.safetensors.md5"]
    for name in theirs:
        assert not is_temporary(name), name
        (tmp_path / name).write_text("keep")
    # a folder replacement killed between its two renames: the previous version waits under an -old- name
    old = tmp_path / temp_name("checkpoint-6", "old")
    old.mkdir()
    (old / "weights").write_text("w6")
    # ... and one whose replacement did arrive: the old copy is just deleted
    (tmp_path / "checkpoint-8").mkdir()
    (tmp_path / temp_name("checkpoint-8", "old")).mkdir()
    clean_temporary(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*theirs, "checkpoint-6", "checkpoint-8"])
    assert (tmp_path / "checkpoint-6" / "weights").read_text() == "w6"


def test_remove_tree_goes_through_a_trash_name(tmp_path: Path, monkeypatch) -> None:
    victim = tmp_path / "checkpoint-1"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "f").write_text("x")
    seen = []
    monkeypatch.setattr("qwenvl.fileio.shutil.rmtree", lambda p: seen.append(sorted(os.listdir(tmp_path))))
    remove_tree(victim)  # "interrupted" before the delete: only a trash folder is left
    assert len(seen) == 1 and len(seen[0]) == 1 and is_temporary(seen[0][0]) and "trash" in seen[0][0]
    monkeypatch.undo()
    clean_temporary(tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---- saving into folders -----------------------------------------------------------------------------------
def test_save_pretrained_keeps_what_it_did_not_write(tmp_path: Path, tiny) -> None:
    state, config = tiny
    out = tmp_path / "ckpt"
    save_pretrained(state, config, out, max_shard_size="200KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(shards) <= set(read_marker(out)["files"])
    (out / "model-card.md").write_text("# card")
    (out / "model.safetensors.md5").write_text("abc")
    (out / "pytorch_model-notes.txt").write_text("mine")
    save_pretrained(state, config, out)  # one file now: our old shards and index go, the user's files stay
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "generation_config.json", "qwen.tiktoken", "model.safetensors", MARKER_FILE,
                     "model-card.md", "model.safetensors.md5", "pytorch_model-notes.txt"}
    assert (out / "model-card.md").read_text() == "# card"


def test_save_pretrained_into_a_foreign_folder(tmp_path: Path, tiny) -> None:
    state, config = tiny
    out = tmp_path / "theirs"
    before = _user_folder(out)
    with pytest.raises(OutputDirError, match="not written by qwenvl"):
        save_pretrained(state, config, out)
    assert _tree(out) == before
    (out / "model-00001-of-00002.safetensors").write_bytes(b"someone else's shard")
    with pytest.raises(OutputDirError, match=r"weight files this save would not replace \(model-00001-of-00002"):
        save_pretrained(state, config, out, overwrite=True)  # the folder would mix two checkpoints
    (out / "model-00001-of-00002.safetensors").unlink()
    save_pretrained(state, config, out, overwrite=True)
    after = _tree(out)
    assert all(after[k] == v for k, v in before.items())
    assert set(load_state_dict(out)) == set(state)


def test_new_folder_appears_whole_and_leaves_no_sibling(tmp_path: Path, tiny) -> None:
    state, config = tiny
    save_pretrained(state, config, tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert read_marker(tmp_path / "a")["command"] == "save_pretrained"


def test_a_planted_lock_symlink_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / LOCK_FILE).symlink_to(victim)
    with pytest.raises(OutputDirError, match="cannot create the lock file"):
        acquire_lock(tmp_path / "out", "convert")
    assert victim.read_text() == "precious"


# ---- stop signals while a re-save moves its files in --------------------------------------------------------
# `qwenvl convert` in a subprocess that sends itself SIGTERM right after the first file of a re-save is moved
# into the output folder (the fault point "publish.moving")
_TERMINATED_WHILE_MOVING = """
import os, signal, sys
from qwenvl import outputs
real = outputs.fault_point
def fault_point(name):
    if name == "publish.moving":
        os.kill(os.getpid(), signal.SIGTERM)
    real(name)
outputs.fault_point = fault_point
from qwenvl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_while_a_resave_moves_its_files_in_waits_for_the_last_one(tmp_path: Path) -> None:
    # the files are moved in one by one, config.json last: stopped after the first, the folder had no config.json
    import signal

    from qwenvl.cli import main

    golden, out = Path(__file__).parent / "fixtures" / "qwenvl-tiny", tmp_path / "out"
    assert main(["convert", str(golden), str(out)]) == 0
    before = _tree(out)
    run = subprocess.run([sys.executable, "-c", _TERMINATED_WHILE_MOVING, "convert", str(golden), str(out)],
                         capture_output=True, text=True, timeout=600)
    assert sorted(_tree(out)) == sorted(before)  # every file in place, nothing left over
    assert _tree(out) == before  # the same conversion: the same bytes
    assert run.returncode == 128 + signal.SIGTERM, run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines[-1] == "terminated (SIGTERM)" and "Traceback" not in run.stderr, run.stderr
    assert f"SIGTERM came while {out} was being saved: acted on now that the save has ended" in run.stderr
    assert load_state_dict(out).keys() == load_state_dict(golden).keys()
