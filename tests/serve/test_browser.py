"""The chat page in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``; ``.ci/run``
installs them) loads ``/``, uploads a picture, asks a grounding question and must show the streamed answer
and draw the box with its label. The screenshot is kept in ``$QWENVL_TEST_ARTIFACTS`` (default
``test-artifacts/``). The browser is driven through chromedriver's W3C WebDriver HTTP API with httpx.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

CAT = Path("tests/fixtures/qwenvl-tiny/images/cat.png").resolve()
ARTIFACTS = Path(os.environ.get("QWENVL_TEST_ARTIFACTS", "test-artifacts"))


class Browser:
    """Just enough WebDriver: a session, CSS lookups, typing, clicks, scripts, screenshots."""

    def __init__(self, driver_url: str) -> None:
        self.http = httpx.Client(base_url=driver_url, timeout=60)
        options = {"binary": shutil.which("chromium"),
                   "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                            "--window-size=1200,850"]}
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None):  # noqa: ANN202
        r = self.http.request(method, path, json=body)
        value = r.json()["value"]
        if r.status_code != 200:
            raise RuntimeError(f"webdriver {path}: {value}")
        return value

    def cmd(self, method: str, path: str, body: dict | None = None):  # noqa: ANN202
        return self._call(method, f"/session/{self.session}{path}", body)

    def find(self, css: str) -> str:
        found = self.cmd("POST", "/element", {"using": "css selector", "value": css})
        return next(iter(found.values()))

    def type(self, css: str, text: str) -> None:
        self.cmd("POST", f"/element/{self.find(css)}/value", {"text": text})

    def script(self, js: str):  # noqa: ANN201
        return self.cmd("POST", "/execute/sync", {"script": js, "args": []})

    def wait_for(self, js: str, timeout: float = 60):  # noqa: ANN201
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.script(js)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for: {js}")

    def close(self) -> None:
        try:
            self._call("DELETE", f"/session/{self.session}")
        finally:
            self.http.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    driver = shutil.which("chromedriver")
    assert driver and shutil.which("chromium"), "install Debian's chromium and chromium-driver (.ci/run does)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # chromium's profile and scratch folders go under the test's own temporary folder, not the system's /tmp
    env = {**os.environ, "TMPDIR": str(tmp_path_factory.mktemp("chromium"))}
    proc = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/status").json()["value"]["ready"]:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        b = Browser(url)
        try:
            yield b
        finally:
            b.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_page_streams_the_answer_and_draws_the_box(grounding_server, browser):
    browser.cmd("POST", "/url", {"url": grounding_server.url + "/"})
    browser.wait_for("return document.getElementById('model').textContent === 'qwenvl-tiny'")
    browser.type("#file", str(CAT))  # the file input: as if chosen in the file dialog
    browser.wait_for("const i = document.getElementById('picture'); return !i.hidden && i.naturalWidth > 0")
    browser.type("#question", "Where is the cat?")
    browser.cmd("POST", f"/element/{browser.find('#send')}/click", {})
    boxes = browser.wait_for("const b = [...document.querySelectorAll('#stage .box')];"
                             "return b.length && b.map(x => [x.textContent, x.style.left, x.style.top,"
                             " x.style.width, x.style.height])")
    answer = browser.script("return document.querySelector('.msg.assistant').textContent")
    assert answer == "the cat is here"  # <ref>/<box> tags shown as plain text; the box is drawn instead
    label, left, top, width, height = boxes[0]
    assert len(boxes) == 1 and label == "the cat"
    # (100,200),(500,800) on the [0, 1000) grid -> pixels / 999 -> percent of the picture
    for got, want in zip((left, top, width, height), (100, 200, 400, 600)):
        assert float(got.rstrip("%")) == pytest.approx(want / 9.99, abs=0.01)

    png = base64.b64decode(browser.cmd("GET", "/screenshot"))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "serve-page.png").write_bytes(png)
    shot = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    red = (np.abs(shot - np.array([0xE5, 0x48, 0x4D])).max(-1) < 12).sum()  # the first box colour
    assert red > 200  # the box's outline and label are on screen
