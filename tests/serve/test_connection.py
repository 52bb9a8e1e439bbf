"""Connections whose request head never arrives (slowloris on the head) are closed; others are served."""

from __future__ import annotations

import socket
import subprocess
import sys
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


def test_past_max_connections_the_oldest_idle_ones_are_closed(golden_model, processor):
    """Connections that send nothing each held a file descriptor until their head's deadline: more of them than the
    process may open files (often 1024) stopped accept() for everyone. Past max_connections the oldest connection
    waiting for a request head is closed, so a client that asks is still answered, and so is a connection whose
    request is in progress."""
    with running(make_engine(golden_model, processor, max_batch_size=1), processor, max_connections=4) as r:
        body = b'{"prompt": "hi", "max_tokens": 2}'
        busy = raw(r.url, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                          b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert busy.recv(4096).startswith(b"HTTP/1.1 100 ")  # its head is in: in a request, never closed
        idle = [raw(r.url, b"") for _ in range(8)]
        assert httpx.get(r.url + "/health", timeout=30).status_code == 200  # one connection more
        assert all(closed_by_server(s) for s in idle[:6])  # the oldest idle ones, for the 6 past the limit
        busy.sendall(body)
        assert busy.recv(4096).startswith(b"HTTP/1.1 200"), "the connection in a request was closed"
        for s in idle[6:]:  # the newest are still open and answered
            s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            s.close()
        busy.close()


def test_the_open_files_limit_is_raised_to_the_hard_limit():
    """A soft limit of open files (often 1024) is raised as far as the hard one allows, at most 65535, as vLLM's
    server does: each connection takes a file."""
    code = ("import resource; from qwenvl.serve.connection import open_files_limit\n"
            "_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
            "got = open_files_limit()\n"
            "print(got, resource.getrlimit(resource.RLIMIT_NOFILE)[0], 65535 if hard == resource.RLIM_INFINITY "
            "else min(hard, 65535))")
    got, soft, want = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     check=True).stdout.split()
    assert got == soft == want and int(want) > 64
