"""Continuous batching: a fixed number of decode slots over one preallocated :class:`SlotKVCache`.

One thread owns the model. Requests wait in a bounded queue; between two decode steps every free slot takes
the next waiting request and runs its prefill (batch 1, through the same ``KVCache`` code path as
``model.generate``), then all occupied slots decode together, each at its own position with the RoPE factor
its prefill chose and its own LogN scale, so a sequence's greedy tokens do not depend on what else is in the
batch. A finished or cancelled sequence frees its slot at once.

The decode step (:func:`decode_slots`) has static shapes apart from two sizes the engine picks on the host:
the number of slots up to the highest occupied one, and the attention window (the longest sequence rounded
up to ``window_bucket`` positions). Tokens, positions and the occupied-slot mask live on the device; a
compiled step reads back only the new tokens (eager, the model's check for an all-ones mask reads one more
value). Prefill runs whole, between steps: a long prompt delays the others' next token by its prefill time.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..generation import SamplingParams, TextStream, pick, process_logits, sampling_generator
from ..model.kv_cache import SlotKVCache
from ..quantize import InductorOptions, compile_options

if TYPE_CHECKING:
    from ..model import QwenVL
    from .metrics import ServeMetrics

__all__ = ["Delta", "Engine", "EngineConfig", "Failed", "Finished", "QueueFull", "Request", "ShuttingDown",
           "auto_batch_size", "decode_slots", "kv_cache_budget", "slot_bytes"]

logger = logging.getLogger(__name__)


MAX_AUTO_SLOTS = 32  # the most decode slots chosen automatically (a larger --max_batch_size is taken as asked)


def slot_bytes(model: QwenVL, max_model_len: int) -> int:
    """Bytes of one decode slot's KV cache: keys and values of every layer for ``max_model_len`` positions."""
    lm = model.config.lm
    return 2 * lm.num_hidden_layers * lm.num_attention_heads * lm.kv_channels * max_model_len * model.dtype.itemsize


def _available_ram() -> int:
    """Bytes of RAM the kernel says are available now (MemAvailable), or the total where that is not readable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_cache_budget(device: torch.device) -> int:
    """Bytes the KV cache may take when the operator does not say (``--kv_cache_memory``), measured after
    the model is loaded: on a GPU half its free memory (the rest stays for activations and the allocator),
    on the CPU a quarter of the available RAM, at most 4 GiB (vLLM's default CPU KV-cache space)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return min(4 << 30, _available_ram() // 4)


def auto_batch_size(model: QwenVL, max_model_len: int, budget: int | None = None) -> int:
    """Decode slots for ``qwenvl serve``'s default: as many as ``budget`` bytes of KV cache hold (default
    :func:`kv_cache_budget`), between 1 and :data:`MAX_AUTO_SLOTS`.

    Why more than a few: a decode step reads every weight once whatever the batch, so on a memory-bound
    device each extra sequence costs little (``benchmarks/serve.py``: 64 clients on the mid model got 2.6-2.8x
    one client's tokens/s with 8 slots and 4.5-4.6x with 32, on 2 AVX2 cores)."""
    budget = kv_cache_budget(model.device) if budget is None else budget
    return max(1, min(MAX_AUTO_SLOTS, budget // slot_bytes(model, max_model_len)))


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is full (the server answers 429)."""


class ShuttingDown(RuntimeError):
    """The engine is stopping: nobody would run a request queued now (the server answers 503)."""


@dataclass
class EngineConfig:
    max_batch_size: int = 8  # decode slots
    max_model_len: int = 2048  # positions per slot: prompt + answer
    max_queue: int = 64  # requests that may wait for a slot; one more is refused with QueueFull
    window_bucket: int = 128  # attention reads a multiple of this many positions per step
    compile: bool = False  # decode with torch.compile (windows and batch sizes are dynamic shapes)

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_model_len", "window_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 (a prompt token and an answer token), got {self.max_model_len}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")


@dataclass
class Delta:
    """New answer text (never half a UTF-8 character, never part of a stop string)."""

    text: str


@dataclass
class Finished:
    """The answer is complete: ``reason`` is "stop" (stop token or string), "length" or "cancelled"."""

    reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str
    status: int = 500  # the HTTP status the server answers with (503: the server is shutting down, retry elsewhere)


Event = Delta | Finished | Failed


@dataclass
class Request:
    """One prompt to continue. ``on_event`` is called from the engine thread with each :data:`Event`."""

    input_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    images: torch.Tensor | None = None  # (N, 3, S, S) pixels of the prompt's <img> spans, in order
    stop: Sequence[str] = ()  # stop strings: the answer ends before the first one
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop generating (the client left): the engine frees the slot before its next step."""
        self.cancelled = True


def decode_slots(
    model: QwenVL, cache: SlotKVCache, tokens: torch.Tensor, positions: torch.Tensor, key_positions: torch.Tensor
) -> torch.Tensor:
    """One decode step of slots ``[0, n)``: ``tokens`` (n,) at ``positions`` (n,) -> (n, V) float32 logits.

    Attention reads the first ``len(key_positions)`` positions of every slot, masked to each slot's own
    length. All sizes come from tensor shapes, so ``torch.compile(dynamic=True)`` keeps one graph.
    """
    mask = key_positions[None, :] <= positions[:, None]  # (n, W): a slot sees its keys up to its own position
    step_cache = cache.decode(positions, key_positions.shape[0])
    out = model(tokens[:, None], attention_mask=mask, position_ids=positions[:, None], past_key_values=step_cache)
    return out.logits[:, -1].float()


def _compiled_decode_slots(backend: str | Callable = "inductor", options: InductorOptions | None = None
                           ) -> Callable[..., torch.Tensor]:
    """:func:`decode_slots` under ``torch.compile``, with the attention window marked dynamic on every call:
    otherwise a window equal to a size of the model (128 positions = Qwen's head size) is compiled as that
    constant, and the first longer window compiles again while every stream waits. ``options``: inductor's
    (:func:`qwenvl.quantize.compile_options`)."""
    options = options if backend == "inductor" else None
    compiled = torch.compile(decode_slots, backend=backend, dynamic=True, fullgraph=True, options=options)

    def step(model: QwenVL, cache: SlotKVCache, tokens: torch.Tensor, positions: torch.Tensor,
             key_positions: torch.Tensor) -> torch.Tensor:  # fmt: skip
        torch._dynamo.mark_dynamic(key_positions, 0)
        return compiled(model, cache, tokens, positions, key_positions)

    return step


class _AnswerText:
    """Text deltas of one answer: UTF-8 safe (:class:`TextStream`), cut before the first stop string, holding
    back any tail that may still become one."""

    def __init__(self, decode: Callable[[list[int]], str], stop_ids: Sequence[int], stop: Sequence[str]) -> None:
        self.stream = TextStream(decode, skip_ids=stop_ids)
        self.stop = [s for s in stop if s]
        self.text = ""
        self.sent = 0

    def push(self, token: int) -> tuple[str, bool]:
        """The text to send after ``token``, and whether a stop string ended the answer."""
        self.text += self.stream.push(token)
        return self._emit(final=False)

    def flush(self) -> tuple[str, bool]:
        """The rest of the text (up to a stop string), and whether a stop string ended it."""
        self.text += self.stream.flush()
        return self._emit(final=True)

    def _emit(self, final: bool) -> tuple[str, bool]:
        # No stop string starts before self.sent: a tail that could begin one is never sent (see _held).
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            final = True
        end = len(self.text) if final else len(self.text) - self._held()
        delta = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta, bool(hits)

    def _held(self) -> int:
        """Length of the longest tail of the text that is the beginning of a stop string."""
        for n in range(min(len(self.text) - self.sent, max((len(s) for s in self.stop), default=0)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0


@dataclass
class _Slot:
    request: Request
    length: int  # positions filled: the next token is written here
    max_new: int
    text: _AnswerText
    generator: torch.Generator | None
    history: torch.Tensor | None = None  # (1, T) prompt and answer so far, for a repetition penalty
    generated: int = 0
    last_time: float = 0.0


class Engine:
    """Continuous-batching generation over ``config.max_batch_size`` slots; see the module docstring.

    ``decode`` turns token ids into text (``processor.decode``). :meth:`start` runs the engine thread,
    :meth:`submit` queues a request (raising :class:`QueueFull`), :meth:`stop` ends the thread.
    """

    def __init__(
        self,
        model: QwenVL,
        decode: Callable[[list[int]], str],
        config: EngineConfig | None = None,
        metrics: ServeMetrics | None = None,
    ) -> None:
        self.model = model
        self.decode = decode
        self.config = config = config or EngineConfig()
        limit = model.config.lm.max_position_embeddings
        if config.max_model_len > limit:
            raise ValueError(f"max_model_len {config.max_model_len} is more than the model's {limit} positions")
        self.metrics = metrics
        lm = model.config.lm
        dev = model.device
        self.cache = SlotKVCache(lm.num_hidden_layers, config.max_batch_size, lm.num_attention_heads,
                                 lm.kv_channels, config.max_model_len, model.dtype, dev)
        n = config.max_batch_size
        self.tokens = torch.zeros(n, dtype=torch.long, device=dev)  # each slot's latest token
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)  # where each slot writes next
        self.occupied = torch.zeros(n, dtype=torch.long, device=dev)  # 1 for a slot that holds a sequence
        self.key_positions = torch.arange(config.max_model_len, device=dev)
        self.slots: list[_Slot | None] = [None] * n
        self.step_fn: Callable[..., torch.Tensor] = decode_slots
        if config.compile:
            self.step_fn = _compiled_decode_slots(options=compile_options(model))
        self._waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._running = False
        self._stopping = False  # set by stop(): submit refuses from then on
        self._thread: threading.Thread | None = None

    # ---- public ------------------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        """Requests waiting for a slot (not those whose client left meanwhile)."""
        with self._lock:
            return sum(not r.cancelled for r in self._waiting)

    @property
    def active(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def running(self) -> bool:
        """Whether the engine thread is alive (``/health``)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            return
        self.warm_up()
        self._stopping = False
        self._running = True
        self._thread = threading.Thread(target=self._run, name="qwenvl-engine", daemon=True)
        self._thread.start()

    @torch.no_grad()
    def warm_up(self) -> None:
        """With ``compile``: compile the decode step now, once for each number of slots that takes another path
        through the model's layers (:data:`qwenvl.quantize.PATH_ROWS`), so that no request waits for a
        compilation later (each takes seconds to minutes; without this, the first batch of 2 and of 13 slots
        stalled every stream for ~15 s). Writes only position 0 of empty slots, which a prefill overwrites."""
        if not self.config.compile or any(s is not None for s in self.slots):
            return
        from ..quantize import PATH_ROWS

        sizes = sorted({min(n, self.config.max_batch_size) for n in PATH_ROWS})
        window = min(self.config.max_model_len, self.config.window_bucket)
        logger.info("compiling the decode step for %s slots before serving (once; seconds to minutes each)",
                    ", ".join(map(str, sizes)))
        start = time.perf_counter()
        for n in sizes:
            positions = torch.zeros_like(self.positions[:n])
            self.step_fn(self.model, self.cache, self.tokens[:n], positions, self.key_positions[:window])
        logger.info("compiled the decode step in %.1f s", time.perf_counter() - start)

    def stop(self, timeout: float = 30.0) -> None:
        """End the engine thread after its current step; requests in flight or waiting get Failed."""
        with self._lock:  # a request queued after this would wait for ever
            self._stopping = True
        self._running = False
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, request: Request) -> None:
        """Queue ``request``. Raises ValueError when it cannot fit a slot, QueueFull when too many wait,
        ShuttingDown after :meth:`stop`."""
        n = len(request.input_ids)
        if n == 0:
            raise ValueError("empty prompt: there is nothing to condition on")
        if n >= self.config.max_model_len:
            raise ValueError(f"the prompt has {n} tokens; this server's context is {self.config.max_model_len} "
                             "tokens for prompt and answer together")
        request.params.validate()
        seed = request.params.seed
        if isinstance(seed, Sequence) and len(seed) != 1:  # generate's one seed per sequence: a request is one
            raise ValueError(f"seed has {len(seed)} values for the one sequence of a request: give one seed")
        with self._lock:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.config.max_queue + self._free_slots():
                self._drop_cancelled_waiting()  # a client that left gives its place back
            if len(self._waiting) >= self.config.max_queue + self._free_slots():
                raise QueueFull(f"{len(self._waiting)} requests are waiting for a slot; try again later")
            self._waiting.append(request)
        self._wake.set()

    # ---- the engine thread ------------------------------------------------------------------------------
    def _free_slots(self) -> int:
        return sum(s is None for s in self.slots)

    def _drop_cancelled_waiting(self) -> None:
        """Forget waiting requests whose client left (the caller holds the lock)."""
        kept = collections.deque(r for r in self._waiting if not r.cancelled)
        for _ in range(len(self._waiting) - len(kept)):
            self._count_finish("cancelled")
        self._waiting = kept

    def _run(self) -> None:
        with torch.no_grad():
            while self._running:
                self._drop_cancelled()
                self._admit()
                if self.active == 0:
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                try:
                    self._step()
                except Exception as e:  # keep serving: fail the sequences of this batch, not the server
                    logger.exception("decode step failed")
                    for i, s in enumerate(self.slots):
                        if s is not None:
                            self._free(i, Failed(f"generation failed: {e}"))
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for r in waiting:
            self._count_finish("cancelled" if r.cancelled else "error")
            r.on_event(Failed("the server is shutting down", 503))
        for i, s in enumerate(self.slots):
            if s is not None:
                self._free(i, Failed("the server is shutting down", 503))

    def _drop_cancelled(self) -> None:
        for i, s in enumerate(self.slots):
            if s is not None and s.request.cancelled:
                self._free(i, self._finished(s, "cancelled"))

    def _admit(self) -> None:
        for i in range(len(self.slots)):
            if self.slots[i] is not None:
                continue
            with self._lock:
                request = self._waiting.popleft() if self._waiting else None
            while request is not None and request.cancelled:
                self._count_finish("cancelled")
                with self._lock:
                    request = self._waiting.popleft() if self._waiting else None
            if request is None:
                return
            try:
                self._prefill(i, request)
            except Exception as e:
                logger.exception("prefill failed")
                if self.slots[i] is not None:
                    self._free(i, Failed(f"generation failed: {e}"))
                else:
                    self._count_finish("error")
                    request.on_event(Failed(f"generation failed: {e}"))

    def _prefill(self, i: int, request: Request) -> None:
        p = request.params
        n = len(request.input_ids)
        generator = None
        if p.do_sample:
            seed = p.seed[0] if isinstance(p.seed, Sequence) else p.seed  # one value (submit checked)
            generator = sampling_generator(seed, self.model.device)
        ids = torch.tensor([request.input_ids], device=self.model.device)
        slot = _Slot(request, n, min(int(p.max_new_tokens), self.config.max_model_len - n),
                     _AnswerText(self.decode, p.stop_token_ids, request.stop), generator,
                     ids if p.repetition_penalty != 1.0 else None)
        self.slots[i] = slot
        kv = self.cache.slot(i)
        logits = self.model(ids, images=request.images, past_key_values=kv, logits_to_keep=1).logits[:, -1]
        self.cache.keep_rope(i, kv)
        token = self._pick(logits.float(), [slot])
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(n)
            self.metrics.time_to_first_token.observe(time.monotonic() - request.submitted)
        if self._accept(i, int(token[0]), token):
            self.tokens[i] = token[0]
            self.positions[i] = n
            self.occupied[i] = 1

    def _step(self) -> None:
        n = max(i for i, s in enumerate(self.slots) if s is not None) + 1
        longest = max(s.length for s in self.slots if s is not None)
        bucket = self.config.window_bucket
        window = min(self.config.max_model_len, -(-(longest + 1) // bucket) * bucket)
        logits = self.step_fn(self.model, self.cache, self.tokens[:n], self.positions[:n], self.key_positions[:window])
        new = self._pick(logits, self.slots[:n])
        self.tokens[:n] = new
        self.positions[:n] += self.occupied[:n]
        if self.metrics is not None:
            self.metrics.batch_size.observe(self.active)
        for i, token in enumerate(new.tolist()):  # the step's one read from the device
            slot = self.slots[i]
            if slot is not None:
                slot.length += 1
                self._accept(i, token, new[i : i + 1])

    def _pick(self, logits: torch.Tensor, rows: Sequence[_Slot | None]) -> torch.Tensor:
        """Next token per row: argmax, or sampled with the row's own parameters and generator; a row's
        repetition penalty (over its own prompt and answer) and min_new_tokens apply as in ``model.generate``."""
        new = logits.argmax(-1)
        for i, s in enumerate(rows):
            if s is None:
                continue
            p = s.request.params
            if p.do_sample or s.history is not None or s.generated < p.min_new_tokens:
                new[i] = pick(process_logits(logits[i : i + 1], s.history, s.generated, p), p, s.generator)[0]
        return new

    def _accept(self, i: int, token: int, on_device: torch.Tensor) -> bool:
        """Record slot ``i``'s new token, given as an int and as the (1,) tensor it was read from; False when
        that ended its sequence (the slot is then free). A repetition penalty's history grows by the tensor:
        one made from the int would be a host-to-device copy per token, which on a GPU waits for the stream."""
        slot = self.slots[i]
        assert slot is not None
        slot.generated += 1
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.generation_tokens.inc()
            if slot.generated > 1:
                self.metrics.inter_token_latency.observe(now - slot.last_time)
        slot.last_time = now
        if slot.history is not None:
            slot.history = torch.cat([slot.history, on_device[None]], dim=1)
        p = slot.request.params
        if token in p.stop_token_ids:
            self._send_tail(slot)
            self._free(i, self._finished(slot, "stop"))
            return False
        delta, stopped = slot.text.push(token)
        if delta:
            slot.request.on_event(Delta(delta))
        if stopped:
            self._free(i, self._finished(slot, "stop"))
            return False
        if slot.generated >= slot.max_new:  # max_new keeps the last written position inside the slot
            # the held-back tail (half a character) may still complete a stop string: then that ended it
            self._free(i, self._finished(slot, "stop" if self._send_tail(slot) else "length"))
            return False
        return True

    def _send_tail(self, slot: _Slot) -> bool:
        """Send what was held back; whether a stop string turned up in it."""
        tail, stopped = slot.text.flush()
        if tail:
            slot.request.on_event(Delta(tail))
        return stopped

    def _finished(self, slot: _Slot, reason: str) -> Finished:
        return Finished(reason, slot.text.text, len(slot.request.input_ids), slot.generated)

    def _free(self, i: int, event: Event) -> None:
        slot = self.slots[i]
        self.slots[i] = None
        self.occupied[i] = 0
        self.positions[i] = 0
        if slot is None:
            return
        self._count_finish(event.reason if isinstance(event, Finished) else "error")
        if self.metrics is not None:
            self.metrics.request_latency.observe(time.monotonic() - slot.request.submitted)
        slot.request.on_event(event)

    def _count_finish(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.finished.inc(reason=reason)
