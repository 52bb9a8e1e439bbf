"""A disk that fills up (or a file-size limit, `ulimit -f`) under the commands that write: the answers already made
are not lost, the error names the file, nothing is left behind in the output folder."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from qwenvl import outputs
from qwenvl.checkpoint import load_state_dict
from qwenvl.cli import main
from qwenvl.fileio import write_error
from qwenvl.outputs import PartialRows

GOLDEN = Path(__file__).parent / "fixtures" / "qwenvl-tiny"


def _fills_up_after(monkeypatch: pytest.MonkeyPatch, room: int) -> None:
    """os.write as on a disk with ``room`` bytes left (or under `ulimit -f`): the write that reaches the end is
    short, the next one fails."""
    real = os.write

    def write(fd: int, data: bytes) -> int:
        nonlocal room
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real(fd, bytes(data[:room]))
        room -= n
        return n

    monkeypatch.setattr(outputs.os, "write", write)


def test_predict_keeps_the_answers_made_before_the_disk_filled_up(tmp_path: Path, capsys,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"text": f"Hello {k}"}) + "\n" for k in range(6)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "answers.jsonl").write_text("yesterday's answers")
    row = 90  # a row is about 100 bytes: two whole rows fit, the third is cut
    _fills_up_after(monkeypatch, 2 * row + 150)
    argv = ["predict", "--model", str(GOLDEN), "--dtype", "fp32", "--jsonl", str(prompts), "--output",
            str(out / "answers.jsonl"), "--overwrite", "--max_new_tokens", "2", "--predict_batch_size", "2"]
    assert main(argv) == 2
    kept = out / "answers.jsonl.partial"
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"qwenvl predict: error: [Errno 28] No space left on device: '{kept}'"
    rows = [json.loads(line) for line in kept.read_text().splitlines()]  # whole rows: the cut one is gone
    assert 2 <= len(rows) < 6 and kept.read_text().endswith("\n")
    assert [r["prompt"] for r in rows] == [f"Hello {k}" for k in range(len(rows))]
    assert err[-2] == f"the answers to the first {len(rows)} of 6 prompts are in {kept} (JSONL, in the prompts' order)"
    assert sorted(p.name for p in out.iterdir()) == ["answers.jsonl", "answers.jsonl.partial"]
    assert (out / "answers.jsonl").read_text() == "yesterday's answers"


def test_partial_rows_leave_no_empty_file_and_never_write_over_an_earlier_one(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.jsonl.partial").write_text("an earlier run's rows")
    _fills_up_after(monkeypatch, 3)
    kept = PartialRows(tmp_path / "a.jsonl")
    with pytest.raises(OSError) as info:
        kept.append('{"response": "no room"}\n')  # not one whole row fits: no file is left
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "a.jsonl.partial-2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl.partial"]
    assert (tmp_path / "a.jsonl.partial").read_text() == "an earlier run's rows"
    monkeypatch.undo()
    kept = PartialRows(tmp_path / "sub" / "a.jsonl")  # the output's folder is made, as the output's write does
    kept.append("1\n")
    kept.append("2\n")
    kept.close()
    assert kept.path == tmp_path / "sub" / "a.jsonl.partial" and kept.path.read_text() == "1\n2\n"
    kept.discard()
    assert list((tmp_path / "sub").iterdir()) == []


@pytest.mark.parametrize("full", ["short write", "ENOSPC"])
def test_a_disk_too_full_for_the_lock_file_leaves_no_folder_and_no_lock(tmp_path: Path, capsys, full: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def pwrite(fd: int, data: bytes, offset: int) -> int:  # the lock file's pid, host, command and time
        if full == "ENOSPC":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return 0

    monkeypatch.setattr(outputs.os, "pwrite", pwrite)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for out, more in [(tmp_path / "new", []), (mine, ["--overwrite"])]:
        assert main(["convert", str(GOLDEN), str(out), *more]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == f"qwenvl convert: error: [Errno 28] No space left on device: '{out / outputs.LOCK_FILE}'"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # the folder made for the run is gone again
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_a_full_disk_while_the_vocabulary_is_copied_names_the_output_not_the_source(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch
                                                                                  ) -> None:
    import shutil

    import torch

    from qwenvl.checkpoint import save_pretrained
    from qwenvl.config import QwenVLConfig

    def sendfile(*args: object) -> int:  # shutil's copy names the source and the destination
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    config = QwenVLConfig.from_pretrained(GOLDEN)
    monkeypatch.setattr(shutil.os, "sendfile", sendfile)
    for folder in (tmp_path / "new", tmp_path / "ours"):  # built in a sibling; published from a staging folder
        if folder.name == "ours":
            monkeypatch.undo()
            save_pretrained({"transformer.wte.weight": torch.zeros(2, 2)}, config, folder)
            monkeypatch.setattr(shutil.os, "sendfile", sendfile)
        before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(OSError) as info:
            save_pretrained({"transformer.wte.weight": torch.ones(2, 2)}, config, folder)
        assert str(info.value) == f"[Errno 28] No space left on device: '{folder}'"
        assert sorted(p.name for p in tmp_path.iterdir()) == [n for n in before if n != "new"]
    assert load_state_dict(tmp_path / "ours")["transformer.wte.weight"].sum() == 0  # the earlier save, whole
    # reading the source failed: said as it was, naming it
    read_failed = OSError(errno.EIO, os.strerror(errno.EIO), "vocab/qwen.tiktoken", str(tmp_path / "stage" / "v"))
    assert write_error(read_failed, tmp_path / "out", tmp_path / "stage") is None


def test_predict_to_a_full_stdout_names_it(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    # `qwenvl predict --jsonl p.jsonl > answers.jsonl` on a full disk: the OS error names no file
    import io
    import sys

    class Full(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "Hi"}\n')
    monkeypatch.setattr(sys, "stdout", Full())
    assert main(["predict", "--model", str(GOLDEN), "--jsonl", str(prompts), "--max_new_tokens", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "qwenvl predict: error: [Errno 27] File too large: '<stdout>'"


def test_an_output_folder_removed_during_convert_is_one_line(tmp_path: Path, capsys, caplog,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from qwenvl import checkpoint

    write = checkpoint._write_safetensors
    out = tmp_path / "out"

    def removed_first(*args: object, **kwargs: object) -> None:  # `rm -rf out` while the weights are written
        shutil.rmtree(out)
        write(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "_write_safetensors", removed_first)
    assert main(["convert", str(GOLDEN), str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"qwenvl convert: error: [Errno 2] No such file or directory: '{out}'"
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []  # no second complaint
    assert list(tmp_path.iterdir()) == []


def test_a_disk_full_after_a_resave_is_published_is_not_a_failed_save(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # the files are in place when the marker's final update finds no room: the save succeeded (and says so)
    import torch

    from qwenvl.checkpoint import save_pretrained
    from qwenvl.config import QwenVLConfig

    config = QwenVLConfig.from_pretrained(GOLDEN)
    out = tmp_path / "out"
    state = {"transformer.wte.weight": torch.zeros(64, 8), "lm_head.weight": torch.zeros(64, 8)}
    save_pretrained(state, config, out, max_shard_size=2100)  # two shards and an index
    write_marker, calls = outputs._write_marker, []

    def full_at_the_last(*args: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / outputs.MARKER_FILE))
        write_marker(*args)

    monkeypatch.setattr(outputs, "_write_marker", full_at_the_last)
    save_pretrained({k: v + 1 for k, v in state.items()}, config, out)  # one file now: the shards go
    assert sorted(p.name for p in out.iterdir()) == sorted([outputs.MARKER_FILE, "config.json",
                                                            "generation_config.json", "model.safetensors",
                                                            "qwen.tiktoken"])
    assert load_state_dict(out)["lm_head.weight"].sum() == 64 * 8
    monkeypatch.undo()
    save_pretrained(state, config, out, max_shard_size=2100)  # the marker naming removed files does no harm
    assert len(list(out.glob("model-*-of-*.safetensors"))) == 2 and not (out / "model.safetensors").exists()


def test_an_output_file_in_a_read_only_folder_is_refused_before_the_run(tmp_path: Path, capsys,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # as a user who may not write there, or on a read-only mount (root may write anywhere: os.access says it)
    data = tmp_path / "llava.json"
    data.write_text(json.dumps([{"id": "1", "conversations": [{"from": "human", "value": "Hi?"},
                                                              {"from": "gpt", "value": "Hello."}]}]))
    ro = tmp_path / "ro"
    ro.mkdir()
    access = os.access
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: Path(path) != ro and access(path, mode))
    for target in (ro / "data.json", ro / "new" / "data.json"):
        argv = ["data-convert", "--data_path", str(data), "--image_location", str(tmp_path), "--output_path",
                str(target)]
        assert main(argv) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"qwenvl data-convert: error: the output file {target} cannot be written: the folder {ro} is read-only "
            "or not yours to write in")
    assert list(ro.iterdir()) == []
