"""Fields of a request that no model of the server reads: a misspelling of one of ours is refused (OpenAI's API
answers 400 to any field it does not know), the others (what OpenAI clients send that changes nothing here) are
logged by name, as vLLM does, and the request is answered."""

from __future__ import annotations

import logging
import typing

import httpx
import openai
import pytest
from openai.types import completion_create_params
from openai.types.chat import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionContentPartImageParam,
    ChatCompletionContentPartTextParam,
    ChatCompletionStreamOptionsParam,
    ChatCompletionSystemMessageParam,
    ChatCompletionUserMessageParam,
)
from openai.types.chat import completion_create_params as chat_create_params
from openai.types.chat.chat_completion_content_part_image_param import ImageURL

from qwenvl.serve import protocol

from .conftest import MODEL_NAME, data_url

CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}
IGNORED = "The following fields were present in the request but ignored: "


def ignored_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "qwenvl.serve.app" and IGNORED in r.getMessage()]


@pytest.mark.parametrize("path, body", [("/chat/completions", CHAT), ("/completions", COMPLETION)])
def test_a_misspelled_field_is_refused_naming_the_field_it_misspells(server, path, body):
    """``"max_tokns": 3`` was answered 200 with the default answer length (512 tokens with Qwen-VL-Chat): the
    misspelled field was dropped unseen."""
    request = {k: v for k, v in body.items() if k != "max_tokens"}
    r = httpx.post(server.v1 + path, json={**request, "max_tokns": 3}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {"message": "Unrecognized request argument supplied: max_tokns (did you mean "
                                            "max_tokens?)", "type": "invalid_request_error",
                                 "param": "max_tokns", "code": None}


def test_misspellings_are_found_in_nested_objects_and_whatever_the_case(server):
    body = {**CHAT, "Temperature": 0, "messages": [{"role": "user", "content": "hi", "names": "bob"}]}
    r = httpx.post(server.v1 + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == ("Unrecognized request arguments supplied: messages.0.names (did you "
                                            "mean name?), Temperature (did you mean temperature?)")  # as sent
    assert r.json()["error"]["param"] == "messages.0.names"


def test_fields_clients_send_that_change_nothing_are_answered_and_logged(server, caplog):
    """What the openai client sends for options of OpenAI's API this server does not implement, and a field of a
    content part, is logged by name (one line per request) and the request answered."""
    caplog.set_level(logging.WARNING, logger="qwenvl.serve.app")
    c = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)
    image = {"type": "image_url", "image_url": {"url": data_url("tests/fixtures/qwenvl-tiny/images/cat.png")},
             "prompt_cache_breakpoint": True}
    answer = c.chat.completions.create(model=MODEL_NAME, max_tokens=2, user="u", metadata={"k": "v"}, store=False,
                                       service_tier="auto", messages=[{"role": "user", "content": [image]}])
    assert answer.choices[0].message.content is not None
    [line] = ignored_lines(caplog)  # in the order the client sent them
    assert sorted(line.removeprefix(IGNORED).split(", ")) == [
        "'messages.0.content.0.prompt_cache_breakpoint'", "'metadata'", "'service_tier'", "'store'"]
    caplog.clear()
    r = httpx.post(server.v1 + "/completions", json={**COMPLETION, "priority": 0}, timeout=60)  # vLLM's
    assert r.status_code == 200, r.text
    assert ignored_lines(caplog) == [IGNORED + "'priority'"]
    caplog.clear()
    r = httpx.post(server.v1 + "/completions", json=COMPLETION, timeout=60)
    assert r.status_code == 200, r.text
    assert ignored_lines(caplog) == []


@pytest.mark.parametrize("path, body", [("/chat/completions", CHAT), ("/completions", COMPLETION)])
def test_vllms_sampling_extensions_we_do_not_implement_are_refused_unless_at_their_default(server, path, body,
                                                                                           caplog):
    """``"ignore_eos": true`` (vLLM's benchmarks send it) was logged as ignored and the answer stopped at the first
    end-of-text: a benchmark measured other lengths than it asked for, unwarned."""
    caplog.set_level(logging.WARNING, logger="qwenvl.serve.app")
    for extra in ({"ignore_eos": True}, {"min_p": 0.05}, {"stop_token_ids": [151643]}, {"use_beam_search": True},
                  {"guided_json": {"type": "object"}}):
        r = httpx.post(server.v1 + path, json={**body, **extra}, timeout=60)
        assert r.status_code == 400, (extra, r.text)
        [name] = extra
        assert r.json()["error"]["param"] == name
        assert r.json()["error"]["message"].startswith(f"{name}: not supported (vLLM's extension; only its default")
    defaults = {"ignore_eos": False, "min_p": 0, "stop_token_ids": [], "use_beam_search": False, "guided_json": None,
                "length_penalty": 1.0, "include_stop_str_in_output": False}
    r = httpx.post(server.v1 + path, json={**body, **defaults}, timeout=60)
    assert r.status_code == 200, r.text
    assert ignored_lines(caplog) == []  # asking for nothing, and known: not said as ignored


@pytest.mark.parametrize("name, default", [("ignore_eos", "false"), ("min_p", "0.0"), ("length_penalty", "1.0"),
                                           ("use_beam_search", "false"), ("guided_json", "null")])
def test_a_refused_vllm_extension_says_vllms_default(name, default):
    """The default each field is marked with, as written: false, not 0.0 (marks that compare equal would be one in
    typing's cache of Annotated)."""
    for request in (protocol.ChatCompletionRequest.model_validate({**CHAT, name: "x"}),
                    protocol.CompletionRequest.model_validate({**COMPLETION, name: "x"})):
        assert request.unsupported() == f"{name}: not supported (vLLM's extension; only its default, {default}, is)"


@pytest.mark.parametrize("model, body", [(protocol.ChatCompletionRequest, CHAT), (protocol.CompletionRequest,
                                                                                  COMPLETION)])
def test_every_field_of_any_type_is_refused_when_it_asks_for_something(model, body):
    """A field typed Any is one whose option this server does not do (a vLLM extension is marked with its default):
    one declared but not refused would be dropped unseen, neither refused nor logged as ignored."""
    untyped = [name for name, field in model.model_fields.items() if field.annotation is typing.Any]
    assert {"min_p", "logit_bias"} <= set(untyped)  # a marked field's annotation is Any to pydantic
    assert [name for name in untyped if model.model_validate({**body, name: "x"}).unsupported() is None] == []


def test_a_misspelled_required_field_is_said_with_the_field_sent(server):
    # pydantic's "messages: Field required" did not say that the request had "mesages"
    r = httpx.post(server.v1 + "/chat/completions", json={"mesages": CHAT["messages"], "max_tokens": 2}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == "messages: Field required (the request has 'mesages': did you mean messages?)"
    r = httpx.post(server.v1 + "/chat/completions", json={"messages": [{"rol": "user", "content": "hi"}]}, timeout=60)
    assert r.json()["error"]["message"] == "messages.0.role: Field required (the request has 'rol': did you mean role?)"
    r = httpx.post(server.v1 + "/completions", json={"max_tokens": 2}, timeout=60)  # nothing close: as before
    assert r.json()["error"]["message"] == "prompt: Field required"


def test_the_log_line_of_many_ignored_fields_is_bounded(server, caplog):
    caplog.set_level(logging.WARNING, logger="qwenvl.serve.app")
    body = {**CHAT, **{f"x{k}": 0 for k in range(1000)}, "y" * 10_000: 0}
    r = httpx.post(server.v1 + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    [line] = ignored_lines(caplog)
    assert line.startswith(IGNORED + "'x0', 'x1', ") and line.endswith(", 'x9' and 991 more")
    body = {**CHAT, "y" * 10_000: 0}
    caplog.clear()
    assert httpx.post(server.v1 + "/chat/completions", json=body, timeout=60).status_code == 200
    [line] = ignored_lines(caplog)
    assert line == IGNORED + repr("y" * 77 + "...")


# the fields of vLLM's chat and completion requests that are no field of ours (clients written for vLLM send them)
VLLM = ("min_p", "ignore_eos", "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output",
        "use_beam_search", "length_penalty", "prompt_logprobs", "add_generation_prompt", "continue_final_message",
        "chat_template", "chat_template_kwargs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
        "guided_decoding_backend", "structured_outputs", "priority", "request_id", "truncate_prompt_tokens",
        "allowed_token_ids", "bad_words", "spaces_between_special_tokens", "add_special_tokens", "documents",
        "mm_processor_kwargs", "return_tokens_as_token_ids", "logits_processors", "cache_salt", "prompt_embeds",
        "echo", "add_generation_prompt", "vllm_xargs", "kv_transfer_params", "return_token_ids",
        # other servers' (OpenRouter, text-generation-webui, TabbyAPI): refused as misspellings before
        "top_a", "models", "temperature_last", "repetition_penalty_range", "logit_bias_type", "top_logprobs_num")


@pytest.mark.parametrize("ours, theirs", [
    (protocol.ChatCompletionRequest, [*typing.get_type_hints(chat_create_params.CompletionCreateParamsBase), *VLLM]),
    (protocol.CompletionRequest, [*typing.get_type_hints(completion_create_params.CompletionCreateParamsBase),
                                  *VLLM]),
    (protocol.Message, [k for m in (ChatCompletionSystemMessageParam, ChatCompletionUserMessageParam,
                                    ChatCompletionAssistantMessageParam) for k in typing.get_type_hints(m)]),
    (protocol.TextPart, typing.get_type_hints(ChatCompletionContentPartTextParam)),
    (protocol.ImagePart, typing.get_type_hints(ChatCompletionContentPartImageParam)),
    (protocol.ImageURL, typing.get_type_hints(ImageURL)),
    (protocol.StreamOptions, typing.get_type_hints(ChatCompletionStreamOptionsParam)),
])
def test_no_field_of_openais_api_or_vllms_is_taken_for_a_misspelling(ours, theirs):
    """A field a real client sends is never refused as a misspelling of one of ours ("store" is near "stream")."""
    assert [(name, protocol.close_field(name, ours.model_fields)) for name in theirs
            if name not in ours.model_fields and protocol.close_field(name, ours.model_fields)] == []
