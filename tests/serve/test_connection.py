"""Connections whose request head never arrives (slowloris on the head) are closed; others are served."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from qwenvl.serve.app import ServeSettings

from .conftest import MODEL_NAME, make_engine, raw, running

HEAD_TIMEOUT = 0.5  # ServeSettings.request_body_timeout: the head's time limit too


@pytest.fixture(scope="module")
def impatient(golden_model, processor):
    settings = ServeSettings(model_name=MODEL_NAME, request_body_timeout=HEAD_TIMEOUT)
    with running(make_engine(golden_model, processor, max_batch_size=1), processor, settings) as r:
        yield r


def closed_by_server(s: socket.socket) -> bool:
    """Whether the server closes ``s`` (reads EOF) before the socket's own 10 s timeout."""
    try:
        while True:
            data = s.recv(4096)
            if not data:
                return True
    except (TimeoutError, ConnectionResetError) as e:
        return isinstance(e, ConnectionResetError)
    finally:
        s.close()


def test_a_connection_that_sends_nothing_is_closed(impatient):
    s = raw(impatient.url, b"")
    assert closed_by_server(s)


def test_a_head_sent_a_byte_at_a_time_is_closed(impatient):
    """Every byte cancels uvicorn's keep-alive timer; the head's deadline counts from the connection's start."""
    s = raw(impatient.url, b"G")
    try:
        for byte in b"ET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 8:
            time.sleep(HEAD_TIMEOUT / 5)
            s.sendall(bytes([byte]))
    except (BrokenPipeError, ConnectionResetError):  # closed while sending: what the test wants
        s.close()
        return
    assert closed_by_server(s)


def test_after_a_response_the_next_head_has_a_deadline_too(impatient):
    s = raw(impatient.url, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    s.settimeout(10)
    first = s.recv(4096)
    assert first.startswith(b"HTTP/1.1 200"), first
    s.sendall(b"GET /health HTTP/1.1\r\n")  # half a head, and then nothing: uvicorn's keep-alive timer is off
    assert closed_by_server(s)


def test_requests_that_come_in_time_are_answered(impatient):
    with httpx.Client(base_url=impatient.url, timeout=30) as client:  # one kept-alive connection
        for _ in range(3):
            assert client.get("/health").status_code == 200
        r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
