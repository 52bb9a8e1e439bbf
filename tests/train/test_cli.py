"""``finetune`` on the command line: flags, overrides, errors, and an end-to-end run of the tiny config."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from qwenvl.model import QwenVL
from qwenvl.train import TrainConfigError
from qwenvl.train.cli import add_parser, config_from_args, main, named_flags, parse_overrides, run

TINY = Path(__file__).parents[2] / "configs" / "finetune_qwenvl_tiny.yaml"


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="qwenvl")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_known_args(["finetune", *argv])


def test_flags_and_overrides_become_the_config(tmp_path: Path) -> None:
    args, extra = _parse(["--config", str(TINY), "--train_data", "d.json", "--output_dir", str(tmp_path),
                          "--learning_rate", "3e-4", "--use-lora", "--lora_r=8", "--resume_training", "--use_parallel"])
    cfg = config_from_args(args, extra)
    assert (cfg.data_path, cfg.output_dir, cfg.learning_rate) == ("d.json", str(tmp_path), 3e-4)
    assert (cfg.use_lora, cfg.lora_r, cfg.resume_training, cfg.use_parallel) == (True, 8, True, True)
    assert cfg.preset == "tiny"  # from the YAML
    args, extra = _parse(["--config", str(TINY), "--resume_training", str(tmp_path / "checkpoint-4")])
    cfg = config_from_args(args, extra)
    assert cfg.resume_training and cfg.resume_from == str(tmp_path / "checkpoint-4")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--run_mode", "predict"], r"--run_mode 'predict' is not supported"),
        (["--learning_rat", "1"], r"'learning_rat' \(did you mean 'learning_rate'\?\)"),
        # a misspelled named flag got no hint: only the settings were suggested
        (["--modl", "m"], r"'modl' \(did you mean --model\?\)"),
        (["--trian_data", "d.json"], r"'trian_data' \(did you mean --train_data\?\)"),
        (["--imag_dir", "imgs"], r"'imag_dir' \(did you mean --image_dir\?\)"),
        (["--max_steps"], r"--max_steps needs a value"),
        (["--max_steps", "x"], r"max_steps: cannot read 'x' as int"),
        (["--seed", "1", "--seed", "2"], r"--seed is given twice"),
    ],
)
def test_bad_command_lines_are_clear_errors(argv: list[str], message: str) -> None:
    args, extra = _parse(["--config", str(TINY), *argv])
    with pytest.raises(TrainConfigError, match=message):
        config_from_args(args, extra)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # named flags given twice: argparse kept the last one silently (the overrides said "given twice")
        (["--output_dir", "a", "--output_dir", "b"], r"--output_dir is given twice"),
        (["--train_data", "a.json", "--data_path", "b.json"], r"--data_path is given twice"),
        (["--config", str(TINY)], r"--config is given twice"),
        (["--resume_training", "--resume_training", "auto"], r"--resume_training is given twice"),
    ],
)
def test_named_flags_given_twice_are_refused(argv: list[str], message: str) -> None:
    args, extra = _parse(["--config", str(TINY), *argv])
    with pytest.raises(TrainConfigError, match=message):
        config_from_args(args, extra)


def test_a_named_flag_given_again_with_dashes_is_said_as_typed(capsys) -> None:
    # parsed without qwenvl's main (which spells --output-dir as --output_dir first: Once says it), the dashed
    # spelling reached the overrides and was said as "--output_dir is given twice", naming neither as typed
    from qwenvl.cli import build_parser
    from qwenvl.cli import main as qwenvl_main

    for argv, said in ((["--output_dir", "a", "--output-dir", "b"], "--output-dir is given twice (also as --output_dir)"),
                       (["--data-path=b.json", "--data", "a.json"], "--data-path is given twice (also as --data)")):
        args, extra = build_parser().parse_known_args(["finetune", "--config", str(TINY), *argv])
        with pytest.raises(TrainConfigError, match=f"^{re.escape(said)}$"):
            config_from_args(args, extra)
    assert qwenvl_main(["finetune", "--config", str(TINY), "--output_dir", "a", "--output-dir", "b"]) == 2
    assert capsys.readouterr().err.strip() == "qwenvl finetune: error: --output_dir is given twice"


def test_named_flags_are_listed_once() -> None:
    # each --field value override built a parser of its own to list them
    assert named_flags() is named_flags()
    assert {"model", "load_checkpoint", "data", "train_data", "image_dir", "output_dir"} <= set(named_flags())


def test_bare_bf16_flag_turns_it_on() -> None:
    # the docstring of parse_overrides promised it; it said "--bf16 needs a value"
    assert parse_overrides(["--bf16", "--seed=3"]) == {"bf16": "true", "seed": "3"}
    args, extra = _parse(["--config", str(TINY), "--bf16"])
    assert config_from_args(args, extra).bf16 == "true"


def test_no_training_data_is_said_before_the_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys) -> None:
    # without --train_data the tiny model was built first (a 9.6B checkpoint: minutes) and then refused
    from qwenvl.cli import main as qwenvl_main
    from qwenvl.train import trainer

    def no_training(cfg):
        raise AssertionError("train() ran")

    monkeypatch.setattr(trainer, "train", no_training)
    (tmp_path / "d.json").write_text("[]")
    for argv, message in (
        ([], "no training data: set data_path (--data FILE)"),  # the name every command has
        (["--train_data", str(tmp_path / "d.json"), "--dataset_dir", str(tmp_path / "nope")],
         f"dataset_dir folder not found: {tmp_path / 'nope'}"),
        # there, but not a file: it said "training data file not found"
        (["--train_data", str(tmp_path)], f"training data path is not a file: {tmp_path}"),
        (["--train_data", "/dev/zero"], "training data path is not a file: /dev/zero"),
    ):
        assert qwenvl_main(["finetune", "--config", str(TINY), "--output_dir", str(tmp_path / "out"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"qwenvl finetune: error: {message}", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]


def test_module_entry_point_errors_are_one_line(train_data: Path, tmp_path: Path, capsys) -> None:
    # `python -m qwenvl.train.cli` caught only ValueError and FileNotFoundError: an output_dir under a file
    # ended in a NotADirectoryError traceback
    (tmp_path / "file").write_text("x")
    assert main(["--config", str(TINY), "--train_data", str(train_data), "--output_dir",
                 str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("qwenvl finetune: error: ") and "is a file, not a folder" in err, err
    assert (tmp_path / "file").read_text() == "x"


def test_parse_overrides_rejects_stray_values() -> None:
    with pytest.raises(TrainConfigError, match="unexpected argument 'oops'"):
        parse_overrides(["oops"])


def test_finetune_tiny_config_end_to_end(train_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args, extra = _parse(["--config", str(TINY), "--run_mode", "finetune", "--train_data", str(train_data),
                          "--output_dir", str(out), "--max_steps", "2", "--save_steps", "1"])
    assert run(args, extra) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["progress"]["step"] == 2 and len(state["progress"]["losses"]) == 2
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]  # save_total_limit 1
    QwenVL.from_pretrained(out)

    # the module entry point: resuming the finished run resumes nothing and leaves its state as it was
    before = (out / "trainer_state.json").stat().st_mtime_ns
    assert main(["--config", str(TINY), "--train_data", str(train_data), "--output_dir", str(out),
                 "--max_steps", "2", "--resume_training"]) == 0
    assert (out / "trainer_state.json").stat().st_mtime_ns == before
    assert main(["--config", str(TINY), "--run_mode", "predict"]) == 2


def test_a_lost_peer_is_one_line_naming_the_rank(train_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys) -> None:
    # under torchrun, the ranks that survive a dead one printed a traceback of ~60 lines each
    from qwenvl.cli import main as qwenvl_main
    from qwenvl.train import trainer
    from qwenvl.train.distributed import DistEnv

    def lost(cfg):
        env = DistEnv(3, 4, 3, None, timeout_s=300)
        raise env.lost(RuntimeError("[gloo/pair.cc:537] Read error: Connection reset by peer\nmore")) from None

    monkeypatch.setattr(trainer, "train", lost)
    assert qwenvl_main(["finetune", "--config", str(TINY), "--train_data", str(train_data), "--output_dir",
                        str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("qwenvl finetune: error: rank 3 of 4: lost the other ranks") and "Connection reset" in err
    # torchrun's summary names this rank first after a timeout: the line said it named the rank that failed (a
    # reviewer's hung rank 1 was named by rank 0's line and the summary as rank 0)
    assert "after a timeout that is the rank that waited, this one, not the one that hung" in err


def test_ctrl_c_names_the_checkpoint_a_resume_goes_on_from(train_data: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    # it said only "interrupted", where predict and eval say where their answers are
    from qwenvl.cli import main as qwenvl_main
    from qwenvl.train import trainer
    from qwenvl.train.state import STATE_FILE

    out = tmp_path / "out"

    def stopped_after_two_checkpoints(cfg):
        for step in (2, 4):
            (out / f"checkpoint-{step}").mkdir(parents=True)
            (out / f"checkpoint-{step}" / STATE_FILE).write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", stopped_after_two_checkpoints)
    monkeypatch.delenv("RANK", raising=False)
    argv = ["finetune", "--config", str(TINY), "--train_data", str(train_data), "--output_dir", str(out)]
    assert qwenvl_main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        f"{out / 'checkpoint-4'} is kept: add --resume_training to go on from it", "interrupted"]


def test_lora_without_peft_is_one_line_before_anything_runs(train_data: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    # peft is an extra (qwenvl[lora]); without it `--use_lora true` ended in an ImportError traceback (exit 1)
    import sys

    from qwenvl.cli import main as qwenvl_main

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now fails as if it were not installed
    (tmp_path / "adapter").mkdir()
    for argv in (["finetune", "--config", str(TINY), "--train_data", str(train_data), "--output_dir",
                  str(tmp_path / "out"), "--use_lora", "true"],
                 ["convert", str(tmp_path), str(tmp_path / "merged"), "--merge_lora", "--adapter",
                  str(tmp_path / "adapter")]):
        assert qwenvl_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "needs peft: pip install 'qwenvl[lora]'" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
