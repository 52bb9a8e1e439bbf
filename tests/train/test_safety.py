"""finetune and its output folder: inputs untouched, one run at a time, no mixed runs, consistent resumes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from qwenvl.cli import main
from qwenvl.fileio import temp_name
from qwenvl.model import QwenVL
from qwenvl.outputs import LOCK_FILE, MARKER_FILE, OutputDirError, acquire_lock
from qwenvl.train import train
from qwenvl.train.state import STATE_FILE, TrainStateError, checkpoint_dirs


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


@pytest.fixture(scope="module")
def done(make_cfg, processor, module_tmp_path):
    """A finished 2-step run with checkpoint-1 kept."""
    cfg = make_cfg(module_tmp_path / "out", max_steps=2, save_steps=1, save_total_limit=1)
    return cfg, train(cfg, processor=processor)


def test_output_dir_must_stay_clear_of_the_checkpoint_it_loads(train_data: Path, tmp_path: Path, capsys) -> None:
    base = tmp_path / "base"
    QwenVL.from_config("tiny", seed=0).save_pretrained(base)
    before = _tree(tmp_path)
    common = ["finetune", "--load_checkpoint", str(base), "--train_data", str(train_data), "--max_steps", "1"]
    _one_line_error([*common, "--output_dir", str(base)], capsys, "is the load_checkpoint")
    _one_line_error([*common, "--output_dir", str(tmp_path)], capsys, "contains the load_checkpoint")
    _one_line_error([*common, "--output_dir", str(train_data.parent)], capsys, "contains the training data")
    assert _tree(tmp_path) == before


def test_a_second_run_in_the_same_folder_is_refused(make_cfg, tmp_path: Path) -> None:
    lock = acquire_lock(tmp_path, "finetune")  # another run holds the folder
    try:
        with pytest.raises(OutputDirError, match=rf"in use by another qwenvl run \(pid {os.getpid()} on host .*"
                                                 r"qwenvl finetune started"):
            train(make_cfg(tmp_path, max_steps=1))
    finally:
        lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written by the refused run


def test_resume_refuses_changed_optimization_settings(done, processor) -> None:
    cfg, _result = done
    changed = cfg.replace(resume_training=True, learning_rate=2e-2, min_lr=2e-3, warmup_steps=1)
    with pytest.raises(TrainStateError, match=r"cannot resume from .*checkpoint-1: learning_rate 0\.01 -> 0\.02, "
                                              r"min_lr 0\.001 -> 0\.002, warmup_steps 0 -> 1 differ"):
        train(changed, processor=processor)
    # the global batch counts (batch_size x gradient_accumulation_steps x ranks), not how it is split
    with pytest.raises(TrainStateError, match=r"global_batch_size 4 -> 2 differ"):
        train(cfg.replace(resume_training=True, batch_size=2), processor=processor)


def test_resume_with_other_data_or_model_is_warned_naming_it(done, processor, tmp_path: Path, caplog) -> None:
    # the sample order only checks the number of samples: another data file of the same length (or the same file
    # cut to another max_length, or another base model) continued the run without a word
    cfg, _result = done
    other = tmp_path / "other.json"
    other.write_text(Path(cfg.data_path).read_text(encoding="utf-8").replace("A cat.", "A dog."), encoding="utf-8")
    shutil.copy(Path(cfg.data_path).parent / "cat.png", tmp_path / "cat.png")
    shutil.copy(Path(cfg.data_path).parent / "street.jpg", tmp_path / "street.jpg")
    QwenVL.from_config("tiny", seed=0).save_pretrained(tmp_path / "base")
    resume = {"resume_from": str(Path(cfg.output_dir) / "checkpoint-1"), "resume_training": True}
    with caplog.at_level("WARNING", logger="qwenvl.train.trainer"):
        train(cfg.replace(output_dir=str(tmp_path / "same"), **resume), processor=processor)
    assert "trained with" not in caplog.text, caplog.text
    with caplog.at_level("WARNING", logger="qwenvl.train.trainer"):
        train(cfg.replace(output_dir=str(tmp_path / "other"), data_path=str(other), max_length=1024,
                          load_checkpoint=str(tmp_path / "base"), **resume), processor=processor)
    said = [r.getMessage() for r in caplog.records if "trained with" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0], said
    assert (f"checkpoint-1 was trained with other inputs: data_path {cfg.data_path!r} -> {str(other)!r}, "
            f"max_length 2048 -> 1024, load_checkpoint '' -> {str(tmp_path / 'base')!r}") in said[0], said[0]
    # data of another length: refused, naming the checkpoint and the data (it named neither)
    short = tmp_path / "short.json"
    short.write_text(json.dumps(json.loads(other.read_text(encoding="utf-8"))[:6]), encoding="utf-8")
    with pytest.raises(TrainStateError, match=r"cannot resume from .*checkpoint-1: it was trained on 8 samples, this "
                                              r"run's data has 6 \(data_path '.*train.json' -> '.*short.json'\)"):
        train(cfg.replace(output_dir=str(tmp_path / "short"), data_path=str(short), **resume), processor=processor)


def test_corrupt_trainer_state_is_a_one_line_error(done, train_data: Path, tmp_path: Path, capsys) -> None:
    cfg, _result = done
    out = Path(shutil.copytree(cfg.output_dir, tmp_path / "out"))
    (out / "trainer_state.json").unlink()  # a run killed after checkpoint-1 (a finished one has nothing to resume)
    state = out / "checkpoint-1" / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    argv = ["finetune", "--preset", "tiny", "--train_data", str(train_data), "--output_dir", str(out),
            "--batch_size", "4", "--max_steps", "2", "--learning_rate", "1e-2", "--min_lr", "1e-3",
            "--warmup_steps", "0", "--seed", "0", "--device", "cpu", "--save_steps", "1", "--save_total_limit", "1",
            "--resume_training"]
    _one_line_error(argv, capsys, "corrupt or unreadable trainer state")
    state.write_bytes(b"not a zip file at all")
    _one_line_error(argv, capsys, "corrupt or unreadable trainer state")
    for garbage in (b"step\n", b"\x80\x02]q\x00(K\x01e.", b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01s."):
        state.write_bytes(garbage)  # an old-style pickle: its opcodes ran into an IndexError traceback
        _one_line_error(argv, capsys, "corrupt or unreadable trainer state")


def test_a_new_run_does_not_mix_with_an_earlier_runs_checkpoints(done, processor, tmp_path: Path) -> None:
    cfg, _result = done
    out = Path(shutil.copytree(cfg.output_dir, tmp_path / "out"))
    with pytest.raises(OutputDirError, match=r"holds checkpoints of an earlier run \(checkpoint-1\): resume it"):
        train(cfg.replace(output_dir=str(out)), processor=processor)
    # the user's files next to ours: a model card and a checksum, named like weight files by prefix only
    (out / "model-card.md").write_text("# my fine-tune")
    (out / "model.safetensors.md5").write_text("0123")
    (out / "pytorch_model_notes.txt").write_text("mine")
    (out / "checkpoint-1" / "sentinel").write_text("from the earlier run")
    result = train(cfg.replace(output_dir=str(out), overwrite=True, save_steps=0), processor=processor)
    assert result.steps == 2 and not (out / "checkpoint-1").exists()  # the earlier run's checkpoint is gone
    assert (out / "model-card.md").read_text() == "# my fine-tune"
    assert (out / "model.safetensors.md5").read_text() == "0123"
    assert (out / "pytorch_model_notes.txt").read_text() == "mine"
    QwenVL.from_pretrained(out)


def test_a_new_run_does_not_replace_an_earlier_runs_model(done, processor, tmp_path: Path) -> None:
    # a finished run that kept no checkpoints (save_steps 0) left only its model: was silently replaced
    cfg, _result = done
    out = tmp_path / "out"
    train(cfg.replace(output_dir=str(out), save_steps=0), processor=processor)
    weights = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(OutputDirError, match=r"holds the trained model of an earlier run \(config\.json\): pass "
                                             r"--overwrite to replace it"):
        train(cfg.replace(output_dir=str(out), save_steps=0, seed=1), processor=processor)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == weights
    train(cfg.replace(output_dir=str(out), save_steps=0, seed=1, overwrite=True), processor=processor)
    assert (out / "model.safetensors").read_bytes() != weights["model.safetensors"]


def test_resume_auto_without_a_checkpoint_does_not_replace_another_runs_model(done, processor, tmp_path: Path) -> None:
    # a finished run that kept no checkpoints; "resume_training auto" with other settings has nothing to resume
    # and started over from step 0, silently replacing that run's model
    cfg, _result = done
    out = tmp_path / "out"
    first = cfg.replace(output_dir=str(out), save_steps=0)
    train(first, processor=processor)
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(OutputDirError, match=r"holds the trained model of an earlier run .*resume_training auto.*"
                                             r"pass --overwrite"):
        train(first.replace(seed=1, resume_training="auto"), processor=processor)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files
    # the same settings: the run is complete, nothing is trained or written
    again = train(first.replace(resume_training="auto"), processor=processor)
    assert again.steps == 2 and again.resumed_from is None
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files


def test_a_finished_run_is_complete_on_another_split_of_the_global_batch(done, processor, tmp_path: Path,
                                                                         caplog) -> None:
    # resuming a finished run with the same global batch split otherwise (ranks x batch_size x accumulation)
    # retrained its last steps from the newest checkpoint and replaced the final model
    cfg, _result = done
    out = Path(shutil.copytree(cfg.output_dir, tmp_path / "out"))
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with caplog.at_level("INFO", logger="qwenvl.train.trainer"):
        result = train(cfg.replace(output_dir=str(out), resume_training=True, batch_size=2,
                                   gradient_accumulation_steps=2), processor=processor)
    assert "is complete" in caplog.text and "resumed from" not in caplog.text
    assert result.steps == 2 and result.resumed_from is None
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files


def test_resume_from_a_path_never_prunes_or_replaces_another_runs_files(done, processor, tmp_path: Path) -> None:
    # resuming checkpoint-1 of one run into a folder that holds another run's checkpoints and model: the resumed
    # run pruned them (save_total_limit) and replaced the model, without --overwrite
    cfg, result = done
    ckpt = Path(cfg.output_dir) / "checkpoint-1"
    other = tmp_path / "other"
    theirs = train(cfg.replace(output_dir=str(other), seed=1), processor=processor)
    before = _tree(other)
    with pytest.raises(OutputDirError, match=r"holds checkpoint-1 and the trained model of another run than "
                                             r".*checkpoint-1 .*pass --overwrite"):
        train(cfg.replace(output_dir=str(other), resume_from=str(ckpt), resume_training=True), processor=processor)
    assert _tree(other) == before
    # its own folder (going back to an earlier checkpoint), a fresh folder, or with --overwrite: it goes on
    fresh = train(cfg.replace(output_dir=str(tmp_path / "fresh"), resume_from=str(ckpt), resume_training=True),
                  processor=processor)
    assert fresh.resumed_from == ckpt and fresh.losses == result.losses
    again = train(cfg.replace(output_dir=str(other), seed=1, resume_from=str(other / "checkpoint-1"),
                              resume_training=True), processor=processor)
    assert again.resumed_from == other / "checkpoint-1" and again.losses == theirs.losses
    replaced = train(cfg.replace(output_dir=str(other), resume_from=str(ckpt), resume_training=True, overwrite=True),
                     processor=processor)
    assert replaced.losses == result.losses


def test_going_back_to_an_earlier_checkpoint_needs_the_later_ones_out_of_the_way(make_cfg, processor,
                                                                                    tmp_path: Path) -> None:
    # resuming checkpoint-1 of a folder holding checkpoint-2 and -3: its new checkpoint-2 replaced the old one,
    # but with save_total_limit pruning by step deleted new ones and kept the abandoned later ones, which
    # resume_training auto then took up again
    cfg = make_cfg(tmp_path / "out", max_steps=4, save_steps=1, save_total_limit=0)
    first = train(cfg, processor=processor)
    out = Path(cfg.output_dir)
    assert [p.name for _s, p in checkpoint_dirs(out)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    before = _tree(out)
    back = cfg.replace(resume_from=str(out / "checkpoint-1"), resume_training=True, save_total_limit=2)
    with pytest.raises(OutputDirError, match=r"holds checkpoints of later steps than .*checkpoint-1 \(checkpoint-2, "
                                             r"checkpoint-3\): going back to step 1, .* pass --overwrite"):
        train(back, processor=processor)
    assert _tree(out) == before
    again = train(back.replace(overwrite=True), processor=processor)
    assert again.resumed_from == out / "checkpoint-1" and again.losses == first.losses
    assert [p.name for _s, p in checkpoint_dirs(out)] == ["checkpoint-2", "checkpoint-3"]


def test_one_process_saves_and_resumes_without_dcps_one_process_warning(make_cfg, processor, tmp_path: Path) -> None:
    # every save and load of a one-process run printed DCP's "torch.distributed is disabled, unavailable or
    # uninitialized, assuming the intent is to save in a single process" (also `qwenvl convert` of a checkpoint)
    import warnings

    cfg = make_cfg(tmp_path / "out", max_steps=2, save_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg, processor=processor)
        train(cfg.replace(resume_from=str(tmp_path / "out" / "checkpoint-1"), resume_training=True),
              processor=processor)
    said = [str(w.message) for w in caught if "torch.distributed is disabled" in str(w.message)]
    assert not said, said


def test_a_users_folder_needs_overwrite_and_keeps_its_files(make_cfg, processor, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("notes")
    with pytest.raises(OutputDirError, match="not empty and was not written by qwenvl"):
        train(make_cfg(tmp_path, max_steps=1), processor=processor)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    train(make_cfg(tmp_path, max_steps=1, overwrite=True), processor=processor)
    assert (tmp_path / "notes.txt").read_text() == "notes"
    assert json.loads((tmp_path / MARKER_FILE).read_text())["command"] == "finetune"


@pytest.mark.parametrize("name, changes", [("checkpoint-1", {}), ("adapter", {"use_lora": True, "lora_r": 2})])
def test_overwrite_never_replaces_a_users_folder_under_a_name_the_run_saves(make_cfg, processor, tmp_path: Path,
                                                                          name: str, changes: dict) -> None:
    # --overwrite replaced the user's checkpoint-1/ (or a LoRA run's adapter/) whole, with the files in it
    (tmp_path / name).mkdir()
    (tmp_path / name / "notes.txt").write_text("notes")
    with pytest.raises(OutputDirError, match=rf"holds {name}, which qwenvl did not write, under the name of what "
                                             r"this run saves \(it would be replaced whole, --overwrite or not\)"):
        train(make_cfg(tmp_path, max_steps=1, save_steps=1, overwrite=True, **changes), processor=processor)
    assert (tmp_path / name / "notes.txt").read_text() == "notes"


def test_a_users_folder_made_during_the_run_under_a_checkpoints_name_stops_the_run(make_cfg, processor,
                                                                                    tmp_path: Path) -> None:
    out = tmp_path / "out"

    def make_folder(info) -> None:  # noqa: ANN001
        if info.step == 1:
            (out / "checkpoint-2").mkdir()
            (out / "checkpoint-2" / "notes.txt").write_text("notes")

    with pytest.raises(OutputDirError, match=r"checkpoint-2 exists and qwenvl did not write it: the run stops at step "
                                             r"2 rather than replace it"):
        train(make_cfg(out, max_steps=3, save_steps=1, save_total_limit=0), processor=processor, callback=make_folder)
    assert (out / "checkpoint-2" / "notes.txt").read_text() == "notes"
    assert (out / "checkpoint-1" / STATE_FILE).is_file()  # the run can resume from there


def test_leftovers_of_a_killed_run_are_cleaned_by_the_next(done, processor, tmp_path: Path) -> None:
    cfg, _result = done
    out = Path(shutil.copytree(cfg.output_dir, tmp_path / "out"))
    half_pruned = out / temp_name("checkpoint-0", "trash")  # a pruning killed half-way
    (half_pruned / "sub").mkdir(parents=True)
    staged = out / temp_name("checkpoint-2")  # a checkpoint killed before its rename
    staged.mkdir()
    (out / ".publish.qwenvl-tmp-k1ll3d00").mkdir()  # a final save killed while staging
    (out / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 12345, "host": "elsewhere"}))  # its lock file
    (out / ".keep.tmp").write_text("not ours")
    unmarked = out / "checkpoint-0"  # a checkpoint folder we did not write: never pruned
    shutil.copytree(out / "checkpoint-1", unmarked)
    (unmarked / MARKER_FILE).unlink()
    train(cfg.replace(output_dir=str(out), resume_training=True), processor=processor)
    hidden = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert hidden == [".keep.tmp", MARKER_FILE]
    assert (unmarked / STATE_FILE).is_file()


def _resume_argv(train_data: Path, out: Path) -> list[str]:
    """The command line that resumes the ``done`` run in ``out``."""
    return ["finetune", "--preset", "tiny", "--train_data", str(train_data), "--output_dir", str(out),
            "--batch_size", "4", "--max_steps", "2", "--learning_rate", "1e-2", "--min_lr", "1e-3",
            "--warmup_steps", "0", "--seed", "0", "--device", "cpu", "--save_steps", "1", "--save_total_limit", "1",
            "--resume_training"]


def test_a_damaged_sharded_checkpoint_is_a_one_line_error(done, train_data: Path, tmp_path: Path, capsys) -> None:
    import torch

    cfg, _result = done
    out = Path(shutil.copytree(cfg.output_dir, tmp_path / "out"))
    (out / "trainer_state.json").unlink()  # a run killed after checkpoint-1
    ckpt = out / "checkpoint-1"
    argv = _resume_argv(train_data, out)
    shard = next(ckpt.glob("*.distcp"))
    good = shard.read_bytes()
    shard.write_bytes(good[:1000])  # truncated
    _one_line_error(argv, capsys, f"cannot read the training checkpoint {ckpt}")
    _one_line_error(["convert", str(ckpt), str(tmp_path / "c1")], capsys, "truncated or corrupt file?")
    shard.unlink()  # missing
    _one_line_error(argv, capsys, f"cannot read the training checkpoint {ckpt}: FileNotFoundError")
    _one_line_error(["convert", str(ckpt), str(tmp_path / "c2")], capsys, "FileNotFoundError")
    shard.write_bytes(good)
    rng = ckpt / "rng-0.pt"
    rng.write_bytes(rng.read_bytes()[:50])
    _one_line_error(argv, capsys, f"cannot read {rng}")
    rng.write_bytes(b"step\n")  # the unpickler raises IndexError on it
    _one_line_error(argv, capsys, f"cannot read {rng}")
    torch.save({"numpy": 1}, rng)  # readable, not RNG states: a KeyError traceback
    _one_line_error(argv, capsys, f"cannot read {rng}: KeyError: 'python'")
    (ckpt / ".metadata").write_text("garbage\n")
    _one_line_error(argv, capsys, f"cannot read {ckpt / '.metadata'}")
    _one_line_error(["convert", str(ckpt), str(tmp_path / "c3")], capsys, f"cannot read {ckpt / '.metadata'}")
    assert not any(p.name.startswith("c") for p in tmp_path.iterdir())


def test_a_checkpoint_of_another_model_is_named_as_such(done, processor, tmp_path: Path) -> None:
    # resuming with a load_checkpoint of other shapes failed as "Size mismatch ... (truncated or corrupt file?)"
    import dataclasses

    from qwenvl.checkpoint import CheckpointError

    cfg, _result = done
    out = Path(shutil.copytree(cfg.output_dir, tmp_path / "out"))
    tiny = QwenVL.from_config("tiny").config
    other = dataclasses.replace(tiny, lm=dataclasses.replace(tiny.lm, intermediate_size=256))
    QwenVL.from_config(other, seed=0).save_pretrained(tmp_path / "other")
    before = _tree(out)
    with pytest.raises(CheckpointError, match=r"cannot resume from .*checkpoint-1: it was written for another model "
                                              r"\(its config.json has lm.intermediate_size 512 \(this model: 256\)\)"):
        train(cfg.replace(output_dir=str(out), resume_training=True, preset="", load_checkpoint=str(tmp_path / "other")),
              processor=processor)
    assert _tree(out) == before


def test_a_missing_rng_file_is_named_on_resume(done, train_data: Path, tmp_path: Path, caplog) -> None:
    # was: "saved by 1 rank(s), this run has 1", as if the world size had changed
    cfg, _result = done
    out = Path(shutil.copytree(cfg.output_dir, tmp_path / "out"))
    (out / "trainer_state.json").unlink()  # a run killed after checkpoint-1
    (out / "checkpoint-1" / "rng-0.pt").unlink()
    with caplog.at_level("WARNING", logger="qwenvl.train.sharded_checkpoint"):
        assert main(_resume_argv(train_data, out)) == 0
    assert "has no rng-0.pt (deleted?): random streams (dropout) restart from the seed" in caplog.text
    assert "rank(s), this run has" not in caplog.text


@pytest.mark.parametrize("where", ["final", "checkpoint", "old-checkpoint", "resume_from"])
def test_a_trainer_state_json_nested_too_deeply_is_read_as_unreadable(done, processor, tmp_path: Path,
                                                                      where: str) -> None:
    # json.loads raised RecursionError (a traceback from `qwenvl finetune --resume_training`) where an unreadable
    # trainer_state.json is passed over: the run resumes from checkpoint-1's trainer_state.pt
    import torch

    cfg, result = done
    out = Path(shutil.copytree(cfg.output_dir, tmp_path / "out"))
    ckpt = out / "checkpoint-1"
    if where == "old-checkpoint":  # a trainer state without its settings (they are read from the JSON copy), of
        state = torch.load(ckpt / STATE_FILE, weights_only=True)  # a run killed after checkpoint-1
        del state["config"]
        torch.save(state, ckpt / STATE_FILE)
        (out / "trainer_state.json").unlink()
    (out if where == "final" else ckpt).joinpath("trainer_state.json").write_text(
        '{"a": ' * 100_000 + "1" + "}" * 100_000)  # deeper than Python's recursion limit
    resume = {"resume_from": str(ckpt)} if where == "resume_from" else {}
    again = train(cfg.replace(output_dir=str(out), resume_training=True, **resume), processor=processor)
    assert again.resumed_from == ckpt and again.losses == result.losses


class _RunsCode:
    def __reduce__(self):  # noqa: ANN204 - what a crafted pickle does: call anything on load
        return (Path.touch, (Path(os.environ["QWENVL_TEST_SENTINEL"]),))


def test_checkpoint_metadata_is_never_unpickled_unsafely(done, train_data: Path, tmp_path: Path, capsys,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    cfg, _result = done
    out = Path(shutil.copytree(cfg.output_dir, tmp_path / "out"))
    (out / "trainer_state.json").unlink()
    sentinel = tmp_path / "code-ran"
    monkeypatch.setenv("QWENVL_TEST_SENTINEL", str(sentinel))
    ckpt = out / "checkpoint-1"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_RunsCode()))  # DCP itself reads .metadata with pickle.load
    _one_line_error(["convert", str(ckpt), str(tmp_path / "converted")], capsys, "not checkpoint metadata")
    _one_line_error(_resume_argv(train_data, out), capsys, "not checkpoint metadata")
    assert not sentinel.exists() and not (tmp_path / "converted").exists()


@pytest.mark.parametrize(("where", "change"), [("final", {"config": 1}), ("checkpoint", {"progress": []}),
                                              ("checkpoint", {"progress": {"step": "x"}})])
def test_a_damaged_trainer_state_json_is_passed_over(done, processor, tmp_path: Path, where: str,
                                                     change: dict) -> None:
    # valid JSON of other types: an AttributeError ('int' object has no attribute 'get'), a TypeError or a
    # ValueError traceback from `qwenvl finetune --resume_training`, where an unreadable one is passed over
    cfg, result = done
    out = Path(shutil.copytree(cfg.output_dir, tmp_path / "out"))
    ckpt = out / "checkpoint-1"
    file = (out if where == "final" else ckpt) / "trainer_state.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **change}))
    again = train(cfg.replace(output_dir=str(out), resume_training=True), processor=processor)
    assert again.resumed_from == ckpt and again.losses == result.losses


@pytest.mark.parametrize("name", [STATE_FILE, "rng-0.pt"])
def test_a_state_file_that_may_run_code_is_refused_in_one_line(done, train_data: Path, tmp_path: Path, capsys,
                                                               monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    # torch's UserWarning (its source file and line) came first, then its error advising to load the file with
    # weights_only=False, which "can result in arbitrary code execution"
    import pickle
    import warnings

    cfg, _result = done
    out = Path(shutil.copytree(cfg.output_dir, tmp_path / "out"))
    (out / "trainer_state.json").unlink()  # a run killed after checkpoint-1
    sentinel = tmp_path / "code-ran"
    monkeypatch.setenv("QWENVL_TEST_SENTINEL", str(sentinel))
    file = out / "checkpoint-1" / name
    said = {2: f"refusing to load {file}: it is not a plain tensor file, weights_only=True rejected it (it may "
               "reference code): WeightsUnpickler error: Unsupported global: GLOBAL getattr",
            # from protocol 4 on, torch warns of the protocol first, then stops at an opcode it does not read
            pickle.HIGHEST_PROTOCOL: "UnpicklingError: Unsupported operand 149"}
    for protocol, message in said.items():
        file.write_bytes(pickle.dumps(_RunsCode(), protocol=protocol))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(_resume_argv(train_data, out)) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and str(file) in err and len(err.splitlines()) == 1 and "False" not in err, err
        assert "add_safe_globals" not in err, err  # torch's advice to allow the global: for files one trusts
        assert not [w for w in caught if "pickle" in str(w.message)], [str(w.message) for w in caught]
    assert not sentinel.exists()


def test_consolidating_refuses_a_config_that_does_not_describe_the_checkpoint(done, tmp_path: Path, capsys) -> None:
    cfg, _result = done
    ckpt = Path(shutil.copytree(Path(cfg.output_dir) / "checkpoint-1", tmp_path / "ckpt"))
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))  # layer 1 would be dropped
    _one_line_error(["convert", str(ckpt), str(tmp_path / "c1")], capsys,
                    "does not match its config.json: 8 tensor(s) it does not describe, e.g. transformer.h.1.")
    (ckpt / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    _one_line_error(["convert", str(ckpt), str(tmp_path / "c2")], capsys, "of another shape, e.g. transformer.h.0.mlp")
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c2").exists()


def test_ctrl_c_while_a_checkpoint_is_written_is_an_interrupt(make_cfg, train_data: Path, tmp_path: Path, capsys,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed.checkpoint.filesystem as dcp_fs

    def interrupted(*args: object, **kwargs: object) -> None:
        try:  # as torch.save hit by Ctrl-C: its zip writer then fails on the way out, DCP wraps that
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    monkeypatch.setattr(dcp_fs, "_write_item", interrupted)
    out = tmp_path / "out"
    argv = ["finetune", "--preset", "tiny", "--train_data", str(train_data), "--output_dir", str(out),
            "--batch_size", "4", "--max_steps", "2", "--save_steps", "1", "--warmup_steps", "0", "--device", "cpu"]
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    assert not out.exists() or not [p.name for p in out.iterdir() if p.name.startswith(("checkpoint", ".check"))]
