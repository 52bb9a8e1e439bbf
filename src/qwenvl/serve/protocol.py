"""OpenAI's chat/completions wire format: request models (validated by pydantic) and response bodies.

Only what the server implements is accepted with a meaning; fields OpenAI clients send that change nothing
here (``user``, ``metadata``, ...) are ignored (the server logs their names: see :func:`unknown_fields`), a field
whose name is a close match of one of ours (``max_tokns``) is refused as misspelled (:func:`close_field`), and
options we cannot honour (``n`` > 1, ``logprobs``, presence/frequency penalties, ``logit_bias``, tools, JSON
``response_format``, audio) are refused with a 400 rather than silently dropped.

Extensions (vLLM's names): ``top_k``, ``repetition_penalty`` and ``min_tokens`` on both requests; ``images`` (a list of image URLs, one per ``<img></img>`` span of
the prompt, in order) on ``/v1/completions``; ``grounding`` on answers that hold boxes (see
:func:`grounding_field`).
"""

from __future__ import annotations

import difflib
import json
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from ..grounding import denormalize_box, parse_grounding

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "ContentPart",
    "ErrorDetail",
    "ErrorResponse",
    "ImagePart",
    "Message",
    "TextPart",
    "close_field",
    "error_body",
    "grounding_field",
    "unknown_fields",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


# JSON numbers only: not true/false, not "5" (OpenAI's API answers 400; pydantic's lax mode took them as 1, 0, 5). An
# integer given as 5.0 is 5, as pydantic reads it (1.5 is refused)
_NUMBERS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
            "min_tokens", "seed", "n", "presence_penalty", "frequency_penalty", "best_of")
# null, as OpenAI's spec allows, for fields whose default is not None here: the default
_NULL_IS_DEFAULT = ("n", "presence_penalty", "frequency_penalty", "stream", "min_tokens", "echo")


def _string_or_list(value: Any, what: str, nullable: bool = False) -> Any:
    """``value`` when it is a string or a list (or None where ``nullable``), else an error saying what the field
    takes: pydantic answered ``"stop": 5`` with its first branch's error alone, "stop.str: Input should be a valid
    string"."""
    if isinstance(value, (str, list)) or (nullable and value is None):
        return value
    raise PydanticCustomError("string_or_list_type", f"Input should be a string or a list of {what}")


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str
    detail: str | None = None  # accepted, no effect: Qwen-VL always sees 448x448


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Model):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content_type(cls, value: Any) -> Any:
        return _string_or_list(value, "content parts")


class StreamOptions(_Model):
    include_usage: bool = Field(default=False, strict=True)


class _VLLMDefault:
    """Marks a field of vLLM's sampling extensions that would change the answer and that this server does not
    implement, with vLLM's ``default``: refused unless at it (see ``unsupported``), so that a client written for
    vLLM (its benchmarks send ignore_eos) is told, not answered as if it held."""

    def __init__(self, default: Any) -> None:
        # no dataclass: marks that compare equal (False and 0.0) are one to typing, which caches Annotated[...]
        self.default = default


class _Sampling(_Model):
    model: str | None = None  # None: the served model (as vLLM; OpenAI's API requires it)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    # vLLM's extra sampling parameters: the penalty of model.generate / transformers (> 0, 1 = off), and how
    # many tokens come before a stop token may be picked (model.generate's min_new_tokens)
    repetition_penalty: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    min_tokens: int = Field(default=0, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed takes
    n: int = Field(default=1, ge=1)
    stream: bool = Field(default=False, strict=True)  # JSON true/false only (pydantic took "yes", "true", 1)
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None
    user: str | None = None
    # what would change the answer and this server cannot do: refused (see unsupported), not ignored
    logit_bias: Any = None
    top_logprobs: Any = None
    response_format: Any = None
    # vLLM's extra sampling parameters we do not implement: refused too, unless at vLLM's default (marked)
    min_p: Annotated[Any, _VLLMDefault(0.0)] = None
    ignore_eos: Annotated[Any, _VLLMDefault(False)] = None
    stop_token_ids: Annotated[Any, _VLLMDefault(None)] = None
    include_stop_str_in_output: Annotated[Any, _VLLMDefault(False)] = None
    length_penalty: Annotated[Any, _VLLMDefault(1.0)] = None
    use_beam_search: Annotated[Any, _VLLMDefault(False)] = None
    prompt_logprobs: Annotated[Any, _VLLMDefault(None)] = None
    bad_words: Annotated[Any, _VLLMDefault(None)] = None
    allowed_token_ids: Annotated[Any, _VLLMDefault(None)] = None
    truncate_prompt_tokens: Annotated[Any, _VLLMDefault(None)] = None
    guided_json: Annotated[Any, _VLLMDefault(None)] = None
    guided_regex: Annotated[Any, _VLLMDefault(None)] = None
    guided_choice: Annotated[Any, _VLLMDefault(None)] = None
    guided_grammar: Annotated[Any, _VLLMDefault(None)] = None
    structured_outputs: Annotated[Any, _VLLMDefault(None)] = None
    logits_processors: Annotated[Any, _VLLMDefault(None)] = None

    @field_validator(*_NULL_IS_DEFAULT, mode="before", check_fields=False)
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        """OpenAI's spec makes these nullable, and clients generated from it send null for what they leave out."""
        name = cast(str, info.field_name)  # set for every field validator (None only in model validators)
        return cls.model_fields[name].default if value is None else value

    @field_validator(*_NUMBERS, mode="before", check_fields=False)
    @classmethod
    def _a_number(cls, value: Any) -> Any:
        """JSON true/false where a number belongs is a flag in the wrong place, not 1 or 0; "5" is a string."""
        if isinstance(value, bool):
            raise PydanticCustomError("bool_not_number", "Input should be a number, not a boolean")
        if isinstance(value, str):
            raise PydanticCustomError("str_not_number", "Input should be a number, not a string")
        return value

    @field_validator("logprobs", mode="before")
    @classmethod
    def _a_flag_or_count(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, (bool, int)):
            raise PydanticCustomError("logprobs_type", "Input should be a boolean or an integer")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_type(cls, value: Any) -> Any:
        return _string_or_list(value, "strings", nullable=True)

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        """As OpenAI and vLLM: options of a stream on a request that is not streamed are a mistake, not a no-op."""
        if value is not None and not info.data.get("stream"):
            raise PydanticCustomError("stream_options_without_stream", "only allowed when stream is true")
        return value

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ValueError("stop: at most 4 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop: stop strings must not be empty")
        return stops

    def unsupported(self) -> str | None:
        """Why the request asks for something this server does not do, or None."""
        for name, default in _VLLM_DEFAULTS.items():  # at vLLM's default (or null, empty) it asks for nothing
            value = getattr(self, name)
            if value is not None and value != default and value not in ([], {}):
                return f"{name}: not supported (vLLM's extension; only its default, {json.dumps(default)}, is)"
        if self.n != 1:
            return "n: only n=1 is supported"
        if self.logprobs:
            return "logprobs: not supported"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty/frequency_penalty: not supported (leave them 0)"
        if self.logit_bias:
            return "logit_bias: not supported"
        if self.top_logprobs:
            return "top_logprobs: not supported"
        if self.response_format is not None and self.response_format != {"type": "text"}:
            return "response_format: only {\"type\": \"text\"} is supported (no JSON mode or schema)"
        return None


# each field marked with vLLM's default, and that default
_VLLM_DEFAULTS: dict[str, Any] = {name: mark.default for name, field in _Sampling.model_fields.items()
                                  for mark in field.metadata if isinstance(mark, _VLLMDefault)}


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: Any = None
    functions: Any = None  # the older name of tools
    tool_choice: Any = None
    function_call: Any = None
    modalities: Any = None
    audio: Any = None

    def unsupported(self) -> str | None:
        if self.tools or self.functions:  # a client that offers tools expects tool calls, which never come
            return "tools: tool calls are not supported (Qwen-VL was not trained for them)"
        if self.tool_choice not in (None, "none", "auto") or self.function_call not in (None, "none", "auto"):
            return "tool_choice: tool calls are not supported"
        if (self.modalities not in (None, ["text"])) or self.audio is not None:
            return "modalities: only text answers are supported"
        return super().unsupported()

    @property
    def answer_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = Field(default=False, strict=True)
    suffix: str | None = None
    best_of: int | None = None
    images: list[str] | None = None  # extension: one image URL per <img></img> span of the prompt

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_type(cls, value: Any) -> Any:
        return _string_or_list(value, "strings")

    @property
    def answer_limit(self) -> int | None:
        return self.max_tokens

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ValueError(f"prompt: one prompt per request (got a list of {len(self.prompt)})")
        return self.prompt[0]

    def unsupported(self) -> str | None:
        # a count here (OpenAI's legacy completions, vLLM): 0 still asks for the chosen tokens' log-probabilities
        if self.logprobs is not None and self.logprobs is not False:
            return "logprobs: not supported"
        if self.echo:
            return "echo: not supported"
        if self.suffix:
            return "suffix: not supported"
        if self.best_of not in (None, 1):
            return "best_of: only best_of=1 is supported"
        return super().unsupported()


def unknown_fields(request: BaseModel, data: Mapping[str, Any],
                   where: str = "") -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    """The fields of ``data``, the JSON object ``request`` was validated from, that no model reads (pydantic drops
    them), nested ones included: each as its path ("metadata", "messages.0.cache_control"), its name and the
    fields of the model that has no such field (for :func:`close_field`). Lazily: a body may hold millions."""
    fields = type(request).model_fields
    for name, value in data.items():
        if name not in fields:
            yield f"{where}{name}", name, fields
        elif isinstance(value, dict):
            held = getattr(request, name)
            if isinstance(held, BaseModel):
                yield from unknown_fields(held, value, f"{where}{name}.")
        elif isinstance(value, list):
            for k, (model, raw) in enumerate(zip(getattr(request, name), value)):
                if isinstance(model, BaseModel) and isinstance(raw, dict):
                    yield from unknown_fields(model, raw, f"{where}{name}.{k}.")


# how close (difflib's ratio, after lower-casing) an unknown field's name must be to one of ours to be refused as a
# misspelling of it: 0.8, not the 0.6 of the CLI's "did you mean", since a false match breaks a client that worked
# (OpenAI's "store" is 0.73 of "stream"); no field of OpenAI's API or of vLLM's extensions comes this close to ours
_MISSPELLED = 0.8


# fields of other servers' APIs one edit away from one of ours: theirs, not misspellings (OpenRouter's)
_OTHER_SERVERS_FIELDS = frozenset({"top_a", "models"})


def close_field(name: str, fields: Mapping[str, Any]) -> str | None:
    """The field of ``fields`` that ``name`` (none of them) misspells: the closest, case aside, or None. A name
    that is one of ours with a ``_...`` suffix (``temperature_last``, ``repetition_penalty_range``: fields of other
    servers' APIs) or one of :data:`_OTHER_SERVERS_FIELDS` is no misspelling."""
    lowered = name.lower()
    if len(name) > 64 or lowered in _OTHER_SERVERS_FIELDS or any(lowered.startswith(f"{f}_") for f in fields):
        return None  # (over 64: 1.5x a field's name, 21 at most, is below 0.8; difflib's time grows with it)
    close = difflib.get_close_matches(lowered, fields, n=1, cutoff=_MISSPELLED)
    return close[0] if close else None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int, grounding: list[dict[str, Any]] | None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if grounding:
        message["grounding"] = grounding
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, model: str, delta: dict[str, Any] | None, finish_reason: str | None = None,
               usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta`` None gives the usage-only chunk (no choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                            "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def completion(rid: str, model: str, text: str | None, finish_reason: str | None = None,
               usage_: dict[str, int] | None = None, grounding: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A ``text_completion``: the whole answer, or one streamed piece of it (``finish_reason`` None until the
    end); ``text`` None gives the usage-only piece (no choices)."""
    choices = []
    if text is not None:
        choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        if grounding:
            choice["grounding"] = grounding
        choices.append(choice)
    body: dict[str, Any] = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                            "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """What every refused request gets (see :func:`error_body`); described in /openapi.json."""

    error: ErrorDetail


def error_body(message: str, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def grounding_field(text: str, image_size: tuple[int, int] | None = None,
                    image_index: int | None = None) -> list[dict[str, Any]] | None:
    """The ``grounding`` extension: every ``<ref>..</ref><box>..</box>`` of an answer, parsed.

    Each entry is ``{"ref": str | None, "box_normalized": [x1, y1, x2, y2]}`` (the model's [0, 1000) grid, as
    written), plus, when the request had images, ``"box"``: the same box in pixels of the request's last
    image (``image_size`` = (width, height): the picture a grounding answer refers to; ``x / 999 * width``
    as the official grounding eval) and ``"image"``: that image's 1-based position among the request's
    images (``image_index``). None when the answer holds no box.
    """
    entries = []
    for obj in parse_grounding(text):
        for b in obj.boxes:
            entry: dict[str, Any] = {"ref": obj.ref, "box_normalized": [b.x1, b.y1, b.x2, b.y2]}
            if image_size is not None:
                entry["box"] = [round(v, 2) for v in denormalize_box(b, *image_size)]
                entry["image"] = image_index
            entries.append(entry)
    return entries or None
