"""LLaVA -> Qwen-VL conversion: exact output, summary counts, bad inputs."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from qwenvl.data.convert import ConvertSummary, MalformedRecord, convert_llava, convert_records
from qwenvl.outputs import OutputDirError

PREFIX = "train2014/COCO_train2014_"
PIC = "Picture 1: <img>train2014/COCO_train2014_{}</img>\n"

RECORDS: list[Any] = [
    {  # 0: the usual shape
        "id": "000000215677",
        "image": "000000215677.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": "A red bus."},
            {"from": "human", "value": "Is it moving?"},
            {"from": "gpt", "value": "No."},
        ],
    },
    {  # 1: image file absent
        "id": "000000000001",
        "image": "000000000001.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe it."},
            {"from": "gpt", "value": "A cat."},
        ],
    },
    {  # 2: malformed: unknown speaker
        "id": "000000000002",
        "image": "000000000002.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nHi"},
            {"from": "robot", "value": "beep"},
        ],
    },
    {  # 3: text-only
        "id": "text-3",
        "conversations": [
            {"from": "human", "value": "What is 2+2?"},
            {"from": "gpt", "value": "4, déjà vu."},
        ],
    },
    {  # 4: tag at the end of the question
        "id": "000000000004",
        "image": "000000000004.jpg",
        "conversations": [
            {"from": "human", "value": "What colour is the car?\n<image>"},
            {"from": "gpt", "value": "Blue."},
        ],
    },
]

EXPECTED = [
    {
        "id": "000000215677",
        "conversations": [
            {"from": "user", "value": PIC.format("000000215677.jpg") + "What is in the picture?"},
            {"from": "assistant", "value": "A red bus."},
            {"from": "user", "value": "Is it moving?"},
            {"from": "assistant", "value": "No."},
        ],
    },
    {
        "id": "text-3",
        "conversations": [
            {"from": "user", "value": "What is 2+2?"},
            {"from": "assistant", "value": "4, déjà vu."},
        ],
    },
    {
        "id": "000000000004",
        "conversations": [
            {"from": "user", "value": PIC.format("000000000004.jpg") + "What colour is the car?"},
            {"from": "assistant", "value": "Blue."},
        ],
    },
]


def _write(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    (root / "train2014").mkdir(parents=True)
    for name in ("000000215677.jpg", "000000000002.jpg", "000000000004.jpg"):
        (root / (PREFIX + name)).write_bytes(b"\xff\xd8\xff")
    return root


def test_converts_llava_file(tmp_path: Path, images: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = _write(tmp_path / "detail.json", RECORDS)
    out = tmp_path / "out" / "qwen.json"
    with caplog.at_level(logging.INFO, logger="qwenvl.data.convert"):
        summary = convert_llava(src, images, out)
    assert not caplog.records  # the summary is returned (the CLI prints it once), not logged a second time

    # Exact bytes: UTF-8 (no \u escapes), one-space indent, trailing newline.
    assert out.read_text(encoding="utf-8") == json.dumps(EXPECTED, ensure_ascii=False, indent=1) + "\n"
    assert "déjà vu" in out.read_text(encoding="utf-8")
    missing = str(images / (PREFIX + "000000000001.jpg"))
    assert summary == ConvertSummary(
        total=5,
        written=3,
        text_only=1,
        untagged=0,
        missing_images=1,
        missing_image_examples=[missing],
        malformed=[
            MalformedRecord(
                2, "000000000002", "turn 1 has unknown 'from' 'robot' (expected 'human' or 'gpt')"
            )
        ],
        output_path=out,
    )
    assert str(summary) == (
        "5 records read, 3 written (1 text-only, 0 with an untagged image), 1 dropped for a missing image, "
        "1 malformed skipped\n"
        f"missing images: {missing}\n"
        "malformed record 2 (id='000000000002'): turn 1 has unknown 'from' 'robot' (expected 'human' or 'gpt')"
    )
    # The input is not modified, and nothing but the output is left in its folder.
    assert json.loads(src.read_text(encoding="utf-8")) == RECORDS
    assert sorted(p.name for p in out.parent.iterdir()) == ["qwen.json"]


def test_role_names_and_prefix(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"x")
    rec = {
        "id": 7,
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>Look."}, {"from": "gpt", "value": "Ok."}],
    }
    converted, summary = convert_records([rec], tmp_path, "user", "assistant", image_prefix="imgs/")
    assert converted == [
        {
            "id": 7,
            "conversations": [
                {"from": "user", "value": "Picture 1: <img>imgs/a.png</img>\nLook."},
                {"from": "assistant", "value": "Ok."},
            ],
        }
    ]
    assert (summary.written, summary.text_only, summary.malformed) == (1, 0, [])
    # other names (MindFormers pairs them with its training config's) write a file that finetune refuses, every
    # record a bad one ("unknown role 'Human'"): said; swapped ones would train the model on the questions: refused
    with caplog.at_level("WARNING", logger="qwenvl.data.convert"):
        converted, _ = convert_records([rec], tmp_path, "Human", "assistant", image_prefix="imgs/")
    assert converted[0]["conversations"][0]["from"] == "Human"
    assert [r.getMessage() for r in caplog.records] == [
        "user_role_name 'Human': qwenvl finetune reads only the roles 'user' and 'assistant' (the ChatML roles of "
        "Qwen-VL-Chat) and will refuse this file; it is for another trainer"]
    for roles in (("assistant", "user"), ("a", "a")):
        with pytest.raises(ValueError, match="the questions would be taken for answers"):
            convert_records([rec], tmp_path, *roles, image_prefix="imgs/")


@pytest.mark.parametrize(
    ("value", "expected", "mindformers"),
    [
        ("<image>\nQ?", "{P}Q?", "{P}Q?"),
        # the picture line starts the turn (as LLaVA trains); MindFormers glues it to the question
        ("Describe it in detail.\n<image>", "{P}Describe it in detail.", "Describe it in detail.{P}"),
        ("Q? <image> more", "{P}Q?  more", "Q? {P} more"),  # bare tag
        ("<image>", "{P}", "{P}"),
        ("<image>\nQ?\n", "{P}Q?\n", "{P}Q?\n"),
    ],
)
def test_image_tag_forms(tmp_path: Path, value: str, expected: str, mindformers: str) -> None:
    (tmp_path / "x.jpg").write_bytes(b"x")
    rec = {"id": "r", "image": "x.jpg", "conversations": [{"from": "human", "value": value}]}
    pic = "Picture 1: <img>x.jpg</img>\n"
    converted, _ = convert_records([rec], tmp_path, image_prefix="")
    assert converted[0]["conversations"][0]["value"] == expected.replace("{P}", pic)
    converted, _ = convert_records([rec], tmp_path, image_prefix="", tag_in_place=True)
    assert converted[0]["conversations"][0]["value"] == mindformers.replace("{P}", pic)


def test_data_convert_command_prints_the_summary_once(tmp_path: Path, images: Path, capsys) -> None:
    from qwenvl.cli import main

    src = _write(tmp_path / "detail.json", RECORDS)
    assert main(["data-convert", "--data_path", str(src), "--image_location", str(images), "--output_path",
                 str(tmp_path / "qwen.json")]) == 0
    out, err = capsys.readouterr()
    assert out.count("5 records read, 3 written") == 1 and "5 records read" not in err


def test_untagged_image_goes_to_first_user_turn(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"x")
    rec = {
        "id": "r",
        "image": "x.jpg",
        "extra": [1],
        "conversations": [{"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Describe."}],
    }
    converted, summary = convert_records([rec], tmp_path, image_prefix="")
    assert converted == [
        {
            "id": "r",
            "extra": [1],
            "conversations": [
                {"from": "assistant", "value": "Hello."},
                {"from": "user", "value": "Picture 1: <img>x.jpg</img>\nDescribe."},
            ],
        }
    ]
    assert summary.untagged == 1


BAD: list[tuple[Any, str]] = [
    ("not a dict", "expected an object, got str"),
    ({"id": "a"}, "'conversations' is missing, not a list or empty"),
    ({"id": "b", "conversations": []}, "'conversations' is missing, not a list or empty"),
    ({"id": "c", "conversations": [{"from": "human"}]}, "turn 0 needs string 'from' and 'value'"),
    ({"id": "d", "conversations": [{"value": "hi"}]}, "turn 0 needs string 'from' and 'value'"),
    ({"id": "e", "conversations": ["hi"]}, "turn 0 is not an object"),
    (
        {"id": "f", "conversations": [{"from": "system", "value": "hi"}]},
        "turn 0 has unknown 'from' 'system' (expected 'human' or 'gpt')",
    ),
    (
        {"id": "g", "image": "", "conversations": [{"from": "human", "value": "hi"}]},
        "'image' must be a non-empty string, got ''",
    ),
    (
        {"id": "h", "conversations": [{"from": "human", "value": "<image>\nhi"}]},
        "turn 0 has an <image> tag but the record has no 'image'",
    ),
    (
        {
            "id": "i",
            "image": "x.jpg",
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image>\nthere"}],
        },
        "turn 1 ('gpt') has an <image> tag; only human turns may",
    ),
    (
        {
            "id": "j",
            "image": "x.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nhi"},
                {"from": "human", "value": "<image>\nagain"},
            ],
        },
        "2 <image> tags; a record holds at most one image",
    ),
    (
        {"id": "k", "image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\n<image>\nhi"}]},
        "2 <image> tags; a record holds at most one image",
    ),
    (
        {"id": "l", "image": "x.jpg", "conversations": [{"from": "gpt", "value": "hi"}]},
        "the record has an 'image' but no human turn to show it in",
    ),
]


def test_malformed_records_are_listed(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"x")
    records = [rec for rec, _ in BAD]
    converted, summary = convert_records(records, tmp_path, image_prefix="")
    assert converted == []
    expected_ids = [None] + [rec["id"] for rec in records[1:]]
    assert summary.malformed == [
        MalformedRecord(i, id_, reason) for i, (id_, (_, reason)) in enumerate(zip(expected_ids, BAD))
    ]
    assert summary.total == len(BAD) and summary.written == 0
    assert str(summary).endswith(f"(and {len(BAD) - 5} more malformed records)")


def test_strict_raises_and_writes_nothing(tmp_path: Path, images: Path) -> None:
    src = _write(tmp_path / "detail.json", RECORDS)
    out = tmp_path / "out.json"
    with pytest.raises(
        ValueError, match=r"record 2 \(id='000000000002'\): turn 1 has unknown 'from' 'robot'"
    ):
        convert_llava(src, images, out, strict=True)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco", "detail.json"]


def test_missing_examples_are_capped(tmp_path: Path) -> None:
    recs = [
        {"id": i, "image": f"{i}.jpg", "conversations": [{"from": "human", "value": "<image>\nq"}]}
        for i in range(8)
    ]
    _, summary = convert_records(recs, tmp_path)
    assert summary.missing_images == 8
    assert summary.missing_image_examples == [str(tmp_path / f"{PREFIX}{i}.jpg") for i in range(5)]
    assert "(and 3 more)" in str(summary)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '[{"id": 1,}]',
            r"bad\.json: not valid JSON: Expecting property name enclosed in double quotes "
            r"at line 1 column 11 \(char 10\)",
        ),
        ("", r"bad\.json: not valid JSON: Expecting value at line 1 column 1"),
        ('{"id": 1}', r"bad\.json: expected a JSON list of LLaVA records at the top level, got dict"),
    ],
)
def test_unreadable_input_writes_nothing(tmp_path: Path, content: str, message: str) -> None:
    src = tmp_path / "bad.json"
    src.write_text(content, encoding="utf-8")
    out = tmp_path / "out.json"
    with pytest.raises(ValueError, match=message):
        convert_llava(src, tmp_path, out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


def test_not_utf8_input(tmp_path: Path) -> None:
    src = tmp_path / "bad.json"
    src.write_bytes(b'["\xff"]')
    with pytest.raises(ValueError, match=r"bad\.json: not UTF-8 text"):
        convert_llava(src, tmp_path, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_missing_input_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"LLaVA data file not found: .*nope\.json"):
        convert_llava(tmp_path / "nope.json", tmp_path, tmp_path / "out.json")
    assert list(tmp_path.iterdir()) == []


def test_bad_image_location_and_roles(tmp_path: Path) -> None:
    src = _write(tmp_path / "d.json", RECORDS)
    with pytest.raises(NotADirectoryError, match="image_location is not a folder"):
        convert_llava(src, tmp_path / "nowhere", tmp_path / "out.json")
    with pytest.raises(ValueError, match="the questions would be taken for answers"):
        convert_llava(src, tmp_path, tmp_path / "out.json", user_role_name="a", assistant_role_name="a")
    assert not (tmp_path / "out.json").exists()


def test_existing_output_is_replaced_only_when_asked(tmp_path: Path, images: Path) -> None:
    src = _write(tmp_path / "d.json", RECORDS)
    out = tmp_path / "out.json"
    out.write_text("old", encoding="utf-8")
    with pytest.raises(OutputDirError, match=r"out.json exists; pass overwrite=True to replace it$"):
        convert_llava(src, images, out)  # a file we may not have written: kept
    assert out.read_text(encoding="utf-8") == "old"
    convert_llava(src, images, out, overwrite=True)
    assert json.loads(out.read_text(encoding="utf-8")) == EXPECTED


def test_jsonl_output_is_json_lines_that_the_dataset_reads(tmp_path: Path, images: Path) -> None:
    from qwenvl.data.dataset import load_records

    # a line separator inside a string must not split a line for any reader (str.splitlines splits at it)
    records = [*RECORDS, {"id": "sep", "conversations": [{"from": "human", "value": "a\u2028b\u2029c\x85d"},
                                                         {"from": "gpt", "value": "ok"}]}]
    expected = [*EXPECTED, {"id": "sep", "conversations": [{"from": "user", "value": "a\u2028b\u2029c\x85d"},
                                                           {"from": "assistant", "value": "ok"}]}]
    out = tmp_path / "out.jsonl"
    convert_llava(_write(tmp_path / "d.json", records), images, out)
    lines = out.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == len(expected) + 1  # one record per line, a newline after each
    assert [json.loads(line) for line in lines[:-1]] == expected
    assert "déjà vu" in out.read_text(encoding="utf-8")  # UTF-8 text, as the .json output
    assert load_records(out) == expected  # what `qwenvl finetune --train_data out.jsonl` reads



def test_records_the_dataset_could_not_encode_are_malformed(tmp_path: Path) -> None:
    """An image path the <img></img> span cannot hold (over 256 bytes, a special token, a lone surrogate) or
    text UTF-8 cannot hold was written out and failed later at training time (or, for the text, crashed the
    write); a file name too long for the file system raised OSError from the existence check."""
    (tmp_path / "imgs").mkdir()

    def rec(i: int, image: str | None = None, text: str = "hi") -> dict:
        r = {"id": str(i), "conversations": [{"from": "human", "value": "<image>\n" + text if image else text},
                                            {"from": "gpt", "value": "ok"}]}
        return r if image is None else {**r, "image": image}

    records = [rec(0, "x" * 300 + ".png"), rec(1, "a</img>b.png"), rec(2, "\ud800.png"), rec(3, text="hi \udfff"),
               rec(4, "<|endoftext|>.png"), rec(5, "z" * 256)]
    converted, summary = convert_records(records, tmp_path / "imgs", image_prefix="")
    assert converted == [] and summary.missing_images == 1  # record 5: 256 bytes fit the span, not the file system
    reasons = {m.index: m.reason for m in summary.malformed}
    assert reasons[0] == f"image path {'x' * 64!r}... is 304 bytes long (UTF-8), more than the 256 that fit between <img> and </img>"
    assert reasons[1] == "image path 'a</img>b.png' holds the special token </img>"
    assert reasons[2] == "image path '\\ud800.png' is not valid Unicode text (a lone surrogate)"
    assert reasons[3].startswith("holds text that is not valid Unicode")
    assert reasons[4] == "image path '<|endoftext|>.png' holds the special token <|endoftext|>"
    out = tmp_path / "out.json"  # written without the bad ones (a file of none of them at all is an error)
    convert_llava(_write(tmp_path / "in.json", [*records, rec(6)]), tmp_path / "imgs", out, image_prefix="")
    assert [r["id"] for r in json.loads(out.read_text())] == ["6"]


def test_image_tag_inside_the_image_name_is_not_counted_as_a_second_tag(tmp_path: Path) -> None:
    # the tags were counted in the turn after the picture line went in, so an image named "a<image>.jpg" made
    # a record with one tag "2 <image> tags" (malformed)
    (tmp_path / "a<image>.jpg").write_bytes(b"x")
    pic = "Picture 1: <img>a<image>.jpg</img>\n"

    def rec(*values: str) -> dict:
        return {"id": "r", "image": "a<image>.jpg",
                "conversations": [{"from": "human", "value": v} for v in values] + [{"from": "gpt", "value": "ok"}]}

    for in_place in (False, True):
        converted, summary = convert_records([rec("<image>\nQ?"), rec("Q?", "<image>\nR?")], tmp_path,
                                             image_prefix="", tag_in_place=in_place)
        assert summary.malformed == [] and summary.untagged == 0
        assert [c["conversations"][0]["value"] for c in converted] == [pic + "Q?", "Q?"]
        assert converted[1]["conversations"][1]["value"] == pic + "R?"
    _, summary = convert_records([rec("<image>\nQ? <image>")], tmp_path, image_prefix="")
    assert [m.reason for m in summary.malformed] == ["2 <image> tags; a record holds at most one image"]


def test_image_paths_out_of_the_image_folder_are_refused_alike_whether_they_exist_or_not(tmp_path: Path) -> None:
    """A record naming a file outside --image_location was written when the file existed and dropped as a missing
    image when it did not: the untrusted data learnt which files exist elsewhere."""
    root, outside = tmp_path / "coco", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"\xff\xd8\xff")
    (root / "secret-link.jpg").symlink_to(outside / "secret.jpg")
    (root / "absent-link.jpg").symlink_to(outside / "absent.jpg")
    names = ["../outside/{}.jpg", str(outside) + "/{}.jpg", "{}-link.jpg", "sub/../../outside/{}.jpg"]
    records = [{"id": str(i), "image": name.format(which),
                "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]}
               for i, (name, which) in enumerate((n, w) for n in names for w in ("secret", "absent"))]
    converted, summary = convert_records(records, root, image_prefix="")
    assert converted == [] and summary.missing_images == 0 and summary.image_files == {}
    reasons = [m.reason for m in summary.malformed]
    assert len(reasons) == len(records)
    assert all(f"is not allowed: only files inside image_location {str(root)!r} are read" in r for r in reasons)
    assert reasons[0::2] == [r.replace("absent", "secret") for r in reasons[1::2]]  # existing or not: the same
    (root / "train2014").mkdir()
    (root / "train2014" / "COCO_train2014_1.jpg").write_bytes(b"\xff\xd8\xff")  # inside: still taken
    inside = [{**records[0], "image": image} for image in ("train2014/COCO_train2014_1.jpg", str(root / PREFIX) + "1.jpg",
                                                           "train2014/../train2014/COCO_train2014_1.jpg")]
    converted, summary = convert_records(inside, root, image_prefix="")
    assert len(converted) == 3 and summary.malformed == []


def test_a_linked_image_folder_is_taken_with_allow_any_local_path(tmp_path: Path, capsys) -> None:
    # images kept elsewhere (coco/train2014 -> /mnt/coco/train2014) are refused by default, as training refuses
    # them; --allow_any_local_path true takes them, as finetune's option of that name
    from qwenvl.cli import main

    root, elsewhere = tmp_path / "coco", tmp_path / "mnt"
    (elsewhere / "train2014").mkdir(parents=True)
    (elsewhere / "train2014" / "COCO_train2014_1.jpg").write_bytes(b"\xff\xd8\xff")
    root.mkdir()
    (root / "train2014").symlink_to(elsewhere / "train2014")
    rec = {"id": "1", "image": "1.jpg",
           "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]}
    src = _write(tmp_path / "detail.json", [rec])
    argv = ["data-convert", "--data_path", str(src), "--image_location", str(root)]
    assert main([*argv, "--output_path", str(tmp_path / "refused.json")]) == 2  # its one record refused: no file
    assert "none of its 1 records could be converted, nothing written: record 0 (id='1'): " in capsys.readouterr().err
    assert not (tmp_path / "refused.json").exists()
    assert main([*argv, "--output_path", str(tmp_path / "taken.json"), "--allow_any_local_path", "true"]) == 0
    [taken] = json.loads((tmp_path / "taken.json").read_text())
    assert taken["conversations"][0]["value"] == "Picture 1: <img>train2014/COCO_train2014_1.jpg</img>\nQ?"


def test_nothing_converted_is_an_error_and_writes_nothing(tmp_path: Path, images: Path) -> None:
    # data already in the Qwen-VL format, or every image missing, wrote an empty file and exited 0: the
    # fine-tune then found "no usable sample" in a file that gave no hint of why
    out = tmp_path / "out.json"
    converted = _write(tmp_path / "qwen.json", EXPECTED)  # already converted
    with pytest.raises(ValueError, match=r"qwen\.json: none of its 3 records could be converted, nothing written: "
                                         r"record 0 \(id='000000215677'\): turn 0 has unknown 'from' 'user' "
                                         r"\(expected 'human' or 'gpt'; is the file converted already\?\)"):
        convert_llava(converted, images, out)
    missing = _write(tmp_path / "missing.json", [RECORDS[1]])
    with pytest.raises(ValueError, match=r"missing\.json: none of its 1 records could be converted, nothing written: "
                                         r"image not found: .*COCO_train2014_000000000001\.jpg"):
        convert_llava(missing, images, out)
    assert not out.exists()
    # an empty list stays an empty list (nothing to lose), and one good record is enough
    assert convert_llava(_write(tmp_path / "empty.json", []), images, out).written == 0
    assert json.loads(out.read_text()) == []
    assert convert_llava(_write(tmp_path / "mixed.json", [EXPECTED[0], RECORDS[0]]), images, out,
                         overwrite=True).written == 1


# ---- check_images: decode each image in full ------------------------------------------------------------------
def _jpeg(path: Path, truncated: bool = False) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.radial_gradient("L").convert("RGB").save(path, quality=90)  # 256x256
    if truncated:  # a download cut short: the header reads, the pixels do not
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _image_record(i: int, image: str) -> dict[str, Any]:
    return {"id": f"r{i}", "image": image,
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "This."}]}


@pytest.fixture
def cut_images(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """An image folder with a good and a truncated JPEG, and records naming them (the truncated one twice)."""
    root = tmp_path / "coco"
    _jpeg(root / "good.jpg")
    _jpeg(root / "cut.jpg", truncated=True)
    records = [_image_record(0, "good.jpg"), _image_record(1, "cut.jpg"), RECORDS[3], _image_record(3, "cut.jpg")]
    return root, records


def test_check_images_drops_records_whose_image_does_not_decode(cut_images, monkeypatch: pytest.MonkeyPatch) -> None:
    from qwenvl import images

    root, records = cut_images
    converted, summary = convert_records(records, root, image_prefix="")  # the default: only the files' existence
    assert summary.written == 4 and summary.bad_images == []

    decoded: list[Path] = []
    real = images.check_image  # qwenvl.images': no checker of its own
    monkeypatch.setattr(images, "check_image", lambda file, **kw: decoded.append(file) or real(file, **kw))
    converted, summary = convert_records(records, root, image_prefix="", check_images=True)
    assert sorted(decoded) == [root / "cut.jpg", root / "good.jpg"]  # each distinct file once
    assert [r["id"] for r in converted] == ["r0", "text-3"]
    assert [(b.index, b.id) for b in summary.bad_images] == [(1, "r1"), (3, "r3")]
    for bad in summary.bad_images:
        assert re.fullmatch(rf"cannot decode image {re.escape(str(root / 'cut.jpg'))}: image file is truncated .*"
                            r"\(truncated or corrupt file\?\)", bad.reason), bad.reason
    assert summary.total == summary.written + summary.missing_images + len(summary.bad_images) + len(summary.malformed)
    assert summary.image_files == {0: root / "good.jpg"}  # what the written records name
    lines = str(summary).splitlines()
    assert lines[0] == ("4 records read, 2 written (1 text-only, 0 with an untagged image), 0 dropped for a missing "
                        "image, 2 for an image that does not decode, 0 malformed skipped")
    assert lines[1] == f"bad image: {summary.bad_images[0]}" and len(lines) == 3


def test_check_images_with_strict_is_an_error(cut_images, tmp_path: Path) -> None:
    root, records = cut_images
    src = _write(tmp_path / "detail.json", records)
    out = tmp_path / "out.json"
    with pytest.raises(ValueError, match=r"^LLaVA record 1 \(id='r1'\): cannot decode image .*cut\.jpg: image file is "
                                         r"truncated"):
        convert_llava(src, root, out, image_prefix="", strict=True, check_images=True)
    assert not out.exists()
    assert convert_llava(src, root, out, image_prefix="", strict=True).written == 4  # not decoded: kept


def test_check_images_flag_of_the_command(cut_images, tmp_path: Path, capsys) -> None:
    from qwenvl.cli import main

    root, records = cut_images
    argv = ["data-convert", "--data_path", str(_write(tmp_path / "detail.json", records)), "--image_location",
            str(root), "--image_prefix", "", "--output_path"]
    assert main([*argv, str(tmp_path / "all.json")]) == 0
    assert len(json.loads((tmp_path / "all.json").read_text())) == 4
    capsys.readouterr()
    assert main([*argv, str(tmp_path / "checked.json"), "--check_images"]) == 0
    assert [r["id"] for r in json.loads((tmp_path / "checked.json").read_text())] == ["r0", "text-3"]
    assert "2 for an image that does not decode" in capsys.readouterr().out
    assert main([*argv, str(tmp_path / "strict.json"), "--check_images", "--strict"]) == 2
    assert capsys.readouterr().err.startswith("qwenvl data-convert: error: LLaVA record 1 (id='r1'): cannot decode ")
    # nothing that decodes: an error naming the first, nothing written
    only_cut = _write(tmp_path / "cut.json", [records[1]])
    assert main([*argv[:2], str(only_cut), *argv[3:], str(tmp_path / "none.json"), "--check_images"]) == 2
    assert f"cut.json: none of its 1 records could be converted, nothing written: record 0 (id='r1'): cannot decode " \
        f"image {root / 'cut.jpg'}: image file is truncated" in capsys.readouterr().err
    assert not (tmp_path / "none.json").exists()


def test_command_messages_name_images_and_records_as_the_user_does(cut_images, tmp_path: Path, monkeypatch,
                                                                    capsys) -> None:
    # missing and undecodable images both as --image_location/NAME (as typed: here relative), a record without an
    # id without "id=None", a path out of the folder refused naming image_location, an existing output refused
    # naming the flag alone (not the Python keyword too)
    from qwenvl.cli import main

    root, records = cut_images
    monkeypatch.chdir(tmp_path)
    untitled = {"image": "../x.jpg", "conversations": [{"from": "human", "value": "<image>\nQ"}]}
    src = _write(tmp_path / "detail.json", [*records, _image_record(4, "gone.jpg"), untitled])
    argv = ["data-convert", "--data_path", "detail.json", "--image_location", "coco", "--image_prefix", "",
            "--output_path", "out.json", "--check_images"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "missing images: coco/gone.jpg"
    assert lines[2].startswith("bad image: record 1 (id='r1'): cannot decode image coco/cut.jpg: ")
    assert lines[-1] == ("malformed record 5: image path '../x.jpg' is not allowed: only files inside --image_location "
                         "'coco' are read (no absolute path outside it, no '~', no '..' or link leading out of it)")
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines()[-1] == ("qwenvl data-convert: error: the output file out.json exists; "
                                                        "pass --overwrite to replace it")
    assert src.exists()
    # the folder named by the flag the user typed (it said "image_location is not a folder" to --image_dir)
    assert main(["data-convert", "--data", "detail.json", "--image_dir", "cocoo", "--output", "x.json"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "qwenvl data-convert: error: --image_dir is not a folder: cocoo"


def test_qwen_vl_image_tags_in_llava_text_are_malformed(tmp_path: Path) -> None:
    """<img>PATH</img> in a LLaVA turn is text to LLaVA but a picture to qwenvl finetune: it was copied into the
    output unchanged, so the data's text named a file to read (any local file with allow_any_local_path; finetune
    without it refused the record only for a path outside dataset_dir)."""
    (tmp_path / "x.jpg").write_bytes(b"x")

    def rec(i: int, *values: str, image: str | None = "x.jpg") -> dict:
        r = {"id": str(i), "conversations": [{"from": w, "value": v} for w, v in zip(("human", "gpt") * 2, values)]}
        return r if image is None else {**r, "image": image}

    records = [rec(0, "<image>\nWhat <img>/etc/passwd</img> is it?", "A cat."),
               rec(1, "<image>\nWhat?", "See </img> here"),  # an answer: finetune reads every turn's tags
               rec(2, "Hi <img>x.jpg</img>", "Hello", image=None),  # text-only
               rec(3, "<image>\nWhat?", "A cat.", "And <ref>this</ref> <box>(1,2),(3,4)</box>?", "A dog.")]
    converted, summary = convert_records(records, tmp_path, image_prefix="")
    assert [c["id"] for c in converted] == ["3"]  # <ref>/<box> read no file: kept
    said = "<img> tags in LLaVA text are not allowed (qwenvl finetune would read the text up to </img> as an image " \
           "path); a record's picture is its 'image'"
    assert summary.malformed == [MalformedRecord(0, "0", f"turn 0 holds <img>: {said}"),
                                 MalformedRecord(1, "1", f"turn 1 holds </img>: {said}"),
                                 MalformedRecord(2, "2", f"turn 0 holds <img>: {said}")]
    with pytest.raises(ValueError, match=re.escape(f"malformed LLaVA record 0 (id='0'): turn 0 holds <img>: {said}")):
        convert_records(records, tmp_path, image_prefix="", strict=True)
    out = tmp_path / "out.json"
    convert_llava(_write(tmp_path / "in.json", records), tmp_path, out, image_prefix="", allow_any_local_path=True)
    assert "/etc/passwd" not in out.read_text() and [r["id"] for r in json.loads(out.read_text())] == ["3"]
