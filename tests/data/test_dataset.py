"""ConversationDataset and collate: encoding, image-safe truncation, dynamic padding, bad records."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from qwenvl.config import ENDOFTEXT_ID, IMG_END_ID, IMG_START_ID
from qwenvl.data.dataset import ConversationDataset, DatasetError, collate, truncation_point

FIXTURE_IMAGES = Path(__file__).parents[1] / "fixtures" / "qwenvl-tiny" / "images"


@pytest.fixture(scope="module")
def processor():
    from qwenvl.processor import Processor

    return Processor.from_pretrained()


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    shutil.copy(FIXTURE_IMAGES / "cat.png", tmp_path / "img" / "cat.png")
    shutil.copy(FIXTURE_IMAGES / "street.jpg", tmp_path / "img" / "street.jpg")
    return tmp_path


def turn(who: str, text: str) -> dict:
    return {"from": who, "value": text}


def record(rid: str, *turns: dict) -> dict:
    return {"id": rid, "conversations": list(turns)}


def write(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


RECORDS = [
    record("cat", turn("user", "Picture 1: <img>img/cat.png</img>\nWhat is this?"), turn("assistant", "A cat.")),
    record("text", turn("user", "What is 2+2?"), turn("assistant", "4")),
    record("street", turn("user", "Picture 1: <img>img/street.jpg</img>\nWhere?"),
           turn("assistant", "A street with many cars and people walking by."),
           turn("user", "Anything else?"), turn("assistant", "No.")),
]


def test_samples_match_the_processor_rule(processor, data_dir: Path) -> None:
    ds = ConversationDataset(write(data_dir / "train.json", RECORDS), processor)
    assert len(ds) == 3 and ds.skipped == []
    for i, rec in enumerate(RECORDS):
        enc = processor.encode_conversation(rec["conversations"])
        s = ds[i]
        assert s["id"] == rec["id"]
        assert s["input_ids"].tolist() == enc["input_ids"]
        assert s["labels"].tolist() == enc["labels"]
    assert ds[0]["images"].shape == (1, 3, 448, 448)
    assert ds[1]["images"] is None  # text-only conversations work
    expected = processor.pixel_values_for(["img/cat.png"], data_dir)
    assert torch.equal(ds[0]["images"], expected)


def test_jsonl_and_in_memory_records(processor, data_dir: Path) -> None:
    jsonl = data_dir / "train.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n", encoding="utf-8")
    a = ConversationDataset(jsonl, processor)
    b = ConversationDataset(RECORDS, processor, dataset_dir=data_dir)
    assert [s["input_ids"].tolist() for s in a] == [s["input_ids"].tolist() for s in b]


def test_truncation_point_never_splits_an_image_span() -> None:
    ids = [1] * 10 + [IMG_START_ID] + [0] * 256 + [IMG_END_ID] + [2] * 10  # span at 10..267
    assert truncation_point(ids, 5) == (5, 0)
    assert truncation_point(ids, 11) == (10, 0)  # the cut would keep <img> only: cut before it
    assert truncation_point(ids, 200) == (10, 0)
    assert truncation_point(ids, 267) == (10, 0)  # would drop only </img>
    assert truncation_point(ids, 268) == (268, 1)  # the whole span fits
    assert truncation_point(ids, 1000) == (len(ids), 1)


def test_truncation_drops_the_image_whole_and_is_counted(processor, data_dir: Path, caplog) -> None:
    rec = record("long", turn("user", "Hello"), turn("assistant", "Hi there."),
                 turn("user", "Picture 1: <img>img/cat.png</img>\nAnd this?"), turn("assistant", "A cat."))
    full = processor.encode_conversation(rec["conversations"])["input_ids"]
    start = full.index(IMG_START_ID)
    with caplog.at_level(logging.WARNING):
        ds = ConversationDataset([rec], processor, dataset_dir=data_dir, max_length=start + 100)
    s = ds[0]
    assert s["input_ids"].tolist() == full[:start]  # cut just before <img>
    assert s["images"] is None
    assert IMG_START_ID not in s["input_ids"].tolist()
    assert (ds.truncation.samples, ds.truncation.images, ds.truncation.tokens) == (1, 1, len(full) - start)
    assert "1 sample(s) truncated" in caplog.text

    # a cut after the span keeps the image
    ds = ConversationDataset([rec], processor, dataset_dir=data_dir, max_length=start + 258 + 3)
    assert ds[0]["images"].shape[0] == 1 and ds[0]["input_ids"].numel() == start + 261
    assert ds.truncation.images == 0


def test_collate_pads_right_to_the_longest_of_the_batch(processor, data_dir: Path) -> None:
    ds = ConversationDataset(write(data_dir / "train.json", RECORDS), processor)
    samples = [ds[1], ds[0], ds[2]]
    lengths = [s["input_ids"].numel() for s in samples]
    batch = collate(samples)
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    for row, (s, n) in enumerate(zip(samples, lengths)):
        assert torch.equal(batch["input_ids"][row, :n], s["input_ids"])
        assert torch.equal(batch["labels"][row, :n], s["labels"])
        assert (batch["input_ids"][row, n:] == ENDOFTEXT_ID).all()
        assert (batch["labels"][row, n:] == -100).all()
        assert batch["attention_mask"][row].sum() == n
    # images of all samples in order: the cat (sample 0 of the batch has none), then the street
    assert torch.equal(batch["images"], torch.cat([ds[0]["images"], ds[2]["images"]]))
    assert batch["ids"] == ["text", "cat", "street"]
    # padding only to the longest of *this* batch
    assert collate([ds[1]])["input_ids"].shape == (1, lengths[0])
    assert collate([ds[1]])["images"] is None


def test_malformed_json_names_the_file_and_position(processor, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[\n {"id": "a", "conversations": []},\n]\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"bad\.json: not valid JSON: .* at line 3 column 1"):
        ConversationDataset(bad, processor)
    bad_lines = tmp_path / "bad.jsonl"
    bad_lines.write_text('{"id": "a", "conversations": []}\n\n{"id": "b",\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"bad\.jsonl:3: invalid JSON: .* \(column 12\)"):
        ConversationDataset(bad_lines, processor)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (record("nopic", turn("user", "Picture 1: <img>img/missing.png</img>\nHi"), turn("assistant", "x")),
         r"record 1 \(id='nopic'\): image not found: .*missing\.png"),
        (record("empty"), r"record 1 \(id='empty'\): empty conversation"),
        (record("noanswer", turn("user", "Hi"), turn("user", "Hello?")),
         r"record 1 \(id='noanswer'\): .*no assistant turn"),
        ({"id": "noconv"}, r"record 1 \(id='noconv'\): 'conversations' is missing"),
        (record("role", turn("user", "Hi"), turn("robot", "beep")), r"record 1 \(id='role'\): .*unknown role"),
    ],
)
def test_bad_records_are_named(processor, data_dir: Path, bad: dict, message: str) -> None:
    path = write(data_dir / "train.json", [RECORDS[1], bad])
    with pytest.raises(DatasetError, match=message) as err:
        ConversationDataset(path, processor)
    assert "train.json: 1 bad record(s) of 2" in str(err.value)
    assert "skip_bad=True, or --skip_bad_samples true when training" in str(err.value)  # the way out, named
    ds = ConversationDataset(path, processor, skip_bad=True)  # or dropped and reported
    assert len(ds) == 1 and [b.index for b in ds.skipped] == [1]


def test_over_long_and_label_free_samples_are_named(processor, data_dir: Path) -> None:
    long_user = record("long", turn("user", "word " * 300), turn("assistant", "ok"))
    with pytest.raises(DatasetError, match=r"record 0 \(id='long'\): \d+ tokens, more than max_length=64"):
        ConversationDataset([long_user], processor, max_length=64, truncate=False)
    # truncated before the answer: no learnable label left
    with pytest.raises(DatasetError, match=r"record 0 \(id='long'\): no learnable label within max_length=64"):
        ConversationDataset([long_user], processor, max_length=64)
    two = record("pics", turn("user", "Picture 1: <img>img/cat.png</img>\nPicture 2: <img>img/cat.png</img>\n"),
                 turn("assistant", "Two cats."))
    with pytest.raises(DatasetError, match=r"record 0 \(id='pics'\): 2 images, more than max_images=1"):
        ConversationDataset([two], processor, dataset_dir=data_dir, max_images=1)


def test_everything_bad_is_an_error_even_when_skipping(processor, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no usable sample"):
        ConversationDataset([record("empty")], processor, skip_bad=True)


def test_undecodable_images_are_bad_records_before_training(processor, data_dir: Path) -> None:
    # a file that exists but does not decode must fail now, not at the step that first draws it
    street = (data_dir / "img" / "street.jpg").read_bytes()
    (data_dir / "img" / "cut.jpg").write_bytes(street[: len(street) // 2])  # a truncated download
    (data_dir / "img" / "text.png").write_text("not an image")
    recs = [RECORDS[0],
            record("cut", turn("user", "<img>img/cut.jpg</img>What?"), turn("assistant", "A street.")),
            record("text", turn("user", "<img>img/text.png</img>What?"), turn("assistant", "Text.")),
            record("cut again", turn("user", "<img>img/cut.jpg</img>And?"), turn("assistant", "Cars."))]
    path = write(data_dir / "train.json", recs)
    with pytest.raises(DatasetError, match=r"3 bad record\(s\) of 4") as err:
        ConversationDataset(path, processor)
    assert "record 1 (id='cut'): cannot decode image" in str(err.value) and "truncated" in str(err.value)
    assert "record 2 (id='text'): cannot decode image" in str(err.value)
    ds = ConversationDataset(path, processor, skip_bad=True)
    assert [s.id for s in ds.samples] == ["cat"] and [b.index for b in ds.skipped] == [1, 2, 3]


def test_bad_records_are_listed_in_file_order_whatever_check_finds_them(processor, data_dir: Path) -> None:
    # records are tokenized first and their images decoded afterwards (by threads): a malformed record found
    # while tokenizing and an undecodable image found later are still reported in the order of the file
    (data_dir / "img" / "text.png").write_text("not an image")
    recs = [RECORDS[0],
            record("text", turn("user", "<img>img/text.png</img>What?"), turn("assistant", "Text.")),
            "not a record",
            record("empty")]
    ds = ConversationDataset(recs, processor, dataset_dir=data_dir, skip_bad=True)
    assert [b.index for b in ds.skipped] == [1, 2, 3]
    assert "cannot decode image" in ds.skipped[0].reason and "expected an object" in ds.skipped[1].reason


def test_a_sample_cut_to_its_frame_names_max_length(processor, data_dir: Path) -> None:
    # cut inside the system block: not even the frame's labels are left; the message still says it was the cut
    with pytest.raises(DatasetError, match=r"record 0 \(id='text'\): no learnable label within max_length=2 tokens"):
        ConversationDataset([RECORDS[1]], processor, data_dir, max_length=2)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        # an empty answer trained the model to end its turn at once (only the ChatML frame was learned)
        (record("blank", turn("user", "Hi"), turn("assistant", "")),
         r"record 1 \(id='blank'\): no answer to learn: every assistant answer is empty"),
        # ChatML markers in the text became the special tokens: a second frame inside the turn, learned in answers
        (record("chatml", turn("user", "Hi<|im_end|>\n<|im_start|>assistant\nYes"), turn("assistant", "ok")),
         r"record 1 \(id='chatml'\): turn 0 holds '<\|im_end\|>', which reads as the ChatML special token .*"
         r"already formatted as ChatML\?"),
        (record("eot", turn("user", "Hi"), turn("assistant", "Bye.<|endoftext|>")),
         r"record 1 \(id='eot'\): turn 1 holds '<\|endoftext\|>'"),
        # LLaVA data given to the fine-tune as it is: the way to convert it is named
        (record("llava", turn("human", "Hi"), turn("gpt", "Hello.")),
         r"record 1 \(id='llava'\): turn 0 has the LLaVA role 'human': convert LLaVA data with qwenvl data-convert"),
        # ... or with its roles renamed by hand: the picture was lost without a word
        (record("tag", turn("user", "<image>\nWhat is it?"), turn("assistant", "A cat.")),
         r"record 1 \(id='tag'\): turn 0 holds LLaVA's <image> tag, which is plain text here .*qwenvl data-convert"),
        ({**record("key", turn("user", "What is it?"), turn("assistant", "A cat.")), "image": "cat.png"},
         r"record 1 \(id='key'\): its 'image' key is not read \(pictures are 'Picture 1: <img>PATH</img>' in the "
         r"text\).*qwenvl data-convert"),
    ],
)
def test_records_that_would_train_on_garbage_are_bad(processor, data_dir: Path, bad: dict, message: str) -> None:
    path = write(data_dir / "train.json", [RECORDS[1], bad])
    with pytest.raises(DatasetError, match=message):
        ConversationDataset(path, processor)
    assert len(ConversationDataset(path, processor, skip_bad=True)) == 1


@pytest.mark.parametrize("skip_bad", [False, True])
def test_a_llava_file_is_said_in_one_line(processor, data_dir: Path, caplog, skip_bad: bool) -> None:
    # a LLaVA file given to the fine-tune as it is: 12 lines (a header, 10 records, "... and 1990 more") whose hint
    # was to skip bad records, which then gave a warning per record and "no usable sample"
    llava = [record(f"r{i}", turn("human", "<image>\nWhat is it?"), turn("gpt", "A cat.")) for i in range(30)]
    path = write(data_dir / "detail.json", llava)
    with pytest.raises(DatasetError) as caught:
        ConversationDataset(path, processor, skip_bad=skip_bad)
    assert str(caught.value) == (f"{path}: all 30 record(s) are LLaVA data, not Qwen-VL conversations (the first: "
                                 "record 0 (id='r0'): turn 0 has the LLaVA role 'human': convert LLaVA data with "
                                 "qwenvl data-convert)")
    assert "skipping" not in caplog.text


def test_image_tags_and_an_image_key_next_to_them_are_fine(processor, data_dir: Path) -> None:
    # the Qwen-VL tags are what user text may hold; a record that keeps its 'image' key next to the tag is read
    tagged = {**RECORDS[0], "image": "img/cat.png"}
    boxed = record("box", turn("user", "Where is <ref>the cat</ref>?"), turn("assistant", "<box>(1,2),(3,4)</box>"))
    assert len(ConversationDataset([tagged, boxed], processor, dataset_dir=data_dir)) == 2


def test_a_system_message_with_chatml_markers_is_refused(processor) -> None:
    with pytest.raises(DatasetError, match=r"system_message holds '<\|im_end\|>'"):
        ConversationDataset([RECORDS[1]], processor, system_message="Be brief.<|im_end|>\n<|im_start|>user\nHi")


def test_images_missing_under_the_default_folder_name_dataset_dir(processor, data_dir: Path) -> None:
    # data-convert writes image paths relative to its --image_location: a fine-tune without --dataset_dir looked for
    # them next to the data file, and every image record was "image not found" with no word of where they are read
    (data_dir / "data").mkdir()
    one = write(data_dir / "data" / "one.json", [RECORDS[0], RECORDS[1]])
    hint = (rf"relative image paths are read under dataset_dir {data_dir / 'data'} \(the data file's folder\): set "
            r"dataset_dir \(--dataset_dir when training\) to the folder that holds them")
    with pytest.raises(DatasetError, match=rf"1 bad record\(s\) of 2 \({hint}; .*\): record 0 \(id='cat'\): image "
                                           r"not found: .*data/img/cat\.png$"):
        ConversationDataset(one, processor)
    two = write(data_dir / "data" / "two.json", RECORDS)
    with pytest.raises(DatasetError, match=rf"2 bad record\(s\) of 3 \({hint}; .*\):\n  - record 0"):
        ConversationDataset(two, processor)
    assert len(ConversationDataset(two, processor, dataset_dir=data_dir)) == 3  # the folder named: found
    with pytest.raises(DatasetError) as err:  # a folder given: the paths are looked up where the user said
        ConversationDataset(two, processor, dataset_dir=data_dir / "data")
    assert "relative image paths" not in str(err.value)
    url = record("url", turn("user", "Picture 1: <img>http://example.com/a.png</img>\nWhat?"), turn("assistant", "A."))
    with pytest.raises(DatasetError) as err:  # not a path the folder could hold: no word of it
        ConversationDataset(write(data_dir / "data" / "url.json", [RECORDS[1], url]), processor)
    assert "image URLs are not downloaded" in str(err.value) and "relative image paths" not in str(err.value)
