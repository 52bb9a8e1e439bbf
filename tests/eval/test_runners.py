"""Benchmark runners: scores equal hand-computed values with stub generators; bad input names the line."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from qwenvl.eval import runners
from qwenvl.eval.runners import (
    EvalDataError,
    evaluate_caption,
    evaluate_grounding,
    evaluate_vqa,
    load_grounding_data,
)
from qwenvl.outputs import OutputDirError

GOLDEN = Path(__file__).parents[1] / "fixtures" / "qwenvl-tiny"


def write_jsonl(path: Path, rows: Sequence[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def stub(answers: dict[str, str]):  # noqa: ANN201
    """A GenerateFn answering by the text of the prompt after the image (the expression/question)."""
    calls: list[list[str]] = []

    def run(prompts: Sequence[str]) -> list[str]:
        calls.append(list(prompts))
        out = []
        for p in prompts:
            key = re.sub(r"<img>.*?</img>", "", p)
            out.append(next(v for k, v in answers.items() if k in key))
        return out

    run.calls = calls  # type: ignore[attr-defined]
    return run


# ---- grounding ----------------------------------------------------------------------------------------------


def grounding_rows() -> list[dict]:
    return [
        # a.png is 200x100: the normalized box (0,0),(499,999) maps to (0,0,99.9,100) with /999.
        {"image": "a.png", "sent": "left half", "bbox": [0, 0, 100, 100], "height": 100, "width": 200},
        {"image": "a.png", "sent": "right half", "bbox": [100, 0, 200, 100], "height": 100, "width": 200},
        {"image": "b.png", "sent": "the middle", "bbox": [25, 25, 75, 75], "height": 100, "width": 100},
        {"image": "b.png", "sent": "nothing", "bbox": [0, 0, 10, 10], "height": 100, "width": 100},
    ]


def test_grounding_accuracy_matches_hand_computed(tmp_path: Path, image_dir: Path) -> None:
    data = write_jsonl(tmp_path / "g.jsonl", grounding_rows())
    gen = stub({
        "left half": "(0,0),(499,999)</box>",  # IoU 0.999 -> correct
        "right half": "(0,0),(499,999)</box>",  # the other half: IoU 0 -> wrong
        "the middle": "(250,250),(999,999)</box><ref>x</ref><box>(250,250),(750,750)</box>",  # first box counts
        "nothing": "I cannot see it",  # unparseable -> wrong
    })  # fmt: skip
    out = tmp_path / "res" / "g.json"
    result = evaluate_grounding(data, generate_fn=gen, image_dir=image_dir, batch_size=3, output=out, progress=False)
    # the middle: pred (25.025, 25.025, 100, 100) vs (25, 25, 75, 75): IoU 0.444 < 0.5
    assert result.score == pytest.approx(1 / 4)
    assert result.details == {"num_correct": 1, "num_unparseable": 1, "num_errors": 0}
    assert [len(c) for c in gen.calls] == [3, 1]  # batched
    assert gen.calls[0][0] == "<img>a.png</img><ref>left half</ref><box>"  # the official prompt
    saved = json.loads(out.read_text())
    assert saved["accuracy"] == pytest.approx(0.25) and saved["num_samples"] == 4
    preds = saved["predictions"]
    assert preds[0]["pred_bbox"] == [0.0, 0.0, 99.9, 100.0] and preds[0]["correct"] is True
    assert preds[2]["pred_box_norm"] == [250.0, 250.0, 999.0, 999.0]
    inter, union = (75 - 25.025) ** 2, 74.975**2 + 50**2 - (75 - 25.025) ** 2
    assert preds[2]["iou"] == pytest.approx(inter / union, abs=1e-4) and preds[2]["correct"] is False
    assert preds[3]["pred_bbox"] is None and preds[3]["correct"] is False


def test_grounding_perfect_predictions_score_100(tmp_path: Path, image_dir: Path) -> None:
    rows = grounding_rows()
    data = write_jsonl(tmp_path / "g.jsonl", rows)

    def perfect(prompts: Sequence[str]) -> list[str]:
        out = []
        for p in prompts:
            row = next(r for r in rows if f"<ref>{r['sent']}</ref>" in p)
            w, h = row["width"], row["height"]
            x1, y1, x2, y2 = row["bbox"]
            out.append(f"({round(x1 / w * 999)},{round(y1 / h * 999)}),({round(x2 / w * 999)},{round(y2 / h * 999)})</box>")
        return out

    result = evaluate_grounding(data, generate_fn=perfect, image_dir=image_dir, progress=False)
    assert result.score == 1.0


def test_grounding_xywh_and_size_from_image(tmp_path: Path, image_dir: Path) -> None:
    data = write_jsonl(tmp_path / "g.jsonl", [{"image": "a.png", "sent": "s", "bbox": [100, 0, 100, 100]}])
    (rec,) = load_grounding_data(data, image_dir, bbox_format="xywh")
    assert rec.bbox == (100.0, 0.0, 200.0, 100.0) and (rec.width, rec.height) == (200.0, 100.0)
    result = evaluate_grounding([rec], generate_fn=lambda ps: ["(500,0),(999,999)"] * len(ps), progress=False)
    assert result.score == 1.0  # unclosed box still parses (generation stopped at max_new_tokens)


def test_grounding_custom_prompt_without_box_suffix(tmp_path: Path, image_dir: Path) -> None:
    data = write_jsonl(tmp_path / "g.jsonl", grounding_rows()[:1])
    result = evaluate_grounding(
        data, generate_fn=lambda ps: ["<ref>left half</ref><box>(0,0),(499,999)</box>"], image_dir=image_dir,
        prompt="Picture 1: <img>{image}</img>\nBox {expression}", progress=False,
    )  # fmt: skip
    assert result.score == 1.0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"image": "a.png", "sent": "x", "bbox": [0, 0, 1, 1]', "invalid JSON"),
        ('{"image": "a.png", "bbox": [0, 0, 1, 1]}', "missing key 'sent'"),
        ('{"image": "a.png", "sent": "x", "bbox": [0, 0, 1]}', "4 finite numbers"),
        ('["a.png"]', "expected a JSON object"),
        ('{"image": "a.png", "sent": "x", "bbox": [0, 0, 1, 1], "width": 0, "height": 5}', "positive"),
        ('{"image": "a.png", "sent": "x", "bbox": [0, 0, 1, 1], "width": 1e400, "height": 5}', "positive finite"),
        # an integer beyond float range: a clean error, not an OverflowError traceback
        pytest.param('{"image": "a.png", "sent": "x", "bbox": [0, 0, 1, 1' + "0" * 400 + ']}', "4 finite numbers",
                     id="bbox-int-beyond-float"),
        pytest.param('{"image": "a.png", "sent": "x", "bbox": [0, 0, 1, 1], "width": 1' + "0" * 400 + ', "height": 5}',
                     "positive finite", id="width-int-beyond-float"),
        ('{"image": "a.png", "sent": "x", "bbox": [true, 0, 1, 1]}', "4 finite numbers"),
        # a reversed or empty target can never be hit: COCO [x, y, w, h] read as corners, say
        ('{"image": "a.png", "sent": "x", "bbox": [50, 40, 20, 30]}', "--bbox_format xywh"),
        ('{"image": "a.png", "sent": "x", "bbox": [5, 5, 5, 9]}', "empty or reversed box"),
    ],
)
def test_malformed_line_names_its_number(tmp_path: Path, image_dir: Path, line: str, message: str) -> None:
    good = json.dumps(grounding_rows()[0])
    data = write_jsonl(tmp_path / "g.jsonl", [good, "", line])
    with pytest.raises(EvalDataError, match=rf"g\.jsonl:3: .*{re.escape(message)}"):
        load_grounding_data(data, image_dir)


def test_grounding_reversed_predicted_box_is_a_miss_as_in_the_official_eval(tmp_path: Path, image_dir: Path) -> None:
    # b.png is 100x100; target (0,0)-(100,100). The official eval (torchvision box_iou on the box as written) finds
    # no intersection for a box with x2 < x1: it is a miss, not the same box with its corners sorted.
    row = {"image": "b.png", "sent": "all", "bbox": [0, 0, 100, 100]}
    data = write_jsonl(tmp_path / "g.jsonl", [row])
    for answer, want in (("(0,0),(999,999)</box>", 1.0), ("(999,999),(0,0)</box>", 0.0), ("(999,0),(0,999)</box>", 0.0)):
        result = evaluate_grounding(data, generate_fn=lambda ps, a=answer: [a] * len(ps), image_dir=image_dir,
                                    progress=False)
        assert result.score == want, answer
        assert result.predictions[0]["correct"] is (want == 1.0)


def test_missing_image_names_line_and_path(tmp_path: Path, image_dir: Path) -> None:
    rows = [grounding_rows()[0], {**grounding_rows()[0], "image": "nope.png"}]
    data = write_jsonl(tmp_path / "g.jsonl", rows)
    with pytest.raises(FileNotFoundError, match=r"g\.jsonl:2: image not found: .*nope\.png"):
        evaluate_grounding(data, generate_fn=lambda ps: [""] * len(ps), image_dir=image_dir, progress=False)
    # a folder (or a FIFO) under the image's name is there but no image file: said so, not "not found"
    (image_dir / "adir.png").mkdir()
    data = write_jsonl(tmp_path / "g.jsonl", [{**grounding_rows()[0], "image": "adir.png"}])
    with pytest.raises(EvalDataError, match=r"g\.jsonl:1: image path is not a file: .*adir\.png"):
        evaluate_grounding(data, generate_fn=lambda ps: [""] * len(ps), image_dir=image_dir, progress=False)


def test_missing_data_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="evaluation data not found"):
        load_grounding_data(tmp_path / "none.jsonl")


def test_bad_template_and_batch_size(tmp_path: Path, image_dir: Path) -> None:
    data = write_jsonl(tmp_path / "g.jsonl", grounding_rows()[:1])
    with pytest.raises(ValueError, match="cannot be filled"):
        evaluate_grounding(data, generate_fn=lambda ps: [""], image_dir=image_dir, prompt="{nope}", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_grounding(data, generate_fn=lambda ps: [""], image_dir=image_dir, batch_size=0, progress=False)


# ---- VQA ------------------------------------------------------------------------------------------------------


def test_vqa_accuracy_matches_hand_computed(tmp_path: Path, image_dir: Path) -> None:
    ten = ["2"] * 3 + ["3"] * 7
    data = write_jsonl(tmp_path / "v.jsonl", [
        {"image": "a.png", "question": "How many dogs?", "answers": ten, "question_id": 1},
        {"image": "a.png", "question": "How many cats?", "answers": ten, "question_id": 2},
        {"image": "b.png", "question": "Color?", "answers": [{"answer": "red"}] * 10, "question_id": 3},
    ])  # fmt: skip
    gen = stub({"dogs": " Two.", "cats": "three", "Color": "blue"})
    result = evaluate_vqa(data, generate_fn=gen, image_dir=image_dir, progress=False)
    # "Two." -> "2": 3 matches; leave-one-out: 7 x min(1, 3/3) + 3 x min(1, 2/3) -> 0.9; "3": 7 matches -> 1.0
    assert result.settings["vqa_metric"] == "vqa"
    assert result.score == pytest.approx((0.9 + 1.0 + 0.0) / 3)
    assert gen.calls[0][0] == "<img>a.png</img>How many dogs? Answer:"
    assert [p["answer"] for p in result.predictions] == ["Two.", "three", "blue"]  # stripped


def test_vqa_single_answers_use_exact_match(tmp_path: Path, image_dir: Path) -> None:
    data = write_jsonl(tmp_path / "v.jsonl", [
        {"image": "a.png", "question": "q1", "answer": "Yes"},
        {"image": "a.png", "question": "q2", "answer": "no"},
    ])  # fmt: skip
    result = evaluate_vqa(data, generate_fn=stub({"q1": "yes", "q2": "maybe"}), image_dir=image_dir, progress=False)
    assert result.settings["vqa_metric"] == "exact_match" and result.score == 0.5


def test_vqa_missing_answers(tmp_path: Path, image_dir: Path) -> None:
    data = write_jsonl(tmp_path / "v.jsonl", [{"image": "a.png", "question": "q"}])
    with pytest.raises(EvalDataError, match=r"v\.jsonl:1: missing key 'answers'"):
        evaluate_vqa(data, generate_fn=lambda ps: [""], image_dir=image_dir, progress=False)


def test_a_failing_sample_is_an_error_row_and_the_rest_is_kept(tmp_path: Path, image_dir: Path) -> None:
    data = write_jsonl(tmp_path / "v.jsonl", [
        {"image": "a.png", "question": "q1", "answer": "yes"},
        {"image": "b.png", "question": "q2 broken", "answer": "no"},
        {"image": "a.png", "question": "q3", "answer": "no"},
    ])  # fmt: skip
    answers = stub({"q1": "yes", "q3": "no"})

    def gen(prompts: Sequence[str]) -> list[str]:
        if any("broken" in p for p in prompts):
            raise ValueError("cannot decode image b.png")
        return answers(prompts)

    out = tmp_path / "res.json"
    result = evaluate_vqa(data, generate_fn=gen, image_dir=image_dir, batch_size=3, output=out, progress=False)
    assert result.details == {"num_errors": 1} and result.score == pytest.approx(2 / 3)  # the failure counts as wrong
    saved = json.loads(out.read_text())["predictions"]
    assert [p.get("error") for p in saved] == [None, "cannot decode image b.png", None]
    assert [p["answer"] for p in saved] == ["yes", "", "no"]


# ---- captioning -------------------------------------------------------------------------------------------------


def test_caption_cider_equals_metric_and_perfect_beats_wrong(tmp_path: Path, image_dir: Path) -> None:
    from qwenvl.eval.metrics import cider

    refs = {"1": ["a white rectangle on a table", "a plain white picture"], "2": ["a gray square", "gray box"]}
    data = write_jsonl(tmp_path / "c.jsonl", [
        {"id": 1, "image": "a.png", "captions": refs["1"]},
        {"id": 2, "image": "b.png", "captions": refs["2"]},
    ])  # fmt: skip
    caps = {"a.png": "a white rectangle on a table", "b.png": "a red car"}

    def gen(prompts: Sequence[str]) -> list[str]:
        return [next(v for k, v in caps.items() if k in p) for p in prompts]

    result = evaluate_caption(data, generate_fn=gen, image_dir=image_dir, progress=False)
    expected, _ = cider({"1": caps["a.png"], "2": caps["b.png"]}, refs)
    assert result.metric == "cider" and result.score == pytest.approx(expected)
    assert result.predictions[0]["cider"] > result.predictions[1]["cider"]


def test_caption_coco_json_format(tmp_path: Path, image_dir: Path) -> None:
    data = tmp_path / "c.json"
    data.write_text(json.dumps({
        "images": [{"id": 7, "image": "a.png"}, {"id": 8, "file_name": "b.png"}],
        "annotations": [{"image_id": 7, "caption": "white"}, {"image_id": 8, "caption": "gray"}],
    }))  # fmt: skip
    records = runners.load_caption_data(data, image_dir)
    assert [(r.id, r.image, r.captions) for r in records] == [(7, "a.png", ["white"]), (8, "b.png", ["gray"])]


def test_caption_coco_json_captions_of_no_listed_image_are_said(tmp_path: Path, image_dir: Path, caplog) -> None:
    # a subset of the images (the Karpathy test split of val2014's captions) is fine, but their captions were
    # dropped without a word, also when the ids were of another type ("7" for 7) and no image got its captions
    data = tmp_path / "c.json"
    data.write_text(json.dumps({"images": [{"id": 7, "image": "a.png"}],
                                "annotations": [{"image_id": 7, "caption": "white"}, {"image_id": "8", "caption": "x"}]}))
    with caplog.at_level("WARNING"):
        records = runners.load_caption_data(data, image_dir)
    assert [(r.id, r.captions) for r in records] == [(7, ["white"])]
    assert f"{data}: 1 image_id(s) of 'annotations' name no entry of 'images' (the first: '8'): their captions are " \
           "not used" in caplog.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"images": 5, "annotations": []}, "'images' and 'annotations' must be lists"),
        ({"images": [], "annotations": {"image_id": 1}}, "'images' and 'annotations' must be lists"),
        ({"images": [{"id": 1, "image": "a.png"}], "annotations": [{"image_id": [1], "caption": "x"}]},
         "annotations[0]: 'image_id' must be a number or a string"),
        ({"images": [{"id": {"a": 1}, "image": "a.png"}], "annotations": []},
         "images[0]: 'id' must be a number or a string"),
        # it said "'image' must be a str", a key COCO's files do not use
        ({"images": [{"id": 1, "coco_url": "a.png"}], "annotations": []}, "images[0]: needs 'image' or 'file_name'"),
    ],
)
def test_caption_coco_json_of_the_wrong_shape_names_the_problem(tmp_path: Path, image_dir: Path, content: dict,
                                                                message: str) -> None:
    data = tmp_path / "c.json"
    data.write_text(json.dumps(content))
    with pytest.raises(EvalDataError, match=rf"c\.json: .*{re.escape(message)}"):
        runners.load_caption_data(data, image_dir)


def test_a_repeated_caption_id_names_both_lines(tmp_path: Path, image_dir: Path) -> None:
    data = write_jsonl(tmp_path / "c.jsonl", [{"image": "a.png", "captions": ["x"], "id": 1},
                                              {"image": "b.png", "captions": ["y"], "id": 1}])
    with pytest.raises(EvalDataError, match=r"c\.jsonl:2: caption id 1 is also the id of .*c\.jsonl:1: ids must be "
                                            r"unique$"):
        runners.load_caption_data(data, image_dir)


def test_a_caption_record_without_id_never_takes_another_records_id(tmp_path: Path, image_dir: Path) -> None:
    # it took its index: the id of another record numbering its ids from 1 ("caption id 1 is also the id of ...")
    rows = [{"image": "a.png", "captions": ["x"], "id": 1}, {"image": "b.png", "captions": ["y"]},
            {"image": "a.png", "captions": ["z"]}, {"image": "b.png", "captions": ["w"], "id": "4"},
            {"image": "a.png", "captions": ["v"]}]
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    records = runners.load_caption_data(data, image_dir)
    assert [r.id for r in records] == [1, 5, 2, "4", 6]  # an index another record has: the first free from 5 up
    # the ids are the output's, and a run resumes from its output
    out = tmp_path / "o.json"
    gen = stub({"": "a photo"})
    first = evaluate_caption(records[:3], generate_fn=gen, image_dir=image_dir, output=out, progress=False)
    assert [p["id"] for p in first.to_dict()["predictions"]] == [1, 5, 2]
    again = evaluate_caption(data, generate_fn=gen, image_dir=image_dir, progress=False, resume=out)
    assert [p["id"] for p in again.to_dict()["predictions"]] == [1, 5, 2, "4", 6]


@pytest.mark.parametrize("name", ["c.json", "c.jsonl"])
def test_evaluation_data_that_is_not_utf8_names_the_file(tmp_path: Path, image_dir: Path, name: str) -> None:
    data = tmp_path / name
    data.write_bytes(b'{"image": "a.png", "captions": ["caf\xe9"]}\n')  # Latin-1
    with pytest.raises(EvalDataError, match=rf"{re.escape(name)}(:1)?: not UTF-8 text"):
        runners.load_caption_data(data, image_dir)


# ---- a real (tiny, random) model end to end --------------------------------------------------------------------


def test_real_tiny_model_through_every_runner(tmp_path: Path, golden_model) -> None:  # noqa: ANN001
    img = GOLDEN / "images"
    g = write_jsonl(tmp_path / "g.jsonl", [
        {"image": "cat.png", "sent": "the cat", "bbox": [10, 10, 100, 100], "height": 240, "width": 320},
        {"image": "street.jpg", "sent": "a car", "bbox": [0, 0, 50, 50], "height": 360, "width": 200},
    ])  # fmt: skip
    v = write_jsonl(tmp_path / "v.jsonl", [{"image": "cat.png", "question": "What is it?", "answers": ["cat"] * 10}])
    c = write_jsonl(tmp_path / "c.jsonl", [{"image": "cat.png", "captions": ["a cat"]},
                                           {"image": "street.jpg", "captions": ["a street"]}])
    res_g = evaluate_grounding(g, model=golden_model, image_dir=img, batch_size=2, max_new_tokens=6,
                               min_new_tokens=0, output=tmp_path / "g.json", progress=False)
    assert 0.0 <= res_g.score <= 1.0 and len(res_g.predictions) == 2
    res_v = evaluate_vqa(v, model=golden_model, image_dir=img, max_new_tokens=3, progress=False)
    assert 0.0 <= res_v.score <= 1.0 and isinstance(res_v.predictions[0]["answer"], str)
    res_c = evaluate_caption(c, model=golden_model, image_dir=img, max_new_tokens=4, min_new_tokens=2,
                             progress=False)
    assert res_c.score >= 0.0 and len(res_c.predictions) == 2
    assert json.loads((tmp_path / "g.json").read_text())["num_samples"] == 2


def test_batched_answers_equal_single(tmp_path: Path, golden_model) -> None:  # noqa: ANN001
    from qwenvl.processor import Processor

    proc = Processor(image_size=golden_model.config.visual.image_size)
    run = runners.model_generate_fn(golden_model, proc, max_new_tokens=5, base_dir=GOLDEN / "images",
                                    skip_special_tokens=False)
    prompts = ["<img>cat.png</img><ref>the cat</ref><box>", "<img>street.jpg</img>What is in the picture? Answer:"]
    assert run(prompts) == [run([p])[0] for p in prompts]


def test_cli_grounding(tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    from qwenvl.cli import main

    data = write_jsonl(tmp_path / "g.jsonl", [
        {"image": "cat.png", "sent": "the cat", "bbox": [10, 10, 100, 100], "height": 240, "width": 320},
    ])  # fmt: skip
    out = tmp_path / "out.json"
    args = ["eval", "grounding", "--model", str(GOLDEN), "--data", str(data), "--image_dir", str(GOLDEN / "images"),
            "--output", str(out), "--max_new_tokens", "4", "--min_new_tokens", "0", "--device", "cpu", "--no_progress"]
    with caplog.at_level("INFO", logger="qwenvl.eval.cli"):
        rc = main(args)  # fmt: skip
    assert rc == 0
    saved = json.loads(out.read_text())
    assert saved["task"] == "grounding" and saved["settings"]["max_new_tokens"] == 4
    # which prompt and format the score is for: on stderr before the run, and in the output's settings
    assert ("eval grounding: prompt '<img>{image}</img><ref>{expression}</ref><box>' (official), chat_format raw, "
            "max_new_tokens 4, min_new_tokens 0") in caplog.text
    assert "note: the official protocol" not in caplog.text  # the golden checkpoint is a raw-format one
    assert (saved["settings"]["prompt"], saved["settings"]["chat_format"], saved["settings"]["protocol"]) == (
        runners.GROUNDING_PROMPT, "raw", "official")

    # --prompt_file: the template exactly as the file holds it, newlines included
    template = "<|im_start|>user\nPicture 1: <img>{image}</img>\n<ref>{expression}</ref><|im_end|>\n<|im_start|>assistant\n<box>"
    (tmp_path / "prompt.txt").write_text(template, encoding="utf-8")
    caplog.clear()
    with caplog.at_level("INFO", logger="qwenvl.eval.cli"):
        assert main([*args, "--chat_format", "chatml", "--prompt_file", str(tmp_path / "prompt.txt")]) == 2
    assert "out.json exists; pass --overwrite" in capsys.readouterr().err  # the first run's file is kept
    caplog.clear()
    with caplog.at_level("INFO", logger="qwenvl.eval.cli"):
        assert main([*args, "--chat_format", "chatml", "--prompt_file", str(tmp_path / "prompt.txt"),
                     "--overwrite"]) == 0
    saved = json.loads(out.read_text())
    assert (saved["settings"]["prompt"], saved["settings"]["chat_format"], saved["settings"]["protocol"]) == (
        template, "chatml", f"--prompt_file {tmp_path / 'prompt.txt'}")
    assert f"eval grounding: prompt {template!r} (--prompt_file {tmp_path / 'prompt.txt'}), chat_format chatml" in \
        caplog.text
    assert main([*args, "--prompt_file", str(tmp_path / "nope.txt"), "--overwrite"]) == 2
    assert "--prompt_file" in capsys.readouterr().err
    for there in (tmp_path, Path("/dev/zero")):  # there, but no prompt file: said so (it said "no such file")
        assert main([*args, "--prompt_file", str(there), "--overwrite"]) == 2
        assert capsys.readouterr().err.strip().endswith(f"--prompt_file {there}: not a file")


def test_cli_checks_the_data_before_loading_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qwenvl.cli import main

    data = write_jsonl(tmp_path / "g.jsonl", [{"image": "gone.png", "sent": "x", "bbox": [0, 0, 1, 1]}])
    # the model folder does not exist either: the data error comes first
    assert main(["eval", "grounding", "--model", str(tmp_path / "no-model"), "--data", str(data)]) == 2
    assert "image not found" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--max_new_tokens", "-1"], "--max_new_tokens must be >= 1, got -1"),
    (["--max_new_tokens", "3"], "--min_new_tokens must be in [0, --max_new_tokens = 3], got 10"),  # grounding's 10
    (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
])
def test_cli_checks_its_numbers_before_loading_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         flags: list[str], message: str) -> None:
    # were: the model loaded, then every sample failed and was scored as wrong
    from qwenvl.cli import main

    data = write_jsonl(tmp_path / "g.jsonl", [{"image": "gone.png", "sent": "x", "bbox": [0, 0, 1, 1]}])
    assert main(["eval", "grounding", "--model", str(tmp_path / "no-model"), "--data", str(data), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_cli_prompt_file_that_is_not_utf8_is_named(tmp_path: Path, image_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from qwenvl.cli import main

    data = write_jsonl(tmp_path / "g.jsonl", grounding_rows()[:1])
    (tmp_path / "prompt.txt").write_bytes(b"<img>{image}</img>caf\xe9 {expression}")  # Latin-1
    assert main(["eval", "grounding", "--model", str(tmp_path / "no-model"), "--data", str(data), "--image_dir",
                 str(image_dir), "--prompt_file", str(tmp_path / "prompt.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"qwenvl eval: error: --prompt_file {tmp_path / 'prompt.txt'}: not UTF-8 text"), err


@pytest.mark.parametrize("task", ["grounding", "vqa", "caption"])
def test_help_shows_the_data_format_with_a_two_line_example_also_in_the_readme(task: str, capsys,
                                                                               tmp_path: Path) -> None:
    from qwenvl.cli import main
    from qwenvl.eval.cli import DATA_FORMATS

    with pytest.raises(SystemExit):
        main(["eval", task, "--help"])
    shown = capsys.readouterr().out
    examples = [line for line in DATA_FORMATS[task].splitlines() if line.startswith("{")]
    assert len(examples) == 2 and all(line in shown for line in examples)
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    assert all(line in readme for line in examples)
    # and the examples are data the loader reads
    for line in examples:
        image = tmp_path / json.loads(line)["image"]
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (640, 640)).save(image, format="PNG")
    (tmp_path / "d.jsonl").write_text("\n".join(examples) + "\n")
    loaders = {"grounding": runners.load_grounding_data, "vqa": runners.load_vqa_data,
               "caption": runners.load_caption_data}
    assert len(loaders[task](tmp_path / "d.jsonl", tmp_path)) == 2


def test_cli_bad_line_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qwenvl.cli import main

    data = write_jsonl(tmp_path / "g.jsonl", ["{not json"])
    rc = main(["eval", "grounding", "--model", str(GOLDEN), "--data", str(data), "--no_progress"])
    assert rc == 2
    assert "g.jsonl:1: invalid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["vqa", "caption"])
def test_cli_vqa_and_caption(tmp_path: Path, task: str, capsys: pytest.CaptureFixture[str]) -> None:
    from qwenvl.cli import main

    row = {"image": "cat.png", "question": "What is it?", "answers": ["cat"] * 10} if task == "vqa" else \
        {"image": "cat.png", "captions": ["a cat"]}
    data = write_jsonl(tmp_path / "d.jsonl", [row, {**row, "image": "street.jpg"}])
    out = tmp_path / "out.json"
    rc = main(["eval", task, "--model", str(GOLDEN), "--data", str(data), "--image_dir", str(GOLDEN / "images"),
               "--output", str(out), "--max_new_tokens", "3", "--min_new_tokens", "1", "--batch_size", "2",
               "--device", "cpu", "--no_progress", "--limit", "1"])  # fmt: skip
    assert rc == 0
    saved = json.loads(out.read_text())
    assert saved["task"] == task and saved["num_samples"] == 1
    assert ("VQA accuracy" if task == "vqa" else "CIDEr") in capsys.readouterr().out


# ---- an interrupted run keeps its predictions -----------------------------------------------------------------


def _six_grounding_rows(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "g.jsonl", [
        {"image": "cat.png" if k % 2 else "street.jpg", "sent": f"thing {k}", "bbox": [10, 10, 100, 100],
         "height": 240, "width": 320} for k in range(6)
    ])  # fmt: skip


def _eval_args(data: Path, out: Path) -> list[str]:
    return ["eval", "grounding", "--model", str(GOLDEN), "--data", str(data), "--image_dir", str(GOLDEN / "images"),
            "--output", str(out), "--max_new_tokens", "3", "--min_new_tokens", "0", "--batch_size", "2",
            "--device", "cpu", "--no_progress"]  # fmt: skip


def read_partial(path: Path) -> tuple[dict, list[dict]]:
    """The header and the rows of an eval run's OUT.partial (JSON Lines, whole lines only)."""
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    header, *rows = [json.loads(line) for line in text.splitlines()]
    return header, rows


def _interrupt_generation_at_batch(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C in the ``n``-th call of ``qwenvl.generation.generate`` (the ``n``-th batch of an eval)."""
    import qwenvl.generation

    real, calls = qwenvl.generation.generate, []

    def generate(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(qwenvl.generation, "generate", generate)


def test_cli_interrupted_keeps_the_predictions_so_far(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    # Ctrl-C in the third batch: the first 4 predictions are already next to --output, under a name that says they
    # are partial (an existing file of that name is kept), one JSON line each; nothing is written at --output
    from qwenvl.cli import main

    _interrupt_generation_at_batch(3, monkeypatch)
    data, out = _six_grounding_rows(tmp_path), tmp_path / "out.json"
    (tmp_path / "out.json.partial").write_text("an earlier run's predictions")
    with caplog.at_level("INFO"):
        assert main(_eval_args(data, out)) == 130
    assert not out.exists() and (tmp_path / "out.json.partial").read_text() == "an earlier run's predictions"
    said = [r.getMessage() for r in caplog.records if "out.json.partial-2" in r.getMessage()]
    assert len(said) == 1 and re.fullmatch(
        rf"interrupted: the predictions for the first 4 of 6 samples are in {re.escape(str(tmp_path))}/out\.json\."
        r"partial-2 \(JSON Lines, to resume from; accuracy over those 4: [01]\.\d{4}\)", said[0]), said
    header, rows = read_partial(tmp_path / "out.json.partial-2")
    assert header == {"qwenvl_eval_partial": 1, "task": "grounding", "num_planned": 6, "settings": {
        "prompt": runners.GROUNDING_PROMPT, "max_new_tokens": 3, "min_new_tokens": 0, "chat_format": "raw"}}
    assert [r["sent"] for r in rows] == [f"thing {k}" for k in range(4)]
    assert all(set(r) == {"image", "sent", "bbox", "answer"} and isinstance(r["answer"], str) for r in rows)



def test_cli_partial_rows_are_one_line_each_for_str_splitlines(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # a sample's text holding U+2028, U+2029 or U+0085 was written as it is: str.splitlines (read_partial) broke
    # the row there; they are escaped, as data-convert's JSON Lines
    from qwenvl.cli import main

    _interrupt_generation_at_batch(2, monkeypatch)
    sents = ["a\u2028b", "c\u2029d\x85e", "f", "g"]
    data = write_jsonl(tmp_path / "g.jsonl", [
        {"image": "cat.png", "sent": s, "bbox": [10, 10, 100, 100], "height": 240, "width": 320} for s in sents
    ])  # fmt: skip
    assert main(_eval_args(data, tmp_path / "out.json")) == 130
    _, rows = read_partial(tmp_path / "out.json.partial")
    assert [r["sent"] for r in rows] == sents[:2]

@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_cli_terminated_keeps_the_predictions_so_far(tmp_path: Path, how: str) -> None:
    # a real SIGTERM from outside (a batch scheduler's cancel) while the third batch runs; or kill -9, after which
    # nothing of the process runs: the rows were on disk before
    import signal
    import subprocess
    import sys
    import time

    data, out, ready = _six_grounding_rows(tmp_path), tmp_path / "out.json", tmp_path / "ready"
    script = f"""
import sys, time
from pathlib import Path
import qwenvl.generation
real, calls = qwenvl.generation.generate, []
def generate(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        Path({str(ready)!r}).touch()
        time.sleep(120)
    return real(*args, **kwargs)
qwenvl.generation.generate = generate
from qwenvl.cli import main
sys.exit(main(sys.argv[1:]))
"""
    proc = subprocess.Popen([sys.executable, "-c", script, *_eval_args(data, out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=120)
    if how == "SIGTERM":
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert f"the predictions for the first 4 of 6 samples are in {tmp_path / 'out.json.partial'} (JSON Lines" in err
    else:
        assert proc.returncode == -signal.SIGKILL, err
    assert "Traceback" not in err and not out.exists()
    _, rows = read_partial(tmp_path / "out.json.partial")
    assert [r["sent"] for r in rows] == [f"thing {k}" for k in range(4)]


def test_runner_interrupted_in_the_first_batch_writes_nothing(tmp_path: Path, image_dir: Path) -> None:
    def gen(prompts: Sequence[str]) -> list[str]:
        raise KeyboardInterrupt

    data = write_jsonl(tmp_path / "g.jsonl", grounding_rows())
    with pytest.raises(KeyboardInterrupt):
        evaluate_grounding(data, generate_fn=gen, image_dir=image_dir, output=tmp_path / "o.json", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.jsonl", "imgs"]


def _output_write_fails(monkeypatch: pytest.MonkeyPatch, failing: set[str], error: BaseException) -> None:
    """The runners' atomic writes raise ``error`` for the file names in ``failing`` (a full disk there)."""
    real = runners.atomic_write_text

    def write(path: Path, text: str, **kwargs: object) -> Path:
        if Path(path).name in failing:
            raise error
        return real(path, text, **kwargs)

    monkeypatch.setattr(runners, "atomic_write_text", write)


def test_runner_keeps_the_predictions_when_the_output_cannot_be_written(tmp_path: Path, image_dir: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    # a full disk at the final write: the predictions are in OUT.partial already (said in one line, with the score
    # over them), the error goes on, the existing OUT stays whole, and resuming from OUT.partial writes OUT without
    # generating anything again
    import errno

    data, out = write_jsonl(tmp_path / "g.jsonl", grounding_rows()), tmp_path / "o.json"
    out.write_text("yesterday's results")
    full = OSError(errno.ENOSPC, "No space left on device", str(out))
    _output_write_fails(monkeypatch, {"o.json"}, full)
    gen = stub({"half": "(0,0),(499,999)</box>", "middle": "x", "nothing": "y"})
    with pytest.raises(OSError) as info, caplog.at_level("WARNING"):
        evaluate_grounding(data, generate_fn=gen, image_dir=image_dir, batch_size=3, output=out, progress=False)
    assert info.value is full and out.read_text() == "yesterday's results"
    kept = tmp_path / "o.json.partial"
    assert [r.getMessage() for r in caplog.records] == [
        f"[Errno 28] No space left on device: '{out}': the predictions for all 4 samples are in {kept} (JSON Lines, "
        "to resume from; accuracy over those 4: 0.2500)"]  # fmt: skip
    header, rows = read_partial(kept)
    assert header["num_planned"] == len(rows) == 4
    assert [r["sent"] for r in rows] == [r["sent"] for r in grounding_rows()]
    monkeypatch.undo()

    def nothing_left(prompts: Sequence[str]) -> list[str]:
        raise AssertionError("every answer is in the partial file")

    resumed = evaluate_grounding(data, generate_fn=nothing_left, image_dir=image_dir, output=out, progress=False,
                                 resume=kept)
    whole = evaluate_grounding(data, generate_fn=gen, image_dir=image_dir, progress=False)
    assert json.loads(out.read_text())["predictions"] == whole.predictions == resumed.predictions
    assert resumed.score == whole.score == 0.25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.jsonl", "imgs", "o.json"]  # o.json holds its rows


def test_runner_without_overwrite_never_replaces_an_output_file(tmp_path: Path, image_dir: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    # overwrite=False (the CLI without --overwrite): a file that appears at OUT while the run generates (another run
    # writing the same OUT, the user's) stays; the error names it and says where the predictions are (OUT.partial,
    # kept, from which a resumed run writes another output without generating again); one there at the start is
    # refused before anything is generated
    data, out = write_jsonl(tmp_path / "g.jsonl", grounding_rows()), tmp_path / "o.json"
    answers = stub({"half": "(0,0),(499,999)</box>", "middle": "x", "nothing": "y"})

    def gen(prompts: Sequence[str]) -> list[str]:
        if not out.exists():
            out.write_text("the other run's results")
        return answers(prompts)

    kept = tmp_path / "o.json.partial"
    with pytest.raises(FileExistsError) as info, caplog.at_level("WARNING"):
        evaluate_grounding(data, generate_fn=gen, image_dir=image_dir, batch_size=3, output=out, progress=False,
                           overwrite=False)
    assert str(info.value) == (f"the output file {out} was created by something else during the run and is left as "
                               f"it is; the predictions for all 4 samples are in {kept} (JSON Lines, to resume from; "
                               "accuracy over those 4: 0.2500)")
    assert caplog.records == []  # said once, in the error
    assert out.read_text() == "the other run's results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.jsonl", "imgs", "o.json", "o.json.partial"]
    answers.calls.clear()
    with pytest.raises(OutputDirError, match=f"the output file {out} exists; pass overwrite=True to replace it"):
        evaluate_grounding(data, generate_fn=gen, image_dir=image_dir, output=out, progress=False, overwrite=False)
    assert answers.calls == [] and out.read_text() == "the other run's results"

    def nothing_left(prompts: Sequence[str]) -> list[str]:
        raise AssertionError("every answer is in the partial file")

    mine = tmp_path / "mine.json"
    resumed = evaluate_grounding(data, generate_fn=nothing_left, image_dir=image_dir, output=mine, progress=False,
                                 resume=kept, overwrite=False)
    assert resumed.score == 0.25 and json.loads(mine.read_text())["predictions"] == resumed.predictions


def test_runner_keeps_the_rows_written_before_the_disk_filled_up(tmp_path: Path, image_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    # the disk fills up while the second batch's rows are written: the error is one line naming OUT.partial, the
    # half-written rows are cut off again, and the first batch's rows are whole and resumable
    import errno

    from qwenvl import outputs

    real, full = os.write, []

    def write(fd: int, data: bytes) -> int:  # the second batch's first row finds room for half of itself
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if b'"sent": "the middle"' in bytes(data):
            full.append(1)
            return real(fd, bytes(data[: len(data) // 2]))
        return real(fd, data)

    data, out = write_jsonl(tmp_path / "g.jsonl", grounding_rows()), tmp_path / "o.json"
    gen = stub({"half": "(0,0),(499,999)</box>", "middle": "x", "nothing": "y"})
    monkeypatch.setattr(outputs.os, "write", write)
    with pytest.raises(OSError) as info, caplog.at_level("WARNING"):
        evaluate_grounding(data, generate_fn=gen, image_dir=image_dir, batch_size=2, output=out, progress=False)
    monkeypatch.undo()
    kept = tmp_path / "o.json.partial"
    assert full and str(info.value) == f"[Errno 28] No space left on device: '{kept}'"
    assert [r.getMessage() for r in caplog.records] == [
        f"[Errno 28] No space left on device: '{kept}': the predictions for the first 2 of 4 samples are in {kept} "
        "(JSON Lines, to resume from; accuracy over those 2: 0.5000)"]  # fmt: skip
    _, rows = read_partial(kept)
    assert [r["sent"] for r in rows] == ["left half", "right half"] and not out.exists()
    gen.calls.clear()
    resumed = evaluate_grounding(data, generate_fn=gen, image_dir=image_dir, batch_size=2, output=out, progress=False,
                                 resume=kept)
    assert gen.calls == [["<img>b.png</img><ref>the middle</ref><box>", "<img>b.png</img><ref>nothing</ref><box>"]]
    whole = evaluate_grounding(data, generate_fn=gen, image_dir=image_dir, progress=False)
    assert resumed.predictions == whole.predictions == json.loads(out.read_text())["predictions"]


def test_runner_interrupted_in_the_final_write_keeps_every_prediction(tmp_path: Path, image_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    data, out = write_jsonl(tmp_path / "g.jsonl", grounding_rows()), tmp_path / "o.json"
    _output_write_fails(monkeypatch, {"o.json"}, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        evaluate_grounding(data, generate_fn=stub({"": "x"}), image_dir=image_dir, output=out, progress=False)
    header, rows = read_partial(tmp_path / "o.json.partial")
    assert not out.exists() and header["num_planned"] == len(rows) == 4


def _task_data(task: str, tmp_path: Path) -> tuple[Path, Any]:
    """Five samples of ``task`` and its runner."""
    if task == "grounding":
        rows = [{"image": "ab"[k % 2] + ".png", "sent": f"thing {k}", "bbox": [0, 0, 50, 50]} for k in range(5)]
        return write_jsonl(tmp_path / "d.jsonl", rows), evaluate_grounding
    if task == "vqa":
        rows = [{"image": "a.png", "question": f"thing {k}?", "answers": ["yes", "no"]} for k in range(5)]
        return write_jsonl(tmp_path / "d.jsonl", rows), evaluate_vqa
    rows = [{"image": "ab"[k % 2] + ".png", "captions": [f"a thing {k}", "a picture"]} for k in range(5)]
    return write_jsonl(tmp_path / "d.jsonl", rows), evaluate_caption


@pytest.mark.parametrize("task", ["grounding", "vqa", "caption"])
def test_a_crash_keeps_the_rows_and_resuming_from_them_generates_only_the_rest(
        tmp_path: Path, image_dir: Path, task: str, caplog: pytest.LogCaptureFixture) -> None:
    # a CUDA error, a bug: any exception after two batches leaves their rows in OUT.partial; resuming from that file
    # while a new OUT.partial is written (OUT.partial-2: the file resumed from is not touched while the run goes)
    # generates the rest and gives the output of one uninterrupted run; then both partial files are gone
    data, evaluate = _task_data(task, tmp_path)

    def answer(prompts: Sequence[str]) -> list[str]:  # caption prompts differ only in their image
        return ["(0,0),(499,999)</box>" if "a.png" in p else " a picture " for p in prompts]

    calls: list[list[str]] = []

    def crash_in_the_third_batch(prompts: Sequence[str]) -> list[str]:
        calls.append(list(prompts))
        if len(calls) == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return answer(prompts)

    out, kept = tmp_path / "o.json", tmp_path / "o.json.partial"
    with pytest.raises(RuntimeError, match="CUDA error"), caplog.at_level("WARNING"):
        evaluate(data, generate_fn=crash_in_the_third_batch, image_dir=image_dir, batch_size=2, output=out,
                 progress=False)
    metric = "cider" if task == "caption" else "accuracy"
    assert len(caplog.records) == 1 and re.fullmatch(
        rf"CUDA error: an illegal memory access was encountered: the predictions for the first 4 of 5 samples are in "
        rf"{re.escape(str(kept))} \(JSON Lines, to resume from; {metric} over those 4: \d+\.\d{{4}}\)",
        caplog.records[0].getMessage()), caplog.records[0].getMessage()
    header, rows = read_partial(kept)
    assert (header["qwenvl_eval_partial"], header["task"], header["num_planned"], len(rows)) == (1, task, 5, 4)
    assert not out.exists()
    before = kept.read_bytes()

    def the_rest(prompts: Sequence[str]) -> list[str]:  # the file being written holds every row resumed from
        calls.append(list(prompts))
        assert read_partial(tmp_path / "o.json.partial-2")[1] == rows and kept.read_bytes() == before
        return answer(prompts)

    calls.clear()
    resumed = evaluate(data, generate_fn=the_rest, image_dir=image_dir, batch_size=2, output=out, progress=False,
                       resume=kept)
    assert calls == [[runners.fill_prompt(p, image="a.png", expression="thing 4", question="thing 4?")
                      for p in [{"grounding": runners.GROUNDING_PROMPT, "vqa": runners.VQA_PROMPT,
                                 "caption": runners.CAPTION_PROMPT}[task]]]]
    whole = evaluate(data, generate_fn=answer, image_dir=image_dir, batch_size=2, progress=False)
    assert json.loads(out.read_text()) == whole.to_dict() == resumed.to_dict()
    assert not kept.exists() and not (tmp_path / "o.json.partial-2").exists()  # OUT holds every row of both
    # the Python API without an output keeps no file, crashed or not
    calls.clear()
    with pytest.raises(RuntimeError):
        evaluate(data, generate_fn=crash_in_the_third_batch, image_dir=image_dir, batch_size=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "imgs", "o.json"]


# ---- scale: each image is checked once, however many samples name it --------------------------------------------


@pytest.mark.parametrize("task", ["grounding", "vqa", "caption"])
def test_each_image_path_is_resolved_and_sized_once(tmp_path: Path, image_dir: Path, task: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # VQAv2 has 5 questions an image, RefCOCO several expressions: 100k samples took a minute of path checks
    # (resolve, realpath, stat; for grounding without a size also a header read) per sample before the model loads
    from qwenvl.images import MediaPolicy

    resolved, sized = [], []
    resolve, read_size = MediaPolicy.resolve, runners._read_size
    monkeypatch.setattr(MediaPolicy, "resolve", lambda self, p: resolved.append(p) or resolve(self, p))
    monkeypatch.setattr(runners, "_read_size", lambda path, where: sized.append(path) or read_size(path, where))
    row = {"grounding": {"sent": "x", "bbox": [0, 0, 10, 10]}, "vqa": {"question": "q?", "answers": ["a", "b"]},
           "caption": {"captions": ["a cat"]}}[task]
    data = write_jsonl(tmp_path / "d.jsonl", [{**row, "image": "ab"[k % 2] + ".png"} for k in range(200)])
    loader = {"grounding": runners.load_grounding_data, "vqa": runners.load_vqa_data,
              "caption": runners.load_caption_data}[task]
    records = loader(data, image_dir)
    assert len(records) == 200 and sorted(resolved) == ["a.png", "b.png"]
    assert len(sized) == (2 if task == "grounding" else 0)
    if task == "grounding":  # the sizes are each image's own
        assert [(r.width, r.height) for r in records[:2]] == [(200.0, 100.0), (100.0, 100.0)]


def test_cli_checks_each_image_against_the_output_once(tmp_path: Path, image_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from qwenvl.cli import main
    from qwenvl.images import MediaPolicy

    resolved = []
    resolve = MediaPolicy.resolve
    monkeypatch.setattr(MediaPolicy, "resolve", lambda self, p: resolved.append(p) or resolve(self, p))
    rows = [{"image": "ab"[k % 2] + ".png", "question": "q?", "answers": ["a", "b"]} for k in range(200)]
    data = write_jsonl(tmp_path / "v.jsonl", rows)
    argv = ["eval", "vqa", "--model", str(tmp_path / "no-model"), "--data", str(data), "--image_dir", str(image_dir)]
    assert main([*argv, "--output", str(tmp_path / "out.json")]) == 2
    assert "checkpoint folder not found" in capsys.readouterr().err  # every check passed, up to the model
    assert sorted(resolved) == ["a.png", "a.png", "b.png", "b.png"]  # the loader's, then the output check's
    # and the output is still refused when it is one of the images, named by the first sample that reads it
    assert main([*argv, "--output", str(image_dir / "b.png"), "--overwrite"]) == 2
    assert f"the output file {image_dir / 'b.png'} is the image of {data}:2 " in capsys.readouterr().err


# ---- resuming an interrupted run --------------------------------------------------------------------------------


def test_cli_resume_from_the_partial_file_generates_only_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    # stopped twice: the run resumed from OUT.partial writes its rows (the resumed ones first) to OUT.partial-2 and
    # says so; resumed from that, the third run generates only the rest and gives the output of one whole run
    import qwenvl.generation
    from qwenvl.cli import main

    real, calls, stop = qwenvl.generation.generate, [], [2]

    def generate(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(args[1].shape[0])  # the batch's prompts
        if len(calls) == stop[0]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(qwenvl.generation, "generate", generate)
    data, out = _six_grounding_rows(tmp_path), tmp_path / "out.json"
    first, second = tmp_path / "out.json.partial", tmp_path / "out.json.partial-2"
    assert main(_eval_args(data, out)) == 130  # 2 of 6 answered
    assert len(read_partial(first)[1]) == 2
    before = first.read_bytes()
    calls.clear()
    # the same command again: it starts over, saying how to go on instead (it did so without a word)
    with caplog.at_level("WARNING"):
        assert main(_eval_args(data, out)) == 130
    assert (f"{out}.partial holds the predictions of an earlier run that stopped: add --resume_from {out}.partial to "
            "generate only the rest (this run starts over and keeps that file)") in caplog.text
    assert first.read_bytes() == before
    second.unlink()  # that run's own rows
    calls.clear()
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main([*_eval_args(data, out), "--resume_from", str(first)]) == 130  # 2 more answered
    assert calls == [2, 2] and first.read_bytes() == before  # a failed run keeps the file it resumed from
    assert ("resuming: the answers to the first 2 of 6 samples are the earlier run's (this run keeps them, with its "
            f"own, in {second})") in caplog.text
    assert f"interrupted: the predictions for the first 4 of 6 samples are in {second} (JSON Lines" in caplog.text
    assert [r["sent"] for r in read_partial(second)[1]] == [f"thing {k}" for k in range(4)]
    calls.clear()
    stop[0] = 0
    with caplog.at_level("INFO"):
        assert main([*_eval_args(data, out), "--resume_from", str(second)]) == 0
    assert calls == [2]  # only the last two samples were generated
    resumed = json.loads(out.read_text())
    assert "partial" not in resumed and resumed["num_samples"] == 6
    # the file resumed from is gone (OUT holds its rows; as the run's own OUT.partial-3); the earlier OUT.partial,
    # which this run did not read, stays
    assert not (tmp_path / "out.json.partial-3").exists() and not second.exists() and first.read_bytes() == before
    assert f"removed {second}, resumed from: its 4 rows are in {out}" in caplog.text
    # the same predictions and score as one uninterrupted run
    calls.clear()
    assert main([*_eval_args(data, tmp_path / "whole.json")]) == 0 and calls == [2, 2, 2]
    whole = json.loads((tmp_path / "whole.json").read_text())
    assert resumed == whole
    capsys.readouterr()


@pytest.mark.parametrize(("change", "message"), [
    (["--max_new_tokens", "4"], "the run to resume from used max_new_tokens 3, this one 4"),
    (["--data", "OTHER"], "prediction 1 of the run to resume from is not for sample 1 of this data (OTHER:2)"),
    (["--prompt", "<img>{image}</img>{expression}"], "the run to resume from used prompt"),
])
@pytest.mark.parametrize("earlier", ["output", "partial"])
def test_cli_resume_from_another_run_is_refused_before_the_model_loads(tmp_path: Path, image_dir: Path,
                                                                       capsys: pytest.CaptureFixture[str],
                                                                       change: list[str], message: str,
                                                                       earlier: str) -> None:
    from qwenvl.cli import main

    rows = grounding_rows()
    data = write_jsonl(tmp_path / "g.jsonl", rows)
    other = write_jsonl(tmp_path / "other.jsonl", [rows[0], rows[2], rows[1]])
    gen = stub({"left": "(0,0),(499,999)</box>", "right": "(0,0),(9,9)</box>", "middle": "x", "nothing": "y"})
    resume_from = tmp_path / "r.json"
    if earlier == "partial":  # the rows a run left in r.json.partial when it crashed in its third batch
        resume_from = tmp_path / "r.json.partial"
        gen = _crash_in_batch(3, gen)
    with pytest.raises(RuntimeError) if earlier == "partial" else contextlib.nullcontext():
        evaluate_grounding(data, generate_fn=gen, image_dir=image_dir, max_new_tokens=3, min_new_tokens=0,
                           output=tmp_path / "r.json", progress=False, batch_size=1)
    change = [str(other) if c == "OTHER" else c for c in change]
    argv = ["eval", "grounding", "--model", str(tmp_path / "no-model"), "--data", str(data), "--image_dir",
            str(image_dir), "--max_new_tokens", "3", "--min_new_tokens", "0", "--resume_from", str(resume_from)]
    assert main([*argv, *change]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"qwenvl eval: error: --resume_from {resume_from}: ") and len(err.splitlines()) == 1
    assert message.replace("OTHER", str(other)) in err, err
    assert main(argv) == 2  # unchanged: every check passed, up to the model
    assert "checkpoint folder not found" in capsys.readouterr().err


def _crash_in_batch(n: int, gen):  # noqa: ANN001, ANN202
    calls: list[int] = []

    def run(prompts: Sequence[str]) -> list[str]:
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("crash")
        return gen(prompts)

    return run


_HEADER = {"qwenvl_eval_partial": 1, "task": "grounding", "num_planned": 4,
           "settings": {"prompt": runners.GROUNDING_PROMPT, "max_new_tokens": 28, "min_new_tokens": 10,
                        "chat_format": "raw"}}
_ROW = {"image": "a.png", "sent": "left half", "bbox": [0, 0, 100, 100], "answer": "x"}


@pytest.mark.parametrize(("lines", "message"), [
    ([_HEADER, _ROW, '{"image": "a.png", "sent": "right h'], "PARTIAL:3: invalid JSON: "),
    ([_HEADER, _ROW, "[1, 2]"], "PARTIAL:3: expected a JSON object, got list"),
    ([_HEADER, {**_ROW, "answer": None}], "PARTIAL:2: not a row of a qwenvl eval partial file (it needs 'answer', a "
                                          "string)"),
    ([{k: v for k, v in _HEADER.items() if k != "qwenvl_eval_partial"}, _ROW],
     "PARTIAL:1: not the header of a qwenvl eval partial file (no 'qwenvl_eval_partial'), and the file is not the "
     "output JSON of qwenvl eval either"),
    ([{**_HEADER, "qwenvl_eval_partial": 2}, _ROW], "PARTIAL:1: not the header of a qwenvl eval partial file of "
                                                     "format 1"),
    ([{**_HEADER, "settings": None}, _ROW], "PARTIAL:1: not the header of a qwenvl eval partial file of format 1"),
    ([{**_HEADER, "task": "vqa"}, _ROW], "--resume_from PARTIAL: the run to resume from is not the output of a "
                                         "grounding evaluation"),
    ([{**_HEADER, "settings": {**_HEADER["settings"], "min_new_tokens": 0}}, _ROW],
     "--resume_from PARTIAL: the run to resume from used min_new_tokens 0, this one 10"),
    ([_HEADER, {**_ROW, "sent": "right half"}], "--resume_from PARTIAL: prediction 0 of the run to resume from is "
                                                "not for sample 0 of this data (DATA:1)"),
    ([], "PARTIAL: not valid JSON: Expecting value at line 1"),
])
def test_cli_a_damaged_partial_file_is_one_line_naming_it(tmp_path: Path, image_dir: Path, lines: list,
                                                          message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from qwenvl.cli import main

    data = write_jsonl(tmp_path / "g.jsonl", grounding_rows())
    partial = write_jsonl(tmp_path / "o.json.partial", lines)
    argv = ["eval", "grounding", "--model", str(tmp_path / "no-model"), "--data", str(data), "--image_dir",
            str(image_dir), "--resume_from", str(partial)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("qwenvl eval: error: " + message.replace("PARTIAL", str(partial)).replace("DATA", str(data)))
    with pytest.raises(EvalDataError):  # the API reads the file the same way
        evaluate_grounding(data, generate_fn=stub({"": "x"}), image_dir=image_dir, resume=partial, progress=False)


def test_runner_resume_keeps_the_earlier_answers_and_errors(tmp_path: Path, image_dir: Path) -> None:
    data = write_jsonl(tmp_path / "v.jsonl", [
        {"image": "a.png", "question": f"q{k}", "answers": ["yes", "yes", "no"], "question_id": k} for k in range(5)
    ])  # fmt: skip
    earlier = {"task": "vqa", "settings": {"prompt": runners.VQA_PROMPT, "max_new_tokens": 10, "min_new_tokens": 1,
                                           "chat_format": "raw"},
               "predictions": [{"question_id": 0, "image": "a.png", "question": "q0", "answer": "yes"},
                               {"question_id": 1, "image": "a.png", "question": "q1", "answer": "", "error": "bad"}]}
    # the same run as a dict, as an earlier version's scored OUT.partial (an output JSON) and as a partial file
    scored = tmp_path / "old.json.partial"
    scored.write_text(json.dumps({**earlier, "partial": True, "num_planned": 5}, indent=1))
    rows = write_jsonl(tmp_path / "o.json.partial", [
        {"qwenvl_eval_partial": 1, "task": "vqa", "settings": earlier["settings"], "num_planned": 5},
        *earlier["predictions"]])  # fmt: skip
    for resume in (earlier, scored, str(rows)):
        gen = stub({"q": "no"})
        result = evaluate_vqa(data, generate_fn=gen, image_dir=image_dir, resume=resume, progress=False)
        assert [p["answer"] for p in result.predictions] == ["yes", "", "no", "no", "no"]
        assert result.predictions[1]["error"] == "bad" and result.details["num_errors"] == 1
        assert gen.calls == [["<img>a.png</img>q2 Answer:", "<img>a.png</img>q3 Answer:", "<img>a.png</img>q4 Answer:"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "o.json.partial", "old.json.partial", "v.jsonl"]


def test_runner_resume_from_a_complete_output(tmp_path: Path, image_dir: Path) -> None:
    data, out = write_jsonl(tmp_path / "g.jsonl", grounding_rows()), tmp_path / "o.json"
    gen = stub({"half": "(0,0),(499,999)</box>", "middle": "x", "nothing": "y"})
    done = evaluate_grounding(data, generate_fn=gen, image_dir=image_dir, output=out, progress=False)
    gen.calls.clear()
    again = evaluate_grounding(data, generate_fn=gen, image_dir=image_dir, output=tmp_path / "again.json",
                               progress=False, resume=out)
    assert gen.calls == [] and again.to_dict() == done.to_dict() == json.loads((tmp_path / "again.json").read_text())


def _resume_case(tmp_path: Path, image_dir: Path) -> tuple[Path, Path, Path, Any]:
    """Grounding data of 5 samples, the output path, the OUT.partial of a run that crashed after 4, and a stub."""
    data, evaluate = _task_data("grounding", tmp_path)
    gen = stub({"": "(0,0),(499,999)</box>"})
    out, calls = tmp_path / "o.json", []

    def crash_in_the_third_batch(prompts: Sequence[str]) -> list[str]:
        calls.append(prompts)
        if len(calls) == 3:
            raise RuntimeError("CUDA error")
        return gen(prompts)

    with pytest.raises(RuntimeError, match="CUDA error"):
        evaluate(data, generate_fn=crash_in_the_third_batch, image_dir=image_dir, batch_size=2, output=out,
                 progress=False)
    return data, out, tmp_path / "o.json.partial", gen


def test_the_partial_file_resumed_from_goes_only_when_the_output_holds_its_rows(
        tmp_path: Path, image_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    # it was always left behind, for the user to delete; now it goes, but never a file that holds rows the output
    # does not (a resumed run with a lower limit), a complete output, or a file of another name, folder or kind
    data, out, kept, gen = _resume_case(tmp_path, image_dir)
    before = kept.read_bytes()
    records = runners.load_grounding_data(data, image_dir)
    with caplog.at_level("INFO", logger="qwenvl.eval.runners"):  # its 4 rows, 3 samples: the 4th is not in OUT
        evaluate_grounding(records[:3], generate_fn=gen, image_dir=image_dir, output=out, progress=False, resume=kept)
    assert kept.read_bytes() == before and json.loads(out.read_text())["num_samples"] == 3
    assert f"kept {kept}: it holds rows that {out} does not" in caplog.text
    # what the API was given as rows, not as a path, is not a file to remove
    evaluate_grounding(data, generate_fn=gen, image_dir=image_dir, output=out, progress=False,
                       resume=runners.read_resume(kept))
    assert kept.read_bytes() == before
    # a copy of it under another name, or in another folder, or a link named OUT.partial-2: kept
    other = tmp_path / "elsewhere"
    other.mkdir()
    for copy in (tmp_path / "saved.partial", tmp_path / "o.json.partial-old", other / "o.json.partial"):
        copy.write_bytes(before)
        evaluate_grounding(data, generate_fn=gen, image_dir=image_dir, output=out, progress=False, resume=copy)
        assert copy.read_bytes() == before
    link = tmp_path / "o.json.partial-2"
    link.symlink_to(kept)
    evaluate_grounding(data, generate_fn=gen, image_dir=image_dir, output=out, progress=False, resume=link)
    assert link.is_symlink() and kept.read_bytes() == before
    link.unlink()
    # a complete output resumed from (given another output) is never removed, even under a partial file's name
    complete = tmp_path / "o2.json.partial"
    complete.write_bytes(out.read_bytes())
    evaluate_grounding(data, generate_fn=gen, image_dir=image_dir, output=tmp_path / "o2.json", progress=False,
                       resume=complete)
    assert complete.read_bytes() == out.read_bytes()
    # a run that fails keeps both files: the one it resumed from and its own
    with pytest.raises(RuntimeError, match="disk full"):
        evaluate_grounding(data, generate_fn=lambda p: (_ for _ in ()).throw(RuntimeError("disk full")),
                           image_dir=image_dir, output=out, progress=False, resume=kept, batch_size=1)
    assert kept.read_bytes() == before and len(read_partial(tmp_path / "o.json.partial-2")[1]) == 4
    (tmp_path / "o.json.partial-2").unlink()
    # OUT.partial itself, with every row in OUT: removed once OUT is written
    evaluate_grounding(data, generate_fn=gen, image_dir=image_dir, output=out, progress=False, resume=kept)
    assert not kept.exists() and not (tmp_path / "o.json.partial-2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "elsewhere", "imgs", "o.json", "o.json.partial-old",
                                                          "o2.json", "o2.json.partial", "saved.partial"]


def test_the_partial_file_resumed_from_is_read_once_to_be_removed(tmp_path: Path, image_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # its header was read, then the whole file again
    _, out, kept, _ = _resume_case(tmp_path, image_dir)
    earlier = runners.read_resume(kept)  # its rows, as the run that resumed from it would have them
    opened: list[Path] = []
    real_open = Path.open

    def counting_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        opened.append(self)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", counting_open)
    assert runners.remove_resumed_partial(kept, out, "grounding", earlier["settings"], earlier["predictions"])
    assert opened.count(kept) == 1 and not kept.exists()


@pytest.mark.parametrize("task", ["vqa", "caption"])
def test_cli_writes_text_that_is_not_valid_unicode_as_it_came(tmp_path: Path, task: str, capsys) -> None:
    # a lone surrogate (JSON "\ud800") in a question or caption: the UTF-8 write of OUT.partial (the first batch)
    # and of OUT (the end of a long run) failed with UnicodeEncodeError; such rows are written in ASCII escapes
    from qwenvl.cli import main

    odd = "What is \ud800?"
    row = {"image": "cat.png", "question": odd, "answers": ["cat"] * 10} if task == "vqa" else \
        {"image": "cat.png", "captions": [odd, "a cat"]}
    data = write_jsonl(tmp_path / "d.jsonl", [row, {**row, "image": "street.jpg"}])
    out = tmp_path / "out.json"
    assert main(["eval", task, "--model", str(GOLDEN), "--data", str(data), "--image_dir", str(GOLDEN / "images"),
                 "--output", str(out), "--max_new_tokens", "2", "--min_new_tokens", "1", "--batch_size", "1",
                 "--device", "cpu", "--no_progress"]) == 0, capsys.readouterr().err  # fmt: skip
    first = json.loads(out.read_text(encoding="utf-8"))["predictions"][0]
    assert first["question"] == odd if task == "vqa" else first["references"] == [odd, "a cat"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "out.json"]  # the partial file went


def test_runner_keeps_rows_that_are_not_valid_unicode_in_the_partial_file(tmp_path: Path, image_dir: Path) -> None:
    # interrupted after the first batch: its row, with a lone surrogate, is in OUT.partial, and resuming reads it
    calls = []

    def gen(prompts: Sequence[str]) -> list[str]:
        calls.append(prompts)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return ["2"] * len(prompts)

    odd = "How many \ud800?"
    data = write_jsonl(tmp_path / "v.jsonl", [{"image": "a.png", "question": odd, "answers": ["2"] * 10},
                                              {"image": "b.png", "question": "Color?", "answers": ["red"] * 10}])
    out = tmp_path / "o.json"
    with pytest.raises(KeyboardInterrupt):
        evaluate_vqa(data, generate_fn=gen, image_dir=image_dir, batch_size=1, output=out, progress=False)
    _, rows = read_partial(tmp_path / "o.json.partial")
    assert [r["question"] for r in rows] == [odd]
    result = evaluate_vqa(data, generate_fn=stub({"Color": "red"}), image_dir=image_dir, output=out,
                          progress=False, resume=tmp_path / "o.json.partial")
    assert [p["question"] for p in result.predictions] == [odd, "Color?"] and result.score == 1.0
    assert json.loads(out.read_text(encoding="utf-8"))["predictions"][0]["question"] == odd
