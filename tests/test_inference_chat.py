"""ChatSession and predict: what the user is told when a message cannot be answered."""

from __future__ import annotations

import pytest

from qwenvl import Processor
from qwenvl.generation import SamplingParams
from qwenvl.inference import ChatSession, ConversationTooLong, predict
from qwenvl.processor import image_path_error


def _session(golden_model, golden_dir, monkeypatch, context: int) -> ChatSession:
    monkeypatch.setattr(golden_model.config.lm, "max_position_embeddings", context)
    processor = Processor.from_pretrained(golden_dir)
    processor.chat_format = "chatml"
    return ChatSession(golden_model, processor, SamplingParams(max_new_tokens=1, do_sample=False))


def test_chat_session_says_the_conversation_is_too_long_and_how_to_go_on(golden_model, golden_dir, monkeypatch):
    # the window (max_window_size) counts the history only: after a long turn a short message failed with
    # "prompt of N tokens does not fit the context", which said neither why nor what to do
    session = _session(golden_model, golden_dir, monkeypatch, 300)
    session.history.append(([{"text": "word " * 280}], "ok"))
    with pytest.raises(ConversationTooLong) as e:
        session.ask("and now?")
    assert str(e.value) == (f"the conversation is too long for the context ({e.value.tokens} tokens, the model "
                            f"holds 300): clear() starts afresh, or drop the oldest turns of .history")
    assert e.value.tokens >= 300 and len(session.history) == 1  # nothing was added
    session.clear()
    assert isinstance(session.ask("and now?"), str)


def test_chat_session_says_a_message_too_long_alone(golden_model, golden_dir, monkeypatch):
    session = _session(golden_model, golden_dir, monkeypatch, 300)
    session.history.append(([{"text": "hi"}], "ok"))
    with pytest.raises(ValueError, match=r"^the message is too long for the context \(\d+ tokens with the system "
                                         r"text, the model holds 300\): send a shorter one$") as e:
        session.ask("word " * 400)
    assert not isinstance(e.value, ConversationTooLong)


def test_chat_session_says_a_system_text_too_long_at_once(golden_model, golden_dir, monkeypatch):
    # accepted at the start (qwenvl chat --system ...), then every message failed on it
    monkeypatch.setattr(golden_model.config.lm, "max_position_embeddings", 300)
    processor = Processor.from_pretrained(golden_dir)
    processor.chat_format = "chatml"
    with pytest.raises(ValueError, match=r"^the system text is too long for the context \(\d+ tokens with an empty "
                                         r"message, the model holds 300\): give a shorter one$"):
        ChatSession(golden_model, processor, system="word " * 400)
    assert ChatSession(golden_model, processor, system="Be brief.").system == "Be brief."


def test_predict_records_a_prompt_of_a_wrong_type_and_answers_the_others(golden_model, golden_dir):
    # a None (a missing field read from a file) or an int among good prompts was a TypeError for the whole batch,
    # with on_error="record" too: every other answer lost
    processor = Processor.from_pretrained(golden_dir)
    params = SamplingParams(max_new_tokens=2, do_sample=False)
    want = predict(golden_model, processor, ["Hello", "What is it?"], params, batch_size=2)
    got = predict(golden_model, processor, ["Hello", None, 7, "What is it?"], params, batch_size=2, on_error="record")
    assert [p.error for p in got] == [
        None, "prompts[1] is of type NoneType, not a prompt: a prompt is a string, a list-format list or a list of messages",
        "prompts[2] is of type int, not a prompt: a prompt is a string, a list-format list or a list of messages", None]
    assert [p.response for p in (got[0], got[3])] == [p.response for p in want]
    assert got[1].response == "" and got[1].prompt == "null"


def test_predict_names_a_prompt_of_a_wrong_type(golden_model, golden_dir):
    processor = Processor.from_pretrained(golden_dir)
    with pytest.raises(ValueError, match=r"^prompts\[2\] is of type NoneType, not a prompt: a prompt is a string, "
                                         r"a list-format list or a list of messages$"):
        predict(golden_model, processor, ["Hello", "Bye", None], SamplingParams(max_new_tokens=2))


JUNK_LIST = ("is a list, but its item 0 is 1, not a dict: a prompt is a string, a list-format list or a list of messages "
             "(list format: [{'image': PATH}, {'text': TEXT}], messages: [{'role': 'user', 'content': TEXT or list "
             "format}])")
JUNK_DICT = JUNK_LIST.replace("is 1, not a dict", "is {'foo': 1}, with none of the keys 'role', 'image', 'text' or 'box'")


def test_predict_names_a_prompt_that_is_a_list_of_junk(golden_model, golden_dir):
    # [1, 2] or [{"foo": 1}] reached the tokenizer: "unsupported list-format element (expected a dict): 1", naming
    # neither the prompt nor what a prompt may be
    processor = Processor.from_pretrained(golden_dir)
    params = SamplingParams(max_new_tokens=2, do_sample=False)
    want = predict(golden_model, processor, ["Hello", "Bye"], params)
    got = predict(golden_model, processor, ["Hello", [1, 2], [{"foo": 1}], "Bye"], params, batch_size=2,
                  on_error="record")
    assert [p.error for p in got] == [None, f"prompts[1] {JUNK_LIST}", f"prompts[2] {JUNK_DICT}", None]
    assert [p.response for p in (got[0], got[3])] == [p.response for p in want]
    assert got[1].prompt == "[1, 2]" and got[2].response == ""
    for prompts, error in ((["Hello", [1, 2]], f"prompts[1] {JUNK_LIST}"), ([[{"foo": 1}]], f"prompts[0] {JUNK_DICT}")):
        with pytest.raises(ValueError) as e:
            predict(golden_model, processor, prompts, params)
        assert str(e.value) == error
    with pytest.raises(ValueError) as e:  # the processor says it too, naming the prompt of a batch
        processor(["Hello", [1, 2]])
    assert str(e.value) == f"the prompt (prompt 2 of the 2 in the batch) {JUNK_LIST}"


def test_chat_session_without_params_uses_the_checkpoints_chat_settings(golden_model, golden_dir, monkeypatch):
    # ChatSession(model, processor) was a TypeError (params required), where predict and stream_text default
    import qwenvl.inference as inference

    seen = []

    def fake_stream_text(model, processor, messages, params, *args, **kwargs):
        seen.append(params)
        yield "ok"

    monkeypatch.setattr(inference, "stream_text", fake_stream_text)
    processor = Processor.from_pretrained(golden_dir)
    processor.chat_format = "chatml"
    assert ChatSession(golden_model, processor).ask("hi") == "ok"
    assert seen == [inference.chat_params(golden_model)]
    mine = SamplingParams(max_new_tokens=1, do_sample=False)
    assert ChatSession(golden_model, processor, mine).ask("hi") == "ok" and seen[-1] is mine


@pytest.mark.parametrize("path", ["a\ud800.png", "y" * 300])
def test_chat_session_refuses_a_typed_image_path_no_prompt_can_show(golden_model, golden_dir, monkeypatch, path):
    # a lone surrogate reached the tokenizer, which read it as U+FFFD: "image not found: ...a\ufffd.png", another
    # name than the one typed; said as the processor and add_image say it, and the conversation is unchanged
    session = _session(golden_model, golden_dir, monkeypatch, 2048)
    with pytest.raises(ValueError, match=r"^image path .* a prompt cannot show it \(<img>PATH</img>\)$") as e:
        session.ask(f"look <img>{path}</img> here")
    assert "\ufffd" not in str(e.value) and str(e.value) == image_path_error(path)
    assert session.history == [] and session.images == {}
