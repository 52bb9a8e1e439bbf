"""Every subcommand, given bad input a user can fix: one line on stderr, exit status 2, never a traceback.

The commands run in-process (``qwenvl.cli.main``) so that the walk stays fast; an exception that escaped
``main`` would fail the test as surely as a traceback would.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenvl import cli

GOLDEN = Path(__file__).parent / "fixtures" / "qwenvl-tiny"


def png_bomb(path: Path, side: int = 40_000) -> Path:
    """A PNG header that claims side x side pixels (1.6e9): PIL refuses it as a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bad(module_tmp_path: Path) -> dict[str, Path]:
    """Bad inputs of every kind, made once."""
    d = module_tmp_path
    int_ckpt = d / "int32-ckpt"
    shutil.copytree(GOLDEN, int_ckpt)
    state = load_file(int_ckpt / "model.safetensors")
    state["lm_head.weight"] = state["lm_head.weight"].to(torch.int32)
    save_file(state, int_ckpt / "model.safetensors", metadata={"format": "pt"})
    for name, config in [("list-config", b"[]"), ("visual-5", b'{"visual": 5}'),
                         ("latin1-config", b'{"visual": {}, "model_type": "qw\xe9n"}')]:  # mismatched checkpoints
        (d / name).mkdir()
        (d / name / "config.json").write_bytes(config)
    official = json.loads((GOLDEN / "config.json").read_text())
    for name, change in [("half-layer", {"num_hidden_layers": 2.5}), ("text-width", {"visual": {**official["visual"],
                                                                                            "width": "abc"}})]:
        (d / name).mkdir()
        (d / name / "config.json").write_text(json.dumps({**official, **change}))
    shutil.copytree(GOLDEN / "images", d / "images")
    png_bomb(d / "images" / "bomb.png")
    (d / "vqa.jsonl").write_text(json.dumps({"image": "images/bomb.png", "question": "q?", "answer": "a"}) + "\n")
    (d / "grounding.jsonl").write_text(json.dumps({"image": "images/bomb.png", "sent": "x", "bbox": [0, 0, 1, 1]}))
    (d / "caption.jsonl").write_text(json.dumps({"image": "/etc/passwd", "captions": ["x"]}) + "\n")
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (d / "adapter" / "adapter_model.safetensors").write_bytes(b"garbage")
    (d / "train.json").write_text(json.dumps([{"id": "a", "conversations": [
        {"from": "user", "value": "<img>/etc/hostname</img>hi"}, {"from": "assistant", "value": "ok"}]}]))
    return {"dir": d, "int_ckpt": int_ckpt}


def cases(b: dict[str, Path]) -> dict[str, list[list[str]]]:
    d, g = b["dir"], str(GOLDEN)
    model = ["--model", g, "--dtype", "fp32"]
    return {
        "info": [["info", str(d / "missing")], ["info", str(d / "list-config")], ["info", str(d / "visual-5")],
                 ["info", str(d / "latin1-config")], ["info", str(d / "half-layer")], ["info", str(d / "text-width")]],
        "predict": [
            ["predict", *model, "--device", "bogus", "--predict_data", "images/cat.png", "hi"],
            ["predict", *model, "--device", "meta", "--predict_data", "images/cat.png", "hi"],  # was a traceback
            ["predict", *model, "--device", "mps", "--predict_data", "images/cat.png", "hi"],  # "not linked with"
            ["predict", *model, "--image_dir", str(d), "--predict_data", "images/bomb.png", "hi"],
            ["predict", *model, "--image_dir", g, "--allow_any_local_path", "false",
             "--predict_data", "/etc/hostname", "hi"],
        ],
        "chat": [["chat", *model, "--device", "bogus"]],
        "convert": [
            ["convert", str(b["int_ckpt"]), str(d / "out-int")],
            ["convert", g, str(d / "out-merged"), "--merge_lora", "--adapter", "org/name"],
            ["convert", g, str(d / "out-merged"), "--merge_lora", "--adapter", str(d / "adapter")],
            ["convert", g, str(d / "out-size"), "--max_shard_size", "abc"],
        ],
        "data-convert": [["data-convert", "--data_path", str(d / "missing.json"), "--image_location", str(d),
                          "--output_path", str(d / "conv.json")]],
        "finetune": [
            ["finetune", "--preset", "tiny", "--data_path", str(d / "train.json"), "--output_dir", str(d / "ft1")],
            ["finetune", "--preset", "tiny", "--data_path", str(d / "train.json"), "--output_dir", str(d / "ft2"),
             "--device", "bogus"],
        ],
        "eval": [
            ["eval", "grounding", *model, "--data", str(d / "grounding.jsonl"), "--image_dir", str(d)],
            ["eval", "vqa", *model, "--data", str(d / "vqa.jsonl"), "--image_dir", str(d), "--device", "bogus"],
            ["eval", "vqa", *model, "--data", str(d / "vqa.jsonl"), "--image_dir", str(d), "--no_progress",
             "--output", str(d / "vqa-result.json")],  # the bomb: an error row, then exit 2
            ["eval", "caption", *model, "--data", str(d / "caption.jsonl"), "--image_dir", str(d)],
        ],
        "demo": [["demo", "--output_dir", str(d / "demo"), "--steps", "1", "--device", "bogus"]],
        "serve": [
            ["serve", *model, "--device", "bogus", "--port", "0"],
            ["serve", *model, "--allowed_local_media_path", str(d / "missing-dir"), "--port", "0"],
            ["serve", "--model", str(d / "missing"), "--port", "0"],
        ],
    }


def test_every_subcommand_is_walked() -> None:
    assert set(cases({"dir": Path(), "int_ckpt": Path()})) == set(cli.SUBCOMMANDS)


@pytest.mark.parametrize("command", sorted(cli.SUBCOMMANDS))
def test_bad_input_is_one_line_and_exit_2(command: str, bad: dict[str, Path], capsys, monkeypatch) -> None:
    monkeypatch.chdir(bad["dir"])
    for argv in cases(bad)[command]:
        status = cli.main(argv)
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert status == 2, (argv, err)
        assert len(lines) == 1 and lines[0].startswith(f"qwenvl {command}: error: "), (argv, err)
        assert "Traceback" not in err
    if command == "eval":  # the answers already computed are kept, the bad sample marked
        (row,) = json.loads((bad["dir"] / "vqa-result.json").read_text())["predictions"]
        assert "decompression bomb" in row["error"] or "too large" in row["error"]


def test_a_cuda_device_this_machine_lacks_is_one_line(bad: dict[str, Path], capsys, monkeypatch) -> None:
    # cuda:1 on a machine with one GPU got past the device check and failed inside loading the weights
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    status = cli.main(["predict", "--model", str(GOLDEN), "--dtype", "fp32", "--device", "cuda:1",
                       "--predict_data", "hi", "--modal_type", "text"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err == "qwenvl predict: error: device 'cuda:1': there is no CUDA device 1 (this machine has 1)"


def test_an_image_dir_that_is_not_there_is_said_before_the_model_loads(tmp_path: Path, capsys) -> None:
    # every image was "not found" under it, one by one (chat: at each :image) after minutes of loading
    data = tmp_path / "g.jsonl"
    data.write_text(json.dumps({"image": "a.png", "sent": "x", "bbox": [0, 0, 1, 1]}) + "\n")
    gone = tmp_path / "nope"
    for argv in (["predict", "--model", str(GOLDEN), "--predict_data", "hi", "--modal_type", "text"],
                 ["chat", "--model", str(GOLDEN)],
                 ["eval", "grounding", "--model", str(GOLDEN), "--data", str(data)]):
        assert cli.main([*argv, "--image_dir", str(gone)]) == 2
        assert capsys.readouterr().err.strip() == f"qwenvl {argv[0]}: error: --image_dir folder not found: {gone}"


def test_an_adapter_without_merge_lora_is_refused(bad: dict[str, Path], capsys) -> None:
    # OUTPUT was SOURCE re-saved, exit 0, the adapter silently left out: it looked merged
    out = bad["dir"] / "out-unmerged"
    assert cli.main(["convert", str(GOLDEN), str(out), "--adapter", str(bad["dir"] / "adapter")]) == 2
    assert capsys.readouterr().err.strip() == ("qwenvl convert: error: --adapter is merged only with --merge_lora: add "
                                               "it (or leave --adapter out to re-save SOURCE)")
    assert not out.exists()


def test_info_on_a_mindspore_ckpt_says_how_to_convert_it(tmp_path: Path, capsys) -> None:
    # "checkpoint folder X.ckpt is not a folder", and nothing on what to do with the file
    ckpt = tmp_path / "qwenvl.ckpt"
    ckpt.write_bytes(b"not read")
    assert cli.main(["info", str(ckpt)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"qwenvl info: error: checkpoint folder {ckpt} is not a folder; a MindSpore .ckpt is converted first: "
        f"qwenvl convert {ckpt} OUT --config ...")
    assert ckpt.read_bytes() == b"not read"


def test_a_path_holding_control_characters_is_said_escaped_in_one_line(tmp_path: Path, capsys) -> None:
    # the newline (or NUL, ESC) was printed as it is: the one-line error became two lines, or coloured the terminal
    from PIL import Image

    odd = tmp_path / "odd\n\x1b[31m"
    odd.mkdir()
    (odd / "c.yaml").write_text("bogus: 1\n")
    (odd / "empty.jsonl").write_text("")
    (odd / "file").write_text("x")
    (odd / "cut.jsonl").write_text('{"text": "hi"\n')
    (tmp_path / "p.jsonl").write_text('{"text": "hi"}\n')
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "vqa.jsonl").write_text(json.dumps({"image": "a.png", "question": "q?", "answer": "a"}) + "\n")
    said = repr(str(odd))[1:-1]  # inside the quotes of the path shown
    assert "\n" not in said and "\\n\\x1b[31m" in said
    for argv, message in (
        (["convert", str(odd / "nope"), "out"], f"checkpoint not found: '{said}/nope'"),
        (["info", "--model", str(odd), "b"], f"DIR is given twice: --model '{said}' and b; give it once"),
        (["info", str(odd / "nope")], f"checkpoint folder not found: '{said}/nope'"),
        (["finetune", "--preset", "tiny", "--data", str(odd / "nope.json")],
         f"training data file not found: '{said}/nope.json'"),
        (["eval", "vqa", "--model", str(GOLDEN), "--data", str(odd / "nope.jsonl")],
         f"evaluation data not found: '{said}/nope.jsonl'"),
        (["predict", "--model", str(GOLDEN), "--data", str(odd / "empty.jsonl")], f"'{said}/empty.jsonl': no prompts"),
        (["predict", "--model", str(GOLDEN), "--data", str(odd / "cut.jsonl")], f"'{said}/cut.jsonl':1: invalid JSON"),
        (["predict", "--model", str(GOLDEN), "--data", str(tmp_path / "p.jsonl"), "--output", str(odd)],
         f"the output file '{said}' is a folder"),
        (["predict", "--model", str(GOLDEN), "--config", str(odd / "c.yaml"), "--predict_data", "hi"],
         f"'{said}/c.yaml': unknown option(s) bogus; known: "),
        (["chat", "--model", str(GOLDEN), "--draw", str(odd / "file")], f"--draw '{said}/file' is not a folder"),
        (["eval", "vqa", "--model", str(GOLDEN), "--data", str(tmp_path / "vqa.jsonl"), "--image_dir", str(tmp_path),
          "--prompt_file", str(odd / "nope")], f"--prompt_file '{said}/nope': no such file"),
    ):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"qwenvl {argv[0]}: error: {message}") and err.count("\n") == 1, (argv, err)


def test_a_path_without_control_characters_is_said_as_it_is(tmp_path: Path) -> None:
    from qwenvl.fileio import shown_path

    for name in ("a b", "a\\nb", "a\xa0é", "a\u200bb", "'quoted'"):  # a backslash, a no-break and a zero-width space
        assert shown_path(tmp_path / name) == str(tmp_path / name)
    assert shown_path("a\u2028b\x85c\x7f") == "'a\\u2028b\\x85c\\x7f'"  # line separators and DEL: escaped


@pytest.mark.parametrize(("argv", "said"), [
    (["predcit"], "qwenvl: error: argument COMMAND: invalid choice: 'predcit' (choose from 'info', 'predict', 'chat', "
                  "'convert', 'data-convert', 'serve', 'finetune', 'eval', 'demo') (did you mean predict?)"),
    (["eval", "grouding", "--model", "m"], "qwenvl eval: error: argument TASK: invalid choice: 'grouding' (choose from "
                                           "'grounding', 'vqa', 'caption') (did you mean grounding?)"),
    (["eval", "--model", "m", "--data", "d"], "qwenvl eval: error: argument TASK: invalid choice: 'm' (choose from "
                                              "'grounding', 'vqa', 'caption'); TASK comes first: qwenvl eval TASK "
                                              "[flags]"),
])
def test_a_misspelled_or_misplaced_command_is_said_with_a_hint(argv: list[str], said: str, capsys) -> None:
    # argparse said only "invalid choice": of the model folder, when the task was left out after `qwenvl eval`
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == said
