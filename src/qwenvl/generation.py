"""Text generation: greedy and sampled decoding over a preallocated KV cache, batched and streamed.

Batches are left-padded; every sequence gets positions, dynamic-NTK factor and LogN scale from its own
unpadded length, so a batch yields the same greedy tokens as each prompt alone.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypedDict

import torch

from .config import ENDOFTEXT_ID, IM_END_ID, IM_START_ID, IMG_START_ID, QwenVLConfig
from .model.qwenvl import describe_value
from .quantize import InductorOptions, compile_options
from .tokenizer import image_spans

if TYPE_CHECKING:
    from .model import QwenVL

logger = logging.getLogger(__name__)

STOP_IDS = {"raw": (ENDOFTEXT_ID,), "chatml": (IM_END_ID, IM_START_ID, ENDOFTEXT_ID)}


@dataclass
class SamplingParams:
    """How to pick each next token. Defaults are greedy; ``from_defaults`` fills them from a checkpoint."""

    max_new_tokens: int = 512
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    # each sequence samples from its own generator seeded with this (so its tokens depend on its prompt and seed,
    # not on the batch around it, as each request in vLLM); a list gives one seed per sequence of the batch;
    # None: one generator for the batch, seeded from torch's random state
    seed: int | Sequence[int] | None = None
    stop_token_ids: Sequence[int] = field(default_factory=lambda: STOP_IDS["chatml"])
    pad_token_id: int = ENDOFTEXT_ID

    def validate(self) -> None:
        if not isinstance(self.do_sample, bool):  # "no" or "false" (a string from a config) would sample
            raise ValueError(f"do_sample must be True or False, got {self.do_sample!r}")
        for name in ("max_new_tokens", "min_new_tokens", "top_k"):
            _require_int(name, getattr(self, name))
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        # 0 means greedy where decoding is greedy anyway (OpenAI's and vLLM's convention; transformers ignores it)
        if self.temperature < 0 or (self.temperature == 0 and self.do_sample):
            raise ValueError(f"temperature must be > 0, got {self.temperature} (use do_sample=False for greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for seed in [self.seed] if isinstance(self.seed, (str, bytes)) else _row_seeds(self.seed):  # "7": a mistake
            if not -(2**63) <= _require_int("seed", seed) < 2**64:
                raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
        if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(self.stop_token_ids, Sequence):
            raise ValueError(f"stop_token_ids must be a sequence of token ids, got {self.stop_token_ids!r}")
        for t in self.stop_token_ids:
            if _require_int("stop token id", t) < 0:
                raise ValueError(f"stop token id must be >= 0, got {t}")
        _require_int("pad_token_id", self.pad_token_id)


def _row_seeds(seed: int | Sequence[int] | None) -> list[int]:
    """``SamplingParams.seed`` as a list: none, the one seed, or the seeds given one per sequence."""
    if seed is None:
        return []
    return list(seed) if isinstance(seed, Sequence) else [seed]


def sampling_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for sampling, seeded with ``seed``, or when it is None from torch's random state (so that
    ``torch.manual_seed`` before an unseeded run repeats it)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return generator


def _require_int(name: str, value: object) -> int:
    """``value`` if it is an int (a bool or a float is a mistake: 2.7 tokens, a flag in the wrong place)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


@functools.lru_cache(maxsize=64)
def _index_on(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``ids`` as an index tensor on ``device``, made once: indexing with the Python list copied it from the host
    on every step, which on a GPU waits for the stream."""
    return torch.tensor(ids, dtype=torch.long, device=device)


def process_logits(
    logits: torch.Tensor, tokens: torch.Tensor | None, step: int, p: SamplingParams
) -> torch.Tensor:
    """Apply min_new_tokens, repetition penalty, temperature, top-k and top-p to float32 logits (B, V)."""
    logits = logits.float()
    if step < p.min_new_tokens:
        logits.index_fill_(1, _index_on(tuple(p.stop_token_ids), logits.device), float("-inf"))
    if p.repetition_penalty != 1.0 and tokens is not None:
        seen = logits.gather(1, tokens)
        # in float32 a penalty below ~1e-45 is 0 and one above ~3e38 inf (NaN): the nearest float32 acts the same
        penalty = min(max(p.repetition_penalty, torch.finfo(seen.dtype).tiny), torch.finfo(seen.dtype).max)
        seen = torch.where(seen < 0, seen * penalty, seen / penalty)
        seen = seen.clamp(max=torch.finfo(seen.dtype).max)  # a tiny penalty overflows a logit to inf (NaN below)
        logits = logits.scatter(1, tokens, seen)
    if not p.do_sample:
        return logits
    # the largest logit shifted to 0 first: a tiny temperature then sends the others to -inf, where dividing
    # the logits themselves overflowed the largest to inf (NaN probabilities, multinomial fails)
    logits = (logits - logits.amax(-1, keepdim=True)) / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        # summed in float64 (where the device has it): the float32 softmax of 150k flat probabilities (a random
        # model's) is off by ~1e-4, which kept 2-4 tokens at a tiny top_p where only the most likely one is nucleus
        wide = torch.float32 if logits.device.type == "mps" else torch.float64
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.to(wide).softmax(-1).cumsum(-1)
        drop = cum <= (1 - p.top_p)
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def pick(logits: torch.Tensor, p: SamplingParams,
         generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """The next token of each row of ``logits`` (B, V): the largest, or sampled from ``generator`` (one draw for
    the batch) or a sequence of B generators (row i from the i-th: what it draws does not depend on the others)."""
    if not p.do_sample:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generator, strict=True)])


def decode_step(model: QwenVL, token: torch.Tensor, attention_mask: torch.Tensor, cache) -> torch.Tensor:  # noqa: ANN001
    """One decode step for the whole batch: (B, 1) token -> (B, V) float32 logits. Small enough for
    torch.compile (the cast to float32 then happens inside the graph: for bf16 logits ~0.1-0.2 ms per token
    less than casting them afterwards)."""
    return model(token, attention_mask=attention_mask, past_key_values=cache).logits[:, -1].float()


_compiled_steps: dict[tuple, Callable] = {}


def compiled_decode_step(device_type: str = "cpu", options: InductorOptions | None = None) -> Callable:
    """``decode_step`` under ``torch.compile`` (sequence length and batch size are dynamic), built once per device
    type and inductor ``options`` (:func:`qwenvl.quantize.compile_options` gives a model's). On the CPU, products
    of one row (and on AMD CPUs of up to 8 fp32 rows) are reductions inside the graph (see ``qwenvl.quantize``).
    The first call compiles, which takes long enough to look like a hang: it is logged when it starts and ends."""
    key = (device_type, tuple(sorted((options or {}).items())))
    if key not in _compiled_steps:
        require_compiler_for(device_type)
        compiled = torch.compile(decode_step, dynamic=True, fullgraph=True, options=options)
        _compiled_steps[key] = _log_first_call(compiled, f"the decode step ({device_type})")
    return _compiled_steps[key]


def require_compiler_for(device_type: str) -> None:
    """Raise FileNotFoundError (one line) when ``torch.compile`` cannot work on ``device_type`` for want of a
    compiler: without one, ``--compile`` failed with a traceback at the first token, after the weights had loaded.
    On a CPU inductor writes C++ and runs ``$CXX`` or else ``g++`` (``clang++`` on macOS); on a CUDA or XPU GPU it
    writes Triton kernels, and Triton builds its kernel launcher with a C compiler the first time it runs
    (``$CC``, else ``gcc``, else ``clang``). That command must be found. Nothing is checked for other devices."""
    if device_type == "cpu":
        cxx = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
        if shutil.which(cxx) is None:
            raise FileNotFoundError(f"--compile (compile=True) needs a C++ compiler on a CPU, and none works here "
                                    f"({cxx!r} is not found): install one (g++) or name it in CXX, or run without "
                                    "--compile")
    elif device_type in ("cuda", "xpu"):
        cc = os.environ.get("CC")
        if (shutil.which(cc) if cc else shutil.which("gcc") or shutil.which("clang")) is None:
            missing = f"{cc!r} is not found" if cc else "neither gcc nor clang is found"
            raise FileNotFoundError(f"--compile (compile=True) needs a C compiler on a GPU (Triton builds its kernel "
                                    f"launcher with it), and none works here ({missing}): install one (gcc) or name "
                                    "it in CC, or run without --compile")


def _log_first_call(fn: Callable, what: str) -> Callable:
    """``fn``, logging when its first call (the compilation) starts and how long it took."""
    done = False

    def call(*args: object) -> object:
        nonlocal done
        if done:
            return fn(*args)
        logger.info("compiling %s with torch.compile, once per process: usually 20 s to a few minutes (longer for "
                    "larger models and the first time on a machine); the first token waits for it", what)
        start = time.perf_counter()
        out = fn(*args)
        done = True
        logger.info("compiled %s in %.1f s", what, time.perf_counter() - start)
        return out

    return call


def check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, images: torch.Tensor | None,
                 vocab_size: int) -> None:
    """Raise ``ValueError`` naming what is wrong with generation inputs that the model would take silently (right
    padding, ids out of range, NaN or infinite pixels) or fail on deep inside (wrong shapes or dtypes)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype.is_floating_point:
        raise ValueError(f"input_ids must be an integer tensor (batch, tokens), got {describe_value(input_ids)}")
    b, t = input_ids.shape
    if b == 0:
        raise ValueError("empty batch: input_ids has no rows")
    if t == 0:
        raise ValueError("empty prompt: input_ids has no tokens")
    bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)]
    if bad.numel():
        raise ValueError(f"token id {int(bad[0])} in input_ids is out of range: the model has ids 0..{vocab_size - 1}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (b, t):
            raise ValueError(f"attention_mask must be a tensor of input_ids' shape {(b, t)}, got {describe_value(attention_mask)}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (tokens)")
        if not bool(attention_mask[:, -1].bool().all() & (attention_mask[:, 1:] >= attention_mask[:, :-1]).all()):
            raise ValueError("attention_mask must pad on the left (0s then 1s, at least one 1 per row): generation "
                             "continues every row after its last column")
    if images is not None and (not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3
                               or not images.dtype.is_floating_point):
        raise ValueError(f"images must be float pixels (images, 3, height, width) as the processor makes them, got "
                         f"{describe_value(images)}")
    if images is not None and images.numel():  # NaN/inf pixels give a garbage answer, silently
        bad = (~torch.isfinite(images).flatten(1).all(1)).nonzero()
        if bad.numel():
            more = f" (so do {bad.numel() - 1} other image(s))" if bad.numel() > 1 else ""
            raise ValueError(f"images[{int(bad[0])}] holds NaN or infinite pixel values{more}: pass finite pixels, "
                             "as the processor makes them")


def stream_tokens(
    model: QwenVL,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    params: SamplingParams | None = None,
    max_context: int | None = None,
    step_fn: Callable | None = None,
    compile: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence, (B,) per step; finished sequences (on a stop token, or at
    ``max_new_tokens`` or the context, whichever is first for that sequence) yield ``pad_token_id``.

    ``compile=True`` runs the decode steps through ``torch.compile`` (worth it for long generations on a GPU).
    """
    p = params or SamplingParams()
    p.validate()
    check_inputs(input_ids, attention_mask, images, model.config.lm.vocab_size)
    if max(p.stop_token_ids, default=0) >= model.config.lm.vocab_size:
        raise ValueError(f"stop token id {max(p.stop_token_ids)} is out of range: the model has "
                         f"{model.config.lm.vocab_size} ids")
    if not 0 <= p.pad_token_id < model.config.lm.vocab_size:  # fed to the model once a row finishes (IndexError)
        raise ValueError(f"pad_token_id {p.pad_token_id} is out of range: the model has ids 0.."
                         f"{model.config.lm.vocab_size - 1}")
    device = model.device
    input_ids = input_ids.to(device)
    b, t = input_ids.shape
    if max_context is not None and (_require_int("max_context", max_context) <= 0):
        raise ValueError(f"max_context must be > 0, got {max_context}")
    limit = max_context or model.config.lm.max_position_embeddings
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    lengths = attention_mask.sum(-1)
    longest = int(lengths.max())
    if longest >= limit:
        raise ValueError(f"prompt of {longest} tokens does not fit the context of {limit} tokens")
    # each row's own budget, as it would have alone: a short prompt batched with a long one is not cut short.
    # Bounded in Python first: a max_new_tokens or max_context past int64 (10**30) overflowed the tensor arithmetic
    new_tokens = min(int(p.max_new_tokens), limit)
    budget = (min(limit, longest + new_tokens) - lengths).clamp(max=new_tokens)
    max_new = int(budget.max())
    if limit - longest < p.max_new_tokens:
        logger.warning("max_new_tokens lowered from %d to %d to fit the context of %d", p.max_new_tokens,
                       limit - longest, limit)
    seeds = _row_seeds(p.seed)  # one per sequence
    if not isinstance(p.seed, Sequence):
        seeds *= b
    elif len(seeds) != b:
        raise ValueError(f"seed has {len(seeds)} values for {b} sequences: give one seed for all, or one per sequence")
    generator: torch.Generator | list[torch.Generator] | None = None
    if p.do_sample:  # seeded: a generator per sequence, whose tokens are then the same whatever it is batched with
        generator = [sampling_generator(s, device) for s in seeds] if seeds else sampling_generator(None, device)

    cache = model.new_cache(b, t + max_new)
    logits = model(input_ids, attention_mask=attention_mask, images=images, past_key_values=cache,
                   logits_to_keep=1).logits[:, -1]
    step_fn = step_fn or (compiled_decode_step(device.type, compile_options(model)) if compile else decode_step)
    stop = torch.tensor(list(p.stop_token_ids), device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    # the tokens seen so far, for the repetition penalty: a row's padding (left) repeats its last prompt token,
    # which the penalty counts once anyway, so a padded row is penalized exactly as the prompt alone
    history = torch.where(attention_mask.bool(), input_ids, input_ids[:, -1:]) if p.repetition_penalty != 1.0 else None
    ones = torch.ones(b, 1, dtype=attention_mask.dtype, device=device)
    for step in range(max_new):
        token = pick(process_logits(logits, history, step, p), p, generator)
        token = torch.where(finished, torch.full_like(token, p.pad_token_id), token)
        yield token
        finished |= torch.isin(token, stop) | (budget <= step + 1)
        if bool(finished.all()) or step == max_new - 1:
            return
        if history is not None:
            history = torch.cat([history, token[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, ones], dim=1)
        logits = step_fn(model, token[:, None], attention_mask, cache)


@torch.no_grad()
def generate(
    model: QwenVL,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    seed: int | Sequence[int] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    chat_format: str | None = None,
    max_context: int | None = None,
    compile: bool = False,
    params: SamplingParams | None = None,
    pad_token_id: int | None = None,
    **transformers_options: object,
) -> torch.Tensor:
    """Prompt + continuation ids (B, T + new), padded with ``pad_token_id`` (default: the checkpoint's,
    ``<|endoftext|>``) after each sequence stops.

    Greedy unless ``do_sample``; sampling defaults (top_p, top_k, temperature, repetition_penalty) and the stop
    tokens come from the checkpoint's ``generation_config.json`` (``chat_format`` raw: ``<|endoftext|>``; chatml: also
    ``<|im_end|>`` and ``<|im_start|>``). The stop token is kept in the output. ``params`` (a
    :class:`SamplingParams`) replaces the individual sampling arguments, which must then stay unset.
    ``seed`` (sampling): each sequence samples from its own generator seeded with it, so a sequence's tokens depend
    only on its prompt and the seed, not on the other prompts of the batch nor its place among them (as vLLM's
    ``seed``; the same prompt twice gives the same answer twice); a list gives one seed per sequence
    (``seed=[s, s + 1, ...]`` for different samples of one prompt). Without a seed the batch draws from one
    generator seeded from torch's random state (``torch.manual_seed`` repeats a run).
    Unknown keyword arguments are errors (a misspelt option never falls back to a default silently).
    transformers' options are taken where they mean the same here (:func:`from_transformers_options`: ``max_length``,
    ``eos_token_id``, ``num_beams=1``, ...); the others are errors that say what to use instead.
    """
    hf = from_transformers_options(transformers_options, input_ids)
    if hf.get("max_new_tokens") is not None and max_new_tokens is not None:
        raise TypeError("generate() got max_new_tokens and max_length: give one (max_length counts the prompt)")
    if hf.get("stop_token_ids") is not None and stop_token_ids is not None:
        raise TypeError("generate() got stop_token_ids and eos_token_id: give one")
    if hf.get("min_new_tokens") is not None and min_new_tokens != 0:
        raise TypeError("generate() got min_new_tokens and min_length: give one (min_length counts the prompt)")
    max_new_tokens = hf.get("max_new_tokens", max_new_tokens)
    min_new_tokens = hf.get("min_new_tokens", min_new_tokens)
    stop_token_ids = hf.get("stop_token_ids", stop_token_ids)
    if params is None:
        params = sampling_params(model, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                 do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                                 repetition_penalty=repetition_penalty, seed=seed, stop_token_ids=stop_token_ids,
                                 chat_format=chat_format)
        if pad_token_id is not None:
            params.pad_token_id = pad_token_id
    else:
        given = {"max_new_tokens": max_new_tokens is not None, "min_new_tokens": min_new_tokens != 0,
                 "do_sample": do_sample, "temperature": temperature is not None, "top_p": top_p is not None,
                 "top_k": top_k is not None, "repetition_penalty": repetition_penalty is not None,
                 "seed": seed is not None, "stop_token_ids": stop_token_ids is not None,
                 "chat_format": chat_format is not None, "pad_token_id": pad_token_id is not None}
        clash = [k for k, v in given.items() if v]
        if clash:
            raise TypeError(f"generate() got params= and {', '.join(clash)}: give one or the other")
    new = list(stream_tokens(model, input_ids, attention_mask, images, params, max_context, compile=compile))
    out = torch.stack(new, dim=1) if new else input_ids.new_zeros((input_ids.shape[0], 0))
    return torch.cat([input_ids.to(out.device), out], dim=1)


class TransformersOptions(TypedDict, total=False):
    """transformers' ``generate()`` options in our terms (what :func:`from_transformers_options` returns)."""

    max_new_tokens: int
    min_new_tokens: int
    stop_token_ids: Sequence[int]


# transformers' generate() options that ask for what this generate does not do: what to use instead
_UNSUPPORTED_OPTIONS = {
    "num_beams": "beam search is not implemented: use greedy decoding (num_beams=1, the default) or do_sample=True",
    "num_return_sequences": "give the prompt several times in the batch (processor([prompt] * n)) with do_sample=True "
                            "(and no seed, or one seed per copy: seed=[s, s + 1, ...])",
    "return_dict_in_generate": "generate returns the ids only; qwenvl.generation.stream_tokens yields each step's "
                               "tokens and model(...).logits gives the scores",
    "output_scores": "generate returns the ids only; model(input_ids, ...).logits gives the scores",
    "output_logits": "generate returns the ids only; model(input_ids, ...).logits gives the logits",
    "output_attentions": "the model does not return attentions",
    "output_hidden_states": "the model does not return hidden states",
    "use_cache": "generate always decodes over a KV cache (the same tokens as without one)",
    "stop_words_ids": "give single stop tokens as stop_token_ids=[id, ...] (stop sequences of several tokens "
                      "are not supported)",
    "generation_config": "pass its settings as keywords (max_new_tokens=..., do_sample=..., top_p=...); the "
                         "checkpoint's generation_config.json already gives the defaults",
    "streamer": "use qwenvl.inference.stream_text (text pieces) or qwenvl.generation.stream_tokens (token ids)",
    "logits_processor": "qwenvl.generation.stream_tokens(..., params=SamplingParams(...)) takes the sampling options",
    "stopping_criteria": "give stop tokens as stop_token_ids=[id, ...]",
}
# the value of each of those options that asks for what this generate does anyway
_NEUTRAL_VALUES = {"num_beams": 1, "num_return_sequences": 1, "return_dict_in_generate": False, "output_scores": False,
                   "output_logits": False, "output_attentions": False, "output_hidden_states": False,
                   "use_cache": True}


def from_transformers_options(options: dict[str, object], input_ids: object) -> TransformersOptions:
    """transformers' ``generate()`` keywords in our terms: ``max_length`` and ``min_length`` (prompt + new
    tokens, the prompt being ``input_ids``' columns, padding included) as ``max_new_tokens`` and
    ``min_new_tokens``, ``eos_token_id`` (an id or a list) as ``stop_token_ids``; the options of
    :data:`_UNSUPPORTED_OPTIONS` given the value that changes nothing (``num_beams=1``, ``use_cache=True``, ...)
    or None are dropped. Any other option is a TypeError: one that asks for what is not done here says what to
    use instead, a misspelt one is never taken for a default."""
    prompt = input_ids.shape[-1] if isinstance(input_ids, torch.Tensor) else 0
    out: TransformersOptions = {}
    for name, value in options.items():
        if value is None:  # transformers' "not given"
            if name not in ("max_length", "min_length", "eos_token_id", *_UNSUPPORTED_OPTIONS):
                raise TypeError(f"generate() got an unexpected keyword argument {name!r}")
        elif name == "max_length":
            max_length = _require_int("max_length", value)
            if max_length <= prompt:
                raise ValueError(f"max_length={value} leaves no room for new tokens after the prompt's {prompt} "
                                 "(max_length counts the prompt; max_new_tokens counts only the new tokens)")
            out["max_new_tokens"] = max_length - prompt
        elif name == "min_length":
            out["min_new_tokens"] = max(_require_int("min_length", value) - prompt, 0)
        elif name == "eos_token_id":
            if isinstance(value, numbers.Integral):
                out["stop_token_ids"] = [_require_int("eos_token_id", value)]
            elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
                out["stop_token_ids"] = value  # its ids are checked with the other sampling settings
            else:
                raise ValueError(f"eos_token_id must be a token id or a list of token ids, got {value!r}")
        elif name in _UNSUPPORTED_OPTIONS:
            neutral = _NEUTRAL_VALUES.get(name)
            if value != neutral or isinstance(value, bool) != isinstance(neutral, bool):
                shown = repr(value) if len(repr(value)) <= 40 else f"<{type(value).__name__}>"
                raise TypeError(f"generate() does not take {name}={shown}: {_UNSUPPORTED_OPTIONS[name]}")
        else:
            raise TypeError(f"generate() got an unexpected keyword argument {name!r}")
    return out


def sampling_params(
    model: QwenVL | QwenVLConfig, *, max_new_tokens: int | None = None, top_p: float | None = None,
    top_k: int | None = None, stop_token_ids: Sequence[int] | None = None, chat_format: str | None = None,
    **kw: object
) -> SamplingParams:
    """SamplingParams with the checkpoint's defaults (of ``model``, or of its config before the weights load)
    for whatever is None (``temperature`` and ``repetition_penalty`` too, as transformers' generate takes them
    from ``generation_config.json``)."""
    g = (model if isinstance(model, QwenVLConfig) else model.config).generation
    fmt = chat_format or g.chat_format
    if fmt not in STOP_IDS:
        raise ValueError(f"chat_format must be one of {sorted(STOP_IDS)}, got {fmt!r}")
    if stop_token_ids is None:
        stop_token_ids = STOP_IDS[fmt]
    elif isinstance(stop_token_ids, Iterable) and not isinstance(stop_token_ids, (str, bytes)):
        stop_token_ids = tuple(stop_token_ids)  # else not ids at all: validate() says so
    for name in ("temperature", "repetition_penalty"):
        if kw.get(name) is None:
            kw[name] = getattr(g, name)
    return SamplingParams(
        max_new_tokens=g.max_new_tokens if max_new_tokens is None else max_new_tokens,
        top_p=g.top_p if top_p is None else top_p,
        top_k=g.top_k if top_k is None else top_k,
        stop_token_ids=stop_token_ids,
        pad_token_id=g.pad_token_id,
        **kw,  # type: ignore[arg-type]
    )


class TextStream:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character."""

    def __init__(self, decode: Callable[[list[int]], str], skip_ids: Sequence[int] = ()) -> None:
        self.decode = decode
        self.skip = set(skip_ids)
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        if token not in self.skip:
            self.ids.append(token)
        ids = self.ids
        if IMG_START_ID in ids:
            # an <img> span still open decodes token by token, then as a path once </img> closes it: wait for that.
            # The open one is the first <img> after the closed spans (a later <img> is inside it), as decode pairs them
            spans = image_spans(ids, strict=False)
            after = spans[-1][1] + 1 if spans else 0
            if IMG_START_ID in ids[after:]:
                ids = ids[: ids.index(IMG_START_ID, after)]
        text = self.decode(ids)
        if text.endswith("\ufffd") or len(text) < self.emitted:  # an incomplete multi-byte character: wait
            return ""  # (or text held back above that was already sent)
        delta, self.emitted = text[self.emitted :], len(text)
        return delta

    def flush(self) -> str:
        text = self.decode(self.ids)
        delta, self.emitted = text[self.emitted :], len(text)
        return delta
