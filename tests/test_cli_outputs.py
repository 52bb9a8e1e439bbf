"""What the commands may write: never over inputs, never over a folder we did not write, bounded YAML.

Every refusal is one line on stderr and exit status 2, and leaves the files exactly as they were.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qwenvl.checkpoint import load_state_dict
from qwenvl.cli import main

GOLDEN = Path(__file__).parent / "fixtures" / "qwenvl-tiny"
MARKER_FILE = ".qwenvl-output.json"  # spelled out: these tests also run (and fail) against code without it


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


@pytest.fixture()
def src(tmp_path: Path) -> Path:
    """A copy of the tiny checkpoint inside tmp_path/work."""
    return Path(shutil.copytree(GOLDEN, tmp_path / "work" / "ckpt", ignore=shutil.ignore_patterns("expected*")))


def test_convert_never_writes_over_its_source(src: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    before = _tree(tmp_path)
    _refused(["convert", str(src), str(src)], capsys, "is the SOURCE")
    _refused(["convert", str(src), str(src.parent)], capsys, "contains the SOURCE")  # the parent folder
    _refused(["convert", str(src), str(src / "converted")], capsys, "lies inside the SOURCE")
    monkeypatch.chdir(src.parent)
    _refused(["convert", "ckpt", "."], capsys, "contains the SOURCE")  # the current directory
    assert _tree(tmp_path) == before


def test_convert_to_and_from_mindspore_never_writes_into_its_inputs(src: Path, tmp_path: Path, capsys,
                                                                    mindformers_ckpt) -> None:
    ckpt = tmp_path / "work" / "tiny.ckpt"
    shutil.copy(mindformers_ckpt("tiny_fp16"), ckpt)
    before = _tree(tmp_path)
    # an import's --config folder is read (its config.json) while the output is written: --overwrite or not
    _refused(["convert", str(ckpt), str(src), "--config", str(src), "--overwrite"], capsys, "is the --config")
    # an export's .ckpt inside the folder it reads
    _refused(["convert", str(src), str(src / "tiny.ckpt")], capsys, "lies inside the SOURCE")
    assert _tree(tmp_path) == before


def test_convert_refuses_a_users_folder_and_overwrite_keeps_the_users_files(src: Path, tmp_path: Path,
                                                                          capsys) -> None:
    out = tmp_path / "mine"
    (out / "photos").mkdir(parents=True)
    (out / "photos" / "a.jpg").write_bytes(b"jpeg")
    (out / "notes.txt").write_text("notes")
    (out / "model-card.md").write_text("card")
    before = _tree(out)
    _refused(["convert", str(src), str(out)], capsys, "not empty and was not written by qwenvl")
    assert _tree(out) == before
    assert main(["convert", str(src), str(out), "--overwrite", "--dtype", "bf16"]) == 0
    after = _tree(out)
    assert all(after[k] == v for k, v in before.items())
    assert json.loads((out / MARKER_FILE).read_text())["command"] == "convert"
    assert set(load_state_dict(out)) == set(load_state_dict(src))


def test_convert_again_into_its_own_output(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--max_shard_size", "300KB"]) == 0
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    (out / "README.md").write_text("added by the user")
    assert main(["convert", str(src), str(out)]) == 0  # ours: no flag needed; one file replaces the shards
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "generation_config.json", "qwen.tiktoken", "model.safetensors", "README.md",
                     MARKER_FILE}


def test_predict_eval_and_data_convert_output_must_not_be_their_input(tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "Hello"}\n')
    _refused(["predict", "--model", str(GOLDEN), "--jsonl", str(prompts), "--output", str(prompts)], capsys,
             "is the --jsonl file")
    data = tmp_path / "vqa.jsonl"
    data.write_text('{"image": "a.png", "question": "q?", "answer": "a"}\n')
    _refused(["eval", "vqa", "--model", str(GOLDEN), "--data", str(data), "--output", str(data)], capsys,
             "is the --data file")
    llava = tmp_path / "llava.json"
    llava.write_text("[]")
    _refused(["data-convert", "--data_path", str(llava), "--image_location", str(tmp_path), "--output_path",
              str(llava)], capsys, "is the --data_path file")
    _refused(["data-convert", "--data", str(llava), "--image_dir", str(tmp_path), "--output", str(llava)], capsys,
             "is the --data file")  # the flag as typed (it said --data_path)
    assert prompts.read_text() == '{"text": "Hello"}\n' and data.read_text().startswith('{"image"')
    assert llava.read_text() == "[]"


def test_predict_eval_and_data_convert_output_is_never_an_image_or_inside_the_checkpoint(src: Path, tmp_path: Path,
                                                                                      capsys, monkeypatch) -> None:
    # the images a command reads and the checkpoint it loads are inputs too: writing the answers there would
    # destroy a picture or the checkpoint's config.json (refused before anything loads)
    media = Path(shutil.copytree(src / "images", tmp_path / "media" / "images"))
    monkeypatch.chdir(media.parent)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"image": "images/cat.png", "text": "What is it?"}\n')
    vqa = tmp_path / "vqa.jsonl"
    vqa.write_text('{"image": "images/cat.png", "question": "q?", "answer": "a"}\n')
    coco = tmp_path / "coco"
    (coco / "train2014").mkdir(parents=True)
    shutil.copy(src / "images" / "cat.png", coco / "train2014" / "COCO_train2014_1.jpg")
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([{"id": "1", "image": "1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]}]))
    before = _tree(tmp_path)
    _refused(["predict", "--model", str(src), "--jsonl", str(prompts), "--output", "images/cat.png"], capsys,
             "is the image of prompt 1")
    _refused(["predict", "--model", str(src), "--predict_data", "images/street.jpg", "hi", "--output",
              str(media / "street.jpg")], capsys, "--output writes the answers of --data/--jsonl")  # never written
    _refused(["predict", "--model", str(src), "--jsonl", str(prompts), "--output", str(src / "config.json")], capsys,
             "lies inside the checkpoint folder")
    _refused(["eval", "vqa", "--model", str(src), "--data", str(vqa), "--output", "images/cat.png"], capsys,
             "is the image of")
    _refused(["eval", "vqa", "--model", str(src), "--data", str(vqa), "--output", str(src / "config.json")], capsys,
             "lies inside the checkpoint folder")
    _refused(["data-convert", "--data_path", str(llava), "--image_location", str(coco), "--output_path",
              str(coco / "train2014" / "COCO_train2014_1.jpg")], capsys, "is the image of record 0")
    assert _tree(tmp_path) == before


def _one_file_inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Inputs of predict, eval vqa and data-convert (one prompt, one question, no LLaVA record)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "Hello"}\n')
    vqa = tmp_path / "vqa.jsonl"
    vqa.write_text('{"image": "images/cat.png", "question": "q?", "answer": "a"}\n')
    llava = tmp_path / "llava.json"
    llava.write_text("[]")
    return prompts, vqa, llava


def test_an_output_file_that_cannot_be_written_is_refused_before_the_run(tmp_path: Path, capsys) -> None:
    # a folder, or a path under a file: said at once, not as a traceback after the whole run
    prompts, vqa, llava = _one_file_inputs(tmp_path)
    (tmp_path / "out").mkdir()
    before = _tree(tmp_path)
    for output, problem in [(tmp_path / "out", "is a folder"), (prompts / "x.jsonl", "is not a folder")]:
        _refused(["predict", "--model", str(GOLDEN), "--jsonl", str(prompts), "--output", str(output)], capsys,
                 problem)
        _refused(["eval", "vqa", "--model", str(GOLDEN), "--data", str(vqa), "--image_dir", str(GOLDEN),
                  "--output", str(output)], capsys, problem)
        _refused(["data-convert", "--data_path", str(llava), "--image_location", str(tmp_path), "--output_path",
                  str(output)], capsys, problem)
    assert _tree(tmp_path) == before


def test_an_existing_output_file_is_replaced_only_with_overwrite(tmp_path: Path, capsys) -> None:
    # a file we may not have written: refused before the run unless --overwrite
    prompts, vqa, llava = _one_file_inputs(tmp_path)
    out = tmp_path / "notes.txt"
    out.write_text("my notes")
    before = _tree(tmp_path)
    runs = [["predict", "--model", str(GOLDEN), "--jsonl", str(prompts), "--max_new_tokens", "2", "--output", str(out)],
            ["eval", "vqa", "--model", str(GOLDEN), "--data", str(vqa), "--image_dir", str(GOLDEN),
             "--max_new_tokens", "2", "--no_progress", "--output", str(out)],
            ["data-convert", "--data_path", str(llava), "--image_location", str(tmp_path), "--output_path", str(out)]]
    for argv in runs:
        _refused(argv, capsys, "notes.txt exists; pass --overwrite")
    assert _tree(tmp_path) == before
    for argv in runs:
        assert main([*argv, "--overwrite"]) == 0, capsys.readouterr().err
        assert out.read_text() != "my notes"
        out.write_text("my notes")


def test_demo_refuses_a_users_folder(tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("notes")
    _refused(["demo", "--steps", "1", "--output_dir", str(tmp_path)], capsys, "not written by qwenvl")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def _billion_laughs(path: Path, key: str) -> Path:
    """``key: [&a [lol x 9], &b [*a x 9], ..., &i [*h x 9]]``: under 1 KB, 9^9 strings once expanded (the
    error message that prints the value, for one, expands it)."""
    levels = ["&a [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"&{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 9) + "]" for i in range(1, 9)]
    path.write_text(f"{key}: [{', '.join(levels)}]\n")
    assert path.stat().st_size < 1024
    return path


@pytest.mark.parametrize(("command", "key"), [(["finetune", "--max_steps", "1"], "lora_target"),
                                             (["predict", "--predict_data", "x"], "modal_type")])
def test_yaml_bombs_fail_fast_in_every_command_that_reads_yaml(tmp_path: Path, capsys, command, key) -> None:
    bomb = _billion_laughs(tmp_path / "bomb.yaml", key)
    _refused([command[0], "--config", str(bomb), *command[1:]], capsys, "YAML aliases expand to more than 100,000")
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    _refused([command[0], "--config", str(deep), *command[1:]], capsys, "nested deeper than")
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 200_000)
    _refused([command[0], "--config", str(big), *command[1:]], capsys, "too large")


def test_yaml_aliases_are_read_and_bounded(tmp_path: Path) -> None:
    """Aliases of whole sections are how MindFormers' finetune YAML names its dataset (``dataset_config:
    *train_dataset``): they were refused, so `convert --config finetune_qwenvl_9.6b_bf16.yaml` failed. What is
    bounded now is their expanded size (the bomb above), and an alias inside what it names is refused."""
    from qwenvl.fileio import read_yaml

    f = tmp_path / "c.yaml"
    f.write_text("a: &size 448\nb: {image_size: *size}\n")
    assert read_yaml(f) == {"a": 448, "b": {"image_size": 448}}
    f.write_text("train_dataset: &train_dataset\n  batch_size: 1\n  seed: 2022\n"
                 "train_dataset_task:\n  type: ModalToTextSFTDataset\n  dataset_config: *train_dataset\n"
                 "base: &base {lr: 1.0e-5}\nrun: {<<: *base, steps: 3}\n")
    assert read_yaml(f) == {"train_dataset": {"batch_size": 1, "seed": 2022},
                            "train_dataset_task": {"type": "ModalToTextSFTDataset",
                                                   "dataset_config": {"batch_size": 1, "seed": 2022}},
                            "base": {"lr": 1e-5}, "run": {"lr": 1e-5, "steps": 3}}
    f.write_text("a: &a [1, *a]\n")
    with pytest.raises(ValueError, match="a YAML alias refers to a value that contains it"):
        read_yaml(f)


@pytest.mark.parametrize("made", [False, True])
def test_convert_that_fails_leaves_the_output_folder_as_it_found_it(src: Path, tmp_path: Path, capsys,
                                                                    made: bool) -> None:
    # an existing empty folder kept our marker (and so became "ours") after a failed run; one made for the
    # run goes again
    (src / "model.safetensors").write_bytes(b"broken")
    out = tmp_path / "out"
    if made:
        out.mkdir()
    _refused(["convert", str(src), str(out)], capsys, "cannot read")
    assert out.is_dir() == made
    if made:
        assert list(out.iterdir()) == []


def test_convert_that_fails_with_overwrite_leaves_a_users_folder_the_users(src: Path, tmp_path: Path, capsys) -> None:
    # the failed run left its marker in the user's folder, which then passed for ours: the next convert wrote there
    # without --overwrite
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("notes")
    good = Path(shutil.copytree(src, tmp_path / "good"))
    (src / "model.safetensors").write_bytes(b"broken")
    _refused(["convert", str(src), str(out), "--overwrite"], capsys, "cannot read")
    assert _tree(out) == {"notes.txt": b"notes"} and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    _refused(["convert", str(good), str(out)], capsys, "not empty and was not written by qwenvl (notes.txt)")
    assert main(["convert", str(good), str(out), "--overwrite"]) == 0  # written: the marker lists what it wrote
    assert (out / "notes.txt").read_text() == "notes" and "notes.txt" not in json.loads(
        (out / MARKER_FILE).read_text())["files"]
    assert main(["convert", str(good), str(out)]) == 0  # ours now


def test_demo_that_fails_with_overwrite_leaves_a_users_folder_the_users(tmp_path: Path, capsys) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "data").write_text("a file where the demo writes a folder")
    _refused(["demo", "--output_dir", str(out), "--overwrite", "--steps", "1"], capsys, "is not a folder")
    assert sorted(p.name for p in out.iterdir()) == ["data"]
    _refused(["demo", "--output_dir", str(out), "--steps", "1"], capsys, "not empty and was not written by qwenvl")


def _appears_during_the_run(monkeypatch: pytest.MonkeyPatch, out: Path) -> None:
    """A file is created at ``out`` (the user's notes, or a second run writing the same output) while the run
    makes its answers: right after the first row is kept in ``OUT.partial``."""
    from qwenvl import outputs

    real = outputs.PartialRows.append

    def append(self: outputs.PartialRows, text: str) -> None:
        real(self, text)
        if not out.exists():
            out.write_text("my precious notes")

    monkeypatch.setattr(outputs.PartialRows, "append", append)


def _answering(command: str, tmp_path: Path, out: Path) -> list[str]:
    """The command line of ``predict`` or ``eval vqa`` answering the one-file inputs in ``tmp_path`` into ``out``."""
    prompts, vqa, _ = _one_file_inputs(tmp_path)
    inputs = {"predict": ["predict", "--model", str(GOLDEN), "--jsonl", str(prompts)],
              "eval": ["eval", "vqa", "--model", str(GOLDEN), "--data", str(vqa), "--image_dir", str(GOLDEN)]}
    return [*inputs[command], "--max_new_tokens", "2", "--no_progress", "--output", str(out)]


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_an_output_file_that_appears_during_the_run_is_never_replaced(tmp_path: Path, capsys,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     command: str) -> None:
    # OUT was checked absent at the start, then replaced at the end by the run's atomic write (os.replace), exit 0:
    # without --overwrite it stays, and the error says where the answers are (OUT.partial, kept)
    out = tmp_path / "answers.out"
    argv = _answering(command, tmp_path, out)
    _appears_during_the_run(monkeypatch, out)
    assert main(argv) == 2
    kept = tmp_path / "answers.out.partial"
    where = {"predict": f"the answer is in {kept} (JSONL, in the prompts' order)",
             "eval": f"the predictions for all 1 samples are in {kept} (JSON Lines, to resume from; accuracy over "
                     "those 1: "}[command]
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"qwenvl {command}: error: the output file {out} was created by something else during "
                              f"the run and is left as it is; {where}"), err
    assert not any(str(kept) in line for line in err[:-1]), err  # said once, in the error
    assert out.read_text() == "my precious notes"
    rows = kept.read_text().splitlines()
    key, asked = {"predict": ("prompt", "Hello"), "eval": ("question", "q?")}[command]
    assert json.loads(rows[-1])[key] == asked  # the answer is there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.out", "answers.out.partial", "llava.json",
                                                          "prompts.jsonl", "vqa.jsonl"]  # no temporary file left
    kept.unlink()
    out.unlink()
    assert main([*argv, "--overwrite"]) == 0, capsys.readouterr().err  # asked for: replaced, as before
    assert out.read_text() != "my precious notes" and not kept.exists()


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_an_output_file_made_while_the_weights_load_is_said_before_generating(tmp_path: Path, capsys,
                                                                             monkeypatch: pytest.MonkeyPatch,
                                                                             command: str) -> None:
    # checked again once the model is loaded (minutes for a real one): refused before any answer is generated
    from qwenvl import inference

    out = tmp_path / "results.json"
    argv = _answering(command, tmp_path, out)
    real = inference.load

    def load_then_appear(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        loaded = real(*args, **kwargs)
        out.write_text("my precious notes")
        return loaded

    monkeypatch.setattr(inference, "load", load_then_appear)
    _refused(argv, capsys, f"qwenvl {command}: error: the output file {out} exists; pass --overwrite to replace it")
    assert out.read_text() == "my precious notes" and not (tmp_path / "results.json.partial").exists()


def test_data_convert_never_replaces_an_output_file_that_appears_before_its_write(tmp_path: Path, capsys,
                                                                                  monkeypatch: pytest.MonkeyPatch
                                                                                  ) -> None:
    # created after the last check that OUT is absent (just before the write): left as it is
    from qwenvl.data import convert

    _, _, llava = _one_file_inputs(tmp_path)
    out = tmp_path / "train.json"
    real = convert.check_output_file

    def check_then_appear(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        real(*args, **kwargs)
        if "overwrite" in kwargs and not out.exists():  # the last check, with the user's --overwrite
            out.write_text("my precious notes")

    monkeypatch.setattr(convert, "check_output_file", check_then_appear)
    argv = ["data-convert", "--data_path", str(llava), "--image_location", str(tmp_path), "--output_path", str(out)]
    _refused(argv, capsys, f"the output file {out} was created by something else during the run and is left as it "
                           "is; nothing was written (pass --overwrite to replace it)")
    assert out.read_text() == "my precious notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llava.json", "prompts.jsonl", "train.json", "vqa.jsonl"]
    out.unlink()
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads(out.read_text()) == []

