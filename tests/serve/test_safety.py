"""Hostile and broken requests: each gets a 4xx with OpenAI's error body, and the server keeps serving."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import struct
import threading
import time
import zlib
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from qwenvl import Processor
from qwenvl.generation import STOP_IDS
from qwenvl.serve.app import ServeSettings
from qwenvl.serve.media import MediaLimits

from .conftest import GOLDEN, MODEL_NAME, data_url, expected_answer, make_engine, running

CAT = "tests/fixtures/qwenvl-tiny/images/cat.png"
STREET = "tests/fixtures/qwenvl-tiny/images/street.jpg"


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims width x height pixels (10 G here) in a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def b64_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def guarded(golden_model, processor, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    Image.open(CAT).save(media / "cat.png")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.png").write_bytes(Path(STREET).read_bytes())
    settings = ServeSettings(model_name=MODEL_NAME, max_request_bytes=2_000_000, max_images_per_request=2,
                             max_tokens_cap=64, media=MediaLimits(max_image_pixels=2_000_000))
    engine = make_engine(golden_model, processor, max_batch_size=2, max_model_len=600)
    # file:// URLs go through the processor's media policy: here a media folder, as --allowed_local_media_path
    with_media = Processor.from_pretrained(GOLDEN, allowed_media_dir=media)
    with_media.chat_format = "chatml"
    with running(engine, with_media, settings) as r:
        r.media, r.outside = media, outside
        yield r


def post(server, path: str, body=None, content: bytes | None = None, headers: dict | None = None) -> httpx.Response:
    return httpx.post(server.v1 + path, json=body, content=content, headers=headers, timeout=60)


def assert_error(r: httpx.Response, status: int, words: str = "") -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["type"]
    assert words.lower() in error["message"].lower(), error["message"]
    return error


def chat(content, **extra) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 4,
            "temperature": 0, **extra}


def test_paths_in_text_are_never_opened(guarded, golden_model, processor, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(Path(STREET).read_bytes())
    # chat: <img> tags in any message text are refused
    assert_error(post(guarded, "/chat/completions", chat(f"<img>{secret}</img> what is this?")), 400, "image_url")
    body = {"model": MODEL_NAME, "max_tokens": 4, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": f"<img>{secret}</img>"},
        {"role": "user", "content": "and?"}]}
    assert_error(post(guarded, "/chat/completions", body), 400, "<img>")
    assert_error(post(guarded, "/chat/completions", {"model": MODEL_NAME, "max_tokens": 4, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [image_part(data_url(CAT))]},
        {"role": "user", "content": "and?"}]}), 400, "only from user")
    # completions: a span's text is only a name; without an image for it the request is refused ...
    prompt = f"Picture 1: <img>{secret}</img>\nDescribe the image in English:"
    assert_error(post(guarded, "/completions", {"model": MODEL_NAME, "prompt": prompt}), 400, "1 <img></img> span")
    # ... and with one, the answer is the one for that image, not for the file the text names
    want, _, _ = expected_answer(golden_model, processor, prompt, [Image.open(CAT)], 8, STOP_IDS["raw"])
    r = post(guarded, "/completions", {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                                       "images": [data_url(CAT)]})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want


def test_image_urls_local_and_remote(guarded, golden_model, processor):
    # local files: only under --allowed_local_media_path, no escape through .. or absolute paths
    ok = post(guarded, "/chat/completions", chat([image_part("file://" + str(guarded.media / "cat.png")),
                                                  {"type": "text", "text": "hi"}]))
    assert ok.status_code == 200, ok.text
    for url in ("file:///etc/passwd", "/etc/hostname", "../outside/secret.png", "file://otherhost/cat.png",
                f"file://{guarded.media}/../outside/secret.png"):
        assert_error(post(guarded, "/chat/completions", chat([image_part(url), {"type": "text", "text": "x"}])), 400)
    # symlinks out of the folder are followed before the check
    (guarded.media / "link.png").symlink_to(guarded.outside / "secret.png")
    assert_error(post(guarded, "/chat/completions", chat([image_part("link.png"), {"type": "text", "text": "x"}])),
                 400, "not allowed")
    # remote URLs: refused unless --allow_remote_images
    assert_error(post(guarded, "/chat/completions", chat([image_part("http://127.0.0.1:9/cat.png")])), 400,
                 "allow_remote_images")
    assert_error(post(guarded, "/chat/completions", chat([image_part("ftp://example.com/cat.png")])), 400,
                 "scheme")


def test_bad_images(guarded):
    def ask(url: str) -> httpx.Response:
        return post(guarded, "/chat/completions", chat([image_part(url), {"type": "text", "text": "what?"}]))

    assert_error(ask(b64_url(bomb_png())), 400, "pixels")
    big = io.BytesIO()
    Image.new("RGB", (2000, 1500)).save(big, "PNG")  # 3 M pixels > the 2 M limit of this server
    assert_error(ask(b64_url(big.getvalue())), 400, "more than the limit")
    assert_error(ask(b64_url(b"this is not an image at all")), 400, "cannot decode")
    assert_error(ask("data:image/png;base64,@@@not-base64@@@"), 400, "base64")
    assert_error(ask("data:image/png,rawbytes"), 400, "malformed data url")
    too_many = [image_part(data_url(CAT))] * 3 + [{"type": "text", "text": "compare"}]
    assert_error(post(guarded, "/chat/completions", chat(too_many)), 400, "at most 2")


def test_malformed_requests(guarded):
    assert_error(post(guarded, "/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
                 400, "not valid JSON")
    assert_error(post(guarded, "/chat/completions", {"model": MODEL_NAME, "messages": "hello"}), 400, "messages")
    assert_error(post(guarded, "/chat/completions", chat("hi", max_tokens="many")), 400, "max_tokens")
    assert_error(post(guarded, "/chat/completions", chat("hi", temperature=5)), 400, "temperature")
    assert_error(post(guarded, "/chat/completions", chat([{"type": "audio", "audio": "x"}])), 400)
    assert_error(post(guarded, "/chat/completions", {"model": MODEL_NAME, "messages": []}), 400, "messages")
    assert_error(post(guarded, "/chat/completions", {"model": MODEL_NAME, "messages": [
        {"role": "assistant", "content": "I speak first"}]}), 400, "last message")
    assert_error(post(guarded, "/chat/completions", {"model": MODEL_NAME, "messages": [
        {"role": "tool", "content": "x"}]}), 400, "role")
    error = assert_error(post(guarded, "/chat/completions", chat("hi", model="gpt-4o")), 404, "gpt-4o")
    assert error["code"] == "model_not_found"
    assert_error(post(guarded, "/chat/completions", chat("hi", n=2)), 400, "n=1")
    assert_error(post(guarded, "/chat/completions", chat("hi", logprobs=True)), 400, "logprobs")
    assert_error(post(guarded, "/chat/completions", chat("hi", stop=["a", "b", "c", "d", "e"])), 400, "stop")
    assert_error(post(guarded, "/chat/completions", chat("hi", max_tokens=65)), 400, "at most 64")
    error = assert_error(post(guarded, "/chat/completions", chat("word " * 700)), 400, "context is 600 tokens")
    assert error["code"] == "context_length_exceeded"
    assert_error(post(guarded, "/chat/completions", chat("word " * 560, max_tokens=64)), 400, "you asked for 64")
    assert_error(post(guarded, "/completions", {"model": MODEL_NAME, "prompt": ["a", "b"]}), 400, "one prompt")
    assert_error(post(guarded, "/completions", {"model": MODEL_NAME, "prompt": "<img>unclosed"}), 400)
    assert_error(httpx.get(guarded.url + "/v1/nothing-here"), 404)
    assert_error(httpx.get(guarded.v1 + "/chat/completions"), 405)


def test_oversized_body_is_refused_before_reading(guarded):
    huge = chat([image_part("data:image/png;base64," + "A" * 2_100_000)])
    assert_error(post(guarded, "/chat/completions", huge), 413, "larger than")

    def chunks():  # no Content-Length: the limit holds for chunked bodies too
        yield b'{"model": "qwenvl-tiny", "messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"x" * 100_000
        yield b'"}]}'

    r = httpx.post(guarded.v1 + "/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413)


def test_server_still_healthy_after_all_that(guarded):
    assert httpx.get(guarded.url + "/health").json()["status"] == "ok"
    c = openai.OpenAI(base_url=guarded.v1, api_key="x", max_retries=0)
    assert c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=3).usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=9999)
    metrics = httpx.get(guarded.url + "/metrics").text
    assert 'qwenvl_requests_total{endpoint="/v1/chat/completions",status="400"}' in metrics
    assert 'status="413"' in metrics


def test_api_key(golden_model, processor):
    settings = ServeSettings(model_name=MODEL_NAME, api_key="s3cret")
    with running(make_engine(golden_model, processor, max_batch_size=1), processor, settings) as r:
        bad = openai.OpenAI(base_url=r.v1, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        refused = httpx.post(r.v1 + "/chat/completions", json=chat("hi"))
        assert_error(refused, 401, "API key")
        assert refused.headers["www-authenticate"] == "Bearer"  # the scheme to authenticate with (RFC 9110)
        good = openai.OpenAI(base_url=r.v1, api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=2).choices[0].finish_reason
        assert httpx.get(r.url + "/health").status_code == 200  # probes need no key


def test_disconnect_frees_the_slot_and_a_full_queue_answers_429(golden_model, processor):
    """One slot, no waiting room: a second request while a stream runs gets 429; closing the stream cancels
    its generation at once, and the next request gets the slot."""
    engine = make_engine(golden_model, processor, max_batch_size=1, max_queue=0, max_model_len=4096)
    with running(engine, processor) as r:
        body = chat("tell me everything", max_tokens=2000, stream=True)
        with httpx.stream("POST", r.v1 + "/chat/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk may come before the engine takes the request
            deadline = time.monotonic() + 20
            while engine.active != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine.active == 1
            busy = openai.OpenAI(base_url=r.v1, api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError) as e:
                busy.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}])
            assert e.value.status_code == 429 and e.value.body["type"] == "rate_limit_exceeded"
            assert e.value.response.headers["retry-after"] == "1"
            # refused by the engine's queue: a stream that has started no longer counts among the requests whose
            # bodies are read and prepared (a client that reads slowly would keep everyone out)
            assert "waiting for a slot" in e.value.body["message"], e.value.body
        deadline = time.monotonic() + 20
        while engine.active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.active == 0
        metrics = httpx.get(r.url + "/metrics").text
        assert 'qwenvl_sequences_finished_total{reason="cancelled"} 1' in metrics
        generated = next(line for line in metrics.splitlines() if line.startswith("qwenvl_generation_tokens_total"))
        assert float(generated.split()[-1]) < 2000
        got = busy.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=5, temperature=0)
        assert got.usage.completion_tokens == 5


def test_remote_images_with_limits(golden_model, processor, tmp_path):
    (tmp_path / "cat.png").write_bytes(Path(CAT).read_bytes())
    (tmp_path / "big.bin").write_bytes(b"\0" * 300_000)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, directory=str(tmp_path), **kw)

        def log_message(self, *a) -> None:
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    settings = ServeSettings(model_name=MODEL_NAME, media=MediaLimits(allow_remote=True, max_image_bytes=250_000,
                                                                      remote_timeout=5))
    try:
        with running(make_engine(golden_model, processor, max_batch_size=1), processor, settings) as r:
            def ask(url: str) -> httpx.Response:
                return post(r, "/chat/completions", chat([image_part(url), {"type": "text", "text": "hi"}]))

            assert ask(base + "/cat.png").status_code == 200
            assert_error(ask(base + "/big.bin"), 400, "limit of 250000 bytes")
            assert_error(ask(base + "/missing.png"), 400, "HTTP 404")
            assert_error(ask("http://127.0.0.1:1/x.png"), 400, "cannot download")
            # a long URL is quoted cut short (http.server answers 414 to it; a space makes it no URL at all)
            long = "/" + "a" * 300_000 + ".png"
            for url, words in ((base + long, "HTTP 414"), ("http://127.0.0.1:1" + long, "cannot download"),
                               (base + "/a b" + long, "cannot download")):
                message = assert_error(ask(url), 400, words)["message"]
                assert len(message) < 400 and "a" * 100 not in message, message[:1000]
    finally:
        files.shutdown()


def test_sampling_values_the_sampler_cannot_take_are_refused_or_greedy(guarded):
    """A seed outside torch's range was a 500 from the engine; a temperature so small that logits / T overflow
    (NaN probabilities) was a 500 too: below 1e-5 it is greedy, as vLLM takes it."""
    for seed in (2**64, -(2**63) - 1, int("9" * 40)):
        assert_error(post(guarded, "/chat/completions", chat("hi", seed=seed, temperature=1)), 400, "seed")
    assert post(guarded, "/chat/completions", chat("hi", seed=2**64 - 1, temperature=1)).status_code == 200
    greedy = post(guarded, "/chat/completions", chat("hi", max_tokens=6)).json()["choices"][0]["message"]
    for t in (1e-300, 1e-40, 1e-6):
        r = post(guarded, "/chat/completions", chat("hi", max_tokens=6, temperature=t))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"] == greedy


def test_repetition_penalty_and_min_tokens_out_of_range_are_refused(guarded):
    for value in (0, -1.5, "nan", "inf", "x"):
        assert_error(post(guarded, "/chat/completions", chat("hi", repetition_penalty=value)), 400,
                     "repetition_penalty")
    for value in (-1, 1.5, "x"):
        assert_error(post(guarded, "/chat/completions", chat("hi", min_tokens=value)), 400, "min_tokens")
    error = assert_error(post(guarded, "/chat/completions", chat("hi", max_tokens=4, min_tokens=5)), 400,
                         "min_tokens is 5")
    assert error["param"] == "min_tokens"
    assert_error(post(guarded, "/completions", {"model": MODEL_NAME, "prompt": "hi", "min_tokens": 17}), 400,
                 "more than the 16 tokens")
    r = post(guarded, "/completions", {"model": MODEL_NAME, "prompt": "hi", "min_tokens": 16, "max_tokens": 16})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16


def test_options_that_would_change_the_answer_are_refused_not_ignored(guarded):
    """tools, JSON mode, logit_bias, top_logprobs, audio and best_of were dropped silently: a client asking for
    a tool call or JSON got plain text as if it were what it asked for."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    for extra, param in (({"tools": [tool]}, "tools"), ({"functions": [tool["function"]]}, "tools"),
                         ({"tool_choice": "required"}, "tool_choice"), ({"response_format": {"type": "json_object"}},
                                                                          "response_format"),
                         ({"logit_bias": {"42": 100}}, "logit_bias"), ({"top_logprobs": 2}, "top_logprobs"),
                         ({"modalities": ["text", "audio"]}, "modalities"), ({"audio": {"voice": "x"}}, "modalities")):
        error = assert_error(post(guarded, "/chat/completions", chat("hi", max_tokens=2, **extra)), 400, param)
        assert error["param"] == param, extra
    error = assert_error(post(guarded, "/completions", {"model": MODEL_NAME, "prompt": "hi", "best_of": 3}), 400)
    assert error["param"] == "best_of"
    # what asks for nothing we lack is fine
    for extra in ({"tools": [], "tool_choice": "none"}, {"response_format": {"type": "text"}}, {"logit_bias": {}},
                  {"modalities": ["text"]}, {"tool_choice": "auto", "parallel_tool_calls": False}):
        assert post(guarded, "/chat/completions", chat("hi", max_tokens=2, **extra)).status_code == 200, extra


def test_a_file_name_the_system_cannot_take_is_a_400(guarded):
    """os.stat's ENAMETOOLONG (or any OSError) on a path inside the media folder was a 500."""
    for url in ("a" * 5000 + ".png", "file://" + str(guarded.media / ("b" * 300 + ".png")), "a/" * 3000 + "x.png"):
        assert_error(post(guarded, "/chat/completions", chat([image_part(url), {"type": "text", "text": "x"}])), 400)


def test_a_long_image_url_or_model_name_is_quoted_cut_short(guarded):
    """Error messages quoted the client's whole image URL (or model name), which may be megabytes: the answer
    to a refused request was as large as the request."""
    long = "a" * 500_000
    for url, words in ((long + ":x", "unsupported image URL scheme"), ("file://otherhost/" + long, "another host"),
                       ("file://" + str(guarded.media / long), "cannot read image file"),
                       ("file://" + str(guarded.media / "x" / ("a/" * 1000)), "not found")):
        error = assert_error(post(guarded, "/chat/completions", chat([image_part(url)])), 400, words)
        assert len(error["message"]) < 400 and error["param"] == "image_url", error["message"][:1000]
    error = assert_error(post(guarded, "/chat/completions", {**chat("hi"), "model": long}), 404, "does not exist")
    assert len(error["message"]) < 400, error["message"][:1000]
    assert_error(httpx.get(guarded.v1 + "/models/" + "a" * 5000), 404, "'" + "a" * 77 + "...' does not exist")


def test_an_image_path_that_is_not_unicode_is_a_400(guarded):
    """A lone surrogate (JSON "\\ud800") in a file name under --allowed_local_media_path was a 500: the path
    could not be encoded for the file system (UnicodeEncodeError); in a file URL's host it was a 500 too, as the
    error message naming the URL could not be encoded as UTF-8."""
    for url, words in (("\ud800.png", "not valid Unicode"), ("file://" + str(guarded.media / "\udc80.png"), "not valid Unicode"),
                       ("file://\ud800/x.png", "another host")):
        body = json.dumps(chat([image_part(url), {"type": "text", "text": "x"}])).encode()  # "\\ud800" escaped
        error = assert_error(post(guarded, "/chat/completions", content=body,
                                  headers={"content-type": "application/json"}), 400, words)
        assert error["param"] == "image_url"


def test_postscript_is_never_handed_to_ghostscript(guarded, fake_ghostscript):
    """PIL decodes EPS by running Ghostscript on the bytes: a request must not make the server run a program."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    for data in (eps, b"\xc5\xd0\xd3\xc6" + b"\0" * 26):
        r = post(guarded, "/chat/completions", chat([image_part(b64_url(data, "image/eps")), {"type": "text", "text": "x"}]))
        assert_error(r, 400, "PostScript")
    assert not fake_ghostscript.exists()


def test_validation_errors_name_the_field_at_fault(guarded):
    """Invalid JSON had param "1" (a character offset); an unknown content part was reported as 'content should
    be a string'; too many images on /v1/completions named 'messages'."""
    error = assert_error(post(guarded, "/chat/completions", content=b"{not json",
                              headers={"content-type": "application/json"}), 400, "not valid JSON")
    assert error["param"] is None and error["message"] == "the request body is not valid JSON"
    error = assert_error(post(guarded, "/chat/completions", chat([{"type": "input_audio", "input_audio": {}}])), 400,
                         "input_audio")
    assert error["param"] == "messages.0.content.0"
    assert_error(post(guarded, "/chat/completions", chat([{"type": "text"}])), 400, "field required")
    error = assert_error(post(guarded, "/completions", {"model": MODEL_NAME, "prompt": "<img>a</img>" * 3,
                                                         "images": [data_url(CAT)] * 3}), 400, "at most 2")
    assert error["param"] == "images"


def test_a_hostile_image_host_cannot_hold_a_request(golden_model, processor):
    """With --allow_remote_images: a host that drips its TLS handshake, headers or body a byte at a time was
    waited on for hours (each read stayed under the socket timeout), and one that answers garbage instead of HTTP
    was a 500."""
    import socket

    def serve(conn: socket.socket, mode: str) -> None:
        with conn:
            conn.recv(65536)
            if mode == "garbage":
                conn.sendall(b"HELLO THERE\r\n\r\n")
                return
            if mode == "tls":  # the header of a 16 KiB handshake record, then its body a byte at a time
                conn.sendall(b"\x16\x03\x03\x40\x00")
                with contextlib.suppress(OSError):
                    for _ in range(100_000):
                        conn.sendall(b"\0")
                        time.sleep(0.3)
                return
            head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
            if mode == "body":
                conn.sendall(head)
            with contextlib.suppress(OSError):
                for byte in (head if mode == "headers" else b"\0" * 100_000):
                    conn.sendall(bytes([byte]))
                    time.sleep(0.3)

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                peek = conn.recv(64, socket.MSG_PEEK)
                mode = "tls" if peek[:1] == b"\x16" else peek.split(b" ")[1].strip(b"/").decode()  # a ClientHello
                threading.Thread(target=serve, args=(conn, mode), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    settings = ServeSettings(model_name=MODEL_NAME, media=MediaLimits(allow_remote=True, remote_timeout=1.0))
    try:
        with running(make_engine(golden_model, processor, max_batch_size=1), processor, settings) as r:
            for mode, words in (("garbage", "cannot download"), ("headers", "more than 1 s"), ("body", "more than 1 s"),
                                ("tls", "more than 1 s")):
                start = time.monotonic()
                url = f"{'https' if mode == 'tls' else 'http'}://127.0.0.1:{port}/{mode}"
                assert_error(post(r, "/chat/completions", chat([image_part(url), {"type": "text", "text": "x"}])),
                             400, words)
                assert time.monotonic() - start < 5, mode
    finally:
        listener.close()
