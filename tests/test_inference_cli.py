"""``qwenvl predict`` run in-process on the golden checkpoint: what its options do to the answers."""

from __future__ import annotations

import json


def test_predict_seeded_answers_do_not_depend_on_the_batch_size(tmp_path, golden_dir):
    # the rows of a batch drew their tokens from one generator: with --seed, a row's answer changed with
    # --predict_batch_size (and with the rows batched with it)
    from qwenvl import cli

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
