"""Requests found by fuzzing the server (schemathesis against /openapi.json, and hand-made hostile bodies): each
gets a 4xx that names the problem, and the server keeps serving."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx

from qwenvl.serve import app as app_module
from qwenvl.serve.app import ServeSettings
from qwenvl.serve.engine import Engine

from .conftest import MODEL_NAME, data_url, make_engine, raw, running


def chat(content: str = "hi", **extra) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 3, **extra}


def post(server, path: str, body=None, content: bytes | None = None, headers: dict | None = None) -> httpx.Response:
    return httpx.post(server.v1 + path, json=body, content=content, headers=headers, timeout=60)


def error_of(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_a_repetition_penalty_float32_cannot_hold_answers(server):
    """repetition_penalty=5e-324 passed "> 0" but is 0 in float32: logits / 0 gave NaN probabilities and a 500
    ("probability tensor contains either inf, nan ...") from the engine; 1e300 is inf there. Both act as the
    nearest float32."""
    for value in (5e-324, 1e-46, 1e-300, 1e300):
        r = post(server, "/chat/completions", chat(repetition_penalty=value, temperature=1, seed=0))
        assert r.status_code == 200, r.text
        r = post(server, "/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 3,
                                          "repetition_penalty": value, "temperature": 1})
        assert r.status_code == 200, r.text
    for value in (0, -1):
        error = error_of(post(server, "/chat/completions", chat(repetition_penalty=value)))
        assert error["param"] == "repetition_penalty", error
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_a_wrong_method_says_which_methods_are_allowed(server):
    """Starlette's 405 carries an Allow header (RFC 9110); our error handler dropped it."""
    for method, path, allowed in (("GET", "/v1/chat/completions", "POST"), ("DELETE", "/v1/completions", "POST"),
                                  ("TRACE", "/health", "GET, HEAD"), ("POST", "/v1/models", "GET")):
        r = httpx.request(method, server.url + path)
        assert error_of(r, 405)["message"] == "Method Not Allowed"
        assert set(r.headers.get("allow", "").split(", ")) == set(allowed.split(", ")), (method, path, r.headers)


def test_an_unknown_path_is_named(server):
    """A path no endpoint serves was answered "Not Found" alone; OpenAI's API names the request (a long path
    cut short)."""
    for method, path, shown in (("GET", "/v1/nope", "'/v1/nope'"), ("POST", "/v1/chat/completion", "'/v1/chat/completion'"),
                                ("GET", "/" + "x" * 200, repr("/" + "x" * 76 + "..."))):
        error = error_of(httpx.request(method, server.url + path), 404)
        assert error["message"] == f"Invalid URL ({method} {shown})" and error["code"] == "not_found", error


def test_a_body_that_is_not_a_json_object_is_named(server):
    """An empty body was answered 'Field required', a JSON body without Content-Type: application/json (curl -d
    sends a form type) 'Input should be a valid dictionary or object to extract fields from', a body nested too
    deeply or with a 5000-digit number 'There was an error parsing the body': none says what is wrong."""
    body = httpx.Request("POST", "/", json=chat()).content
    for content, headers, words in (
        (b"", {"content-type": "application/json"}, "the request body is empty"),
        (b"", {}, "the request body is empty"),
        (body, {"content-type": "application/x-www-form-urlencoded"}, "content-type: application/json"),
        (body, {"content-type": "text/plain"}, "content-type: application/json"),
        (body, {}, "content-type: application/json"),
        (b"null", {"content-type": "application/json"}, "must be a json object"),
        (b"[1, 2]", {"content-type": "application/json"}, "must be a json object"),
        (b"[" * 100_000 + b"]" * 100_000, {"content-type": "application/json"}, "nested too deeply"),
        (body[:-1] + b', "max_tokens": ' + b"9" * 5000 + b"}", {"content-type": "application/json"}, "digits"),
    ):
        for path in ("/chat/completions", "/completions"):
            error = error_of(post(server, path, content=content, headers=headers))
            assert words in error["message"].lower(), (content[:40], headers, error)
            assert error["param"] is None and "\n" not in error["message"]
    assert post(server, "/chat/completions", chat()).status_code == 200


def test_booleans_are_not_numbers(server):
    """n=true, max_tokens=true, temperature=false ... were taken as 1 and 0: a flag in the wrong place."""
    for field in ("n", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
                  "repetition_penalty", "min_tokens"):
        for value in (True, False):
            error = error_of(post(server, "/chat/completions", chat(**{field: value})))
            assert error["param"] == field and "boolean" in error["message"], (field, error)
    error = error_of(post(server, "/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": True}))
    assert error["param"] == "max_tokens"
    for extra in ({"n": 1.0}, {"max_tokens": 3.0}, {"temperature": 0}, {"top_k": 0}, {"seed": 7, "temperature": 1}):
        assert post(server, "/chat/completions", chat(**extra)).status_code == 200, extra


def test_openapi_documents_the_errors_the_server_sends(server):
    """/openapi.json promised 422 bodies (never sent: validation errors are 400s in OpenAI's shape) and no other
    error, and described /metrics as JSON."""
    spec = httpx.get(server.url + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = spec["paths"][path]["post"]["responses"]
        assert "422" not in responses and {"200", "4XX", "5XX"} <= set(responses), responses
        ref = responses["4XX"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
        error = spec["components"]["schemas"][ref]
        assert error["required"] == ["error"], error
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    fields = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]  # the bounds a fuzzer reads
    assert {"exclusiveMinimum": 0, "maximum": 1, "type": "number"} in fields["top_p"]["anyOf"]
    assert {"exclusiveMinimum": 0, "type": "number"} in fields["repetition_penalty"]["anyOf"]


def test_requests_beyond_the_slots_and_the_queue_are_refused_before_their_bodies_are_read(golden_model, processor):
    """Every connection's body was read whole before any bound applied (the engine's queue counts only requests
    already prepared): a thousand clients sending --max_request_bytes each held a thousand times that. At most
    max_batch_size + max_queue requests with a body are in progress; one more is answered 429 at once, and
    requests without a body (/health probes) still get through."""
    engine = make_engine(golden_model, processor, max_batch_size=1, max_queue=1)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n")
    with running(engine, processor) as r:
        uploads = [raw(r.url, head + b'{"model": "') for _ in range(2)]  # bodies still arriving
        for _ in range(200):
            refused = post(r, "/chat/completions", chat())
            if refused.status_code != 200:
                break
            time.sleep(0.02)
        error = error_of(refused, 429)
        assert error["code"] == "rate_limit_exceeded" and "2 requests" in error["message"], error
        assert refused.headers["retry-after"] == "1"  # when to try again (OpenAI's clients wait that long)
        assert httpx.get(r.url + "/health").json()["status"] == "ok"
        for s in uploads:  # the clients leave: their places are free again
            s.close()
        for _ in range(200):
            again = post(r, "/chat/completions", chat())
            if again.status_code != 429:
                break
            time.sleep(0.02)
        assert again.status_code == 200, again.text


def test_the_bytes_of_bodies_held_at_once_are_bounded(golden_model, processor):
    """Each request's body, up to --max_request_bytes, was held from its arrival until its answer started, with no
    bound but the count of requests in progress: 96 requests of 20 MiB held 2 GB. A body that would take the bytes
    held over --max_request_bytes_in_flight is answered 503, at once when its Content-Length says so, else as it
    arrives; smaller requests still fit, and a client that leaves gives its bytes back. /metrics shows the bytes held,
    the limit and the 503s."""
    settings = ServeSettings(model_name=MODEL_NAME, max_request_bytes=100_000, max_request_bytes_in_flight=150_000)
    big = chat(user="x" * 70_000)  # an ignored field: answered 200 when it fits
    with running(make_engine(golden_model, processor, max_batch_size=1), processor, settings) as r:
        assert post(r, "/chat/completions", big).status_code == 200
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n")
        assert metric(r, "qwenvl_request_body_bytes_limit") == 150_000
        assert metric(r, "qwenvl_request_body_bytes_in_flight") == 0
        upload = raw(r.url, head + b'{"model": "' + b"x" * 90_000)  # arriving slowly: 90 KB held
        for _ in range(200):
            if metric(r, "qwenvl_request_body_bytes_in_flight") == 90_011:
                break
            time.sleep(0.02)
        assert metric(r, "qwenvl_request_body_bytes_in_flight") == 90_011
        assert metric(r, "qwenvl_server_busy_total") == 0
        for _ in range(200):
            refused = post(r, "/chat/completions", big)
            if refused.status_code != 200:
                break
            time.sleep(0.02)
        error = error_of(refused, 503)
        assert error["type"] == "server_error" and error["code"] == "server_busy", error
        assert refused.headers["retry-after"] == "1"  # when to try again (OpenAI's clients wait that long)
        assert "busy" in error["message"] and "\n" not in error["message"], error
        assert post(r, "/chat/completions", chat()).status_code == 200  # what fits still gets through
        announced = raw(r.url, head.replace(b"100000", b"70000"))  # refused before a byte of its body is read
        head_of_503 = announced.recv(4096).split(b"\r\n\r\n")[0].lower()
        assert head_of_503.startswith(b"http/1.1 503 ") and b"\r\nretry-after: 1" in head_of_503, head_of_503
        announced.close()
        assert metric(r, "qwenvl_server_busy_total") == 2
        assert metric(r, "qwenvl_request_body_bytes_in_flight") == 90_011  # the refused ones hold nothing
        upload.close()  # its bytes are free again
        for _ in range(200):
            again = post(r, "/chat/completions", big)
            if again.status_code != 503:
                break
            time.sleep(0.02)
        assert again.status_code == 200, again.text
        assert metric(r, "qwenvl_request_body_bytes_in_flight") == 0


def metric(server, name: str) -> float:
    """The value of the unlabelled metric ``name`` in the server's /metrics."""
    lines = httpx.get(server.url + "/metrics").text.splitlines()
    return float(next(line.split(" ")[1] for line in lines if line.split(" ")[0] == name))


def test_a_body_is_given_back_once_its_request_is_prepared(golden_model, processor):
    """The parsed body (its data: URLs above all) is dropped once its request is prepared, and its bytes count no
    more: a non-streamed answer being generated does not keep a second large request out."""
    picking = threading.Event()
    go_on = threading.Event()

    class Held(Engine):
        def _pick(self, logits, rows):
            picking.set()
            go_on.wait(30)
            return super()._pick(logits, rows)

    settings = ServeSettings(model_name=MODEL_NAME, max_request_bytes=100_000, max_request_bytes_in_flight=100_000)
    big = chat(user="x" * 70_000)
    engine = make_engine(golden_model, processor, Held, max_batch_size=2)
    with running(engine, processor, settings) as r, concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(post, r, "/chat/completions", big)
            assert picking.wait(30)
            second = pool.submit(post, r, "/chat/completions", big)
            for _ in range(500):  # until the second is queued for a slot, or answered (503 when refused)
                if engine.waiting or second.done():
                    break
                time.sleep(0.02)
            assert not second.done(), second.result().text
        finally:
            go_on.set()
        assert first.result().status_code == second.result().status_code == 200


def test_images_are_decoded_a_few_requests_at_a_time(golden_model, processor, monkeypatch):
    """Requests were prepared in as many threads as arrived (anyio's 40), each decoding up to
    --max_images_per_request pictures of --max_image_pixels (a 115 KB PNG of 40 M pixels is 150 MB decoded): 40
    clients held 24 GB. At most ServeSettings.decode_concurrency requests turn bytes into pixels at once (their
    downloads are not held up by it)."""
    lock, decoding, peak, release = threading.Lock(), [0], [0], threading.Event()
    decode = app_module.decode_image

    def counting_decode(*args, **kwargs):
        with lock:
            decoding[0] += 1
            peak[0] = max(peak[0], decoding[0])
        release.wait(30)
        try:
            return decode(*args, **kwargs)
        finally:
            with lock:
                decoding[0] -= 1

    monkeypatch.setattr(app_module, "decode_image", counting_decode)
    image = {"type": "image_url", "image_url": {"url": data_url("tests/fixtures/qwenvl-tiny/images/cat.png")}}
    settings = ServeSettings(model_name=MODEL_NAME, decode_concurrency=2)
    engine = make_engine(golden_model, processor, max_batch_size=2)
    with running(engine, processor, settings) as r, concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = [pool.submit(post, r, "/chat/completions", chat([image])) for _ in range(6)]
        for _ in range(150):  # until all six are decoding, or a while if they may not
            if peak[0] == 6:
                break
            time.sleep(0.02)
        release.set()
        assert [a.result().status_code for a in answers] == [200] * 6
    assert peak[0] == 2


def test_a_prompt_that_cannot_fit_is_refused_before_its_images_are_read(server, monkeypatch):
    """A prompt over the context, or a max_tokens over the cap, was refused only after every image of the request
    had been fetched and decoded and the prompt tokenized again (and for /v1/completions the error named
    'messages'): a few bytes of text then cost the server seconds of work for a 400."""
    fetched = []
    monkeypatch.setattr(app_module, "read_image", lambda url, *args: fetched.append(url))
    image = {"type": "image_url", "image_url": {"url": data_url("tests/fixtures/qwenvl-tiny/images/cat.png")}}
    long = "word " * 1100  # the server's context is 1024 tokens
    for body, path, param in (
        (chat([image, {"type": "text", "text": long}]), "/chat/completions", "messages"),
        ({"model": MODEL_NAME, "prompt": "<img>a</img>" + long, "images": [image["image_url"]["url"]]},
         "/completions", "prompt"),
    ):
        error = error_of(post(server, path, body))
        assert error["code"] == "context_length_exceeded" and error["param"] == param, error
        error = error_of(post(server, path, {**body, "max_tokens": 10**6}))
        assert error["param"] == "max_tokens" and "at most 2048" in error["message"], error
    assert fetched == []


def test_a_prompt_with_more_image_spans_than_allowed_is_refused_before_tokenizing(server, processor, monkeypatch):
    """Each <img></img> span of a /v1/completions prompt is 258 token ids: 12 bytes of "<img>a</img>" became 2 KB of
    Python ints, so a 20 MiB prompt of spans took gigabytes and minutes of tokenizing before the span count was
    checked against --max_images_per_request."""
    encoded = []
    encode = processor.tokenizer.encode
    monkeypatch.setattr(processor.tokenizer, "encode", lambda text, *a, **kw: (encoded.append(text), encode(text, *a, **kw))[1])
    error = error_of(post(server, "/completions", {"model": MODEL_NAME, "prompt": "<img>a</img>" * 1000}))
    assert error["param"] == "prompt" and "1000 images" in error["message"] and "at most 4" in error["message"], error
    assert encoded == []


def test_stream_options_without_stream_are_refused(server):
    """stream_options on a request that is not streamed was taken silently (include_usage then changed nothing);
    OpenAI and vLLM answer 400."""
    completion = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 3}
    for path, body in (("/chat/completions", chat()), ("/completions", completion)):
        for stream in ({}, {"stream": False}, {"stream": None}):
            error = error_of(post(server, path, {**body, **stream, "stream_options": {"include_usage": True}}))
            assert error["param"] == "stream_options" and "stream is true" in error["message"], (path, stream, error)
        assert post(server, path, {**body, "stream_options": None}).status_code == 200
        r = post(server, path, {**body, "stream": True, "stream_options": {"include_usage": True}})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
        assert '"usage": {"prompt_tokens"' in r.text and r.text.endswith("data: [DONE]\n\n")
        assert error_of(post(server, path, {**body, "stream": 2}))["param"] == "stream"


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing(server, processor, monkeypatch):
    """15 MiB of plain text was tokenized whole (4 s of words, 19 s of one repeated letter) before the context
    check refused it. A token stands for at most 128 bytes (Qwen's longest, a run of spaces), a character is at
    least one byte: more than 128 x 1024 characters cannot fit this server's context of 1024, and are refused
    untokenized. A history turn that cannot fit is dropped, with the older ones, untokenized. The bound never
    refuses a prompt that fits: 1022 tokens of 128 spaces do, with a 2-token answer."""
    encoded = []
    encode = processor.tokenizer.encode
    monkeypatch.setattr(processor.tokenizer, "encode",
                        lambda text, *a, **kw: (encoded.append(len(text)), encode(text, *a, **kw))[1])
    too_long = " " * (128 * 1024 + 1)
    error = error_of(post(server, "/completions", {"model": MODEL_NAME, "prompt": too_long}))
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt", error
    assert "131073 characters" in error["message"] and "at most 128 bytes" in error["message"], error
    error = error_of(post(server, "/chat/completions", chat(too_long)))
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages", error
    assert encoded == []
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
               {"role": "user", "content": [{"type": "text", "text": too_long}]}, {"role": "assistant", "content": "c"},
               {"role": "user", "content": "d"}, {"role": "assistant", "content": too_long},
               {"role": "user", "content": "hi"}]
    for messages in (history, [{"role": "system", "content": "s"}, *history]):
        r = post(server, "/chat/completions", {"model": MODEL_NAME, "max_tokens": 2, "messages": messages})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] < 50, r.text
    assert max(encoded) < 100, encoded
    fits = " " * (128 * 1022)
    r = post(server, "/completions", {"model": MODEL_NAME, "prompt": fits, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"] == {"prompt_tokens": 1022, "completion_tokens": 2,
                                                          "total_tokens": 1024}, r.text
    # counted as the tokenizer reads it, NFC-normalized: 140000 characters that are 70000 ("e" + U+0301 is "é")
    encoded.clear()
    error = error_of(post(server, "/completions", {"model": MODEL_NAME, "prompt": "e\u0301" * 70000}))
    assert error["code"] == "context_length_exceeded" and "the prompt has" in error["message"], error
    assert "tokens" in error["message"].split("the prompt has")[1] and encoded == [140000], error


def test_the_longest_token_is_not_found_by_converting_every_id(golden_model, processor, monkeypatch):
    """The bound above (the most bytes one token stands for) was found at every server start by converting all
    151,851 ids to tokens (~0.2 s); the tokenizer now tells it from its BPE ranks, the same 128."""
    tokenizer = processor.tokenizer
    tokens = tokenizer.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
    assert tokenizer.max_token_bytes == max(len(t) for t in tokens) == 128

    def refused(*args):
        raise AssertionError("every id converted")

    monkeypatch.setattr(type(tokenizer), "convert_ids_to_tokens", refused)
    app_module.create_app(make_engine(golden_model, processor, max_batch_size=1), processor)
