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

from qwenvl import Processor
from qwenvl.config import ENDOFTEXT_ID, IM_END_ID
from qwenvl.serve.app import ServeSettings

from .conftest import GROUNDED_ANSWER, MODEL_NAME, ScriptedEngine, make_engine, running

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
    assert browser.script("return document.getElementById('note').hidden")  # a chat model: no base-model note
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


class SlowEngine(ScriptedEngine):
    """A scripted answer at ~30 tokens/s: long enough to act while it streams."""

    def _pick(self, logits, rows):
        time.sleep(0.03)
        return super()._pick(logits, rows)


class BreakingEngine(ScriptedEngine):
    """Fails after a few tokens of its answer: an error in the middle of the stream."""

    def _pick(self, logits, rows):
        if any(s is not None and s.generated >= 4 for s in rows):
            raise RuntimeError("out of <b>memory</b>")
        return super()._pick(logits, rows)


def scripted(golden_model, processor, answer: str, cls: type[ScriptedEngine] = ScriptedEngine,
             stop: int = IM_END_ID) -> ScriptedEngine:
    engine = make_engine(golden_model, processor, cls, max_batch_size=2)
    engine.script = processor.tokenizer.encode(answer) + [stop]
    return engine


def open_page(browser: Browser, url: str) -> None:
    browser.cmd("POST", "/url", {"url": url + "/"})
    browser.wait_for(f"return document.getElementById('model').textContent === '{MODEL_NAME}'")


def test_model_output_refs_and_questions_stay_text(golden_model, processor, browser):
    # a model can be made to write markup: it is shown as text, never parsed (answer, box label, question)
    answer = ('<img src=x onerror="window.pwned=1">hi <ref><img src=y onerror="window.pwned=2">cat</ref>'
              '<box>(100,200),(500,800)</box><script>window.pwned=3</script> [a](javascript:alert(1))')
    with running(scripted(golden_model, processor, answer), processor) as server:
        open_page(browser, server.url)
        browser.type("#file", str(CAT))
        browser.wait_for("const i = document.getElementById('picture'); return !i.hidden && i.naturalWidth > 0")
        browser.type("#question", "<img src=z onerror='window.pwned=4'>?\n")
        browser.wait_for("return document.querySelectorAll('#stage .box').length === 1 &&"
                         " !document.getElementById('send').disabled")
        assert browser.script("return window.pwned === undefined")
        assert browser.script("return document.querySelectorAll('#log *, #stage .box *').length") == 3  # 2 divs, a span
        assert browser.script("return document.querySelector('#stage .box').textContent") == (
            '<img src=y onerror="window.pwned=2">cat')
        assert browser.script("return document.querySelector('.msg.assistant').textContent").startswith("<img src=x")


def test_one_question_at_a_time_and_new_chat_drops_the_answer_in_flight(golden_model, processor, browser):
    with running(scripted(golden_model, processor, "one two three four five " * 12, SlowEngine), processor) as server:
        open_page(browser, server.url)
        browser.type("#question", "first\n")
        browser.wait_for("return document.querySelector('.msg.assistant').textContent.length > 0")
        browser.type("#question", "second\n")  # Enter while the answer streams: waits in the box, not sent
        assert browser.script("return document.querySelectorAll('.msg.user').length") == 1
        assert browser.script("return document.getElementById('question').value") == "second"
        browser.cmd("POST", f"/element/{browser.find('#clear')}/click", {})  # New chat in the middle of it
        browser.wait_for("return !document.getElementById('send').disabled")
        time.sleep(0.5)
        assert browser.script("return [history.length, document.getElementById('log').textContent]") == [0, ""]
        browser.cmd("POST", f"/element/{browser.find('#send')}/click", {})
        browser.wait_for("return history.length === 2")
        assert browser.script("return history[0].content[0].text") == "second"  # the old chat is not sent along


def test_an_error_in_the_middle_of_an_answer_keeps_what_came(golden_model, processor, browser):
    with running(scripted(golden_model, processor, "one two three four five six", BreakingEngine), processor) as server:
        open_page(browser, server.url)
        browser.type("#question", "count\n")
        error = browser.wait_for("const e = document.querySelector('.msg.error'); return e && e.textContent")
        assert error == "generation failed: out of <b>memory</b>"
        assert browser.script("return document.querySelector('.msg.assistant').textContent").startswith("one")
        assert browser.script("return history.length") == 0  # the broken answer is not part of the chat


def test_an_api_key_typed_after_the_page_loaded_is_used(golden_model, processor, browser):
    settings = ServeSettings(model_name=MODEL_NAME, api_key="s3cret")
    with running(scripted(golden_model, processor, "fine"), processor, settings) as server:
        browser.cmd("POST", "/url", {"url": server.url + "/"})
        browser.script("localStorage.clear()")
        browser.cmd("POST", "/refresh", {})
        browser.wait_for("return document.getElementById('model').textContent.includes('API key')")
        browser.type("#key", "s3cret")
        browser.type("#question", "hello\n")
        answer = browser.wait_for("const a = document.querySelector('.msg.assistant'); return a && a.textContent"
                                  " && !document.getElementById('send').disabled && a.textContent")
        assert answer == "fine"
        assert browser.script("return document.getElementById('model').textContent") == MODEL_NAME


def test_a_file_that_is_not_an_image_is_named_in_an_error(server, browser, tmp_path):
    notes = tmp_path / "notes <img src=x onerror=alert(1)>.txt"
    notes.write_text("hello")
    open_page(browser, server.url)
    browser.type("#file", str(notes))
    error = browser.wait_for("const e = document.querySelector('.msg.error'); return e && e.textContent")
    assert error == "not an image: notes <img src=x onerror=alert(1)>.txt"
    assert browser.script("return document.getElementById('picture').hidden")


def test_a_base_model_is_asked_each_message_alone_with_the_picture(golden_model, golden_dir, browser):
    # a base checkpoint (chat_format raw) takes one message (more get a 400): the page says so, and sends each
    # question alone, with the picture on the stage, so a second question about it is answered and its boxes drawn
    base = Processor.from_pretrained(golden_dir, allowed_media_dir=None)
    assert base.chat_format == "raw"  # the golden checkpoint's generation_config
    with running(scripted(golden_model, base, GROUNDED_ANSWER, stop=ENDOFTEXT_ID), base) as server:
        open_page(browser, server.url)
        note = browser.wait_for("const n = document.getElementById('note'); return !n.hidden && n.textContent")
        assert "answers each message alone" in note
        browser.script("window.sent = []; const f = window.fetch; window.fetch = (url, init) => {"
                       " if (init && init.body) window.sent.push(JSON.parse(init.body)); return f(url, init); }")
        browser.type("#file", str(CAT))
        browser.wait_for("const i = document.getElementById('picture'); return !i.hidden && i.naturalWidth > 0")
        for k, question in enumerate(("Where is the cat?", "And now?")):
            browser.script("clearBoxes()")
            browser.type("#question", question + "\n")
            browser.wait_for(f"return window.sent.length === {k + 1} && !document.getElementById('send').disabled")
            assert browser.script("const e = document.querySelector('.msg.error'); return e && e.textContent") is None
            assert browser.script(f"return document.querySelectorAll('.msg.assistant')[{k}].textContent") == (
                "the cat is here")
            assert browser.script("return document.querySelectorAll('#stage .box').length") == 1
            assert browser.script("return history.length") == 0  # no chat kept that would never be sent
        sent = browser.script("return window.sent")
        for body, question in zip(sent, ("Where is the cat?", "And now?")):
            (message,) = body["messages"]
            assert message["role"] == "user" and [p["type"] for p in message["content"]] == ["image_url", "text"]
            assert message["content"][1]["text"] == question
            assert message["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
