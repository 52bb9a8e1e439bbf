"""What the README says the server does, checked where it was not: a long chat keeps going (its oldest turns, and
their pictures, give way to the answer's room in the context and to --max_images_per_request); OpenAI's optional
fields are taken as OpenAI takes them (``null`` means "the default"; ``logprobs: 0`` on /v1/completions asks for
log-probabilities, refused; a refusal names the field sent); ``--help`` says every default, and a --max_model_len
too small is said before the weights load."""

from __future__ import annotations

import argparse
import socket

import httpx
import pytest
from PIL import Image

from qwenvl import Processor
from qwenvl.cli import main
from qwenvl.serve import cli
from qwenvl.serve.app import ServeSettings

from .conftest import MODEL_NAME, data_url, expected_answer, make_engine, running

CONTEXT = 256  # positions per slot: a few turns of the conversation below fill it
CAT = "tests/fixtures/qwenvl-tiny/images/cat.png"
STREET = "tests/fixtures/qwenvl-tiny/images/street.jpg"


def test_a_long_chat_drops_its_oldest_turns_to_leave_the_answer_room(golden_dir, golden_model):
    """``qwenvl serve`` trims chat history to the slots' positions (max_window_size <= max_model_len); the window
    counts the history only, so a long chat filled the context and every later turn was refused with
    context_length_exceeded, for ever. The oldest turns give way instead, as far as the answer needs."""
    processor = Processor.from_pretrained(golden_dir, allowed_media_dir=None)
    processor.chat_format, processor.max_window_size = "chatml", CONTEXT  # as qwenvl serve sets the window
    history: list[dict] = [{"role": "system", "content": "Be brief."}]
    with running(make_engine(golden_model, processor, max_batch_size=1, max_model_len=CONTEXT), processor) as r:
        for k in range(8):
            history.append({"role": "user", "content": f"question {k}: " + "tell me more " * 8})
            resp = httpx.post(r.v1 + "/chat/completions", timeout=60, json={
                "model": MODEL_NAME, "messages": history, "max_tokens": 16, "temperature": 0})
            assert resp.status_code == 200, (k, resp.json())
            body = resp.json()
            assert body["usage"]["prompt_tokens"] + 16 <= CONTEXT
            history.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
        # the last answer is the model's to the system message and the newest turns that leave 16 positions
        asked = history[:-1]
        kept = newest_turns(processor, asked, 16)
        assert len(kept) < len(asked)  # history was dropped ...
        want, prompt_len, _ = expected_answer(golden_model, processor, kept, [], 16)
        assert (history[-1]["content"], body["usage"]["prompt_tokens"]) == (want, prompt_len)  # ... oldest first

        # without max_tokens the room kept is the default answer length (generation_config's 512), at most half
        # the context
        asked = history + [{"role": "user", "content": "and?"}]
        resp = httpx.post(r.v1 + "/chat/completions", timeout=60, json={
            "model": MODEL_NAME, "messages": asked, "temperature": 0, "max_tokens": None})
        assert resp.status_code == 200, resp.json()
        kept = newest_turns(processor, asked, CONTEXT // 2)
        assert 3 < len(kept) < len(asked)  # some history kept, some dropped
        assert resp.json()["usage"]["prompt_tokens"] == len(processor.build_messages_prompt(kept)[1])

        # a question that cannot fit on its own is still refused, naming the context
        resp = httpx.post(r.v1 + "/chat/completions", timeout=60, json={
            "model": MODEL_NAME, "max_tokens": 16,
            "messages": history + [{"role": "user", "content": "tell me more " * 100}]})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"


def test_pictures_of_a_long_chat_count_as_far_as_its_kept_turns(golden_model, processor):
    """The chat page sends the whole conversation, its pictures included: with more pictures in it than
    --max_images_per_request, every later turn was refused, though the oldest turns (and their pictures) are
    what a long chat drops. The oldest turns give way; a last message with too many pictures is still refused."""
    def turn(image: str, text: str) -> tuple[dict, dict]:
        ours = {"role": "user", "content": [{"image": "x"}, {"text": text}]}
        theirs = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                              {"type": "text", "text": text}]}
        return ours, theirs

    answer = {"role": "assistant", "content": "A picture."}
    (_, t1), (o2, t2), (o3, t3) = turn(CAT, "What is it?"), turn(STREET, "And this?"), turn(CAT, "Again?")
    settings = ServeSettings(model_name=MODEL_NAME, max_images_per_request=2)
    with running(make_engine(golden_model, processor, max_batch_size=1), processor, settings) as r:
        resp = httpx.post(r.v1 + "/chat/completions", timeout=60, json={
            "model": MODEL_NAME, "messages": [t1, answer, t2, answer, t3], "max_tokens": 8, "temperature": 0})
        assert resp.status_code == 200, resp.json()
        want, prompt_len, _ = expected_answer(golden_model, processor, [o2, answer, o3],
                                              [Image.open(STREET), Image.open(CAT)], 8)
        assert (resp.json()["choices"][0]["message"]["content"], resp.json()["usage"]["prompt_tokens"]) == \
            (want, prompt_len)

        three = {"role": "user", "content": t3["content"][:1] * 3 + t3["content"][1:]}
        resp = httpx.post(r.v1 + "/chat/completions", timeout=60, json={
            "model": MODEL_NAME, "messages": [t1, answer, three], "max_tokens": 8})
        assert resp.status_code == 400 and "3 images in one request; this server takes at most 2" in \
            resp.json()["error"]["message"]


def newest_turns(processor: Processor, messages: list[dict], room: int) -> list[dict]:
    """The system message and the most user/assistant turns, newest first, whose prompt leaves ``room``."""
    return next(messages[:1] + messages[n:] for n in range(1, len(messages), 2)
                if len(processor.build_messages_prompt(messages[:1] + messages[n:])[1]) + room <= CONTEXT)


@pytest.mark.parametrize("field", ["n", "presence_penalty", "frequency_penalty", "stream", "min_tokens", "logprobs",
                                   "top_logprobs", "stop", "seed", "stream_options", "response_format",
                                   "echo"])
def test_null_is_the_default(server, field):
    """OpenAI's API documents these fields as nullable, and clients generated from its spec send null for what
    they leave out: it is the default, not a 400."""
    base = {"model": MODEL_NAME, "max_tokens": 3, "temperature": 0}
    chat = httpx.post(server.v1 + "/chat/completions", timeout=60,
                      json={**base, "messages": [{"role": "user", "content": "Hello"}], field: None})
    assert chat.status_code == 200, chat.json()
    plain = httpx.post(server.v1 + "/chat/completions", timeout=60,
                       json={**base, "messages": [{"role": "user", "content": "Hello"}]})
    assert chat.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
    completion = httpx.post(server.v1 + "/completions", timeout=60, json={**base, "prompt": "Hello", field: None})
    assert completion.status_code == 200, completion.json()


def test_logprobs_zero_on_completions_is_refused(server):
    """On /v1/completions ``logprobs`` is a count and 0 asks for the chosen tokens' log-probabilities (OpenAI,
    vLLM): answering without them would drop the option silently."""
    r = httpx.post(server.v1 + "/completions", timeout=60,
                   json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2, "logprobs": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    ok = httpx.post(server.v1 + "/chat/completions", timeout=60,  # chat's logprobs is a flag: false asks nothing
                    json={"model": MODEL_NAME, "max_tokens": 2, "logprobs": False,
                          "messages": [{"role": "user", "content": "Hello"}]})
    assert ok.status_code == 200


def test_every_serve_flag_with_a_default_says_it():
    """The README sends users to ``qwenvl serve --help`` for the limits; --port (8000), --max_tokens_cap (2048),
    --max_images_per_request (4) and --remote_image_timeout (10 s) did not say theirs."""
    parser = cli.add_parser(argparse.ArgumentParser().add_subparsers())
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            assert "default" in (action.help or ""), action.option_strings[0]


@pytest.mark.parametrize("value", ["0", "1", "-5"])
def test_a_max_model_len_too_small_is_said_before_loading(golden_dir, capsys, value):
    """--max_model_len 0 was taken for "not given" (the checkpoint's 2048 served instead, silently), and 1 or less
    was refused only after the weights had loaded."""
    busy = socket.socket()  # should the check let it through, the server stops at the port, not serving for ever
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        assert main(["serve", "--model", str(golden_dir), "--port", str(busy.getsockname()[1]),
                     "--max_model_len", value]) == 2
    finally:
        busy.close()
    assert capsys.readouterr().err.strip() == \
        f"qwenvl serve: error: --max_model_len must be >= 2 (a prompt token and an answer token), got {value}"


def test_max_completion_tokens_over_the_cap_is_named_as_sent(server):
    """OpenAI's newer name for max_tokens: the refusal named max_tokens, a field the request did not have."""
    hello = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hello"}]}
    r = httpx.post(server.v1 + "/chat/completions", timeout=60, json={**hello, "max_completion_tokens": 5000})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "max_completion_tokens"
    assert r.json()["error"]["message"] == "max_completion_tokens is 5000; this server allows at most 2048"
