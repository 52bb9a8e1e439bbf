"""``qwenvl predict`` run in-process on the golden checkpoint: what its options do to the answers."""

from __future__ import annotations

import json

import pytest
import torch

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
    generation.require_cpp_compiler(torch.device("cuda").type)  # only CPUs' code is C++
