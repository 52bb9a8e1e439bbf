"""``qwenvl serve`` as users run it: --help, one-line errors (exit 2), and a real process answering."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from qwenvl.cli import main


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--host", "--port", "--dtype", "--max_batch_size", "--api_key", "--allow_remote_images",
                 "--allowed_local_media_path", "--max_request_bytes", "--max_image_pixels", "--max_tokens_cap",
                 "--quantize", "--request_body_timeout", "--max_request_bytes_in_flight", "--max_connections"):
        assert flag in text, flag


def test_user_errors_are_one_line_and_exit_2(capsys, golden_dir, tmp_path, monkeypatch):
    assert main(["serve", "--model", str(golden_dir), "--allowed_local_media_path", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a folder" in err
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        assert main(["serve", "--model", str(golden_dir), "--port", str(busy.getsockname()[1])]) == 2
        assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    finally:
        busy.close()
    assert main(["serve", "--model", str(golden_dir), "--max_batch_size", "0"]) == 2
    assert "--max_batch_size must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--model", str(golden_dir), "--max_connections", "0"]) == 2
    assert "--max_connections must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--model", str(golden_dir), "--kv_cache_memory", "0"]) == 2
    assert "--kv_cache_memory must be > 0 GiB" in capsys.readouterr().err
    assert main(["serve", "--model", str(golden_dir), "--max_request_bytes", "1000",
                 "--max_request_bytes_in_flight", "999"]) == 2  # a largest body would never fit
    assert "--max_request_bytes_in_flight must be >= --max_request_bytes (1000), got 999" in capsys.readouterr().err
    for flag in ("--request_body_timeout", "--remote_image_timeout"):  # 0 or less: every download timed out
        for value in ("0", "-1", "nan"):
            assert main(["serve", "--model", str(golden_dir), flag, value]) == 2
            assert f"{flag} must be > 0 seconds, got {float(value)}" in capsys.readouterr().err
    for port in ("99999", "-5"):  # an OverflowError traceback from bind(), after the weights had loaded
        assert main(["serve", "--model", str(golden_dir), "--port", port]) == 2
        assert capsys.readouterr().err.strip() == f"qwenvl serve: error: --port must be 0-65535 (0: any free port), got {port}"
    # more positions than the model has: said before the weights load (refused only after loading them: minutes
    # at 9.6B), as no other flag's value is
    from qwenvl import inference

    def no_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the weights loaded")

    monkeypatch.setattr(inference, "load", no_load)
    assert main(["serve", "--model", str(golden_dir), "--max_model_len", "100000"]) == 2
    limit = json.loads((golden_dir / "config.json").read_text())["max_position_embeddings"]
    assert capsys.readouterr().err.strip() == (f"qwenvl serve: error: --max_model_len 100000 is more than the model's "
                                               f"{limit} positions (max_position_embeddings in its config.json)")


def test_a_real_server_process(golden_dir):
    """Started as users start it; the slot count comes from --kv_cache_memory (room for exactly two slots)."""
    lm = json.loads((golden_dir / "config.json").read_text())
    two_slots = 2 * 2 * lm["num_hidden_layers"] * lm["num_attention_heads"] * lm["kv_channels"] * 512 * 4
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwenvl.cli", "serve", "--model", str(golden_dir), "--port", "0",
         "--kv_cache_memory", str((two_slots + 100) / 2**30), "--max_model_len", "512", "--served_model_name", "tiny", "--dtype", "float32", "--quantize", "int8"],
        stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        url, log = None, []
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                log.append(lines.get(timeout=0.5))
            except queue.Empty:
                continue
            match = re.search(r"serving tiny on (http://127\.0\.0\.1:\d+)", log[-1])
            url = match.group(1) if match else None
        assert url is not None, "".join(log)
        assert "(2 slots of 512 positions" in log[-1], log[-1]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        got = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                        temperature=0)
        assert got.usage.completion_tokens == 4
        # on 127.0.0.1 by default only this machine's names are answered (DNS rebinding)
        refused = httpx.get(url + "/v1/models", headers={"Host": "evil.example"})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "host_not_allowed", refused.text
        assert httpx.get(url + "/v1/models", headers={"Host": "localhost:1"}).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
