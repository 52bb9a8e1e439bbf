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


@pytest.mark.parametrize(("argv", "said"), [(["--data", "a.json", "--train_data", "b.json"],
                                            "--train_data is given twice (first as --data)"),
                                           (["--model", "a", "--load_checkpoint", "b"],
                                            "--load_checkpoint is given twice (first as --model)"),
                                           (["--data_path", "a.json", "--data", "b.json"],
                                            "--data is given twice (first as --data_path)"),
                                           (["--data", "a.json", "--data", "a.json"], "--data is given twice")])
def test_finetune_data_file_given_twice_is_refused(argv, said):
    from qwenvl.train import TrainConfigError

    with pytest.raises(TrainConfigError, match=f"^{re.escape(said)}$"):
        _finetune_config(argv)


@pytest.mark.parametrize(("argv", "said"), [
    # the last one won silently in predict and data-convert (finetune said it, naming one of the two)
    (["predict", "--model", "a", "--load_checkpoint", "b", "--predict_data", "hi"],
     "qwenvl predict: error: --load_checkpoint is given twice (first as --model)"),
    (["predict", "--data", "x.jsonl", "--jsonl", "y.jsonl"], "qwenvl predict: error: --jsonl is given twice (first as --data)"),
    (["predict", "--predict_batch_size", "2", "--batch_size", "3"],
     "qwenvl predict: error: --batch_size is given twice (first as --predict_batch_size)"),
    (["chat", "--load_checkpoint", "a", "--model", "a"], "qwenvl chat: error: --model is given twice (first as --load_checkpoint)"),
    (["data-convert", "--data", "x", "--data_path", "y", "--image_location", "i", "--output", "o"],
     "qwenvl data-convert: error: --data_path is given twice (first as --data)"),
    (["data-convert", "--data", "x", "--image_location", "i", "--output", "o", "--output_path", "p"],
     "qwenvl data-convert: error: --output_path is given twice (first as --output)"),
    (["eval", "vqa", "--model", "a", "--load_checkpoint", "b", "--data", "d"],
     "qwenvl eval vqa: error: --load_checkpoint is given twice (first as --model)"),
    (["convert", "--model", "a", "--load_checkpoint", "b", "--output_dir", "o"],
     "qwenvl convert: error: --load_checkpoint is given twice (first as --model)"),
    (["finetune", "--train_data", "a.json", "--data", "b.json"],
     "qwenvl finetune: error: --data is given twice (first as --train_data)"),
    (["serve", "--model", "a", "--load_checkpoint", "b"], "qwenvl serve: error: --load_checkpoint is given twice (first as --model)"),
    # the positional one won silently
    (["convert", "a", "b", "--model", "c"], "qwenvl convert: error: SOURCE is given twice: a and --model c; give it once"),
    (["convert", "a", "b", "--output_dir", "c"], "qwenvl convert: error: OUTPUT is given twice: b and --output_dir c; give it once"),
])
def test_a_flag_given_twice_under_its_names_is_refused_naming_both(capsys, argv, said):
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == said  # one line, before anything is read


@pytest.mark.parametrize(("argv", "said"), [
    # argparse said "the following arguments are required: --data/--data_path", hiding the typo and its hint
    (["data-convert", "--data_pth", "x", "--image_location", "c", "--output", "o"],
     "qwenvl data-convert: error: unrecognized arguments: --data_pth x (did you mean --data_path?)"),
    (["eval", "vqa", "--model", "m", "--dat", "g.jsonl"],
     "qwenvl eval vqa: error: unrecognized arguments: --dat g.jsonl (did you mean --data?)"),
    # said under `qwenvl eval`'s usage with no hint: eval's own parser has no flags but --help
    (["eval", "caption", "--model", "m", "--data", "g.jsonl", "--limt", "3"],
     "qwenvl eval caption: error: unrecognized arguments: --limt 3 (did you mean --limit?)"),
    # argparse's own message when no flag is unknown (-v is qwenvl's)
    (["data-convert", "--image_location", "c", "--output", "o", "-v"],
     "qwenvl data-convert: error: the following arguments are required: --data/--data_path"),
    # --help is never the hint: --model is not a misspelled --help
    (["info", "DIR", "--halp"], "qwenvl info: error: unrecognized arguments: --halp"),
    (["convert", "a", "b", "--halp"], "qwenvl convert: error: unrecognized arguments: --halp"),
])
def test_an_unknown_flag_is_said_first_with_its_hint(capsys, argv, said):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().splitlines()[-1] == said
    assert err.startswith(f"usage: qwenvl {' '.join(argv[:2] if argv[0] == 'eval' else argv[:1])} ")


@pytest.mark.parametrize("argv", [["info", "DIR"], ["info", "--model", "DIR"]])
def test_info_takes_the_checkpoint_as_an_argument_or_as_model(argv):
    # `qwenvl info --model DIR` said "unrecognized arguments: --model (did you mean --help?)"
    assert build_parser().parse_args(argv).checkpoint == "DIR"
    assert build_parser().parse_args(["info", "--preset", "tiny"]).checkpoint is None


@pytest.mark.parametrize(("argv", "said"), [
    # "the argument checkpoint is given twice (first as --model)": named neither what was typed nor the folders
    (["info", "A", "--model", "B"], "DIR is given twice: A and --model B; give it once"),
    (["info", "--model", "A", "A"], "DIR is given twice: --model A and A; give it once"),
    (["info", "--model", "A", "--model", "B"], "--model is given twice"),
    # as convert says its SOURCE and OUTPUT given both ways (below)
    (["convert", "--model", "a", "b", "c"], "SOURCE is given twice: --model a and b; give it once"),
    (["convert", "a", "b", "--output_dir", "c"], "OUTPUT is given twice: b and --output_dir c; give it once"),
    # the last --output_dir won, silently: it is OUTPUT's second name, as --model is SOURCE's
    (["convert", "a", "--output_dir", "b", "--output_dir", "c"], "--output_dir is given twice"),
])
def test_the_checkpoint_given_both_ways_is_said_as_typed(capsys, argv, said):
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"qwenvl {argv[0]}: error: {said}"


def test_convert_takes_model_as_load_checkpoint():
    # `convert --merge_lora --model DIR ...` said "(did you mean --help?)"
    parse = build_parser().parse_args
    argv = ["convert", "--merge_lora", "--adapter", "a", "--output_dir", "o"]
    assert parse([*argv, "--model", "m"]).source == parse([*argv, "--load_checkpoint", "m"]).source == "m"


@pytest.mark.parametrize("flag", ["--image_dir", "--image_location"])
def test_data_convert_takes_image_dir_as_image_location(tmp_path, capsys, flag):
    out = tmp_path / "out.json"
    assert main(["data-convert", "--data", str(_llava(tmp_path)), flag, str(tmp_path), "--output", str(out)]) == 0
    assert capsys.readouterr().out.startswith("1 records read, 1 written")


@pytest.mark.parametrize("flag", ["--image_dir", "--dataset_dir"])
def test_finetune_takes_image_dir_as_dataset_dir(flag):
    assert _finetune_config(["--data", "d.json", flag, "imgs"]).dataset_dir == "imgs"


def test_help_still_shows_the_required_flags_as_required(capsys):
    # an unknown flag is looked for only once argparse finds a required flag missing: --help is parsed as before
    with pytest.raises(SystemExit) as e:
        main(["data-convert", "--help"])
    assert e.value.code == 0
    assert "usage: qwenvl data-convert [-h] --data FILE --image_dir DIR --output FILE" in capsys.readouterr().out
