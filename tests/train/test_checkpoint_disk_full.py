"""A disk that fills up while a training checkpoint is written: a one-line error naming the checkpoint, the staging
folder and the lock gone, the checkpoints already written untouched (and resumable)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch.distributed.checkpoint.filesystem as dcp_fs

from qwenvl import fileio
from qwenvl.cli import main
from qwenvl.outputs import LOCK_FILE, MARKER_FILE


def _argv(train_data: Path, out: Path, *more: str) -> list[str]:
    return ["finetune", "--preset", "tiny", "--train_data", str(train_data), "--output_dir", str(out),
            "--batch_size", "4", "--max_steps", "3", "--save_steps", "1", "--warmup_steps", "0", "--device", "cpu",
            "--gradient_checkpointing", "false", *more]


@pytest.mark.parametrize("failure", ["enospc", "torch.save"])
def test_a_full_disk_while_a_checkpoint_is_written_is_one_line(train_data: Path, tmp_path: Path, capsys,
                                                               monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    write_item, real_fault_point = dcp_fs._write_item, fileio.fault_point
    first_done = []

    def fills_up(*args: object, **kwargs: object) -> object:  # the second checkpoint runs out of space
        if first_done:
            if failure == "enospc":  # the write() of a shard
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            # torch.save's zip writer hides the errno
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return write_item(*args, **kwargs)

    def after_first(name: str) -> None:
        if name == "atomic_dir.staged":
            first_done.append(name)
        real_fault_point(name)

    monkeypatch.setattr(dcp_fs, "_write_item", fills_up)
    monkeypatch.setattr(fileio, "fault_point", after_first)
    if failure == "torch.save":
        monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(_argv(train_data, out, "--overwrite")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"qwenvl finetune: error: [Errno 28] No space left on device: '{out / 'checkpoint-2'}'"
    assert sorted(p.name for p in out.iterdir()) == [MARKER_FILE, "checkpoint-1", "notes.txt"]
    assert LOCK_FILE not in os.listdir(out)
    if failure == "torch.save":
        return
    monkeypatch.undo()
    assert main(_argv(train_data, out, "--resume_training")) == 0  # space freed: resumes from checkpoint-1
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").read_text() == "mine"


def test_a_rank_that_cannot_write_its_rng_file_is_one_line(train_data: Path, tmp_path: Path, capsys,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # each rank writes its RNG states into the checkpoint first, outside the save's error handling: a rank whose node
    # sees the folder read-only (or not at all) printed a 30-line traceback of torch.save's RuntimeError
    import torch

    from qwenvl.train import sharded_checkpoint

    def read_only(obj: object, file: object, *args: object, **kwargs: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:747] . open file failed with strerror: Read-only "
                           "file system")

    monkeypatch.setattr(sharded_checkpoint.torch, "save", read_only)
    out = tmp_path / "out"
    assert main(_argv(train_data, out)) == 2
    monkeypatch.setattr(sharded_checkpoint.torch, "save", torch.save)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"qwenvl finetune: error: cannot write the training checkpoint {out / 'checkpoint-1'}: "
                       "RuntimeError: [enforce fail at inline_container.cc:747] . open file failed with strerror: "
                       "Read-only file system"), err
    assert not out.exists()  # the staging folder went, and with it the folder the run made (nothing else written)
