"""What the README says about evaluation data, checked where it was not: captioning data is JSON Lines whatever
the file is called (as grounding and VQA data are); only a .json holding COCO's images/annotations is read as
COCO."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwenvl.eval import runners
from qwenvl.eval.runners import EvalDataError


@pytest.mark.parametrize("lines", [1, 2])
def test_caption_json_lines_named_json_are_read_as_json_lines(tmp_path: Path, image_dir: Path, lines: int) -> None:
    """``captions.json`` holding the README's JSONL lines was refused ("not valid JSON: Extra data", or "must hold
    'images' and 'annotations'" for one line) while grounding and VQA data of any name were read."""
    rows = [{"image": "a.png", "captions": ["white"], "id": 7}, {"image": "b.png", "captions": ["gray"]}][:lines]
    data = tmp_path / "captions.json"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    records = runners.load_caption_data(data, image_dir)
    assert [(r.id, r.image, r.captions, r.where) for r in records] == \
        [(7, "a.png", ["white"], f"{data}:1"), (1, "b.png", ["gray"], f"{data}:2")][:lines]


def test_a_broken_coco_json_is_still_named_as_json(tmp_path: Path, image_dir: Path) -> None:
    data = tmp_path / "coco.json"
    data.write_text('{"images": [{"id": 1, "file_name": "a.png"}],\n "annotations": [}', encoding="utf-8")
    with pytest.raises(EvalDataError, match=r"coco\.json: not valid JSON: .* at line 2"):
        runners.load_caption_data(data, image_dir)
    data.write_text(json.dumps({"images": [], "captions": []}), encoding="utf-8")  # neither COCO nor a caption line
    with pytest.raises(EvalDataError, match=r"coco\.json: a \.json caption file must hold 'images' and 'annotations'"):
        runners.load_caption_data(data, image_dir)
