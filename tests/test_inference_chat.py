"""ChatSession and predict: what the user is told when a message cannot be answered."""

from __future__ import annotations

import pytest

from qwenvl import Processor
from qwenvl.generation import SamplingParams
from qwenvl.inference import ChatSession, ConversationTooLong, predict


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
