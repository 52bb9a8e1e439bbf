"""The chat page at ``/``: one self-contained file (no build step, nothing fetched from elsewhere) that
talks to this server's own endpoints and draws grounding boxes."""

from __future__ import annotations

import re

import httpx


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
