"""Processor: golden batch, images, chat prompts (make_context) and fine-tuning labels (finetune.py preprocess)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from qwenvl.config import ENDOFTEXT_ID, IM_END_ID, IM_START_ID, IMG_START_ID, QwenVLConfig
from qwenvl.images import ImageError, load_image, preprocess
from qwenvl.processor import IGNORE_INDEX, Processor
from qwenvl.tokenizer import QwenTokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "qwenvl-tiny"
VL_TAGS = {"<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>"}
SYSTEM_IDS = [IM_START_ID, 8948, 198, 2610, 525, 264, 10950, 17847, 13, IM_END_ID]  # system\nYou are a helpful assistant.


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return QwenTokenizer.from_pretrained()


@pytest.fixture(scope="module")
def chat(tok: QwenTokenizer) -> Processor:
    return Processor(tok, chat_format="chatml", base_dir=FIXTURE)


@pytest.fixture(scope="module")
def golden() -> tuple[list[str], list[list[int]], torch.Tensor]:
    data = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))
    prompts = [p.replace("{0}", "images/cat.png").replace("{1}", "images/street.jpg") for p in data["prompts"]]
    with safe_open(str(FIXTURE / "expected.safetensors"), framework="pt") as f:
        pixels = f.get_tensor("pixels")
    return prompts, [c["input_ids"] for c in data["cases"]], pixels


def official_make_context(tok, query, history, system, max_window_size):
    """The official chatml ``make_context``, restated in the test."""
    im_start, im_end, nl = [tok.im_start_id], [tok.im_end_id], tok.encode("\n")

    def tokenize_str(role, content):
        return f"{role}\n{content}", tok.encode(role, allowed_special=VL_TAGS) + nl + tok.encode(
            content, allowed_special=VL_TAGS
        )

    system_text, system_part = tokenize_str("system", system)
    system_tokens = im_start + system_part + im_end
    raw_text, context = "", []
    for turn_query, turn_response in reversed(history):
        query_text, query_part = tokenize_str("user", turn_query)
        query_tokens = im_start + query_part + im_end
        if turn_response is not None:
            response_text, response_part = tokenize_str("assistant", turn_response)
            next_context = nl + query_tokens + nl + im_start + response_part + im_end
            prev_chat = f"\n<|im_start|>{query_text}<|im_end|>\n<|im_start|>{response_text}<|im_end|>"
        else:
            next_context = nl + query_tokens + nl
            prev_chat = f"\n<|im_start|>{query_text}<|im_end|>\n"
        if len(system_tokens) + len(next_context) + len(context) < max_window_size:
            context = next_context + context
            raw_text = prev_chat + raw_text
        else:
            break
    context = system_tokens + context
    raw_text = f"<|im_start|>{system_text}<|im_end|>" + raw_text
    context += nl + im_start + tokenize_str("user", query)[1] + im_end + nl + im_start + tok.encode("assistant") + nl
    raw_text += f"\n<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"
    return raw_text, context


def official_preprocess(tok, source, system_message="You are a helpful assistant."):
    """The official Qwen-VL ``finetune.py`` ``preprocess`` for one sample (no padding), restated in the test."""
    roles = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}
    nl = tok.encode("\n")
    if roles[source[0]["from"]] != roles["user"]:
        source = source[1:]
    system = [tok.im_start_id] + tok.encode("system") + nl + tok.encode(system_message) + [tok.im_end_id] + nl
    input_id, target = list(system), [tok.im_start_id] + [-100] * (len(system) - 3) + [tok.im_end_id] + nl
    for sentence in source:
        role = roles[sentence["from"]]
        _input_id = tok.encode(role) + nl + tok.encode(sentence["value"]) + [tok.im_end_id] + nl
        input_id += _input_id
        if role == "<|im_start|>user":
            _target = [tok.im_start_id] + [-100] * (len(_input_id) - 3) + [tok.im_end_id] + nl
        else:
            n = len(tok.encode(role))
            _target = [tok.im_start_id] + [-100] * n + _input_id[n + 1 : -2] + [tok.im_end_id] + nl
        target += _target
    return input_id, target


# ---- golden batch and images ---------------------------------------------------------------------
def test_golden_batch_left_padded(golden, tok: QwenTokenizer) -> None:
    prompts, expected, pixels = golden
    proc = Processor.from_pretrained(FIXTURE, base_dir=FIXTURE)
    out = proc(prompts)
    width = max(len(e) for e in expected)
    assert out["input_ids"].shape == out["attention_mask"].shape == (3, width)
    assert out["input_ids"].dtype == torch.long
    for b, ids in enumerate(expected):
        pad = width - len(ids)
        assert out["input_ids"][b, pad:].tolist() == ids
        assert out["input_ids"][b, :pad].tolist() == [ENDOFTEXT_ID] * pad
        assert out["attention_mask"][b].tolist() == [0] * pad + [1] * len(ids)
    # images in order of appearance, row-major: cat (prompt 0), cat, street (prompt 1)
    assert out["images"].shape == (3, 3, 448, 448)
    assert (out["images"][[0, 1, 2]] - pixels[[0, 0, 1]]).abs().max().item() < 1e-4
    single = proc(prompts[2])
    assert single["input_ids"].tolist() == [expected[2]] and single["images"] is None
    assert proc.decode(out["input_ids"][1, width - len(expected[1]) :]) == prompts[1]
    assert proc.batch_decode(out["input_ids"])[2] == tok.decode([ENDOFTEXT_ID] * (width - 22)) + prompts[2]


def test_supplied_images(chat: Processor, tmp_path: Path) -> None:
    cat = load_image("images/cat.png", FIXTURE)
    street_bytes = (FIXTURE / "images" / "street.jpg").read_bytes()
    out = chat(["Picture 1: <img>first</img>\nhi", "<img>second</img><img>third</img>"], images=[cat, street_bytes, cat])
    assert out["images"].shape == (3, 3, 448, 448)
    assert torch.equal(out["images"][0], preprocess(cat)) and torch.equal(out["images"][2], preprocess(cat))
    assert torch.equal(out["images"][1], preprocess(Image.open(io.BytesIO(street_bytes)).convert("RGB")))
    with pytest.raises(ValueError, match="got 1 images for 2 <img> spans"):
        chat("<img>a</img><img>b</img>", images=[cat])
    with pytest.raises(ValueError, match="got 1 images for 0 <img> spans"):
        chat("no image here", images=[cat])


def test_call_errors(chat: Processor, tmp_path: Path) -> None:
    # counted from 1, and only for a batch (predict --jsonl retries a failed row alone: it said "prompt 0" for all)
    with pytest.raises(ValueError, match="^empty prompt: there is nothing to condition on$"):
        chat("")
    with pytest.raises(ValueError, match=r"^empty prompt \(prompt 2 of the 2 in the batch\): there is nothing"):
        chat(["ok", ""])
    with pytest.raises(ValueError, match="empty prompt"):
        chat([])
    with pytest.raises(ImageError, match=f"image not found: {tmp_path / 'nope.png'}"):
        chat("<img>nope.png</img>", base_dir=tmp_path)
    with pytest.raises(ImageError, match="image URLs are not downloaded"):
        chat("<img>https://example.com/x.png</img>")
    (tmp_path / "bad.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(ImageError, match="cannot decode image"):
        chat("<img>bad.jpg</img>", base_dir=tmp_path)
    with pytest.raises(ValueError, match="unclosed <img>"):
        chat("<img>a.png")
    with pytest.raises(ValueError, match="300 bytes long"):
        chat("<img>" + "a" * 300 + "</img>")
    with pytest.raises(ValueError, match="return_tensors='pt'"):
        chat("hi", return_tensors="np")


def test_an_image_path_no_span_can_hold_is_refused_before_tokenizing(tok: QwenTokenizer, tmp_path: Path) -> None:
    # in the words of predict's check before the weights load (image_path_error): a lone surrogate ("\ud800" in
    # JSON) was read as U+FFFD by the tokenizer, so the prompt failed on "image not found: .../a\ufffd.png"
    from qwenvl.processor import image_path_error

    chat = Processor(tok, chat_format="chatml", base_dir=tmp_path)
    for path in ("a\ud800.png", "a</img>b.png", "x" * 300):
        message = image_path_error(path)
        assert message is not None and message.startswith("image path ")
        for prompt in ([{"image": path}, {"text": "What?"}], [{"role": "user", "content": [{"image": path}]}]):
            with pytest.raises(ValueError) as e:
                chat(prompt)
            assert str(e.value) == message
    assert "is not valid Unicode text (a lone surrogate)" in image_path_error("a\ud800.png")
    with pytest.raises(ValueError) as e:
        chat(["hi", "Picture 1: <img>a\ud800.png</img>\nWhat?"])
    assert str(e.value) == image_path_error("a\ud800.png") + " (prompt 2 of the 2 in the batch)"
    # a turn a raw (base) prompt drops is never read: its picture is not checked either
    raw = Processor(tok, chat_format="raw", base_dir=tmp_path)
    messages = [{"role": "user", "content": "<img>a\ud800.png</img>"}, {"role": "assistant", "content": "Hm."},
                {"role": "user", "content": "Bye"}]
    assert raw(messages)["input_ids"][0].tolist() == tok.encode("Bye")
    with pytest.raises(ValueError, match="lone surrogate"):
        chat(messages)


def test_every_way_into_a_prompt_refuses_an_image_path_no_span_can_hold(tok: QwenTokenizer, tmp_path: Path) -> None:
    # the check ran in __call__ only (and by hand in ChatSession.ask): build_messages_prompt and build_chat_prompt
    # read a lone surrogate as U+FFFD, so the picture then read was "image not found" of another name
    from qwenvl.processor import image_path_error

    chat = Processor(tok, chat_format="chatml", base_dir=tmp_path)
    span = "<img>a\ud800.png</img>"
    long_turns = [("older", "ok")] + [("x " * 50, "y")] * 3  # a window of 200 tokens ends at "older" (left out)
    for build, path in ((lambda: chat.build_chat_prompt([{"image": "a\ud800.png"}, {"text": "What?"}]), "a\ud800.png"),
                        (lambda: chat.build_chat_prompt("hi", [(span, "ok")]), "a\ud800.png"),
                        (lambda: chat.build_chat_prompt("hi", [(span, "ok"), *long_turns], max_window_size=200),
                         "a\ud800.png"),
                        (lambda: chat.build_messages_prompt([{"role": "system", "content": span},
                                                             {"role": "user", "content": "hi"}]), "a\ud800.png"),
                        (lambda: chat.build_messages_prompt([{"role": "user", "content": [{"image": "a</img>b.png"}]}]),
                         "a</img>b.png")):
        with pytest.raises(ValueError) as e:
            build()
        assert str(e.value) == image_path_error(path)
    assert "older" not in chat.build_chat_prompt("hi", long_turns, max_window_size=200)[0]
    with pytest.raises(ValueError, match="must be a .query, response. pair"):  # the turns left out are checked too
        chat.build_chat_prompt("hi", [("q",), *long_turns], max_window_size=200)
    # an assistant's answer shows no picture, and a raw (base) prompt drops the system message: neither is checked
    assert span in chat.build_chat_prompt("hi", [("q", span)])[0]
    raw = Processor(tok, chat_format="raw", base_dir=tmp_path)
    assert raw.build_messages_prompt([{"role": "system", "content": span}, {"role": "user", "content": "Bye"}]) == (
        "Bye", tok.encode("Bye"))
    # in a batch, which prompt: of messages too, and for the tokenizer's own refusals
    with pytest.raises(ValueError) as e:
        chat(["hi", [{"role": "user", "content": span}]])
    assert str(e.value) == image_path_error("a\ud800.png") + " (prompt 2 of the 2 in the batch)"
    with pytest.raises(ValueError, match=r"^unclosed <img> .* \(prompt 2 of the 2 in the batch\)$"):
        chat(["hi", "<img>a.png"])


def test_from_pretrained_sources(tmp_path: Path) -> None:
    p = Processor.from_pretrained(FIXTURE)
    assert (p.chat_format, p.image_size, p.max_window_size) == ("raw", 448, 6144)
    assert p.tokenizer.vocab_file == (FIXTURE / "qwen.tiktoken").resolve()
    d = Processor.from_pretrained()
    assert (d.chat_format, d.image_size, d.max_window_size) == ("chatml", 448, 6144)
    cfg = QwenVLConfig.from_preset("tiny")
    cfg.visual.image_size = 224
    cfg.generation.max_window_size = 1000
    cfg.save_pretrained(tmp_path / "ckpt")
    c = Processor.from_pretrained(tmp_path / "ckpt")
    assert (c.chat_format, c.image_size, c.max_window_size) == ("chatml", 224, 1000)
    assert c("<img>images/cat.png</img>", base_dir=FIXTURE)["images"].shape == (1, 3, 224, 224)
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "generation_config.json").write_text('{"chat_format": "raw", "max_window_size": 99}')
    g = Processor.from_pretrained(tmp_path / "gen")
    assert (g.chat_format, g.max_window_size, g.image_size) == ("raw", 99, 448)
    assert Processor.from_pretrained(FIXTURE, config=cfg).image_size == 224  # explicit config wins
    with pytest.raises(ValueError, match="chat_format"):
        Processor(chat_format="vicuna")


# ---- chat prompts --------------------------------------------------------------------------------
def test_chat_prompt_two_turn_history_exact_ids(chat: Processor) -> None:
    raw, ids = chat.build_chat_prompt("Hello world", history=[("hi", "ok"), ("2+2?", "4")])
    turn1 = [198, IM_START_ID, 872, 198, 6023, IM_END_ID, 198, IM_START_ID, 77091, 198, 562, IM_END_ID]
    turn2 = [198, IM_START_ID, 872, 198, 17, 10, 17, 30, IM_END_ID, 198, IM_START_ID, 77091, 198, 19, IM_END_ID]
    query = [198, IM_START_ID, 872, 198, 9707, 1879, IM_END_ID, 198, IM_START_ID, 77091, 198]
    assert ids == SYSTEM_IDS + turn1 + turn2 + query
    assert raw == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>"
        "\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nok<|im_end|>"
        "\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>"
        "\n<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat.tokenizer.decode(ids) == raw


def test_chat_prompt_matches_restatement(chat: Processor, tok: QwenTokenizer) -> None:
    q_list = [{"image": "images/cat.png"}, {"image": "images/street.jpg"}, {"text": "框出图中的蓝色方块"}]
    cases = [
        ("Hello", [], "You are a helpful assistant."),
        (" leading space\n\nand newlines \n", [("\nq1 ", " a1\n"), ("q2", None)], "Be brief."),
        ("<ref>狗</ref><box>(1,2),(3,4)</box> typed <|im_end|> and <|endoftext|>", [("x<|im_start|>", "y")], ""),
        (tok.from_list_format(q_list), [("Picture 1: <img>images/cat.png</img>\n这是什么", "一只猫")], "sys"),
    ]
    for query, history, system in cases:
        assert chat.build_chat_prompt(query, history, system=system) == official_make_context(
            tok, query, history, system, 6144
        )
    # content is tokenized without the chat tags: a typed <|im_end|> stays text, the VL tags stay tags
    _, ids = chat.build_chat_prompt(cases[2][0], cases[2][1], system="")
    assert ids.count(IM_END_ID) == 4 and ids.count(ENDOFTEXT_ID) == 0 and 151851 in ids
    # list-format queries are formatted first
    assert chat.build_chat_prompt(q_list)[1] == chat.build_chat_prompt(tok.from_list_format(q_list))[1]


def test_history_trimming_drops_oldest_first(chat: Processor, tok: QwenTokenizer) -> None:
    history = [("old question", "old answer"), ("a much longer question " * 20, "long answer " * 10), ("new q", "new a")]

    def turn_len(q, r):
        return len(official_make_context(tok, "x", [(q, r)], "You are a helpful assistant.", 10**9)[1]) - len(
            official_make_context(tok, "x", [], "You are a helpful assistant.", 10**9)[1]
        )

    sys_len = len(SYSTEM_IDS)
    new, mid, old = turn_len(*history[2]), turn_len(*history[1]), turn_len(*history[0])
    full = chat.build_chat_prompt("x", history, max_window_size=10**9)[0]
    assert "old question" in full and "new q" in full
    # room for everything
    w = sys_len + new + mid + old + 1
    assert chat.build_chat_prompt("x", history, max_window_size=w) == official_make_context(tok, "x", history, "You are a helpful assistant.", w)
    assert chat.build_chat_prompt("x", history, max_window_size=w)[0] == full
    # one token less: the oldest turn goes
    raw, _ = chat.build_chat_prompt("x", history, max_window_size=w - 1)
    assert "old question" not in raw and "longer question" in raw and "new q" in raw
    # room for the newest and the oldest but not the middle one: the walk stops at the middle turn
    w2 = sys_len + new + old + 1
    assert w2 < sys_len + new + mid
    raw, ids = chat.build_chat_prompt("x", history, max_window_size=w2)
    assert "new q" in raw and "longer question" not in raw and "old question" not in raw
    assert (raw, ids) == official_make_context(tok, "x", history, "You are a helpful assistant.", w2)
    # nothing fits: system and query only
    raw, _ = chat.build_chat_prompt("x", history, max_window_size=sys_len + new)
    assert raw == chat.build_chat_prompt("x")[0]
    # the default window comes from the processor (generation_config's max_window_size)
    small = Processor(tok, chat_format="chatml", max_window_size=sys_len + new + 1)
    assert small.build_chat_prompt("x", history)[0] == chat.build_chat_prompt("x", history[2:])[0]


def test_messages_api(chat: Processor, tok: QwenTokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"image": "images/cat.png"}, {"text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Where is it?"},
    ]
    expected = chat.build_chat_prompt(
        "Where is it?", [("Picture 1: <img>images/cat.png</img>\nWhat is it?", "A cat.")], system="Be brief."
    )
    assert chat.build_messages_prompt(messages) == expected
    out = chat(messages)
    assert out["input_ids"].tolist() == [expected[1]] and out["images"].shape == (1, 3, 448, 448)
    batch = chat([messages, messages[1:2]])
    assert batch["input_ids"].shape[0] == 2 and batch["images"].shape[0] == 2
    assert chat([{"role": "user", "content": "hi"}])["input_ids"].tolist() == [chat.build_chat_prompt("hi")[1]]
    for bad, msg in [
        ([{"role": "assistant", "content": "x"}], "last message must be the user's"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message must be the user's"),
        ([{"role": "robot", "content": "a"}], "unknown role 'robot'"),
        ([{"role": "user", "content": 5}], "content must be a str or a list-format list"),
        ([{"role": "user"}], "must be a dict with 'role' and 'content'"),
    ]:
        with pytest.raises(ValueError, match=msg):
            chat.build_messages_prompt(bad)


# ---- fine-tuning labels --------------------------------------------------------------------------
def test_encode_conversation_by_hand(chat: Processor) -> None:
    out = chat.encode_conversation([{"from": "user", "value": "hi"}, {"from": "assistant", "value": "ok"}])
    user = [IM_START_ID, 872, 198, 6023, IM_END_ID, 198]
    assistant = [IM_START_ID, 77091, 198, 562, IM_END_ID, 198]
    assert out["input_ids"] == SYSTEM_IDS + [198] + user + assistant
    labels = out["labels"]
    unmasked = [i for i, v in enumerate(labels) if v != IGNORE_INDEX]
    # system: <|im_start|> (0), <|im_end|> (9), \n (10); user: <|im_start|> (11), <|im_end|> (15), \n (16);
    # assistant: <|im_start|> (17) kept, "assistant\n" (18, 19) masked, "ok" (20), <|im_end|> (21), \n (22)
    assert unmasked == [0, 9, 10, 11, 15, 16, 17, 20, 21, 22]
    assert [labels[i] for i in unmasked] == [IM_START_ID, IM_END_ID, 198, IM_START_ID, IM_END_ID, 198, IM_START_ID, 562, IM_END_ID, 198]
    assert out["image_paths"] == []


def test_encode_conversation_matches_restatement(chat: Processor, tok: QwenTokenizer) -> None:
    conversations = [
        [
            {"from": "user", "value": "Picture 1: <img>images/cat.png</img>\nPicture 2: <img>images/street.jpg</img>\n两张图有什么不同？"},
            {"from": "assistant", "value": "第一张是猫，第二张是街道。"},
            {"from": "user", "value": "框出图中的猫"},
            {"from": "assistant", "value": "<ref>猫</ref><box>(120,45),(870,990)</box>"},
        ],
        [
            {"from": "assistant", "value": "I speak first and am dropped."},
            {"from": "user", "value": "  \n leading and trailing whitespace \n\n"},
            {"from": "assistant", "value": "\n\nanswer\t \n"},
        ],
        [
            {"from": "user", "value": "one"},
            {"from": "assistant", "value": "two"},
            {"from": "assistant", "value": "three (a second assistant turn is kept)"},
        ],
    ]
    for conv in conversations:
        out = chat.encode_conversation(conv)
        ids, labels = official_preprocess(tok, conv)
        assert out["input_ids"] == ids and out["labels"] == labels and len(ids) == len(labels)
    assert chat.encode_conversation(conversations[0])["image_paths"] == ["images/cat.png", "images/street.jpg"]
    dropped = chat.encode_conversation(conversations[1])
    assert "I speak first" not in tok.decode(dropped["input_ids"])
    custom = chat.encode_conversation(conversations[2], system_message="Be brief.")
    assert (custom["input_ids"], custom["labels"]) == official_preprocess(tok, conversations[2], "Be brief.")
    # the learned tokens of the first sample decode to exactly the assistant answers and the chat tags
    learned = [v for v in chat.encode_conversation(conversations[0])["labels"] if v != IGNORE_INDEX]
    assert tok.decode(learned) == (
        "<|im_start|><|im_end|>\n<|im_start|><|im_end|>\n<|im_start|>第一张是猫，第二张是街道。<|im_end|>\n"
        "<|im_start|><|im_end|>\n<|im_start|><ref>猫</ref><box>(120,45),(870,990)</box><|im_end|>\n"
    )
    assert IMG_START_ID not in learned


def test_encode_conversation_errors(chat: Processor) -> None:
    cases = [
        ([], "empty conversation"),
        ([{"from": "human", "value": "hi"}, {"from": "assistant", "value": "ok"}], "turn 0 has unknown role 'human'"),
        # a system turn said only "unknown role 'system'", not where the system prompt goes
        ([{"from": "system", "value": "Be brief."}, {"from": "user", "value": "hi"}, {"from": "assistant", "value": "ok"}],
         r"^turn 0 has unknown role 'system'; expected 'user' or 'assistant': the system prompt is no turn; give it as "
         r"system_message \(qwenvl finetune: the system_message setting, --system_message\)$"),
        ([{"from": "user", "value": "hi"}, {"from": "assistant", "value": None}], "turn 1: value must be a str"),
        # a role that is not a string (unhashable: TypeError, which ended a fine-tuning run instead of one bad record)
        ([{"from": ["user"], "value": "hi"}, {"from": "assistant", "value": "ok"}], r"turn 0 has unknown role \['user'\]"),
        ([{"from": "user", "value": "hi"}, {"from": {"a": 1}, "value": "ok"}], "turn 1 has unknown role"),
        ([{"from": "user", "value": "hi"}], "no assistant turn"),
        ([{"from": "assistant", "value": "only me"}], "no assistant turn"),
        ([{"from": "user"}], "must be a dict with 'from' and 'value'"),
    ]
    for conv, msg in cases:
        with pytest.raises(ValueError, match=msg):
            chat.encode_conversation(conv)
    conv = [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "ok"}]
    assert len(chat.encode_conversation(conv, max_length=23)["input_ids"]) == 23
    with pytest.raises(ValueError, match="23 tokens long, more than max_length=22"):
        chat.encode_conversation(conv, max_length=22)
    with pytest.raises(ValueError, match="unclosed <img>"):
        chat.encode_conversation([{"from": "user", "value": "<img>x"}, {"from": "assistant", "value": "ok"}])


def test_pixel_values_for(chat: Processor, golden) -> None:
    _, _, pixels = golden
    px = chat.pixel_values_for(["images/street.jpg", FIXTURE / "images" / "cat.png"])
    assert px.shape == (2, 3, 448, 448) and (px - pixels[[1, 0]]).abs().max().item() < 1e-4
    assert chat.pixel_values_for([]).shape == (0, 3, 448, 448)


def test_raw_format_keeps_the_last_user_message_and_says_what_it_dropped(
    tok: QwenTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is it?"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Where is it?"},
    ]
    raw_proc = Processor(tok, chat_format="raw")
    with caplog.at_level("WARNING", logger="qwenvl.processor"):
        assert raw_proc.build_messages_prompt(messages) == ("Where is it?", tok.encode("Where is it?"))  # official
        raw_proc.build_messages_prompt(messages)  # said once per processor
    assert [r.getMessage() for r in caplog.records] == [
        "chat_format raw (a base checkpoint) prompts with the last user message alone: dropped the system text "
        "'Be brief.' and 1 history turn(s); chat_format chatml (--chat_format chatml) keeps them (said once)"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="qwenvl.processor"):  # nothing dropped, nothing said
        Processor(tok, chat_format="raw")([{"role": "user", "content": "Hi"}])
    assert not caplog.records
    raw_proc.chat_format = "chatml"  # asked for: the whole conversation
    text = raw_proc.build_messages_prompt(messages)[0]
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "A cat." in text


def test_images_must_be_a_list(chat: Processor) -> None:
    cat = load_image("images/cat.png", FIXTURE)
    with pytest.raises(ValueError, match=r"images= takes a list.*got a PngImageFile.*images=\[image\]"):
        chat("<img>a</img>hi", images=cat)
    with pytest.raises(ValueError, match="images= takes a list"):
        chat("<img>a</img>hi", images="images/cat.png")  # not one path per character
