"""Requests found by fuzzing the server (schemathesis against /openapi.json, and hand-made hostile bodies): each
gets a 4xx that names the problem, and the server keeps serving."""

from __future__ import annotations

import httpx

from .conftest import MODEL_NAME


def chat(content: str = "hi", **extra) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 3, **extra}


def post(server, path: str, body=None, content: bytes | None = None, headers: dict | None = None) -> httpx.Response:
    return httpx.post(server.v1 + path, json=body, content=content, headers=headers, timeout=60)


def error_of(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_a_repetition_penalty_float32_cannot_hold_answers(server):
    """repetition_penalty=5e-324 passed "> 0" but is 0 in float32: logits / 0 gave NaN probabilities and a 500
    ("probability tensor contains either inf, nan ...") from the engine; 1e300 is inf there. Both act as the
    nearest float32."""
    for value in (5e-324, 1e-46, "1e-300", 1e300):
        r = post(server, "/chat/completions", chat(repetition_penalty=value, temperature=1, seed=0))
        assert r.status_code == 200, r.text
        r = post(server, "/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 3,
                                          "repetition_penalty": value, "temperature": 1})
        assert r.status_code == 200, r.text
    for value in (0, -1):
        error = error_of(post(server, "/chat/completions", chat(repetition_penalty=value)))
        assert error["param"] == "repetition_penalty", error
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_a_wrong_method_says_which_methods_are_allowed(server):
    """Starlette's 405 carries an Allow header (RFC 9110); our error handler dropped it."""
    for method, path, allowed in (("GET", "/v1/chat/completions", "POST"), ("DELETE", "/v1/completions", "POST"),
                                  ("TRACE", "/health", "GET, HEAD"), ("POST", "/v1/models", "GET")):
        r = httpx.request(method, server.url + path)
        assert error_of(r, 405)["message"] == "Method Not Allowed"
        assert set(r.headers.get("allow", "").split(", ")) == set(allowed.split(", ")), (method, path, r.headers)


def test_a_body_that_is_not_a_json_object_is_named(server):
    """An empty body was answered 'Field required', a JSON body without Content-Type: application/json (curl -d
    sends a form type) 'Input should be a valid dictionary or object to extract fields from', a body nested too
    deeply or with a 5000-digit number 'There was an error parsing the body': none says what is wrong."""
    body = httpx.Request("POST", "/", json=chat()).content
    for content, headers, words in (
        (b"", {"content-type": "application/json"}, "the request body is empty"),
        (b"", {}, "the request body is empty"),
        (body, {"content-type": "application/x-www-form-urlencoded"}, "content-type: application/json"),
        (body, {"content-type": "text/plain"}, "content-type: application/json"),
        (body, {}, "content-type: application/json"),
        (b"null", {"content-type": "application/json"}, "must be a json object"),
        (b"[1, 2]", {"content-type": "application/json"}, "must be a json object"),
        (b"[" * 100_000 + b"]" * 100_000, {"content-type": "application/json"}, "nested too deeply"),
        (body[:-1] + b', "max_tokens": ' + b"9" * 5000 + b"}", {"content-type": "application/json"}, "digits"),
    ):
        for path in ("/chat/completions", "/completions"):
            error = error_of(post(server, path, content=content, headers=headers))
            assert words in error["message"].lower(), (content[:40], headers, error)
            assert error["param"] is None and "\n" not in error["message"]
    assert post(server, "/chat/completions", chat()).status_code == 200


def test_booleans_are_not_numbers(server):
    """n=true, max_tokens=true, temperature=false ... were taken as 1 and 0: a flag in the wrong place."""
    for field in ("n", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
                  "repetition_penalty", "min_tokens"):
        for value in (True, False):
            error = error_of(post(server, "/chat/completions", chat(**{field: value})))
            assert error["param"] == field and "boolean" in error["message"], (field, error)
    error = error_of(post(server, "/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": True}))
    assert error["param"] == "max_tokens"
    for extra in ({"n": 1.0}, {"max_tokens": 3.0}, {"temperature": 0}, {"top_k": 0}, {"seed": 7, "temperature": 1}):
        assert post(server, "/chat/completions", chat(**extra)).status_code == 200, extra


def test_openapi_documents_the_errors_the_server_sends(server):
    """/openapi.json promised 422 bodies (never sent: validation errors are 400s in OpenAI's shape) and no other
    error, and described /metrics as JSON."""
    spec = httpx.get(server.url + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = spec["paths"][path]["post"]["responses"]
        assert "422" not in responses and {"200", "4XX", "5XX"} <= set(responses), responses
        ref = responses["4XX"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
        error = spec["components"]["schemas"][ref]
        assert error["required"] == ["error"], error
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    fields = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]  # the bounds a fuzzer reads
    assert {"exclusiveMinimum": 0, "maximum": 1, "type": "number"} in fields["top_p"]["anyOf"]
    assert {"exclusiveMinimum": 0, "type": "number"} in fields["repetition_penalty"]["anyOf"]
