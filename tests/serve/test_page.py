"""The chat page at ``/``: one self-contained file (no build step, nothing fetched from elsewhere) that
talks to this server's own endpoints and draws grounding boxes."""

from __future__ import annotations

import re

import httpx

from qwenvl import Processor

from .conftest import MODEL_NAME, make_engine, running


def test_page_is_served_and_self_contained(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", page)  # no CDN, no remote scripts or fonts
    assert "http://" not in page and "https://" not in page
    for element in ('id="file"', 'id="question"', 'id="picture"', 'id="log"'):
        assert element in page
    # it uses the endpoints this server has, streams, and reads the grounding extension
    for used in ('"/v1/chat/completions"', '"/v1/models"', "stream: true", "delta.grounding", 'className = "box"'):
        assert used in page, used
    assert httpx.get(server.url + "/v1/models").json()["data"][0]["id"]


def test_models_say_the_chat_format_the_page_adapts_to(server, golden_model, golden_dir):
    """The page learns from /v1/models whether the model is a base checkpoint (chat_format raw), which takes one
    message: it then sends each question alone, with the picture on the stage, and says so."""
    assert httpx.get(server.v1 + "/models").json()["data"][0]["chat_format"] == "chatml"
    base = Processor.from_pretrained(golden_dir, allowed_media_dir=None)
    assert base.chat_format == "raw"
    with running(make_engine(golden_model, base, max_batch_size=1), base) as r:
        card = httpx.get(r.v1 + "/models").json()["data"][0]
        assert card["chat_format"] == "raw"
        assert httpx.get(f"{r.v1}/models/{MODEL_NAME}").json() == card
        page = httpx.get(r.url + "/").text
    assert 'chat_format === "raw"' in page and 'id="note"' in page
