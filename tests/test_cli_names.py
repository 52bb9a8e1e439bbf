"""One spelling for one thing across the ``qwenvl`` commands: ``--model`` (the checkpoint folder), ``--batch_size``,
``--data`` (an input data file), ``--output`` (an output file) and ``--output_dir`` (an output folder) work in every
command that has that thing, and the reference tools' names (``--load_checkpoint``, ``--predict_batch_size``,
``--jsonl``, ``--data_path``, ``--output_path``, ``--train_data``) keep working as before."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qwenvl.cli import build_parser, main


def _options(*command: str) -> set[str]:
    parser = build_parser().commands[command[0]]
    for name in command[1:]:  # eval's tasks
        parser = next(a for a in parser._actions if a.dest == "eval_task").choices[name]
    return {o for action in parser._actions for o in action.option_strings}


EVAL = [("eval", task) for task in ("grounding", "vqa", "caption")]


@pytest.mark.parametrize("command", [("predict",), ("chat",), *EVAL, ("serve",), ("finetune",)])
def test_every_command_that_starts_from_a_checkpoint_folder_takes_model(command):
    assert {"--model", "--load_checkpoint"} <= _options(*command)


@pytest.mark.parametrize("command", [("predict",), *EVAL])
def test_every_command_that_batches_takes_batch_size(command):
    assert "--batch_size" in _options(*command)


@pytest.mark.parametrize("command", [("predict",), *EVAL, ("data-convert",), ("finetune",)])
def test_every_command_that_reads_a_data_file_takes_data(command):
    assert "--data" in _options(*command)


@pytest.mark.parametrize("command", [("predict",), *EVAL, ("data-convert",)])
def test_output_is_a_file_wherever_it_is_taken(command):
    assert "--output" in _options(*command)


@pytest.mark.parametrize("command", [("demo",), ("finetune",), ("convert",)])
def test_commands_writing_a_folder_take_output_dir_and_not_output(command):
    # --output is a file in every command that takes it: none takes it for a folder
    assert "--output_dir" in _options(*command) and "--output" not in _options(*command)


@pytest.mark.parametrize(
    ("new", "old", "dest", "value"),
    [
        (["--batch_size", "3"], ["--predict_batch_size", "3"], "predict_batch_size", 3),
        (["--data", "p.jsonl"], ["--jsonl", "p.jsonl"], "jsonl", "p.jsonl"),
    ],
)
def test_predict_aliases_parse_as_the_reference_names(new, old, dest, value):
    parser = build_parser()
    assert getattr(parser.parse_args(["predict", *new]), dest) == value
    assert getattr(parser.parse_args(["predict", *old]), dest) == value


def test_predict_batch_size_and_data_reach_the_run(tmp_path, golden_dir, monkeypatch):
    # the same answers, batched the same way, whichever names the command line uses
    from qwenvl import inference

    seen: list[int] = []
    real = inference.iter_predict

    def recording(*args, batch_size=1, **kwargs):
        seen.append(batch_size)
        return real(*args, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(inference, "iter_predict", recording)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ("Hello", "Hi", "Yes")) + "\n")
    common = ["predict", "--model", str(golden_dir), "--dtype", "fp32", "--max_new_tokens", "2"]
    assert main([*common, "--data", str(prompts), "--batch_size", "2", "--output", str(tmp_path / "new.jsonl")]) == 0
    assert main([*common, "--jsonl", str(prompts), "--predict_batch_size", "2",
                 "--output", str(tmp_path / "old.jsonl")]) == 0
    assert seen == [2, 2]
    assert (tmp_path / "new.jsonl").read_text() == (tmp_path / "old.jsonl").read_text()
    assert len((tmp_path / "new.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("flag", ["--batch_size", "--predict_batch_size"])
def test_predict_batch_size_is_checked_under_either_name(tmp_path, capsys, flag):
    argv = ["predict", "--model", str(tmp_path / "no-model"), "--predict_data", "hi", "--modal_type", "text", flag, "0"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"qwenvl predict: error: {flag} must be >= 1, got 0"  # as typed


def _llava(tmp_path: Path) -> Path:
    data = tmp_path / "llava.json"
    data.write_text(json.dumps([{"id": "1", "conversations": [{"from": "human", "value": "Hi?"},
                                                              {"from": "gpt", "value": "Hello."}]}]))
    return data


@pytest.mark.parametrize(("data", "output"), [("--data", "--output"), ("--data_path", "--output_path"),
                                               ("--data", "--output_path"), ("--data_path", "--output")])
def test_data_convert_takes_data_and_output_as_well_as_its_reference_names(tmp_path, capsys, data, output):
    out = tmp_path / "out.json"
    assert main(["data-convert", data, str(_llava(tmp_path)), "--image_location", str(tmp_path), output, str(out)]) == 0
    assert capsys.readouterr().out.startswith("1 records read, 1 written")
    assert json.loads(out.read_text())[0]["conversations"][1] == {"from": "assistant", "value": "Hello."}


def test_data_convert_still_needs_its_data_and_output(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["data-convert", "--image_location", str(tmp_path)])
    assert e.value.code == 2
    # each is said by all its names (argparse: --data/--data_path), the one the README uses among them
    assert re.search(r"required: (--data/)?--data_path, (--output/)?--output_path$", capsys.readouterr().err)


def _finetune_config(argv: list[str]):
    from qwenvl.train.cli import config_from_args

    args, extra = build_parser().parse_known_args(["finetune", "--preset", "tiny", *argv])
    return config_from_args(args, extra)


@pytest.mark.parametrize("flag", ["--data", "--train_data", "--data_path"])
def test_finetune_data_file_under_each_of_its_names(flag):
    cfg = _finetune_config([flag, "d.json", "--batch_size", "2", "--dataset_dir", "imgs"])
    assert (cfg.data_path, cfg.batch_size, cfg.dataset_dir) == ("d.json", 2, "imgs")


@pytest.mark.parametrize(("model", "data"), [("--model", "--data"), ("--load_checkpoint", "--train_data")])
def test_finetune_checkpoint_under_each_of_its_names(model, data, tmp_path):
    cfg = _finetune_config([model, str(tmp_path), data, "d.json", "--learning_rate", "3e-4"])
    assert (cfg.load_checkpoint, cfg.data_path, cfg.learning_rate) == (str(tmp_path), "d.json", 3e-4)


@pytest.mark.parametrize("argv", [["--data", "a.json", "--train_data", "b.json"],
                                  ["--model", "a", "--load_checkpoint", "b"],
                                  ["--data_path", "a.json", "--data", "b.json"],
                                  ["--data", "a.json", "--data", "a.json"]])
def test_finetune_data_file_given_twice_is_refused(argv):
    from qwenvl.train import TrainConfigError

    with pytest.raises(TrainConfigError, match=r"is given twice \(or under another of its names\)"):
        _finetune_config(argv)
