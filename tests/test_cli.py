"""The ``qwenvl`` command as a user runs it: subprocesses on the golden checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def qwenvl(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwenvl.cli", *args], input=stdin, capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=600)


def test_help_lists_every_command():
    out = qwenvl("--help")
    assert out.returncode == 0
    for cmd in ("info", "predict", "chat", "convert", "data-convert", "finetune", "eval", "demo"):
        assert cmd in out.stdout


@pytest.mark.parametrize("command", ["info", "predict", "chat", "convert", "data-convert", "serve", "finetune", "eval",
                                     "demo"])
def test_every_command_help_says_what_the_command_does(command, capsys):
    # `qwenvl chat --help` printed its flags alone: what chat is and its :image/:clear/:quit showed only in
    # `qwenvl --help`'s list (info, predict, convert and data-convert alike)
    from qwenvl import cli

    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    usage, _, rest = capsys.readouterr().out.partition("\n\n")
    description = rest.split("\n\n")[0]
    assert usage.startswith(f"usage: qwenvl {command}")
    assert not description.startswith(("options:", "positional arguments:")), f"{command} --help: no description"
    if command == "chat":
        assert ":image PATH, :clear, :quit" in description


def test_verbose_flag_works_after_the_command_too(golden_dir, capsys):
    # `qwenvl info DIR -v` was "unrecognized arguments: -v" (-v was known only before the command)
    from qwenvl import cli

    assert cli.main(["info", str(golden_dir), "--json", "-v"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"]["total"] == 39_502_720


def test_a_reader_that_leaves_early_is_not_an_error(golden_dir):
    # `qwenvl info DIR | head -1` (or `predict --jsonl ... | head`) printed "qwenvl info: error: [Errno 32] Broken
    # pipe" and exited 2: now it stops quietly, with the status of a Unix tool that SIGPIPE ended
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        out = subprocess.run([sys.executable, "-m", "qwenvl.cli", "info", str(golden_dir)], stdout=write_end,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=600)
    finally:
        os.close(write_end)
    assert out.returncode == 128 + 13, out.stderr
    assert "Broken pipe" not in out.stderr and "error" not in out.stderr


def test_help_and_bad_input_are_answered_before_torch_loads(tmp_path):
    # torch takes seconds to import: `--help`, a missing image, data file or checkpoint folder do not wait for it
    # (and nothing is written: no output folder for the finetune that cannot start)
    script = ("import sys\nfrom qwenvl.cli import main\ntry:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n"
              "    rc = e.code\nprint('torch loaded' if 'torch' in sys.modules else 'no torch', rc)")
    gone = tmp_path / "no-model"
    cases = [
        (["--help"], None),
        (["predict", "--model", str(tmp_path), "--predict_data", "gone.png", "hi"],
         f"qwenvl predict: error: image not found: {tmp_path / 'gone.png'}"),
        (["predict", "--model", str(gone), "--predict_data", "hi", "--modal_type", "text"],
         f"qwenvl predict: error: checkpoint folder not found: {gone}"),
        (["chat", "--model", str(gone)], f"qwenvl chat: error: checkpoint folder not found: {gone}"),
        (["eval", "grounding", "--model", str(tmp_path), "--data", "gone.jsonl"],
         "qwenvl eval: error: evaluation data not found: gone.jsonl"),
        (["serve", "--model", str(gone)], f"qwenvl serve: error: checkpoint folder not found: {gone}"),
        (["finetune", "--load_checkpoint", str(gone), "--train_data", "t.json", "--output_dir", "out"],
         f"qwenvl finetune: error: checkpoint folder not found: {gone}"),
        (["finetune", "--preset", "tiny", "--train_data", "t.json", "--output_dir", "out"],
         "qwenvl finetune: error: training data file not found: t.json"),
        (["info", str(gone)], f"qwenvl info: error: checkpoint folder not found: {gone}"),
        (["convert", str(gone), "out"], f"qwenvl convert: error: checkpoint not found: {gone}"),
        (["convert", f"{gone}.ckpt", "out"], f"qwenvl convert: error: checkpoint not found: {gone}.ckpt"),
    ]
    for args, error in cases:
        out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=tmp_path,
                             timeout=600)
        assert out.stdout.strip().splitlines()[-1] == f"no torch {2 if error else 0}", (args, out.stdout, out.stderr)
        assert out.stderr.strip() == (error or ""), args
    assert not (tmp_path / "out").exists()


def test_info_prints_parts_and_dtype(golden_dir):
    out = qwenvl("info", str(golden_dir), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["dtype"].startswith("float16")
    assert info["parameters"]["total"] == 39_502_720
    assert info["parameters"]["LM head (lm_head)"] == 151936 * 128
    out = qwenvl("info", "--preset", "qwen-vl-9.6b")
    assert "9.657 B" in out.stdout
    assert out.stdout.startswith("preset: qwen-vl-9.6b\n")  # was "checkpoint: preset"


# eager decoding, the compiled decode step (one-row products as reductions in the graph)
@pytest.mark.parametrize("mode", [[], ["--compile"]])
def test_predict_seed_flags_print_prompt_and_answer(golden_dir, golden_expected, mode):
    out = qwenvl("predict", "--config", "configs/predict_qwenvl_9.6b.yaml", "--load_checkpoint", str(golden_dir),
                 "--dtype", "float32", "--device", "cpu", "--image_dir", str(golden_dir), *mode,
                 "--predict_data", "images/cat.png", "Describe the image in English:", "--modal_type", "image", "text",
                 "--max_new_tokens", "10", "--min_new_tokens", "10", "--predict_batch_size", "1")
    assert out.returncode == 0, out.stderr
    # the first compiled call is a long silent wait unless it is logged: when it starts and how long it took
    assert ("compiling the decode step (cpu) with torch.compile" in out.stderr) == bool(mode)
    assert ("compiled the decode step (cpu) in " in out.stderr) == bool(mode)
    text = out.stdout.strip()
    assert text.startswith("Picture 1: <img>images/cat.png</img>\nDescribe the image in English:")
    # the same 10 greedy tokens as the official implementation on this prompt
    from qwenvl import Processor

    expected = Processor.from_pretrained(golden_dir).decode(golden_expected["cases"][0]["greedy_10"])
    assert text.endswith(expected)


def test_predict_jsonl_batched(tmp_path, golden_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"image": "images/cat.png", "text": "What is it?"},
        {"prompt": "Hello"},
        {"image": ["images/cat.png", "images/street.jpg"], "text": "Compare."},
    ]) + "\n")
    out_file = tmp_path / "answers.jsonl"
    out = qwenvl("predict", "--model", str(golden_dir), "--dtype", "fp32", "--image_dir", str(golden_dir),
                 "--jsonl", str(prompts), "--output", str(out_file), "--max_new_tokens", "4", "--predict_batch_size", "2")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(rows) == 3
    assert rows[2]["prompt"].startswith("Picture 1: <img>images/cat.png</img>\nPicture 2: <img>images/street.jpg</img>")
    assert all(0 < r["num_tokens"] <= 4 for r in rows)
    assert "3/3" in out.stderr  # the progress bar; --no_progress (as eval's) has none
    quiet = qwenvl("predict", "--model", str(golden_dir), "--dtype", "fp32", "--image_dir", str(golden_dir),
                   "--data", str(prompts), "--output", str(tmp_path / "quiet.jsonl"), "--max_new_tokens", "4",
                   "--no_progress")
    assert quiet.returncode == 0 and "3/3" not in quiet.stderr, quiet.stderr


def test_predict_jsonl_keeps_every_answer_when_one_image_is_bad(tmp_path, golden_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"image": "images/cat.png", "text": "What is it?"},
        {"image": "images/missing.png", "text": "And this?"},
        {"image": "images/street.jpg", "text": "Where?"},
    ]) + "\n")
    out_file = tmp_path / "answers.jsonl"
    out = qwenvl("predict", "--model", str(golden_dir), "--dtype", "fp32", "--image_dir", str(golden_dir),
                 "--jsonl", str(prompts), "--output", str(out_file), "--max_new_tokens", "3", "--predict_batch_size", "3")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("qwenvl predict: error: 1 of 3 prompt(s) failed")
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert ["error" in r for r in rows] == [False, True, False]
    assert "image not found" in rows[1]["error"] and rows[0]["num_tokens"] > 0 and rows[2]["num_tokens"] > 0


def test_predict_jsonl_keeps_every_answer_when_one_prompt_is_too_long(tmp_path, golden_dir):
    # a prompt longer than the context is an error row, as a bad image is: the rows before and after it (the one
    # batched with it included) are answered and written
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"text": "Hello"}, {"text": "word " * 9000}, {"text": "Bye"},
    ]) + "\n")
    out_file = tmp_path / "answers.jsonl"
    out = qwenvl("predict", "--model", str(golden_dir), "--dtype", "fp32", "--jsonl", str(prompts), "--output",
                 str(out_file), "--max_new_tokens", "3", "--predict_batch_size", "2")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("qwenvl predict: error: 1 of 3 prompt(s) failed")
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert ["error" in r for r in rows] == [False, True, False]
    assert "does not fit the context" in rows[1]["error"] and rows[0]["num_tokens"] > 0 and rows[2]["num_tokens"] > 0


def test_predict_interrupted_keeps_the_answers_so_far(tmp_path, golden_dir, monkeypatch, capsys):
    # Ctrl-C in the middle of a long --jsonl run: the batches answered so far are written next to --output under
    # a name that says they are partial (an existing file of that name is kept), and the exit status is 130
    import qwenvl.inference
    from qwenvl.cli import main

    answered = qwenvl.inference._generate_batch
    calls = []

    def stop_at_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return answered(*args, **kwargs)

    monkeypatch.setattr(qwenvl.inference, "_generate_batch", stop_at_the_third_batch)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"text": f"Hello {k}"}) + "\n" for k in range(6)))
    out_file = tmp_path / "answers.jsonl"
    (tmp_path / "answers.jsonl.partial").write_text("an earlier run's rows")
    argv = ["predict", "--model", str(golden_dir), "--dtype", "fp32", "--jsonl", str(prompts), "--output",
            str(out_file), "--max_new_tokens", "2", "--predict_batch_size", "2"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "the answers to the first 4 of 6 prompts are in" in err and "answers.jsonl.partial-2" in err
    assert not out_file.exists() and (tmp_path / "answers.jsonl.partial").read_text() == "an earlier run's rows"
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl.partial-2").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [f"Hello {k}" for k in range(4)] and all(r["num_tokens"] > 0 for r in rows)


def test_predict_can_restrict_images_to_the_image_dir(tmp_path, golden_dir):
    outside = tmp_path / "cat.png"
    outside.write_bytes((golden_dir / "images" / "cat.png").read_bytes())
    args = ["predict", "--model", str(golden_dir), "--dtype", "fp32", "--image_dir", str(golden_dir / "images"),
            "--max_new_tokens", "2", "--predict_data", str(outside), "What is it?"]
    assert qwenvl(*args).returncode == 0  # the user's own prompt: any file they can read (the default)
    out = qwenvl(*args, "--allow_any_local_path", "false")
    assert out.returncode == 2 and "not allowed: only files inside the media folder" in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--predict_data", "missing.png", "hi"], "image not found"),
        (["--predict_data", "images/cat.png"], "not a multiple"),
        (["--predict_data", "images/cat.png", "hi", "--max_new_tokens", "0"], "max_new_tokens must be > 0"),
        (["--predict_data", "images/cat.png", "hi", "--run_mode", "train"], "run_mode"),
        (["--predict_data", "images/cat.png", "hi", "--predict_batch_size", "0"], "batch_size"),
        (["--predict_data", "images/cat.png", "hi", "--quantize", "int4"], "invalid choice: 'int4'"),
    ],
)
def test_predict_bad_input_is_a_clear_error(golden_dir, args, message):
    out = qwenvl("predict", "--model", str(golden_dir), "--image_dir", str(golden_dir), "--dtype", "fp32", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"image": 5, "text": "x"}, "'image' must be a path or a list of paths, got 5"),
        ({"image": {"cat.png": 1}, "text": "x"}, "'image' must be a path or a list of paths, got {'cat.png': 1}"),
        ({"image": ["images/cat.png", 3], "text": "x"},
         "'image' must be a path or a list of paths, got ['images/cat.png', 3]"),
        ({"query": 5}, "'query' must be a string or a list-format list, got 5"),
        ({"messages": "hello"}, "'messages' must be a list of {'role', 'content'} messages"),
        # were written into the prompt as the words None and ['a']
        ({"image": "images/cat.png", "text": None}, "'text' must be a string, got None"),
        ({"text": ["a"]}, "'text' must be a string, got ['a']"),
        ({"image": "", "text": "x"}, "'image' is an empty path"),  # was a prompt without the picture
        # the picture was ignored: a 'prompt', 'messages' or 'query' row is the whole prompt
        ({"prompt": "x", "image": "images/cat.png"},
         "a row with 'prompt' is the whole prompt: 'image' would be ignored (a row has one of 'messages', "
         "'prompt', 'query' or 'image'/'text')"),
        ({"messages": [{"role": "user", "content": "Hi"}], "prompt": "x", "text": "y"},
         "a row with 'messages' is the whole prompt: 'prompt', 'text' would be ignored (a row has one of "
         "'messages', 'prompt', 'query' or 'image'/'text')"),
        # an unknown key was ignored: the pictures of {"images": [...]} were left out of the prompt
        ({"images": ["images/cat.png"], "text": "Describe"},
         "unknown key 'images' (did you mean 'image'?): a row has 'messages', 'prompt', 'query' or 'image'/'text'"),
    ],
)
def test_predict_jsonl_field_of_the_wrong_type_is_a_clear_error(tmp_path, row, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(row) + "\n")
    out = qwenvl("predict", "--model", str(tmp_path / "no-model"), "--jsonl", str(prompts))
    assert out.returncode == 2 and out.stderr.strip() == f"qwenvl predict: error: {prompts}:2: {message}"


def test_predict_jsonl_keys_no_prompt_reads_are_noted_once(tmp_path):
    # an "id" of the user's is no typo of a prompt key: the rows are answered, and the keys carried into the output
    # rows (tests/test_predict_rows.py) are said once
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in [{"text": "a", "id": 7}, {"text": "b", "id": 8, "src": "x"}]))
    out = qwenvl("predict", "--model", str(tmp_path / "no-model"), "--jsonl", str(prompts))
    note, error = out.stderr.strip().splitlines()
    assert note == f"note: {prompts}: no prompt reads the key(s) 'id', 'src'; they are copied into the output rows"
    assert out.returncode == 2 and error.startswith("qwenvl predict: error: checkpoint folder not found")


def test_predict_jsonl_that_is_not_utf8_is_named(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')  # Latin-1
    out = qwenvl("predict", "--model", str(tmp_path / "no-model"), "--jsonl", str(prompts))
    assert out.returncode == 2 and out.stderr.strip().startswith(f"qwenvl predict: error: {prompts}:2: not UTF-8 text")


def test_predict_checks_images_before_loading_the_model(tmp_path, golden_dir):
    (tmp_path / "notes.jpg").write_text("not an image")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"image": "images/cat.png", "text": "ok"},
        {"messages": [{"role": "user", "content": [{"image": str(tmp_path / "notes.jpg")}, {"text": "?"}]}]},
        {"prompt": "Picture 1: <img>gone.png</img>\nWhat?"},
    ]) + "\n")
    # the checkpoint folder does not exist: what is said about the images before that error was checked first.
    # --jsonl: a bad row costs only itself, so the bad images are a note and the run goes on (to the model)
    out = qwenvl("predict", "--model", str(tmp_path / "no-model"), "--image_dir", str(golden_dir),
                 "--jsonl", str(prompts))
    assert out.returncode == 2
    note, error = out.stderr.strip().splitlines()
    assert note.startswith(f"note: prompt 2 of 3: cannot decode image {tmp_path / 'notes.jpg'}: not a PNG/JPEG/GIF/BMP/WEBP/... file ")
    assert note.endswith("(2 prompts have a bad image); answering the others (the bad ones become rows with an "
                         "'error' field)")
    assert error.startswith("qwenvl predict: error: checkpoint folder not found")
    # ... and when no prompt is left, or with --predict_data, it is the error
    prompts.write_text(json.dumps({"prompt": "Picture 1: <img>gone.png</img>\nWhat?"}) + "\n")
    out = qwenvl("predict", "--model", str(tmp_path / "no-model"), "--image_dir", str(golden_dir),
                 "--jsonl", str(prompts))
    assert out.returncode == 2 and out.stderr.strip() == ("qwenvl predict: error: image not found: "
                                                          f"{golden_dir / 'gone.png'}")
    out = qwenvl("predict", "--model", str(tmp_path / "no-model"), "--predict_data", "missing.png", "hi")
    assert out.returncode == 2 and out.stderr.strip() == f"qwenvl predict: error: image not found: {ROOT / 'missing.png'}"
    # the media policy applies already: with --allow_any_local_path false nothing outside --image_dir is read
    out = qwenvl("predict", "--model", str(tmp_path / "no-model"), "--image_dir", str(golden_dir),
                 "--allow_any_local_path", "false", "--predict_data", str(tmp_path / "notes.jpg"), "hi")
    assert out.returncode == 2 and "is not allowed: only files inside the media folder are read" in out.stderr


def test_predict_chat_format_chatml_keeps_system_and_history_on_a_base_checkpoint(tmp_path, golden_dir):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": messages}) + "\n")
    args = ("predict", "--model", str(golden_dir), "--dtype", "fp32", "--jsonl", str(prompts), "--max_new_tokens", "1")
    out = qwenvl(*args)  # the golden checkpoint is a base one: chat_format raw
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["prompt"] == "Bye"
    assert ("dropped the system text 'Be brief.' and 1 history turn(s); chat_format chatml (--chat_format chatml) "
            "keeps them") in out.stderr
    out = qwenvl(*args, "--chat_format", "chatml")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["prompt"] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>"
                                                "\n<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye"
                                                "<|im_end|>\n<|im_start|>assistant\n")
    assert "dropped" not in out.stderr


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ('do_sample: "false"', "do_sample must be true or false, got 'false'"),  # a non-empty string: it sampled
        ("modal_type: text", "modal_type must be a list, got 'text'"),  # was four kinds: t, e, x, t
        ("modal_type: [image, txt]", "modal_type must be a list of image and text, got ['image', 'txt']"),
        ("predict_batch_size: 2.5", "predict_batch_size must be an integer, got 2.5"),
        ("max_new_tokens: true", "max_new_tokens must be an integer, got True"),
        ("top_p: high", "top_p must be a number, got 'high'"),
    ],
)
def test_predict_config_value_of_the_wrong_type_is_named_before_the_model_loads(tmp_path, capsys, yaml, message):
    from qwenvl.cli import main

    config = tmp_path / "predict.yaml"
    config.write_text(yaml + "\n")
    argv = ["predict", "--config", str(config), "--model", str(tmp_path / "no-model"), "--predict_data", "hi",
            "--modal_type", "text"]
    assert main(argv[:-2] if "modal_type" in yaml else argv) == 2
    assert capsys.readouterr().err.strip() == f"qwenvl predict: error: {config}: {message}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--predict_batch_size", "0"], "--predict_batch_size must be >= 1, got 0"),  # said after loading the model
        (["--output", "answers.jsonl"], "--output writes the answers of --data/--jsonl; --predict_data prints them "
                                        "(redirect stdout)"),  # was ignored: printed, and no file written
    ],
)
def test_predict_flags_that_cannot_work_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, args,
                                                                           message):
    from qwenvl.cli import main

    monkeypatch.chdir(tmp_path)
    argv = ["predict", "--model", str(tmp_path / "no-model"), "--predict_data", "hi", "--modal_type", "text", *args]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"qwenvl predict: error: {message}"
    assert not (tmp_path / "answers.jsonl").exists()


def test_predict_output_only_with_jsonl_is_refused_before_the_model_loads(tmp_path, capsys):
    # the rows of --jsonl hold the prompt and its answer: --output_only was accepted and did nothing
    from qwenvl.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "hi"}) + "\n")
    assert main(["predict", "--model", str(tmp_path / "no-model"), "--jsonl", str(prompts), "--output_only"]) == 2
    assert capsys.readouterr().err.strip() == ("qwenvl predict: error: --output_only prints the answers of "
                                               "--predict_data alone; the rows of --jsonl hold each answer in "
                                               "their 'response' field")


def test_chat_has_no_chat_format_flag(capsys, monkeypatch, golden_dir):
    # chat is ChatML whatever the checkpoint: --chat_format raw was accepted and did nothing
    import io

    from qwenvl.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(":quit\n"))
    with pytest.raises(SystemExit) as e:
        main(["chat", "--model", str(golden_dir), "--chat_format", "raw"])
    assert e.value.code == 2 and "unrecognized arguments: --chat_format raw" in capsys.readouterr().err


def test_predict_rejects_unknown_flag_values(golden_dir):
    out = qwenvl("predict", "--model", str(golden_dir), "--dtype", "fp8", "--predict_data", "a", "b")
    assert out.returncode == 2 and "invalid choice" in out.stderr
    out = qwenvl("predict", "--model", str(golden_dir), "--do_sample", "maybe", "--predict_data", "a", "b")
    assert out.returncode == 2 and "boolean" in out.stderr


def test_chat_scripted_session_with_image_and_boxes(tmp_path, golden_dir):
    script = "\n".join([
        ":image images/missing.png",
        ":image images/street.jpg",
        "Box the car",
        "And now?",
        ":clear",
        "Hello",
        ":quit",
    ]) + "\n"
    out = qwenvl("chat", "--model", str(golden_dir), "--dtype", "fp32", "--image_dir", str(golden_dir),
                 "--max_new_tokens", "5", "--do_sample", "false", "--draw", str(tmp_path / "drawn"), stdin=script)
    assert out.returncode == 0, out.stderr
    assert "image not found" in out.stderr  # a bad :image is reported and the session goes on
    assert "picture added: images/street.jpg" in out.stderr
    assert out.stdout.count("assistant> ") == 3
    assert "conversation cleared" in out.stderr
    # every answer about a picture says what --draw did with it (5 random tokens hold no box)
    assert out.stderr.count("(nothing drawn: the answer has no <box>)") + out.stderr.count("(boxes drawn:") == 2


def test_chat_draw_that_is_a_file_is_refused_before_the_session(tmp_path):
    # else the first answer with a box would end the session with a traceback (the drawing cannot be written)
    (tmp_path / "notes.txt").write_text("notes")
    out = qwenvl("chat", "--model", str(tmp_path), "--draw", str(tmp_path / "notes.txt"), stdin=":quit\n")
    assert out.returncode == 2
    assert out.stderr.strip() == f"qwenvl chat: error: --draw {tmp_path / 'notes.txt'} is not a folder"
    assert (tmp_path / "notes.txt").read_text() == "notes"


def test_chat_draws_boxes_of_an_answer(tmp_path, golden_dir):
    from PIL import Image, ImageChops

    from qwenvl.inference_cli import _draw_answer, _no_box_note

    answer = "<ref>the car</ref><box>(100,200),(600,900)</box>"
    out = _draw_answer(answer, "images/street.jpg", str(golden_dir), tmp_path, 3)
    assert out == tmp_path / "turn-003.png"
    drawn = Image.open(out).convert("RGB")
    original = Image.open(golden_dir / "images/street.jpg").convert("RGB")
    assert drawn.size == original.size
    assert ImageChops.difference(drawn, original).getbbox() is not None  # something was drawn
    assert _draw_answer("no boxes here", "images/street.jpg", str(golden_dir), tmp_path, 4) is None
    assert _no_box_note("no boxes here") == "(nothing drawn: the answer has no <box>)"
    assert _draw_answer("<box>(100,200),(600</box>", "images/street.jpg", str(golden_dir), tmp_path, 5) is None
    assert _no_box_note("<box>(100,200),(600</box>") == ("(nothing drawn: the answer's <box> is malformed; a box is "
                                                         "<box>(x1,y1),(x2,y2)</box>)")
    # a file already there (the user's, or an earlier chat's turn 3) is never replaced: the next free name
    (tmp_path / "turn-003.png").write_bytes(b"mine")
    (tmp_path / "turn-003-2.png").mkdir()
    assert _draw_answer(answer, "images/street.jpg", str(golden_dir), tmp_path, 3) == tmp_path / "turn-003-3.png"
    assert (tmp_path / "turn-003.png").read_bytes() == b"mine"
    assert Image.open(tmp_path / "turn-003-3.png").size == original.size


def _chat_in_process(monkeypatch, capsys, golden_dir, script: str | bytes, ask, *flags: str, errors: str = "strict"):
    """``qwenvl chat`` on the golden checkpoint, in this process, with ``ChatSession.ask`` replaced by ``ask``
    (a random model writes neither boxes nor long enough answers to interrupt on cue); a ``script`` of bytes is
    read as a pipe under a UTF-8 locale reads it (``errors``: strictly; under C.UTF-8, "surrogateescape")."""
    import io

    from qwenvl.cli import main
    from qwenvl.inference import ChatSession

    monkeypatch.setattr(ChatSession, "ask", ask)
    stdin = io.StringIO(script) if isinstance(script, str) else io.TextIOWrapper(io.BytesIO(script), "utf-8", errors)
    monkeypatch.setattr(sys, "stdin", stdin)
    rc = main(["chat", "--model", str(golden_dir), "--dtype", "fp32", "--image_dir", str(golden_dir), *flags])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_chat_ctrl_c_stops_the_answer_and_keeps_the_session(monkeypatch, capsys, golden_dir):
    asked = []

    def ask(self, text, on_text=None):
        asked.append(text)
        on_text("Once upon a ")
        if text == "Tell me a story":
            raise KeyboardInterrupt  # Ctrl-C while the answer streams
        on_text("time")
        return "Once upon a time"

    rc, out, err = _chat_in_process(monkeypatch, capsys, golden_dir, "Tell me a story\nShorter, please\n:quit\n", ask)
    assert rc == 0, err
    assert asked == ["Tell me a story", "Shorter, please"]
    assert "(answer stopped" in err and "interrupted" not in err
    assert out.count("assistant> ") == 2 and out.endswith("Once upon a time\n")


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_chat_line_that_is_not_utf8_costs_only_itself(monkeypatch, capsys, golden_dir, errors):
    # a line typed in Latin-1 ended the chat ("error: 'utf-8' codec can't decode ..."), its conversation lost; under
    # C.UTF-8 (Docker, CI: stdin's errors "surrogateescape") it went to the model with a lone surrogate
    asked = []

    def ask(self, text, on_text=None):
        asked.append(text)
        return "ok"

    script = "Hello\r\ncaf\u00e9 au lait\n".encode() + b"caf\xe9\nStill there?\n"
    rc, out, err = _chat_in_process(monkeypatch, capsys, golden_dir, script, ask, errors=errors)
    assert rc == 0, err
    assert asked == ["Hello", "caf\u00e9 au lait", "Still there?"]
    assert "error: the line is not utf-8 text (invalid continuation byte at byte 4); it was not sent" in err


def test_chat_draw_folder_that_cannot_be_written_keeps_the_session(monkeypatch, capsys, golden_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("notes")  # --draw notes.txt/boxes: its parent is a file
    draw = tmp_path / "notes.txt" / "boxes"

    def ask(self, text, on_text=None):
        on_text("<ref>the cat</ref><box>(100,200),(500,800)</box>")
        return "<ref>the cat</ref><box>(100,200),(500,800)</box>"

    rc, out, err = _chat_in_process(monkeypatch, capsys, golden_dir, ":image images/cat.png\nWhere?\nAgain?\n", ask,
                                    "--draw", str(draw))
    assert rc == 0, err
    assert out.count("assistant> ") == 2
    assert err.count(f"(nothing drawn: cannot write into --draw {draw}: Not a directory)") == 2, err
    assert (tmp_path / "notes.txt").read_text() == "notes"


def test_chat_draws_on_the_picture_it_was_shown_after_the_file_is_gone(monkeypatch, capsys, golden_dir, tmp_path):
    shutil.copy(golden_dir / "images" / "cat.png", tmp_path / "cat.png")

    def ask(self, text, on_text=None):
        (tmp_path / "cat.png").unlink()  # deleted while the model answers
        return "<ref>the cat</ref><box>(100,200),(500,800)</box>"

    rc, _out, err = _chat_in_process(monkeypatch, capsys, golden_dir, f":image {tmp_path / 'cat.png'}\nWhere?\n",
                                     ask, "--draw", str(tmp_path / "drawn"))
    assert rc == 0, err
    assert f"(boxes drawn: {tmp_path / 'drawn' / 'turn-001.png'})" in err, err


def test_chat_never_draws_on_a_picture_the_conversation_has_left(monkeypatch, capsys, golden_dir, tmp_path):
    # a long message pushes the picture's turn out of the window; the picture goes with it, and --draw read the
    # file again for the next answer with a box: a file deleted meanwhile ended the whole chat ("image not found")
    import qwenvl.inference
    from qwenvl.inference import ChatSession

    shutil.copy(golden_dir / "images" / "cat.png", tmp_path / "cat.png")
    load, ask = qwenvl.inference.load, ChatSession.ask

    def small_window(*args, **kwargs):
        model, processor = load(*args, **kwargs)
        processor.max_window_size = 400  # the picture's turn and a 360-word one do not fit together
        return model, processor

    def ask_for_a_box(self, text, on_text=None):
        ask(self, text)
        (tmp_path / "cat.png").unlink(missing_ok=True)
        return "<ref>the cat</ref><box>(100,200),(500,800)</box>"

    monkeypatch.setattr(qwenvl.inference, "load", small_window)
    script = f":image {tmp_path / 'cat.png'}\nWhere?\n{'word ' * 360}\nAnd now?\n"
    rc, out, err = _chat_in_process(monkeypatch, capsys, golden_dir, script, ask_for_a_box, "--max_new_tokens", "1",
                                    "--draw", str(tmp_path / "drawn"))
    assert rc == 0, err
    assert out.count("assistant> ") == 3
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == ["turn-001.png", "turn-002.png"]  # not 3


@pytest.mark.parametrize(("env", "torch_first", "want"), [
    (None, False, "True 1"),  # the CLI asks for huge pages before torch loads
    ("0", False, "False 0"),  # the operator's setting wins
    (None, True, "False None"),  # too late once torch is imported: left alone
])
def test_the_cli_asks_for_huge_pages_before_torch_loads(env, torch_first, want):
    code = ("import os, sys\n" + ("import torch\n" if torch_first else "") +
            "from qwenvl.cli import use_huge_pages\n"
            "print(use_huge_pages(), os.environ.get('THP_MEM_ALLOC_ENABLE'))")
    environ = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env is not None:
        environ["THP_MEM_ALLOC_ENABLE"] = env
    environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, check=True)
    assert out.stdout.strip() == want


@pytest.mark.parametrize(("argv", "want"), [(["demo", "--help"], "1"), (["-v", "finetune", "--help"], "1"),
                                            (["predict", "--help"], "None"), (["serve", "--help"], "None")])
def test_only_the_training_commands_ask_for_huge_pages(argv, want):
    code = ("import os, sys\nfrom qwenvl.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('THP_MEM_ALLOC_ENABLE'), file=sys.stderr)")
    environ = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=environ, check=True)
    assert out.stderr.strip().splitlines()[-1] == want


def test_chat_image_path_in_quotes(monkeypatch, capsys, golden_dir):
    # a file name with a space, written as in a shell
    rc, _out, err = _chat_in_process(monkeypatch, capsys, golden_dir, ':image "images/cat.png"\n:quit\n',
                                     lambda self, text, on_text=None: "")
    assert rc == 0 and "(picture added: images/cat.png)" in err, err


@pytest.mark.parametrize("ctrl_c_first", [False, True])
def test_chat_at_a_terminal_reads_with_line_editing(monkeypatch, capsys, golden_dir, ctrl_c_first):
    # at a terminal the chat reads with input() (readline's editing and history); Ctrl-D ends it on a new line;
    # Ctrl-C at the prompt drops the line typed so far and asks again, as Python's own prompt does
    import builtins
    import io

    from qwenvl.cli import main

    lines = iter([KeyboardInterrupt(), "Hi"] if ctrl_c_first else ["Hi"])
    prompts = []

    def terminal_input(prompt=""):
        prompts.append(prompt)
        try:
            line = next(lines)
        except StopIteration:
            raise EOFError from None
        if isinstance(line, BaseException):
            raise line
        return line

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(builtins, "input", terminal_input)
    monkeypatch.setattr(sys, "stdin", Terminal(""))
    monkeypatch.setattr(sys, "stdout", Terminal())
    from qwenvl.inference import ChatSession

    monkeypatch.setattr(ChatSession, "ask", lambda self, text, on_text=None: on_text("Hello") or "Hello")
    assert main(["chat", "--model", str(golden_dir), "--dtype", "fp32"]) == 0
    assert prompts == ["user> "] * (3 if ctrl_c_first else 2)
    assert sys.stdout.getvalue() == "assistant> Hello\n"
    err = capsys.readouterr().err
    assert err.endswith("\n")
    assert ("(Ctrl-C: :quit or Ctrl-D leaves the chat)" in err) == ctrl_c_first, err


def test_an_output_that_turned_into_a_pipe_or_device_is_one_line(monkeypatch, capsys):
    """The atomic write refuses to replace a pipe or a device with FileExistsError, which the command line did not
    catch (a traceback) when the output became one after the commands' own up-front check."""
    from qwenvl import cli, inference_cli

    def run(args, extra):
        raise FileExistsError("cannot write out.json: it is not a regular file (a pipe, socket or device)")

    monkeypatch.setattr(inference_cli, "run", run)
    assert cli.main(["info", "x"]) == 2
    assert capsys.readouterr().err == ("qwenvl info: error: cannot write out.json: it is not a regular file (a pipe, "
                                       "socket or device)\n")


@pytest.mark.parametrize(("command", "flags", "message"), [
    ("predict", ["--do_sample", "true", "--temperature", "-1"],
     "temperature must be > 0, got -1.0 (use do_sample=False for greedy)"),
    ("predict", ["--max_new_tokens", "0"], "max_new_tokens must be > 0, got 0"),
    ("chat", ["--top_p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    # sampling flags where decoding is greedy were ignored: `predict --seed 3` answered greedily
    ("predict", ["--seed", "3"],
     "--seed only changes sampled answers, and this run decodes greedily: add --do_sample true (or leave it out)"),
    ("predict", ["--temperature", "0.8", "--top_p", "0.9", "--top_k", "0"], "--temperature, --top_p only change "
     "sampled answers, and this run decodes greedily: add --do_sample true (or leave them out)"),
    ("chat", ["--do_sample", "false", "--top_k", "5"],
     "--top_k only changes sampled answers, and this run decodes greedily: add --do_sample true (or leave it out)"),
])
def test_sampling_values_are_checked_before_the_weights_load(golden_dir, monkeypatch, capsys, command, flags,
                                                             message):
    """They were said only after the model had loaded (minutes for Qwen-VL-Chat on a CPU)."""
    from qwenvl import cli

    def never(*args, **kwargs):
        raise AssertionError("weights read")

    monkeypatch.setattr("qwenvl.checkpoint.load_weights", never)
    argv = [command, "--model", str(golden_dir), *flags]
    if command == "predict":
        argv += ["--predict_data", "hi", "--modal_type", "text"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"qwenvl {command}: error: {message}\n"


def test_flags_take_vllms_dashed_spelling_too(golden_dir, capsys):
    from qwenvl import cli

    assert cli.underscored(["serve", "--max-model-len", "2048", "--served-model-name=a-b", "--system=be-brief",
                            "-v", "--learning_rate", "1e-5", "--", "--not-a-flag"]) == [
        "serve", "--max_model_len", "2048", "--served_model_name=a-b", "--system=be-brief", "-v", "--learning_rate",
        "1e-5", "--", "--not-a-flag"]
    answers = []
    for spelling in (["--predict_data", "hi", "--modal_type", "text", "--max_new_tokens", "3"],
                     ["--predict-data", "hi", "--modal-type", "text", "--max-new-tokens", "3"]):
        assert cli.main(["predict", "--model", str(golden_dir), "--dtype", "float32", *spelling]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0]


# data-convert in a subprocess that prints "paused" in the middle of writing its output (before the file's fsync)
# and waits there for a signal; ``ignore_hup``: started as ``nohup`` starts it (SIGHUP ignored), it sends itself
# SIGHUP there and goes on
_PAUSED_WRITE = """
import os, signal, sys
from qwenvl import fileio
if sys.argv[1] == "ignore_hup":
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
real = os.fsync
def fsync(fd):
    print("paused", flush=True)
    if sys.argv[1] == "ignore_hup":
        os.kill(os.getpid(), signal.SIGHUP)
    else:  # not a read from the terminal: once it is gone that fails (EIO) before the signal comes
        signal.pause()
    real(fd)
fileio.os.fsync = fsync
from qwenvl.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _data_convert_args(tmp_path: Path) -> tuple[list[str], Path]:
    data, out = tmp_path / "llava.json", tmp_path / "out"
    data.write_text(json.dumps([{"id": "1", "conversations": [{"from": "human", "value": "Hi?"},
                                                              {"from": "gpt", "value": "Hello."}]}]))
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    return ["data-convert", "--data_path", str(data), "--image_location", str(tmp_path), "--output_path",
            str(out / "data.json")], out


def test_closing_the_terminal_stops_a_command_as_sigterm_does(tmp_path):
    # the command runs in a terminal (a pty, its controlling terminal) that closes while it writes: the kernel
    # sends SIGHUP and writes to the terminal fail from then on. It was killed by SIGHUP on the spot (its
    # temporary file and lock left behind); now it cleans up as for SIGTERM and ends with status 128 + 1
    import pty
    import signal
    import termios

    def controlling_terminal() -> None:  # in the child, a session leader (start_new_session): the pty is its tty
        import fcntl

        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    argv, out = _data_convert_args(tmp_path)
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-c", _PAUSED_WRITE, "-", *argv], stdin=slave, stdout=slave,
                                stderr=slave, start_new_session=True, preexec_fn=controlling_terminal, cwd=ROOT)
    finally:
        os.close(slave)
    seen = b""
    while b"paused" not in seen:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal (it ended before pausing)
            chunk = b""
        assert chunk, seen.decode(errors="replace")
        seen += chunk
    os.close(master)  # the terminal goes away
    try:
        assert proc.wait(timeout=300) == 128 + signal.SIGHUP
    finally:
        if proc.poll() is None:  # SIGHUP never came
            proc.kill()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # no temporary file, no lock left


def test_a_command_started_with_nohup_outlives_its_terminal(tmp_path):
    # SIGHUP ignored when the command starts (nohup) stays ignored: the command finishes its work
    argv, out = _data_convert_args(tmp_path)
    run = subprocess.run([sys.executable, "-c", _PAUSED_WRITE, "ignore_hup", *argv], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr
    assert json.loads((out / "data.json").read_text())[0]["id"] == "1"


def test_a_second_sigterm_does_not_cut_the_cleanup_of_the_first_short(tmp_path):
    # `scancel` signals every process of the job and torchrun forwards it to its workers: each gets SIGTERM twice.
    # The second one, arriving while the first one's cleanup deleted the temporary file, raised again there and
    # left the file behind
    import signal

    script = ("import os, pathlib, signal, sys\n"
              "from qwenvl import fileio\n"
              "stopping = []\n"
              "def fsync(fd):\n"
              "    stopping.append(1)\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "fileio.os.fsync = fsync\n"
              "real_unlink = pathlib.Path.unlink\n"
              "def unlink(self, *args, **kwargs):\n"
              "    if stopping:\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "    return real_unlink(self, *args, **kwargs)\n"
              "pathlib.Path.unlink = unlink\n"
              "from qwenvl.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    argv, out = _data_convert_args(tmp_path)
    run = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 128 + signal.SIGTERM, run.stderr
    assert run.stderr.strip().splitlines()[-1] == "terminated (SIGTERM)"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # no temporary file, no lock left


def test_chat_says_the_conversation_is_too_long_and_that_clear_starts_afresh(monkeypatch, capsys, golden_dir):
    # the window (max_window_size) counts the history only: a message that fits alone failed after a long turn
    # with "prompt of N tokens does not fit the context", saying neither why nor what to do
    import qwenvl.inference
    from qwenvl.inference import ChatSession

    load = qwenvl.inference.load

    def small_context(*args, **kwargs):
        model, processor = load(*args, **kwargs)
        model.config.lm.max_position_embeddings = 400  # a fresh model: only this test's
        return model, processor

    monkeypatch.setattr(qwenvl.inference, "load", small_context)
    script = f"{'word ' * 300}\n{'word ' * 100}\n{'word ' * 400}\n:clear\n{'word ' * 100}\n"
    rc, out, err = _chat_in_process(monkeypatch, capsys, golden_dir, script, ChatSession.ask, "--max_new_tokens", "1")
    assert rc == 0, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, err
    assert re.fullmatch(r"error: the conversation is too long for the context \(\d+ tokens, the model holds 400\): "
                        r":clear starts afresh", errors[0]), err
    assert re.fullmatch(r"error: the message is too long for the context \(\d+ tokens with the system text, the "
                        r"model holds 400\): send a shorter one", errors[1]), err
    assert out.count("assistant> ") == 4


@pytest.mark.parametrize(("argv", "said"), [
    # a prefix of a flag was taken as the flag: --dtyp ran as --dtype, --output as data-convert's --output_path
    (["convert", "a", "b", "--dtyp", "fp16"], "qwenvl convert: error: unrecognized arguments: --dtyp fp16 (did you "
                                              "mean --dtype?)"),
    (["info", "ckpt", "--pres", "tiny"], "qwenvl info: error: unrecognized arguments: --pres tiny (did you mean --preset?)"),
    # an unknown flag was said under qwenvl's own usage, with no hint
    (["predict", "--modle", "m", "--predict_data", "hi", "--modal_type", "text"],
     "qwenvl predict: error: unrecognized arguments: --modle m (did you mean --model?)"),
])
def test_a_flag_is_spelled_whole_and_an_unknown_one_is_said_by_its_command(capsys, argv, said):
    from qwenvl.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().splitlines()[-1] == said
    assert err.startswith(f"usage: qwenvl {argv[0]} ")
