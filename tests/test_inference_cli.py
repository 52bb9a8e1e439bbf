"""``qwenvl predict`` run in-process on the golden checkpoint: what its options do to the answers."""

from __future__ import annotations

import json

import pytest

from qwenvl import cli, generation, inference


def test_predict_seeded_answers_do_not_depend_on_the_batch_size(tmp_path, golden_dir):
    # the rows of a batch drew their tokens from one generator: with --seed, a row's answer changed with
    # --predict_batch_size (and with the rows batched with it)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Hello", "The cat sat on the mat and", "1 2"]))
    answers = []
    for batch_size in ("1", "3"):
        out = tmp_path / f"answers-{batch_size}.jsonl"
        assert cli.main(["predict", "--model", str(golden_dir), "--dtype", "float32", "--device", "cpu", "--jsonl",
                         str(prompts), "--output", str(out), "--predict_batch_size", batch_size, "--do_sample", "true",
                         "--seed", "0", "--temperature", "1", "--top_p", "1", "--top_k", "0", "--max_new_tokens", "5",
                         "--min_new_tokens", "5"]) == 0
        answers.append([json.loads(line) for line in out.read_text().splitlines()])
    assert len(answers[0]) == 3 and all(row["num_tokens"] == 5 for row in answers[0])
    assert answers[0] == answers[1]



def test_predict_rows_are_one_line_each_for_str_splitlines(tmp_path, golden_dir):
    # U+2028, U+2029 and U+0085 in a prompt were written as they are: str.splitlines (and some JavaScript readers)
    # broke the row there; they are escaped, as data-convert's JSON Lines
    prompts = tmp_path / "p.jsonl"
    texts = ["a\u2028b", "c\u2029d\x85e"]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in texts))
    out = tmp_path / "answers.jsonl"
    assert cli.main(["predict", "--model", str(golden_dir), "--dtype", "float32", "--device", "cpu", "--jsonl",
                     str(prompts), "--output", str(out), "--max_new_tokens", "1"]) == 0
    assert [json.loads(line)["prompt"] for line in out.read_text(encoding="utf-8").splitlines()] == texts


def test_predict_output_check_takes_a_checkpoint_path_with_a_nul_character(tmp_path, capsys):
    # load_checkpoint "a\0b" in --config, with --output: the error was "embedded null byte" alone (from the check
    # that the output is not inside the checkpoint folder); such a folder cannot exist, which is said as usual
    config, prompts, out = tmp_path / "c.yaml", tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    config.write_text('load_checkpoint: "a\\0b"\n')
    prompts.write_text('{"prompt": "Hello"}\n')
    assert cli.main(["predict", "--config", str(config), "--jsonl", str(prompts), "--output", str(out)]) == 2
    assert capsys.readouterr().err == "qwenvl predict: error: checkpoint folder not found: 'a\\x00b'\n"  # NUL escaped

def test_compile_without_a_cpp_compiler_is_one_line_before_the_weights_load(tmp_path, golden_dir, capsys,
                                                                             monkeypatch):
    # was inductor's long traceback (InvalidCxxCompiler) at the first token, after the weights had loaded
    monkeypatch.setenv("CXX", str(tmp_path / "no-g++"))  # inductor runs $CXX (else g++)

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(inference, "load", no_load)
    data = tmp_path / "d.jsonl"
    data.write_text('{"image": "images/cat.png", "sent": "a cat", "bbox": [0, 0, 1, 1], "height": 8, "width": 8}\n')
    for argv in (["predict", "--predict_data", "hi", "--modal_type", "text"], ["chat"], ["serve"],
                 ["eval", "grounding", "--data", str(data), "--image_dir", str(golden_dir)]):
        assert cli.main([*argv, "--model", str(golden_dir), "--device", "cpu", "--compile"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith(f"qwenvl {argv[0]}: error: --compile (compile=True) needs a C++ "
                                                  f"compiler on a CPU, and none works here ('{tmp_path / 'no-g++'}' "
                                                  "is not found): install one (g++) or name it in CXX, or run "
                                                  "without --compile")
    # the API (compile=True) says the same, not inductor's traceback
    monkeypatch.setattr(generation, "_compiled_steps", {})
    with pytest.raises(FileNotFoundError, match="needs a C\\+\\+ compiler"):
        generation.compiled_decode_step("cpu")
    generation.require_compiler_for("mps")  # nothing is checked where torch.compile's needs are not known


def test_compile_on_a_gpu_without_a_c_compiler_is_one_line_before_the_weights_load(monkeypatch):
    """On CUDA, Triton builds its kernel launcher with $CC, else gcc, else clang, the first time a compiled step
    runs: without any, --compile failed then with Triton's "Failed to find C compiler" traceback."""
    from qwenvl import generation

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CC", raising=False)
    for device in ("cuda", "xpu"):
        with pytest.raises(FileNotFoundError) as e:
            generation.require_compiler_for(device)
        assert str(e.value) == ("--compile (compile=True) needs a C compiler on a GPU (Triton builds its kernel "
                                "launcher with it), and none works here (neither gcc nor clang is found): install "
                                "one (gcc) or name it in CC, or run without --compile")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(FileNotFoundError, match="'/nonexistent/cc' is not found"):
        generation.require_compiler_for("cuda")
    monkeypatch.setenv("CC", "/bin/sh")  # any command that is found
    generation.require_compiler_for("cuda")


def test_the_up_front_image_note_gives_the_reason_of_the_rows_own_error(tmp_path, golden_dir, capsys):
    # the check before the weights load said "image not found" for a file: URL, and "cannot read image ... [Errno
    # 21] Is a directory" or "... cannot identify image file" where the row then said what was really wrong
    import os
    import shutil

    from qwenvl.images import MediaPolicy
    from qwenvl.inference_cli import bad_prompt_images

    media = tmp_path / "media"
    media.mkdir()
    shutil.copy(golden_dir / "images" / "cat.png", media / "cat.png")
    (media / "folder.png").mkdir()
    (media / "empty.png").write_bytes(b"")
    (media / "notes.png").write_text("not a picture")
    os.symlink("loop-b.png", media / "loop-a.png")
    os.symlink("loop-a.png", media / "loop-b.png")
    # the last three no <img> span can hold: their rows said "image not found" of 'a\ufffd.png' (the tokenizer reads
    # a lone surrogate as U+FFFD), "a list-format image path cannot hold '</img>'" and "image path is 304 bytes
    # long ..." while the note gave each its own words; the row with the lone surrogate stopped the whole output
    # ("'utf-8' codec can't encode character '\ud800'")
    images = ["file:cat.png", "folder.png", "empty.png", "notes.png", "loop-a.png", "cat.png/inside.png",
              "https://example.com/cat.png", "data:image/png;base64,AAA", "a\ud800.png", "a</img>b.png",
              "x" * 300 + ".png"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"image": p, "text": "What is it?"}) + "\n" for p in ["cat.png", *images]))
    out = tmp_path / "answers.jsonl"
    for any_path in ("true", "false"):
        assert cli.main(["predict", "--model", str(golden_dir), "--dtype", "float32", "--device", "cpu", "--jsonl",
                         str(prompts), "--output", str(out), "--overwrite", "--image_dir", str(media),
                         "--allow_any_local_path", any_path, "--max_new_tokens", "1"]) == 2
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert "error" not in rows[0] and all("error" in row for row in rows[1:])
        note = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("note: prompt 2 of"))
        assert note == (f"note: prompt 2 of 12: {rows[1]['error']} (11 prompts have a bad image); answering the "
                        "others (the bad ones become rows with an 'error' field)")
        bad = bad_prompt_images([[{"image": p}] for p in ["cat.png", *images]], MediaPolicy(media, any_path == "true"))
        assert [k for k, _ in bad] == list(range(2, 13))
        assert [problem for _, problem in bad] == [row["error"] for row in rows[1:]]
        assert json.loads(out.read_text().splitlines()[9])["prompt"] == json.dumps(
            [{"image": "a\ud800.png"}, {"text": "What is it?"}], ensure_ascii=False)  # the row as it came
        # a path that no <img> span can hold: said as the prompt's words cannot show it
        assert [row["error"] for row in rows[-3:]] == [
            "image path 'a\\ud800.png' is not valid Unicode text (a lone surrogate): a prompt cannot show it "
            "(<img>PATH</img>)",
            "image path 'a</img>b.png' holds the special token </img>: a prompt cannot show it (<img>PATH</img>)",
            f"image path {'x' * 77 + '...'!r} is 304 bytes long (UTF-8), more than the 256 that fit between <img> and "
            "</img>: a prompt cannot show it (<img>PATH</img>)"]


@pytest.mark.parametrize(("row", "error"), [
    ({"query": [1, 2]}, "'query' is a list, but its item 0 is 1, not a dict: a prompt is a string, a list-format list "
                        "or a list of messages (list format: [{'image': PATH}, {'text': TEXT}], messages: [{'role': "
                        "'user', 'content': TEXT or list format}])"),
    ({"messages": [{"foo": 1}]}, "'messages' is a list, but its item 0 is {'foo': 1}, with none of the keys 'role', "
                                 "'image', 'text' or 'box': a prompt is a string, a list-format list or a list of "
                                 "messages (list format: [{'image': PATH}, {'text': TEXT}], messages: [{'role': "
                                 "'user', 'content': TEXT or list format}])"),
])
def test_predict_names_the_row_whose_prompt_is_a_list_of_junk(tmp_path, golden_dir, capsys, monkeypatch, row, error):
    # the row reached the processor after the weights had loaded, and its error row said only "unsupported
    # list-format element (expected a dict): 1"
    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(inference, "load", no_load)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello"}) + "\n" + json.dumps(row) + "\n")
    assert cli.main(["predict", "--model", str(golden_dir), "--jsonl", str(prompts), "--output",
                     str(tmp_path / "out.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == f"qwenvl predict: error: {prompts}:2: {error}"
    assert not (tmp_path / "out.jsonl").exists()


def test_predict_checks_only_the_images_of_the_turns_the_prompt_reads(tmp_path, golden_dir, capsys):
    # a base checkpoint (chat_format raw) is prompted with the last user message alone: a missing picture in an
    # earlier turn was a note (or, with every row such, the error) about a file that is never read
    messages = [{"role": "user", "content": [{"image": "gone.png"}, {"text": "What is it?"}]},
                {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Thanks"}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": messages}) + "\n")
    out = tmp_path / "answers.jsonl"
    argv = ["predict", "--model", str(golden_dir), "--dtype", "float32", "--device", "cpu", "--data", str(prompts),
            "--output", str(out), "--image_dir", str(golden_dir), "--max_new_tokens", "1"]
    assert cli.main(argv) == 0
    assert "gone.png" not in capsys.readouterr().err
    assert json.loads(out.read_text())["prompt"] == "Thanks"
    # chatml keeps the history, and with it the picture: that one is read, so it is checked first
    assert cli.main([*argv, "--overwrite", "--chat_format", "chatml"]) == 2
    assert capsys.readouterr().err.strip() == f"qwenvl predict: error: image not found: {golden_dir / 'gone.png'}"


@pytest.mark.parametrize("data", ["--data", "--jsonl"])
def test_predict_messages_name_the_data_flag_as_typed(tmp_path, capsys, data):
    # --data is --jsonl: the messages said --jsonl whichever the command line had
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "hi"}) + "\n")
    base = ["predict", "--model", str(tmp_path / "no-model"), data, str(prompts)]
    for extra, message in [
        (["--output_only"], f"--output_only prints the answers of --predict_data alone; the rows of {data} hold each "
                            "answer in their 'response' field"),
        (["--predict_data", "hi", "--modal_type", "text"], f"give --predict_data ITEMS... or {data} FILE (one of them)"),
        (["--output", str(prompts)], f"the output file {prompts} is the {data} file {prompts}; write the output "
                                     "somewhere else"),
    ]:
        assert cli.main([*base, *extra]) == 2
        assert capsys.readouterr().err.strip() == f"qwenvl predict: error: {message}"


def test_predict_batch_size_of_the_config_is_named_as_its_key(tmp_path, capsys):
    # "predict_batch_size: 0" in the YAML was said as "--predict_batch_size must be >= 1"; a YAML "batch_size" (the
    # flag's new name) is not a key of the MindFormers predict config: refused, naming the key it is
    config = tmp_path / "predict.yaml"
    argv = ["predict", "--config", str(config), "--model", str(tmp_path / "no-model"), "--predict_data", "hi",
            "--modal_type", "text"]
    config.write_text("predict_batch_size: 0\n")
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == f"qwenvl predict: error: {config}: predict_batch_size must be >= 1, got 0"
    config.write_text("batch_size: 2\n")
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip().startswith(
        f"qwenvl predict: error: {config}: unknown option(s) batch_size (the key of --batch_size is predict_batch_size); "
        "known: ")
