"""The Host header check (DNS rebinding): a server on a loopback address, with no API key and maybe a media folder,
answers only requests that name this machine, so that a web page the user visits cannot reach it through a DNS
name of its own (evil.example resolving to 127.0.0.1)."""

from __future__ import annotations

import json

import pytest

from qwenvl.cli import main
from qwenvl.serve.app import ServeSettings
from qwenvl.serve.cli import allowed_hosts

from .conftest import MODEL_NAME, make_engine, raw, running
from .test_chaos import read_all


def ask(url: str, host: bytes | None, path: str = "/health") -> tuple[int, bytes]:
    """GET ``path`` with the raw Host header ``host`` (None: an HTTP/1.0 request without one): status, body."""
    if host is None:
        head = f"GET {path} HTTP/1.0\r\n\r\n".encode()
    else:
        head = f"GET {path} HTTP/1.1\r\n".encode() + b"Host: " + host + b"\r\nConnection: close\r\n\r\n"
    with raw(url, head) as s:
        answer = read_all(s)
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1]


LOOPBACK = (b"localhost", b"LOCALHOST:8000", b"127.0.0.1", b"127.0.0.1:1", b"127.1.2.3:80", b"[::1]", b"[::1]:8000",
            b"app.localhost:3000", b"localhost.")
FOREIGN = (b"evil.example", b"evil.example:8000", b"127.0.0.1.evil.example", b"localhost.evil.example",
           b"10.0.0.1", b"[::2]:80", b"")


@pytest.fixture(scope="module")
def loopback_only(golden_model, processor):
    with running(make_engine(golden_model, processor, max_batch_size=1), processor) as r:
        yield r


def test_a_loopback_server_refuses_a_host_that_is_not_this_machine(loopback_only):
    for host in LOOPBACK:
        assert ask(loopback_only.url, host)[0] == 200, host
    assert ask(loopback_only.url, None)[0] == 200  # HTTP/1.0: no Host header at all
    for host in FOREIGN:
        for path in ("/", "/health", "/v1/models", "/metrics"):
            status, body = ask(loopback_only.url, host, path)
            assert status == 400, (host, path, body)
            assert body.count(b"\n") == 0, body
            error = json.loads(body)["error"]
            assert error["code"] == "host_not_allowed" and error["type"] == "invalid_request_error", error
            assert repr(host.decode()) in error["message"] and "--allowed_hosts" in error["message"], error
    status, body = ask(loopback_only.url, b"localhost", "/")
    assert status == 200 and b"<html" in body.lower()


def test_allowed_hosts_extends_or_disables_the_check(golden_model, processor):
    settings = ServeSettings(model_name=MODEL_NAME, allowed_hosts=("My.Lan", "*.corp.example", "[fe80::1]"))
    with running(make_engine(golden_model, processor, max_batch_size=1), processor, settings) as r:
        for host in (b"my.lan", b"MY.LAN:8000", b"a.corp.example", b"b.a.corp.example:1", b"[fe80::1]:8000", *LOOPBACK):
            assert ask(r.url, host)[0] == 200, host
        for host in (b"corp.example", b"xcorp.example", b"my.lan.evil.example", b"evil.example", b"[fe80::2]"):
            assert ask(r.url, host)[0] == 400, host
    settings = ServeSettings(model_name=MODEL_NAME, allowed_hosts=None)  # "*", or a non-loopback --host
    with running(make_engine(golden_model, processor, max_batch_size=1), processor, settings) as r:
        for host in (*FOREIGN, *LOOPBACK):
            assert ask(r.url, host)[0] == 200, host


def test_the_default_depends_on_the_listening_address(capsys, golden_dir):
    assert allowed_hosts(None, "127.0.0.1") == ()
    assert allowed_hosts(None, "127.0.0.2") == ()
    assert allowed_hosts(None, "::1") == ()
    assert allowed_hosts(None, "0.0.0.0") is None
    assert allowed_hosts(None, "::") is None
    assert allowed_hosts(None, "192.168.1.5") is None
    assert allowed_hosts("my.lan, *.corp.example,", "127.0.0.1") == ("my.lan", "*.corp.example")
    assert allowed_hosts("my.lan", "0.0.0.0") == ("my.lan",)  # asked for: checked on any address
    assert allowed_hosts("*", "127.0.0.1") is None
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--allowed_hosts" in text and "0.0.0.0) any Host" in text, text
    for name in ("example.com:8000", "http://example.com"):  # a port is never compared: it would never match
        assert main(["serve", "--model", str(golden_dir), "--port", "0", "--allowed_hosts", f"a,{name}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"--allowed_hosts: {name!r} is not a host name" in err, err
