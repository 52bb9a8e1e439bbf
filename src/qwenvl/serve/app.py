"""The HTTP front end: OpenAI's ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``, plus
``/health``, ``/metrics`` (Prometheus text) and ``GET /`` (a chat page).

Requests are checked and turned into token ids and pixels here (in a worker thread), then handed to the
:class:`~qwenvl.serve.engine.Engine`; answers come back as events and are sent whole or as server-sent
events in OpenAI's chunk format. Every refused request gets a 4xx with OpenAI's error body
(:func:`~qwenvl.serve.protocol.error_body`) and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import hmac
import importlib.resources
import ipaddress
import itertools
import json
import logging
import threading
import time
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.models import OpenAPI
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from ..config import first_image_tag
from ..fileio import error_line
from ..generation import STOP_IDS, SamplingParams
from ..images import shown
from ..processor import Processor
from . import protocol
from .engine import Delta, Engine, Event, Failed, Finished, QueueFull, ShuttingDown
from .engine import Request as EngineRequest
from .media import MediaError, MediaLimits, decode_image, read_image
from .metrics import ServeMetrics

__all__ = ["APIError", "Server", "ServeSettings", "create_app", "host_allowed"]

logger = logging.getLogger(__name__)

_SAMPLING_EPS = 1e-5  # a smaller temperature is greedy (vLLM's _SAMPLING_EPS)

_IGNORED_NAMED = 10  # the unknown fields of a request that are told apart from the rest: named, checked for typos

_Body = TypeVar("_Body", bound=BaseModel)

_RELEASE_BODY = "qwenvl.release_body"  # the scope key of a request's callable that gives its body's bytes back

# the Retry-After (seconds) of a busy server's 429 and 503 server_busy: a slot or the body budget frees as answers
# end; OpenAI's clients wait that long before they retry (else their own backoff)
_RETRY_AFTER_S = 1


@dataclass
class ServeSettings:
    model_name: str = "qwenvl"
    api_key: str | None = None  # clients must send "Authorization: Bearer KEY" to /v1/*
    max_request_bytes: int = 20 * 2**20
    request_body_timeout: float = 60.0  # seconds for a whole request body to arrive (408 after: slowloris)
    # bytes of request bodies the server holds at once, from their arrival until their requests are prepared (503
    # past it); None: decode_concurrency x max_request_bytes, as many largest bodies as are decoded at once
    max_request_bytes_in_flight: int | None = None
    max_images_per_request: int = 4
    max_tokens_cap: int = 2048
    # requests whose images are decoded and resized at once: a picture of max_image_pixels is ~150 MB decoded
    decode_concurrency: int = 4
    media: MediaLimits = field(default_factory=MediaLimits)
    # Host header names answered besides localhost, *.localhost and loopback IPs (a web page's script reaching a
    # server on this machine through a name of its own, DNS rebinding, is refused); None: any Host
    allowed_hosts: tuple[str, ...] | None = ()


def host_allowed(host: str, allowed: tuple[str, ...] | None) -> bool:
    """Whether a request's Host header value (``name``, ``name:port``, ``[v6]:port``) names this machine's
    loopback (localhost, ``*.localhost``, 127.x.x.x, ::1) or one of ``allowed`` (exact names, ``*.domain`` for its
    subdomains; ``*`` any; None: any)."""
    if allowed is None or "*" in allowed:
        return True
    host = host.strip().lower()
    if host.startswith("["):  # [v6] or [v6]:port
        name = host[1 : host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        if ipaddress.ip_address(name).is_loopback:
            return True
    except ValueError:
        pass
    for pattern in allowed:
        pattern = pattern.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")
        if name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


class APIError(Exception):
    """A request the server refuses: answered with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def response(self) -> Response:
        # ASCII JSON: a message may quote what the client sent, lone surrogates ("\ud800") included, which UTF-8
        # cannot encode
        body = json.dumps(protocol.error_body(self.message, self.type, self.code, self.param))
        return Response(body, self.status, _error_headers(self.code), media_type="application/json")


def _error_headers(code: str | None) -> dict[str, str]:
    """The headers an error answer with ``code`` carries besides its body (RFC 9110): when a busy server may be
    asked again, and how to authenticate after a 401."""
    if code in ("rate_limit_exceeded", "server_busy"):
        return {"retry-after": str(_RETRY_AFTER_S)}
    if code == "invalid_api_key":
        return {"www-authenticate": "Bearer"}
    return {}


@dataclass
class _Prepared:
    """A checked request: what the engine runs and what the answer needs to be sent."""

    input_ids: list[int]
    images: torch.Tensor | None
    params: SamplingParams
    stop: list[str]
    image_size: tuple[int, int] | None  # (width, height) of the request's last image: boxes map onto it
    image_count: int


class _Refused(Exception):
    """A request body the guard refuses before the app sees it: answered ``status`` with OpenAI's error body."""

    def __init__(self, status: int, message: str, code: str, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type = status, message, code, type


class _Guard:
    """ASGI middleware: refuses a Host header that is not in ``allowed_hosts`` (400, see :func:`host_allowed`),
    bodies over ``limit`` bytes (413, before the app reads them), bodies that take
    longer than ``timeout`` seconds to arrive (408: a client that announces a body and sends it slowly or never
    would hold its connection for ever; uvicorn has no such limit) and, while ``busy`` requests with a body wait
    for their answer to start, one more (429, before its body is read: the engine's queue counts only requests
    already prepared, so that bodies were otherwise read, parsed and prepared for as many clients as connect; a
    stream counts until its first chunk, so that clients who read slowly do not keep others out), refuses a body
    that would take the bytes of bodies held at once over ``budget`` (503: announced or as it arrives; a body is
    held until the app calls ``scope[_RELEASE_BODY]`` once it no longer holds it, or its answer starts), and counts
    every answer in ``qwenvl_requests_total`` by endpoint and status."""

    def __init__(self, app: Callable[..., Awaitable[None]], limit: int, metrics: ServeMetrics,
                 endpoints: frozenset[str], timeout: float = 60.0, busy: int | None = None,
                 allowed_hosts: tuple[str, ...] | None = None, budget: int | None = None) -> None:
        self.app, self.limit, self.metrics, self.endpoints, self.timeout = app, limit, metrics, endpoints, timeout
        self.allowed_hosts = allowed_hosts
        self.busy, self.in_progress = busy, 0  # requests with a body (probes have none: never refused)
        self.budget, self.held = budget, 0  # bytes of bodies read and not yet released
        metrics.request_body_bytes.read = lambda: self.held

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        status = [0]
        counted = False
        held = 0  # this request's bytes in self.held

        def hold(size: int) -> None:
            nonlocal held
            if self.budget is not None and self.held + size > self.budget:
                self.metrics.server_busy.inc()
                raise _Refused(503, f"the server is busy: {self.held} bytes of request bodies are in progress and "
                                    f"this one would take them over {self.budget}; try again later",
                               "server_busy", "server_error")
            self.held, held = self.held + size, held + size

        def unhold() -> None:
            nonlocal held
            self.held, held = self.held - held, 0

        def release() -> None:
            nonlocal counted
            unhold()
            if counted:
                self.in_progress, counted = self.in_progress - 1, False

        async def counted_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                release()
            await send(message)

        headers = dict(scope.get("headers") or [])
        has_body = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
        try:
            try:
                self._check_host(headers.get(b"host"))
                self._check_size(headers)
                declared = headers.get(b"content-length", b"")
                if declared.isdigit():  # refused at once if it cannot fit; counted as it arrives
                    hold(int(declared))
                    unhold()
                if has_body:
                    if self.busy is not None and self.in_progress >= self.busy:
                        raise _Refused(429, f"the server is busy: {self.in_progress} requests are in progress; "
                                            "try again later", "rate_limit_exceeded", "rate_limit_exceeded")
                    self.in_progress, counted = self.in_progress + 1, True
                scope[_RELEASE_BODY] = unhold
                body = await self._read_body(receive, hold)
            except _Refused as e:
                await self._refuse(counted_send, e)
                return
            replayed = False

            async def replay() -> dict[str, Any]:
                nonlocal replayed, body
                if not replayed:
                    replayed = True
                    message = {"type": "http.request", "body": body, "more_body": False}
                    body = b""  # not held here for the whole request: the app has it
                    return message
                return await receive()  # after the body: the client's disconnect

            await self.app(scope, replay, counted_send)
        finally:
            release()
            if status[0]:
                self.metrics.requests.inc(endpoint=endpoint, status=str(status[0]))

    def _check_host(self, host: bytes | None) -> None:
        """A request without Host (HTTP/1.0) passes: a browser always sends one."""
        if host is None or host_allowed(host.decode("latin-1"), self.allowed_hosts):
            return
        raise _Refused(400, f"the Host header {shown(host.decode('latin-1'))} is not allowed: this server answers "
                            "only requests for localhost, a loopback IP or a name of --allowed_hosts (else a web page "
                            "could reach it through a DNS name of its own); to serve that name, add it to "
                            "--allowed_hosts (comma-separated; '*': any)", "host_not_allowed")

    def _check_size(self, headers: dict[bytes, bytes]) -> None:
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            raise self._too_large()

    async def _read_body(self, receive: Callable, hold: Callable[[int], None]) -> bytes:
        """The whole body, each chunk passed to ``hold`` as it arrives; raises _Refused when it is larger than the
        limit or has not arrived within the timeout."""
        try:
            return await asyncio.wait_for(self._receive_body(receive, hold), self.timeout)
        except asyncio.TimeoutError:
            raise _Refused(408, f"the request body did not arrive within {self.timeout:g} seconds",
                           "request_timeout") from None

    async def _receive_body(self, receive: Callable, hold: Callable[[int], None]) -> bytes:
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client left; the app will see an empty body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise self._too_large()
            hold(len(chunk))
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    def _too_large(self) -> _Refused:
        return _Refused(413, f"request body is larger than this server's limit of {self.limit} bytes",
                        "request_too_large")

    async def _refuse(self, send: Callable, refused: _Refused) -> None:
        """Answer ``refused`` and close the connection (the rest of the body is never read)."""
        body = json.dumps(protocol.error_body(refused.message, refused.type, refused.code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        headers += [(k.encode(), v.encode()) for k, v in _error_headers(refused.code).items()]
        await send({"type": "http.response.start", "status": refused.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _Events:
    """Engine events (from the engine thread) into an asyncio queue of the request's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody listens any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def _sse(body: dict[str, Any] | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)}\n\n"


class _Server:
    def __init__(self, engine: Engine, processor: Processor, settings: ServeSettings, metrics: ServeMetrics) -> None:
        self.engine, self.processor, self.settings, self.metrics = engine, processor, settings, metrics
        self.media_policy = processor.media_policy()
        if self.media_policy.allow_any_local_path:
            raise ValueError("a server's processor must not allow any local path: give it allowed_media_dir "
                             "(a media folder) or None (no local files)")
        self.defaults = engine.model.config.generation
        self.max_model_len = engine.config.max_model_len
        self.decoding = threading.BoundedSemaphore(settings.decode_concurrency)
        # the most bytes one token stands for (Qwen's vocabulary: 128, a run of spaces): see _check_length
        self.max_token_bytes = processor.tokenizer.max_token_bytes

    # ---- turning requests into token ids and pixels ----------------------------------------------------
    def prepare_chat(self, body: protocol.ChatCompletionRequest) -> _Prepared:
        self._check_common(body)
        if self.processor.chat_format == "raw" and len(body.messages) > 1:
            # a base checkpoint's prompt is the last user message alone (the official make_context): the rest would
            # be dropped unseen with a 200, as vLLM refuses chat its model's template cannot write
            raise APIError(400, "this server's model is a base checkpoint (chat_format raw): it is prompted with the "
                                f"last message alone, so the {len(body.messages) - 1} message(s) before it would be "
                                "dropped; send one user message, or the whole prompt to /v1/completions",
                           param="messages")
        messages: list[dict[str, Any]] = []
        urls: list[str] = []
        first_of_last = 0  # the question's images are urls[first_of_last:]; the history's count as far as it is kept
        texts: list[str] = []  # the text of each message (its parts' text, joined)
        for k, m in enumerate(body.messages):
            first_of_last = len(urls)
            parts = [protocol.TextPart(type="text", text=m.content)] if isinstance(m.content, str) else m.content
            items: list[dict[str, str]] = []
            for part in parts:
                if isinstance(part, protocol.TextPart):
                    _check_text(part.text, f"messages[{k}]")
                    items.append({"text": part.text})
                elif m.role != "user":
                    raise APIError(400, f"messages[{k}]: images are read only from user messages", param="messages")
                else:
                    urls.append(part.image_url.url)
                    items.append({"image": f"image-{len(urls)}"})  # a name only: the pixels come from `urls`
            text_only = "".join(i.get("text", "") for i in items)
            messages.append({"role": m.role, "content": items if m.role == "user" else text_only})
            texts.append(text_only)
        self._check_image_count(len(urls) - first_of_last)
        self._check_length(texts[-1], "messages")
        # a turn that cannot fit goes with the older ones before the prompt is built (_fit_history would drop them
        # all, after tokenizing them)
        head = 1 if messages[0]["role"] == "system" else 0
        turns = (len(messages) - head) % 2 == 1 and all(
            m["role"] == ("assistant" if (k - head) % 2 else "user") for k, m in enumerate(messages) if k >= head)
        over = [k for k in range(head, len(messages) - 1) if self._cannot_fit(texts[k])]
        if over and turns:  # (else the prompt's builder refuses the roles)
            drop = over[-1] + 2 - (over[-1] - head) % 2  # through the assistant answer of the turn
            messages = messages[:head] + messages[drop:]
        try:
            messages, ids = self._fit_history(messages, self._answer_room(body))
            spans = len(self.processor.tokenizer.image_paths(ids))
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        self._check_room(body, len(ids), "messages")
        # history trimmed to the window drops the oldest images
        kept = urls[len(urls) - spans :] if spans else []
        return self._finish(body, messages, kept, len(urls), STOP_IDS[self.processor.chat_format])

    def _answer_room(self, body: protocol.ChatCompletionRequest) -> int:
        """The positions a chat prompt leaves for the answer: max_tokens, else the default answer length (at most
        half the context, so that a short context does not lose a whole chat for an answer length nobody asked)."""
        if body.answer_limit is not None:
            return body.answer_limit
        return min(self.defaults.max_new_tokens, self.settings.max_tokens_cap, self.max_model_len // 2)

    def _fit_history(self, messages: list[dict[str, Any]], room: int) -> tuple[list[dict[str, Any]], list[int]]:
        """``messages`` without their oldest user/assistant turns as far as needed for the prompt to leave ``room``
        positions of the context and to hold at most --max_images_per_request pictures, and the prompt's ids. The
        processor's window counts the history only, and a chat client sends the whole conversation, pictures
        included: a long chat would otherwise have every later turn refused. What does not fit even without
        history is left for the checks after this to refuse."""
        build = self.processor.build_messages_prompt
        limit = self.settings.max_images_per_request

        def fits(ids: list[int]) -> bool:
            return len(ids) + room <= self.max_model_len and len(self.processor.tokenizer.image_paths(ids)) <= limit

        ids = build(messages)[1]  # also checks the roles: the turns below are user/assistant pairs
        if fits(ids):
            return messages, ids
        head = 1 if messages[0]["role"] == "system" else 0

        def without(pairs: int) -> list[dict[str, Any]]:
            return messages[:head] + messages[head + 2 * pairs :]

        # the fewest oldest pairs to drop, by bisection (a build tokenizes the window's turns)
        enough, too_few = (len(messages) - head) // 2, 0
        best = build(without(enough))[1]
        if not fits(best):
            return without(enough), best
        while enough - too_few > 1:
            mid = (enough + too_few) // 2
            mid_ids = build(without(mid))[1]
            if fits(mid_ids):
                enough, best = mid, mid_ids
            else:
                too_few = mid
        return without(enough), best

    def prepare_completion(self, body: protocol.CompletionRequest) -> _Prepared:
        self._check_common(body)
        urls = list(body.images or [])
        self._check_image_count(len(urls), "images")
        try:
            prompt = body.prompt_text()
            # each <img> opens a span of 258 ids (or is refused as malformed): counted before tokenizing
            self._check_image_count(prompt.count("<img>"), "prompt")
            self._check_length(prompt, "prompt")
            ids = self.processor.tokenizer.encode(prompt)
            self._check_room(body, len(ids), "prompt")  # before reading its spans or images
            spans = len(self.processor.tokenizer.image_paths(ids))
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from e
        if spans != len(urls):
            raise APIError(400, f"the prompt has {spans} <img></img> span(s) but {len(urls)} image(s) were given: "
                                "send one image URL per span in 'images' (a span's text is only a name)",
                           param="images")
        return self._finish(body, prompt, urls, len(urls), STOP_IDS[self.defaults.chat_format])

    def _check_common(self, body: protocol.ChatCompletionRequest | protocol.CompletionRequest) -> None:
        if body.model is not None and body.model != self.settings.model_name:
            raise APIError(404, f"the model {shown(body.model)} does not exist; this server serves "
                                f"{self.settings.model_name!r}", code="model_not_found", param="model")
        why = body.unsupported()
        if why is not None:
            raise APIError(400, why, param=why.split(":")[0])

    def _cannot_fit(self, text: str) -> bool:
        """Whether ``text`` (a prompt, or the text of a message's parts) has more tokens than the context holds, told
        without tokenizing it: a token stands for at most max_token_bytes bytes and a character is at least one byte
        once NFC-normalized, as the tokenizer normalizes it (NFC may merge or split characters, so a long text is
        counted normalized). Never true of a text that fits."""
        bound = self.max_model_len * self.max_token_bytes
        if len(text) <= bound:
            return False  # NFC may lengthen it: then the tokenizer and _check_room tell
        return len(unicodedata.normalize("NFC", text)) > bound

    def _check_length(self, text: str, param: str) -> None:
        """Refuse a prompt that cannot fit before tokenizing it: 15 MiB of text took 4 to 19 s of tokenizing."""
        if self._cannot_fit(text):
            raise APIError(400, f"this server's context is {self.max_model_len} tokens for prompt and answer; the "
                                f"prompt has {len(text)} characters, more than that many tokens hold (a token stands "
                                f"for at most {self.max_token_bytes} bytes)", code="context_length_exceeded",
                           param=param)

    def _check_image_count(self, n: int, param: str = "messages") -> None:
        if n > self.settings.max_images_per_request:
            raise APIError(400, f"{n} images in one request; this server takes at most "
                                f"{self.settings.max_images_per_request}", param=param)

    def _finish(self, body: protocol.ChatCompletionRequest | protocol.CompletionRequest, prompt: Any,
                urls: list[str], image_count: int, stop_ids: tuple[int, ...]) -> _Prepared:
        try:
            stop = body.stop_strings()
        except ValueError as e:
            raise APIError(400, str(e), param="stop") from e
        try:
            data = [read_image(u, self.settings.media, self.media_policy) for u in urls]
            # a few requests at a time from bytes to pixels: each decoded picture may take ~150 MB until resized
            with self.decoding:
                pictures = [decode_image(d, self.settings.media) for d in data]
                del data
                # explicit images: the <img> spans' text is never opened as a path
                inputs = self.processor(prompt, images=pictures)
        except MediaError as e:
            raise APIError(400, str(e), param="image_url") from e
        except ValueError as e:
            raise APIError(400, str(e)) from e
        ids = inputs["input_ids"][0].tolist()
        limit = body.answer_limit
        if limit is None:  # the prompt is the one _check_room saw: room >= 1
            limit = min(self.defaults.max_new_tokens, self.settings.max_tokens_cap, self.max_model_len - len(ids))
        if body.min_tokens > limit:
            raise APIError(400, f"min_tokens is {body.min_tokens}, more than the {limit} tokens this answer may have "
                                "(max_tokens, or what fits the context)", param="min_tokens")
        size = pictures[-1].size if pictures else None
        return _Prepared(ids, inputs["images"], self._params(body, limit, stop_ids), stop, size, image_count)

    def _check_room(self, body: protocol.ChatCompletionRequest | protocol.CompletionRequest, prompt_tokens: int,
                    param: str) -> None:
        """Refuse a max_tokens over the cap, and a prompt that leaves no room (or less than max_tokens) for the
        answer: before the request's images are fetched and decoded."""
        limit = body.answer_limit
        cap = self.settings.max_tokens_cap
        if limit is not None and limit > cap:
            field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
            raise APIError(400, f"{field} is {limit}; this server allows at most {cap}", param=field)
        room = self.max_model_len - prompt_tokens
        if room < 1 or (limit is not None and limit > room):
            asked = f"; you asked for {limit} more" if limit is not None else ""
            raise APIError(400, f"this server's context is {self.max_model_len} tokens for prompt and answer; the "
                                f"prompt has {prompt_tokens} tokens{asked}", code="context_length_exceeded",
                           param=param)

    def _params(self, body: protocol.ChatCompletionRequest | protocol.CompletionRequest, limit: int,
                stop_ids: tuple[int, ...]) -> SamplingParams:
        """OpenAI's knobs onto SamplingParams; what the request leaves out comes from generation_config.json.
        ``temperature`` 0 (below 1e-5) is greedy."""
        g = self.defaults
        if body.temperature is None:
            do_sample, temperature = g.do_sample, g.temperature
        else:  # below 1e-5 logits / temperature overflow to inf (NaN probabilities): greedy, as vLLM takes it
            do_sample = body.temperature >= _SAMPLING_EPS
            temperature = body.temperature if do_sample else 1.0
        return SamplingParams(
            max_new_tokens=limit, do_sample=do_sample, temperature=temperature,
            top_p=g.top_p if body.top_p is None else body.top_p, top_k=g.top_k if body.top_k is None else body.top_k,
            seed=body.seed, stop_token_ids=stop_ids, pad_token_id=g.pad_token_id,
            repetition_penalty=g.repetition_penalty if body.repetition_penalty is None else body.repetition_penalty,
            min_new_tokens=body.min_tokens,
        )

    # ---- running them --------------------------------------------------------------------------------
    def submit(self, prepared: _Prepared) -> tuple[EngineRequest, _Events]:
        events = _Events()
        request = EngineRequest(prepared.input_ids, prepared.params, events.put, prepared.images, prepared.stop)
        try:
            self.engine.submit(request)
        except ShuttingDown as e:
            raise APIError(503, str(e), type="server_error") from e
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}", type="rate_limit_exceeded",
                           code="rate_limit_exceeded") from e
        except ValueError as e:
            raise APIError(400, str(e)) from e
        return request, events

    async def collect(self, http: Request, request: EngineRequest, events: _Events) -> Finished:
        """Wait for the whole answer; a client that leaves meanwhile cancels it."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        raise APIError(499, "client closed the request") from None
                    continue
                if isinstance(event, Finished):
                    return event
                if isinstance(event, Failed):
                    raise APIError(event.status, event.message, type="server_error")
        finally:
            request.cancel()  # a no-op once finished

    async def stream(self, request: EngineRequest, events: _Events, first: str | None,
                     piece: Callable[[str], dict[str, Any]], last: Callable[[Finished], list[dict[str, Any]]]
                     ) -> AsyncIterator[str]:
        """Server-sent events: ``first`` (if any), a ``piece`` per text delta, the ``last`` ones, ``[DONE]``.
        A client that disconnects ends the generator, which cancels the request."""
        try:
            if first is not None:
                yield first
            while True:
                event = await events.queue.get()
                if isinstance(event, Delta):
                    yield _sse(piece(event.text))
                elif isinstance(event, Finished):
                    for body in last(event):
                        yield _sse(body)
                    break
                else:
                    yield _sse(protocol.error_body(event.message, type="server_error"))
                    break
            yield _sse("[DONE]")
        finally:
            request.cancel()


def _check_text(text: str, where: str) -> None:
    """Images come only as image_url parts: an <img> tag in text could otherwise claim a picture's place."""
    if first_image_tag(text) is not None:
        raise APIError(400, f"{where}: <img> tags in message text are not allowed; send images as image_url "
                            "content parts", param="messages")


def _body_problem(content_type: str, missing: bool) -> str:
    """Why a body is not a request: FastAPI reads JSON only under a JSON content type (``curl -d`` sends a
    form's), and hands the endpoint the raw bytes otherwise."""
    media = content_type.split(";")[0].strip().lower()
    if missing:
        return "the request body is empty: send the request as a JSON object"
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        return f"the request body must be a JSON object sent with Content-Type: application/json (got {got})"
    return "the request body must be a JSON object ({...})"


def _is_json(content_type: str) -> bool:
    """Whether a body of ``content_type`` is read as JSON: application/json or application/*+json (as FastAPI
    reads a body; no Content-Type is not JSON)."""
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return bool(content_type) and message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json"))


async def _parse(http: Request, model: type[_Body]) -> _Body:
    """The request body as ``model``. Read and parsed here, with the errors FastAPI's body parameter gave, rather
    than by FastAPI, which kept the parsed JSON for the whole request: fields this server ignores are dropped
    once validated (20 MiB of ``[{}, {}, ...]`` in one is ~550 MB of Python objects, of ``[[[]], [[]], ...]``
    ~740 MB). Parsed on the event loop as FastAPI did, so one body at a time. (pydantic's
    ``model_validate_json`` parses into a tree of its own first: 1.4 GB for those 20 MiB of ``[[]]``.)"""
    data = b"".join([chunk async for chunk in http.stream()])
    content_type = http.headers.get("content-type", "")
    if not data or not _is_json(content_type):
        raise APIError(400, _body_problem(content_type, missing=not data))
    try:
        # decoded as json.loads decodes bytes, which it held along with the text and the parsed objects: a body of
        # a 20 MiB data: URL peaked at 60 MiB, now 40
        text = data.decode(json.detect_encoding(data), "surrogatepass")
        del data
        parsed = json.loads(text)
    except json.JSONDecodeError:
        raise APIError(400, "the request body is not valid JSON") from None
    except (ValueError, RecursionError) as e:
        raise APIError(400, _unparsable(e)) from None
    try:
        body = model.model_validate(parsed, from_attributes=True)  # as FastAPI validates: the same messages
    except ValidationError as e:  # answered as FastAPI's validation errors are (see create_app's handler)
        found = [(err, _input_path(parsed, err)) for err in e.errors()]
        raise RequestValidationError([{**err, "loc": ("body", *path), "msg": _missing_hint(parsed, path, err)}
                                      for err, path in found]) from None
    _check_unknown(body, parsed)
    return body


# how many keys of an object that lacks a required field are looked at for one misspelling it: a request holds a
# few dozen; a hostile one millions, each a difflib comparison on the event loop
_MISSING_HINT_KEYS = 64


def _missing_hint(data: Any, path: tuple[str | int, ...], error: Any) -> str:
    """pydantic's message of ``error``, at ``path`` in the request's JSON ``data`` (:func:`_input_path`); for a
    required field left out, with the field of the request that misspells it (``"mesages"``: "Field required (the
    request has 'mesages': did you mean messages?)")."""
    if error["type"] != "missing" or not path:
        return error["msg"]
    *where, name = path
    for step in where:  # the object that lacks the field: every step of the path is in the data
        data = data[step]
    keys = itertools.islice(data, _MISSING_HINT_KEYS) if isinstance(data, dict) else ()
    typed = next((k for k in keys if protocol.close_field(k, {str(name): None})), None)
    return error["msg"] if typed is None else f"{error['msg']} (the request has {shown(typed)}: did you mean {name}?)"


def _check_unknown(body: BaseModel, data: Any) -> None:
    """Refuse fields of the request ``data`` that misspell one of ours, in OpenAI's words for a field it does not
    know, with the CLI's "did you mean" (``max_tokns`` asked for nothing, and got the default 512 tokens); log
    the names of the other fields nothing reads, as vLLM does: clients send fields of OpenAI's API that change
    nothing here (``metadata``, ``store``, ``service_tier``, ...), which OpenAI's API would refuse if unknown. Only
    the first :data:`_IGNORED_NAMED` unknown fields are named and checked (a body may hold millions): a misspelling
    after as many other unknown fields is only counted."""
    found = protocol.unknown_fields(body, data)
    named = list(itertools.islice(found, _IGNORED_NAMED))  # a body may hold millions
    typos = [(path, close) for path, name, fields in named if (close := protocol.close_field(name, fields))]
    if typos:
        raise APIError(400, f"Unrecognized request argument{'s' if len(typos) > 1 else ''} supplied: "
                            + ", ".join(f"{path} (did you mean {close}?)" for path, close in typos),
                       param=typos[0][0])
    if named:
        more = sum(1 for _ in found)
        logger.warning("The following fields were present in the request but ignored: %s%s",
                       ", ".join(shown(path) for path, _, _ in named), f" and {more} more" if more else "")


def _input_path(data: Any, error: Any) -> tuple[str | int, ...]:
    """Where in the request's JSON ``data`` a pydantic ``error`` is: its loc without the names pydantic gives a
    union's branches ("str", "list[str]", a content part's type: "messages.0.content.0.image_url.image_url"),
    which are no field of the request; the name of a missing field is kept."""
    loc, path = error["loc"], []
    for k, key in enumerate(loc):
        field = isinstance(data, dict) and isinstance(key, str) and key in data
        if field or (isinstance(data, list) and isinstance(key, int) and 0 <= key < len(data)):
            data = data[key]
        elif not (error["type"] == "missing" and k == len(loc) - 1):
            continue
        path.append(key)
    return tuple(path)


def _unparsable(cause: BaseException) -> str:
    if isinstance(cause, RecursionError):
        return "the request body is not valid JSON here: it is nested too deeply"
    # int('9' * 5000): "Exceeds the limit (4300 digits) ...; use sys.set_int_max_str_digits() ..."
    return f"the request body is not valid JSON here: {error_line(cause).split(';')[0]}"


def _page() -> str:
    return (importlib.resources.files("qwenvl.serve") / "static" / "index.html").read_text(encoding="utf-8")


def create_app(engine: Engine, processor: Processor, settings: ServeSettings | None = None,
               metrics: ServeMetrics | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``; it starts the engine thread on startup and stops it on shutdown."""
    settings = settings or ServeSettings()
    metrics = metrics or engine.metrics or ServeMetrics()
    metrics.queue_depth.read = lambda: engine.waiting
    metrics.active_slots.read = lambda: engine.active
    metrics.slots.read = lambda: engine.config.max_batch_size
    if engine.metrics is None:
        engine.metrics = metrics
    server = _Server(engine, processor, settings, metrics)
    page = _page()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    # every refusal is OpenAI's error body (validation errors too: 400, not FastAPI's 422), and says so in the spec
    errors = {"model": protocol.ErrorResponse, "description": "refused: OpenAI's error body"}
    app = FastAPI(title="qwenvl", description="Qwen-VL behind OpenAI's chat/completions API",
                  lifespan=lifespan, docs_url=None, redoc_url=None,  # no CDN: the docs pages load theirs
                  responses={"4XX": errors, "5XX": {**errors, "description": "failed: OpenAI's error body"}})
    endpoints = frozenset({"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"})
    budget = settings.max_request_bytes_in_flight
    if budget is None:
        budget = settings.decode_concurrency * settings.max_request_bytes
    if budget < settings.max_request_bytes:
        raise ValueError(f"max_request_bytes_in_flight ({budget}) must be >= max_request_bytes "
                         f"({settings.max_request_bytes}): a largest body would never fit")
    metrics.request_body_bytes_limit.read = lambda: budget
    app.add_middleware(_Guard, limit=settings.max_request_bytes, metrics=metrics, endpoints=endpoints,
                       timeout=settings.request_body_timeout,
                       busy=engine.config.max_batch_size + engine.config.max_queue,
                       allowed_hosts=settings.allowed_hosts, budget=budget)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> Response:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> Response:
        # the deepest error names the field at fault: for `content` (a string or a list of parts) a bad part,
        # not "should be a valid string"; loc entries with "[" name a union's branch, not a field
        first: dict[str, Any] = max(e.errors(), key=lambda err: len(err.get("loc", ())), default={})
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and "[" not in str(p))
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            where, message = "", "the request body is not valid JSON"  # its loc is a character offset
        elif tuple(first.get("loc", ())) == ("body",):  # the body as a whole: missing, or not an object
            message = _body_problem(request.headers.get("content-type", ""), first.get("type") == "missing")
        return APIError(400, f"{where}: {message}" if where else message, param=where or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        message = str(e.detail)
        if e.status_code == 400 and isinstance(e.__cause__, (ValueError, RecursionError)):
            message = _unparsable(e.__cause__)  # FastAPI's "There was an error parsing the body"
        elif e.status_code == 404:  # no route of the path: Starlette's "Not Found" named nothing; OpenAI's words
            message = f"Invalid URL ({request.method} {shown(request.url.path)})"
        response = APIError(e.status_code, message, code="not_found" if e.status_code == 404 else None).response()
        response.headers.update(e.headers or {})
        if e.status_code == 405:  # Allow: the methods of every route of the path, not only of the first one
            allowed = {m for r in app.routes if isinstance(r, Route) and r.matches(request.scope)[0] is Match.PARTIAL
                       for m in r.methods or ()}
            response.headers["allow"] = ", ".join(sorted(allowed))
        return response

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> Response:
        logger.exception("request failed")
        return APIError(500, f"internal error: {type(e).__name__}", type="server_error").response()

    async def authorized(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           type="authentication_error", code="invalid_api_key")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = engine.running
        return JSONResponse({"status": "ok" if alive else "engine stopped", "active": engine.active,
                             "waiting": engine.waiting, "slots": engine.config.max_batch_size},
                            200 if alive else 503)

    # HEAD: what some load balancers probe with; a route of its own, as one route for both methods gave both
    # operations one operationId in /openapi.json
    app.head("/health")(health)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    def model_card() -> dict[str, Any]:
        # chat_format (the checkpoint's generation_config): "raw", a base model, is prompted with one message alone
        return {"id": settings.model_name, "object": "model", "created": int(started), "owned_by": "qwenvl",
                "max_model_len": engine.config.max_model_len, "chat_format": processor.chat_format}

    started = time.time()

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorized)])
    async def model(name: str) -> dict[str, Any]:
        if name != settings.model_name:
            raise APIError(404, f"the model {shown(name)} does not exist", code="model_not_found", param="model")
        return model_card()

    def body_of(model: type[BaseModel]) -> dict[str, Any]:  # the request body in /openapi.json (see _parse)
        schema = {"$ref": f"#/components/schemas/{model.__name__}"}
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)],
              openapi_extra=body_of(protocol.ChatCompletionRequest))
    async def chat(http: Request) -> Response:
        body = await _parse(http, protocol.ChatCompletionRequest)
        prepared = await run_in_threadpool(server.prepare_chat, body)
        stream, include_usage = body.stream, _include_usage(body)
        del body  # its images are pixels now: the bytes of data: URLs are given back
        _release_body(http)
        request, events = server.submit(prepared)
        rid, name = protocol.new_id("chatcmpl"), settings.model_name
        grounding = _grounding_of(prepared)

        if not stream:
            done = await server.collect(http, request, events)
            return JSONResponse(protocol.chat_completion(rid, name, done.text, done.reason, done.prompt_tokens,
                                                         done.completion_tokens, grounding(done.text)))

        def last(done: Finished) -> list[dict[str, Any]]:
            g = grounding(done.text)
            out = [protocol.chat_chunk(rid, name, {"grounding": g} if g else {}, done.reason)]
            if include_usage:
                out.append(protocol.chat_chunk(rid, name, None, usage_=protocol.usage(done.prompt_tokens,
                                                                                     done.completion_tokens)))
            return out

        first = _sse(protocol.chat_chunk(rid, name, {"role": "assistant", "content": ""}))
        return _EventStream(
            server.stream(request, events, first, lambda t: protocol.chat_chunk(rid, name, {"content": t}), last),
            request)

    @app.post("/v1/completions", dependencies=[Depends(authorized)], openapi_extra=body_of(protocol.CompletionRequest))
    async def complete(http: Request) -> Response:
        body = await _parse(http, protocol.CompletionRequest)
        prepared = await run_in_threadpool(server.prepare_completion, body)
        stream, include_usage = body.stream, _include_usage(body)
        del body
        _release_body(http)
        request, events = server.submit(prepared)
        rid, name = protocol.new_id("cmpl"), settings.model_name
        grounding = _grounding_of(prepared)

        if not stream:
            done = await server.collect(http, request, events)
            return JSONResponse(protocol.completion(rid, name, done.text, done.reason,
                                                    protocol.usage(done.prompt_tokens, done.completion_tokens),
                                                    grounding(done.text)))

        def last(done: Finished) -> list[dict[str, Any]]:
            out = [protocol.completion(rid, name, "", done.reason, grounding=grounding(done.text))]
            if include_usage:
                out.append(protocol.completion(rid, name, None,
                                               usage_=protocol.usage(done.prompt_tokens, done.completion_tokens)))
            return out

        return _EventStream(server.stream(request, events, None, lambda t: protocol.completion(rid, name, t), last),
                             request)

    spec = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's, with the request bodies' schemas, which it leaves out as no parameter declares them."""
        if app.openapi_schema is None:
            full = spec()
            schemas = full.setdefault("components", {}).setdefault("schemas", {})
            for model in (protocol.ChatCompletionRequest, protocol.CompletionRequest):
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
            # in FastAPI's form (its OpenAPI model, no nulls), as it writes the schemas of the models it sees
            app.openapi_schema = jsonable_encoder(OpenAPI(**full), by_alias=True, exclude_none=True)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _grounding_of(prepared: Any) -> Callable[[str], list[dict[str, Any]] | None]:
    """The grounding extension field of an answer to ``prepared`` (boxes in pixels of its last image)."""
    return lambda text: protocol.grounding_field(text, prepared.image_size, prepared.image_count or None)


def _release_body(http: Request) -> None:
    """Give the request's body bytes back to the server's budget (see _Guard): the request no longer holds them."""
    release = http.scope.get(_RELEASE_BODY)
    if release is not None:
        release()


def _include_usage(body: Any) -> bool:
    return body.stream_options is not None and bool(body.stream_options.include_usage)


class _EventStream(StreamingResponse):
    """Server-sent events, as OpenAI's streaming endpoints send them; the engine request is cancelled however
    the response ends. (The event generator cancels it when it ends, but a generator that never started never
    ends: under ASGI 2.4 Starlette sends the response head first, and a client already gone stops it there.)"""

    def __init__(self, events: Any, request: EngineRequest) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.engine_request = request

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.engine_request.cancel()  # a no-op once finished


class Server(uvicorn.Server):
    """uvicorn's server for an app of :func:`create_app`: when shutdown begins (Ctrl-C, SIGTERM) the engine stops
    first, so the answers in flight end at once with "the server is shutting down" in OpenAI's error body (a
    stream: an error chunk, then ``[DONE]``), rather than running on until uvicorn's graceful-shutdown timeout
    cancels them mid-answer (a traceback per request in the log, a plain-text 500 or a cut stream)."""

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        await asyncio.to_thread(self.engine.stop)  # the event loop keeps sending what the engine ends with
        await super().shutdown(sockets)
