"""``qwenvl predict --data``: the keys of an input row that no prompt reads ("id", "meta") go into its output row."""

from __future__ import annotations

import json

import pytest

from qwenvl import cli, inference

OURS = ["prompt", "response", "num_tokens", "stopped"]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def predict(golden_dir, prompts, *more):
    return cli.main(["predict", "--model", str(golden_dir), "--dtype", "float32", "--device", "cpu",
                     "--image_dir", str(golden_dir), "--data", str(prompts), "--max_new_tokens", "2", *more])


def test_keys_no_prompt_reads_are_carried_into_the_output_rows(tmp_path, golden_dir, capsys):
    # {"image": ..., "text": ..., "id": 7}: the answer rows had no "id" ("they are left out"): results could only be
    # joined to their inputs by line order. Now each row carries them, as they are, in the input's order, before
    # ours; an error row (a missing image) too; a row without such keys gets none
    prompts = write_rows(tmp_path / "p.jsonl", [
        {"id": 7, "image": "images/cat.png", "text": "What is it?", "meta": {"split": "val", "tags": [1, None]}},
        {"text": "Hello"},
        {"image": "images/missing.png", "src": "x", "text": "And this?", "id": "b"},
    ])
    out = tmp_path / "answers.jsonl"
    assert predict(golden_dir, prompts, "--output", str(out), "--batch_size", "2") == 2  # the missing image
    err = capsys.readouterr().err
    assert f"note: {prompts}: no prompt reads the key(s) 'id', 'meta', 'src'; they are copied into the output rows" \
        in err and "left out" not in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [list(r) for r in rows] == [["id", "meta", *OURS], OURS, ["src", "id", *OURS, "error"]]
    assert rows[0]["id"] == 7 and rows[0]["meta"] == {"split": "val", "tags": [1, None]}
    assert rows[2]["src"] == "x" and rows[2]["id"] == "b" and "image not found" in rows[2]["error"]
    assert rows[0]["num_tokens"] > 0 and rows[1]["prompt"] == "Hello"


def test_rows_printed_without_output_carry_the_keys(tmp_path, golden_dir, capsys):
    prompts = write_rows(tmp_path / "p.jsonl", [{"prompt": "Hello", "id": 1}, {"custom_id": "req-2", "prompt": "Bye"}])
    assert predict(golden_dir, prompts) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(list(r), r["prompt"]) for r in rows] == [(["id", *OURS], "Hello"), (["custom_id", *OURS], "Bye")]
    assert [rows[0]["id"], rows[1]["custom_id"]] == [1, "req-2"]


def test_partial_rows_of_a_stopped_run_carry_the_keys(tmp_path, golden_dir, monkeypatch, capsys):
    # Ctrl-C at the second batch: OUTPUT.partial holds the first batch's rows, each with its own keys
    answered, calls = inference._generate_batch, []

    def stop_at_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return answered(*args, **kwargs)

    monkeypatch.setattr(inference, "_generate_batch", stop_at_the_second_batch)
    prompts = write_rows(tmp_path / "p.jsonl", [{"prompt": f"Hello {k}", "id": k} for k in range(4)])
    out = tmp_path / "answers.jsonl"
    assert predict(golden_dir, prompts, "--output", str(out), "--batch_size", "2") == 130
    assert "the answers to the first 2 of 4 prompts are in" in capsys.readouterr().err and not out.exists()
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl.partial").read_text().splitlines()]
    assert [(r["id"], r["prompt"]) for r in rows] == [(0, "Hello 0"), (1, "Hello 1")]


@pytest.mark.parametrize("key", ["response", "num_tokens", "stopped", "error"])
def test_a_key_named_as_a_field_of_ours_is_refused_before_the_weights_load(tmp_path, golden_dir, monkeypatch,
                                                                             capsys, key):
    # carried, it would overwrite our field (or ours it): refused in one line naming the key and the row
    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(inference, "load", no_load)
    prompts = write_rows(tmp_path / "p.jsonl", [{"text": "a", "id": 1}, {"text": "b", key: "x"}])
    assert predict(golden_dir, prompts, "--output", str(tmp_path / "out.jsonl")) == 2
    assert capsys.readouterr().err == (
        f"qwenvl predict: error: {prompts}:2: key {key!r} is a field of the output rows (prompt, response, "
        "num_tokens, stopped, error): rename it to have it carried into its row\n")
    assert not (tmp_path / "out.jsonl").exists()


def test_a_query_row_is_asked_as_the_official_chat_asks_its_query(tmp_path, golden_dir):
    # {"query": Q} is the official model.chat(tokenizer, query)'s query: a chat checkpoint asks it as a ChatML user
    # turn, as {"text": Q} is asked (it was sent raw, as {"prompt": Q}); a raw-format checkpoint gets Q as before
    query = "Picture 1: <img>images/cat.png</img>\nWhat is it?"
    prompts = write_rows(tmp_path / "p.jsonl", [{"query": query}, {"text": query}, {"prompt": query}])
    for fmt in ("chatml", "raw"):
        out = tmp_path / f"{fmt}.jsonl"
        assert predict(golden_dir, prompts, "--output", str(out), "--chat_format", fmt) == 0
        asked = [json.loads(line)["prompt"] for line in out.read_text().splitlines()]
        if fmt == "chatml":
            assert asked[0] == asked[1] != asked[2] and asked[0].startswith("<|im_start|>system")
        else:
            assert asked[0] == asked[1] == asked[2] == query
