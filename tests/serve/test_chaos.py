"""The server's state under many clients at once (streams cut off, requests cancelled before their first token,
refused edge values, images, probes meanwhile), and connections that never finish their request."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import random
import socket
import threading
import time
import warnings

import httpx
from PIL import Image

from qwenvl.serve.app import ServeSettings, create_app

from .conftest import MODEL_NAME, make_engine, raw, running


def png_url(width: int, height: int) -> str:
    out = io.BytesIO()
    Image.effect_noise((width, height), 60).convert("RGB").save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def metric_values(text: str) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if line[:1] not in ("", "#"))
    }


def test_a_storm_of_clients_leaves_the_server_idle_and_answering_as_before(golden_model, processor, caplog):
    """Clients that leave mid-stream, cancel before the first token, send refused values (n=2, logprobs, too
    long a prompt, max_tokens over the cap), images, and probe /health and /metrics meanwhile: afterwards every
    slot is free, the queue is empty, every request the engine took is counted finished once, no request failed,
    nothing was logged as an error, and greedy answers are what they were before the storm."""
    engine = make_engine(golden_model, processor, max_batch_size=2, max_queue=3, max_model_len=300)
    accepted = []
    submit = engine.submit
    engine.submit = lambda request: (submit(request), accepted.append(request))
    rng = random.Random(0)
    images = [png_url(1, 1), png_url(7, 200), png_url(60, 60)]
    probes = [
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": c}], "max_tokens": 6, "temperature": 0}
        for c in ("hello there", "what is 2+2")
    ]

    def body() -> dict:
        content = rng.choice(
            [
                "hi",
                "tell me a story",
                "x " * 20,
                [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": rng.choice(images)}},
                ],
            ]
        )
        extra = rng.choice(
            [
                {},
                {},
                {},
                {"n": 2},
                {"logprobs": True},
                {"max_tokens": 10**6},
                {"stop": ["a", "\n"]},
                {"temperature": 0.8, "seed": 1},
                {"min_tokens": 2},
                {"max_tokens": 1},
            ]
        )
        if rng.random() < 0.1:
            content = "word " * 400
        return {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 4,
            "stream": rng.random() < 0.6,
            **extra,
        }

    async def client(c: httpx.AsyncClient, url: str) -> int | None:
        await asyncio.sleep(rng.random() * 0.5)
        kind = rng.random()
        if kind < 0.1:
            return (await c.get(url + "/metrics")).status_code
        if kind < 0.2:
            return (await c.get(url + "/health")).status_code
        b = body()
        if kind < 0.4:  # gone before the answer starts
            task = asyncio.ensure_future(c.post(url + "/v1/chat/completions", json=b))
            await asyncio.sleep(rng.random() * 0.2)
            task.cancel()
            try:
                return (await task).status_code
            except asyncio.CancelledError:
                return None
        if b["stream"]:
            async with c.stream("POST", url + "/v1/chat/completions", json=b) as r:
                cut = rng.choice([1, 2, 10**9])  # leave after a chunk or two, or read to the end
                async for n, _ in aenumerate(r.aiter_lines()):
                    if n + 1 >= cut:
                        break
                return r.status_code
        return (await c.post(url + "/v1/chat/completions", json=b)).status_code

    async def storm(url: str) -> tuple[list, list, list, str]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as c:
            before = [(await c.post(url + "/v1/chat/completions", json=p)).json() for p in probes]
            statuses = await asyncio.gather(*(client(c, url) for _ in range(30)))
            deadline = time.monotonic() + 30
            while (engine.active or len(accepted) > finished()) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            after = [(await c.post(url + "/v1/chat/completions", json=p)).json() for p in probes]
            return before, after, statuses, (await c.get(url + "/metrics")).text

    def finished() -> float:
        return sum(
            v
            for k, v in metric_values(engine.metrics.render()).items()
            if k.startswith("qwenvl_sequences_finished_total")
        )

    with running(engine, processor, ServeSettings(model_name=MODEL_NAME, max_tokens_cap=8)) as r:
        uvicorn_log = logging.getLogger(
            "uvicorn"
        )  # does not propagate: "Exception in ASGI application" goes here
        uvicorn_log.addHandler(caplog.handler)
        try:
            before, after, statuses, text = asyncio.run(storm(r.url))
            health = httpx.get(r.url + "/health").json()
        finally:
            uvicorn_log.removeHandler(caplog.handler)
    assert [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR] == []
    assert not any(s is not None and s >= 500 for s in statuses), statuses
    assert {200, 400} <= set(statuses), statuses  # the storm did reach the engine and was refused in places
    assert [a["choices"][0]["message"] for a in after] == [b["choices"][0]["message"] for b in before]
    assert health == {"status": "ok", "active": 0, "waiting": 0, "slots": 2}
    assert engine.slots == [None, None] and not engine.occupied.any() and not engine.positions.any()
    values = metric_values(text)
    ends = {k: v for k, v in values.items() if k.startswith("qwenvl_sequences_finished_total")}
    # each request the engine took counted once, whether it ended, failed or its client left
    assert sum(ends.values()) == len(accepted), (ends, len(accepted))
    assert 'qwenvl_sequences_finished_total{reason="error"}' not in ends, ends
    assert values["qwenvl_active_slots"] == 0 and values["qwenvl_queue_depth"] == 0


async def aenumerate(items):
    n = 0
    async for item in items:
        yield n, item
        n += 1


def read_all(s: socket.socket) -> bytes:
    """What the server sends until it closes the connection (the socket's timeout if it never does)."""
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_body_that_never_arrives_is_answered_408(golden_model, processor):
    """A client that announces Content-Length and then sends the body slowly or not at all (slowloris) held its
    connection, and the request's task, for ever: the body must come within --request_body_timeout."""
    engine = make_engine(golden_model, processor, max_batch_size=1)
    settings = ServeSettings(model_name=MODEL_NAME, request_body_timeout=0.5)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    with running(engine, processor, settings) as r:
        never = raw(r.url, head + b'{"model"')
        dripping = raw(r.url, head)
        for _ in range(10):  # a byte every 0.2 s: each is in time, the whole is not
            time.sleep(0.2)
            try:
                dripping.sendall(b" ")
            except OSError:
                break
        for s in (never, dripping):
            with s:
                answer = read_all(s)  # the server closes the connection after answering
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert b"request body did not arrive within 0.5 seconds" in answer, answer
        metrics = httpx.get(r.url + "/metrics").text
        assert 'qwenvl_requests_total{endpoint="/v1/chat/completions",status="408"} 2' in metrics
        ok = httpx.post(
            r.v1 + "/chat/completions",
            json={"model": MODEL_NAME, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert ok.status_code == 200, ok.text


def test_building_the_openapi_spec_warns_nothing(golden_model, processor):
    """GET and HEAD /health were one route, so both operations got the id health_health_get and FastAPI warned
    "Duplicate Operation ID" each time /openapi.json was built; a client generator takes one of them only."""
    app = create_app(make_engine(golden_model, processor, max_batch_size=1), processor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = app.openapi()
    assert [str(w.message) for w in caught] == []
    ids = [op["operationId"] for path in spec["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids)), ids
    assert set(spec["paths"]["/health"]) == {"get", "head"}


def test_stopping_the_server_ends_the_answers_in_flight_cleanly(golden_model, processor, caplog):
    """Ctrl-C on a busy server: generations ran on until uvicorn's graceful-shutdown timeout cancelled their
    tasks, which logged a traceback per request ("Exception in ASGI application") and left the clients a
    plain-text 500 or a stream cut mid-body. They end at once now, with OpenAI's error body."""
    engine = make_engine(golden_model, processor, max_batch_size=1, max_model_len=4096)
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000}
    answers: dict[str, object] = {}

    def ask(url: str, stream: bool) -> None:
        try:
            if stream:
                with httpx.stream(
                    "POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60
                ) as r:
                    answers["stream"] = [line for line in r.iter_lines() if line]
            else:
                r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
                answers["whole"] = (r.status_code, r.headers.get("content-type"), r.text)
        except httpx.HTTPError as e:
            answers["stream" if stream else "whole"] = repr(e)

    uvicorn_log = logging.getLogger("uvicorn")
    with running(engine, processor) as r:
        uvicorn_log.addHandler(caplog.handler)
        clients = [threading.Thread(target=ask, args=(r.url, stream)) for stream in (True, False)]
        for c in clients:
            c.start()
        deadline = time.monotonic() + 30
        while (engine.active, engine.waiting) != (1, 1) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (engine.active, engine.waiting) == (1, 1)
    uvicorn_log.removeHandler(caplog.handler)
    for c in clients:
        c.join(30)
    status, kind, text = answers["whole"]
    assert status == 503 and kind == "application/json", answers["whole"]  # was 500: 503 says "try again"
    assert "the server is shutting down" in text
    stream = answers["stream"]
    assert stream[-1] == "data: [DONE]" and "the server is shutting down" in stream[-2], stream[-3:]
    assert [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR] == []
    assert 'qwenvl_sequences_finished_total{reason="error"} 2' in engine.metrics.render()


def test_a_request_after_the_engine_stopped_is_answered_503(golden_model, processor):
    """Between the engine's stop and the server's, a request was queued for a thread that no longer ran: its
    client waited until the graceful-shutdown timeout cut it off."""
    engine = make_engine(golden_model, processor, max_batch_size=1)
    with running(engine, processor) as r:
        engine.stop()
        got = httpx.post(
            r.v1 + "/chat/completions",
            timeout=10,
            json={"model": MODEL_NAME, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert got.status_code == 503, got.text
        assert got.json()["error"]["message"] == "the server is shutting down"
        assert httpx.get(r.url + "/health").status_code == 503
