"""How request bodies are read: what of them stays in memory, and which JSON types a field takes."""

from __future__ import annotations

import asyncio
import gc
import json
import tracemalloc

import httpx
from starlette.requests import Request

from qwenvl.serve import app as app_module
from qwenvl.serve import protocol

from .conftest import MODEL_NAME, data_url


def test_ignored_fields_are_not_kept_for_the_whole_request(server, monkeypatch):
    """FastAPI kept the parsed JSON of a body for the whole request, fields this server ignores included: 20 MiB of
    ``[{}, {}, ...]`` is ~540 MB of Python objects, held by every request in progress (6 such requests queued for
    one slot took a server from 0.5 GB to 3.8 GB). Once validated, only the request model is left."""
    junk = 300_001
    alive = []
    read_image = app_module.read_image

    def looking(*args):  # while the request is prepared, after its body was parsed
        gc.collect()
        alive.append(any(type(o) is list and len(o) == junk for o in gc.get_objects()))
        return read_image(*args)

    monkeypatch.setattr(app_module, "read_image", looking)
    image = {"type": "image_url", "image_url": {"url": data_url("tests/fixtures/qwenvl-tiny/images/cat.png")}}
    body = {"model": MODEL_NAME, "max_tokens": 2, "messages": [{"role": "user", "content": [image]}]}
    for path, request in (("/chat/completions", body),
                          ("/completions", {**body, "messages": None, "prompt": "<img>a</img>hi",
                                            "images": [image["image_url"]["url"]]})):
        content = json.dumps(request)[:-1] + ', "junk": [' + "{}, " * (junk - 1) + "{}]}"  # no such list here
        r = httpx.post(server.v1 + path, content=content, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 200, r.text
    assert alive == [False, False]


def test_json_types_are_strict(server):
    """pydantic's lax mode read "stream": "yes" (or "true", 1) as true, "max_tokens": "5" as 5 and "temperature":
    "0.5" as 0.5; OpenAI's API answers such a request 400. A boolean field takes JSON true/false only and a number
    field a JSON number only; an integer written 5.0 is still 5 (1.5 is refused)."""
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    completion = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}
    wrong = [("stream", v) for v in ("yes", "true", "false", 1, 0, 2, [])]
    wrong += [("stream_options", {"include_usage": v}) for v in ("yes", 1)]
    wrong += [(f, v) for f in ("max_tokens", "n", "top_k", "seed", "min_tokens") for v in ("5", "1", 1.5, True, "x")]
    wrong += [(f, v) for f in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
              for v in ("0.5", "1", "0", True, "nan")]
    wrong += [("logprobs", v) for v in ("yes", "0", 1.5)]
    for path, body, extra in (("/chat/completions", chat, [("max_completion_tokens", "3")]),
                              ("/completions", completion, [("echo", "no"), ("echo", 0), ("best_of", "1")])):
        for field, value in wrong + extra:
            request = {**body, field: value, **({"stream": True} if field == "stream_options" else {})}
            r = httpx.post(server.v1 + path, json=request, timeout=60)
            assert r.status_code == 400, (path, field, value, r.text)
            error = r.json()["error"]
            assert error["param"].split(".")[0] == field and error["message"].startswith(field), (path, field, error)
        for extra in ({"stream": False}, {"stream": None}, {"max_tokens": 2.0}, {"n": 1.0}, {"seed": 3.0},
                      {"temperature": 1}, {"top_p": 1}, {"repetition_penalty": 1}, {"logprobs": False},
                      {"logprobs": None}, {"presence_penalty": 0}):
            r = httpx.post(server.v1 + path, json={**body, **extra}, timeout=60)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, (path, extra, r.text)
        r = httpx.post(server.v1 + path, json={**body, "stream": True, "stream_options": {"include_usage": True}})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text


def test_a_union_field_of_a_wrong_type_says_what_it_takes(server):
    """``{"stop": 5}`` was answered "stop.str: Input should be a valid string" with param "stop.str" (pydantic's
    name for the union's first branch; a list is as welcome), and a content part's field was named after the part's
    type too: "messages.0.content.0.image_url.image_url"."""
    def chat(content="hi", **extra):
        return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}

    completion = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}
    strings = "Input should be a string or a list of strings"
    for path, body, param, message in (
        ("/chat/completions", chat(stop=5), "stop", strings),
        ("/chat/completions", chat(stop={"a": 1}), "stop", strings),
        ("/completions", {**completion, "stop": 5.5}, "stop", strings),
        ("/completions", {**completion, "stop": ["a", 5]}, "stop.1", "Input should be a valid string"),
        ("/completions", {**completion, "prompt": 5}, "prompt", strings),
        ("/completions", {**completion, "prompt": None}, "prompt", strings),
        ("/chat/completions", chat(5), "messages.0.content", "Input should be a string or a list of content parts"),
        ("/chat/completions", chat([{"type": "image_url", "image_url": 5}]), "messages.0.content.0.image_url",
         "Input should be a valid dictionary"),
        ("/chat/completions", chat([{"type": "image_url", "image_url": {"url": 5}}]),
         "messages.0.content.0.image_url.url", "Input should be a valid string"),
        ("/chat/completions", chat([{"type": "image_url"}]), "messages.0.content.0.image_url", "Field required"),
        ("/chat/completions", chat([{"type": "text", "text": 5}]), "messages.0.content.0.text",
         "Input should be a valid string"),
    ):
        r = httpx.post(server.v1 + path, json=body, timeout=60)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["message"].startswith(f"{param}: {message}"), (body, error)
    for stop in ("x", ["x", "y"], None, []):
        for path, body in (("/chat/completions", chat(stop=stop)), ("/completions", {**completion, "stop": stop})):
            assert httpx.post(server.v1 + path, json=body, timeout=60).status_code == 200, (path, stop)


def test_the_body_bytes_are_dropped_before_its_json_is_parsed():
    """A body's bytes, its decoded text and the objects parsed from it were held at once (json.loads of the bytes
    decodes them first): ~3x the body at its peak, 60 MiB for 20 MiB of a data: URL. The bytes go once decoded."""
    url = "data:image/png;base64," + "A" * 2**22
    body = json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
    chunks = [body[: len(body) // 2].encode(), body[len(body) // 2 :].encode()]  # joined into bytes the trace sees
    del url, body

    async def receive():
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-type", b"application/json")]}

    async def parse() -> tuple[protocol.ChatCompletionRequest, int]:
        tracemalloc.start()
        try:
            parsed = await app_module._parse(Request(scope, receive), protocol.ChatCompletionRequest)
            return parsed, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    parsed, peak = asyncio.run(parse())
    assert len(parsed.messages[0].content[0].image_url.url) > 2**22
    assert peak < 2.5 * 2**22, peak  # the text and the parsed URL: 2x; with the bytes 3x
