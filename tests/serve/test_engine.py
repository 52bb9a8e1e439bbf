"""The continuous-batching engine without HTTP: greedy tokens equal ``model.generate`` whatever shares the
batch (also past ``seq_length``, where each slot has its own NTK factor and LogN scale), the decode step
compiles as one graph, cancelled sequences free their slot, the queue is bounded, stop strings cut text."""

from __future__ import annotations

import collections
import copy
import threading
import time

import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

from qwenvl import QwenVL
from qwenvl.config import LMConfig, QwenVLConfig, VisionConfig
from qwenvl.generation import SamplingParams
from qwenvl.processor import Processor
from qwenvl.quantize import optimize_for_inference
from qwenvl.serve.engine import (
    MAX_AUTO_SLOTS,
    Delta,
    Engine,
    EngineConfig,
    Failed,
    Finished,
    QueueFull,
    Request,
    ShuttingDown,
    _AnswerText,
    _compiled_decode_slots,
    auto_batch_size,
    decode_slots,
    kv_cache_budget,
    slot_bytes,
)
from qwenvl.serve.metrics import ServeMetrics

CAT = "tests/fixtures/qwenvl-tiny/images/cat.png"


class Collector:
    def __init__(self) -> None:
        self.events: list = []
        self.done = threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, (Finished, Failed)):
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Delta))


def run_all(engine: Engine, requests: list[Request], timeout: float = 120) -> None:
    engine.start()
    try:
        for r in requests:
            engine.submit(r)
        deadline = time.monotonic() + timeout
        for r in requests:
            assert r.on_event.done.wait(max(0.0, deadline - time.monotonic())), "engine did not finish in time"
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def short_model() -> QwenVL:
    """seq_length 32: prompts and answers cross it, so dynamic NTK and LogN differ from slot to slot."""
    cfg = QwenVLConfig(
        lm=LMConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, kv_channels=64,
                    intermediate_size=256, seq_length=32),
        visual=VisionConfig(image_size=56, patch_size=14, width=32, layers=1, heads=2, mlp_ratio=2.0, output_dim=128),
    )
    return QwenVL.from_config(cfg, seed=0).float()


def greedy(model: QwenVL, ids: list[int], images, max_new: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), images=images, max_new_tokens=max_new, stop_token_ids=())
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("step", ["eager", "compiled"])
def test_batched_slots_equal_generate_alone(short_model, step):
    """3 slots, 7 requests of 5..70 prompt tokens (one with a picture): requests join as slots free up, and
    each one's greedy tokens equal model.generate for its prompt alone. ``compiled``: the decode step goes
    through torch.compile(fullgraph=True, dynamic=True) (backend "eager": the graph capture is what is
    checked, quickly)."""
    torch.manual_seed(0)
    processor = Processor(image_size=56)
    picture = processor.pixel_values_for([Image.open(CAT)])
    image_prompt = processor.tokenizer.encode("Picture 1: <img>a</img>\nWhat is it?")
    prompts = [torch.randint(0, 5000, (n,)).tolist() for n in (5, 40, 12, 70, 31, 3)] + [image_prompt]
    lengths = [20, 9, 33, 14, 26, 40, 11]
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731 (token ids as text: easy to compare)
    engine = Engine(short_model, decode, EngineConfig(max_batch_size=3, max_model_len=320, window_bucket=16))
    if step == "compiled":
        torch._dynamo.reset()
        engine.step_fn = torch.compile(decode_slots, backend="eager", fullgraph=True, dynamic=True)
    requests = [Request(ids, SamplingParams(max_new_tokens=n, stop_token_ids=()), Collector(),
                        picture if ids is image_prompt else None)
                for ids, n in zip(prompts, lengths)]
    run_all(engine, requests)
    for r, n in zip(requests, lengths):
        want = greedy(short_model, r.input_ids, r.images, n)
        assert r.on_event.events[-1] == Finished("length", decode(want), len(r.input_ids), n)
        assert r.on_event.text == decode(want)


def test_a_compiling_engine_warms_up_each_path_before_serving(short_model):
    """``compile``: start() runs the step once for each slot count that starts another path through the layers
    (:data:`qwenvl.quantize.PATH_ROWS` up to the slots: 1, 2, 3, 5, 9, 13 and 16 here), each its own compiled
    graph, before any request; what that writes into empty slots does not change an answer."""
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    engine = Engine(short_model, decode, EngineConfig(max_batch_size=16, max_model_len=64, window_bucket=16,
                                                      compile=True))
    calls = []

    def step(model, cache, tokens, positions, key_positions):
        calls.append((len(tokens), len(key_positions)))
        return decode_slots(model, cache, tokens, positions, key_positions)

    engine.step_fn = step  # eager, counted (the real one is torch.compile(decode_slots))
    ids = torch.randint(0, 5000, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    request = Request(ids, SamplingParams(max_new_tokens=6, stop_token_ids=()), Collector())
    run_all(engine, [request])
    assert calls[:7] == [(n, 16) for n in (1, 2, 3, 5, 9, 13, 16)]
    assert request.on_event.text == decode(greedy(short_model, ids, None, 6))


def test_the_compiled_step_compiles_only_while_warming_up(short_model):
    """After warm_up, no number of slots and no attention window compiles again (a window equal to a model
    size, 64 = this model's head size here, used to be compiled as a constant)."""
    compiled = []

    def backend(gm, example_inputs):  # counts compilations, runs the captured graph as it is
        compiled.append(len(example_inputs))
        return gm.forward

    model = optimize_for_inference(copy.deepcopy(short_model).eval())  # the layers qwenvl serve runs
    engine = Engine(model, str, EngineConfig(max_batch_size=16, max_model_len=256, window_bucket=64, compile=True))
    torch._dynamo.reset()
    engine.step_fn = _compiled_decode_slots(backend)
    engine.warm_up()
    # 1 slot, then: with slices (MKL with AVX-512) 2-12 and 13-16 slots; on AMD CPUs reductions padded to 2, 4
    # and 8 rows for 2, 3-4 and 5-8 slots, then transposed products for 9-16; elsewhere one graph for 2-16
    assert len(compiled) == {"slices": 3, "transposed": 5, "plain": 2}[model.lm_head.few_rows]
    warmed = len(compiled)
    with torch.no_grad():
        for n in (1, 2, 3, 4, 5, 8, 9, 12, 13, 16):
            for window in (64, 128, 192):
                engine.step_fn(model, engine.cache, engine.tokens[:n], engine.positions[:n], engine.key_positions[:window])
    assert len(compiled) == warmed


def test_cancel_frees_the_slot_and_the_queue_is_bounded(golden_model, processor):
    engine = Engine(golden_model, processor.decode, EngineConfig(max_batch_size=1, max_queue=1, max_model_len=4096))
    ids = processor.tokenizer.encode("Hello")
    first, second, third = Collector(), Collector(), Collector()
    long = Request(ids, SamplingParams(max_new_tokens=3000, stop_token_ids=()), first)
    short = Request(ids, SamplingParams(max_new_tokens=4, stop_token_ids=()), second)
    engine.submit(long)
    engine.submit(short)  # waits: the only slot is (about to be) taken
    with pytest.raises(QueueFull):
        engine.submit(Request(ids, SamplingParams(max_new_tokens=4), third))
    with pytest.raises(ValueError, match="context is 4096 tokens"):
        engine.submit(Request([1] * 4096, SamplingParams(max_new_tokens=4), third))
    engine.start()
    try:
        deadline = time.monotonic() + 30
        while not any(isinstance(e, Delta) for e in first.events) and time.monotonic() < deadline:
            time.sleep(0.01)
        long.cancel()
        assert second.done.wait(30) and first.done.wait(30)
    finally:
        engine.stop()
    finished = first.events[-1]
    assert finished.reason == "cancelled" and finished.completion_tokens < 3000
    assert second.events[-1].reason == "length" and second.events[-1].completion_tokens == 4
    assert engine.active == 0 and engine.waiting == 0


def test_answer_text_holds_back_what_may_become_a_stop_string():
    decode = lambda ids: "".join(chr(i) for i in ids)  # noqa: E731
    text = _AnswerText(decode, stop_ids=(0,), stop=["cd", "xyz"])
    assert [text.push(ord(c)) for c in "abx"] == [("a", False), ("b", False), ("", False)]
    assert text.push(ord("c")) == ("x", False)  # "x" can no longer start "xyz"; "c" may start "cd"
    assert text.push(ord("d")) == ("", True)
    assert text.text == "abx"
    tail = _AnswerText(decode, stop_ids=(), stop=["cd"])
    assert tail.push(ord("c")) == ("", False)
    assert tail.flush() == ("c", False)  # the end of the answer releases what was held


def test_stop_token_ends_the_answer(golden_model, processor):
    """A stop token ends the answer ("stop") and is not part of the text."""
    ids = processor.tokenizer.encode("Hello")
    first = greedy(golden_model, ids, None, 6)
    collector = Collector()
    engine = Engine(golden_model, processor.decode, EngineConfig(max_batch_size=2, max_model_len=64))
    run_all(engine, [Request(ids, SamplingParams(max_new_tokens=20, stop_token_ids=(first[3],)), collector)])
    cut = first.index(first[3])
    assert collector.events[-1] == Finished("stop", processor.decode(first[:cut]), len(ids), cut + 1)


def test_int8_weights_batched_equal_generate(golden_dir, processor):
    """What ``qwenvl serve --quantize int8`` loads: still the tokens of model.generate for each prompt alone."""
    model = QwenVL.from_pretrained(golden_dir, dtype=torch.float32)
    optimize_for_inference(model, "int8")
    prompts = [processor.tokenizer.encode(t) for t in ("Hello", "A much longer question about many things", "x y")]
    engine = Engine(model, processor.decode, EngineConfig(max_batch_size=2, max_model_len=128))
    requests = [Request(ids, SamplingParams(max_new_tokens=n, stop_token_ids=()), Collector())
                for ids, n in zip(prompts, (12, 7, 9))]
    run_all(engine, requests)
    for r in requests:
        want = greedy(model, r.input_ids, None, r.params.max_new_tokens)
        assert r.on_event.events[-1].text == processor.decode(want)


def test_the_default_slot_count_fits_the_kv_cache_budget(golden_model):
    per_slot = slot_bytes(golden_model, 512)
    lm = golden_model.config.lm
    assert per_slot == 2 * lm.num_hidden_layers * lm.num_attention_heads * lm.kv_channels * 512 * 4  # fp32
    assert auto_batch_size(golden_model, 512, budget=3 * per_slot + per_slot // 2) == 3
    assert auto_batch_size(golden_model, 512, budget=1) == 1  # always one slot, however small the budget
    assert auto_batch_size(golden_model, 512, budget=1 << 50) == MAX_AUTO_SLOTS
    budget = kv_cache_budget(torch.device("cpu"))
    assert 0 < budget <= 4 << 30
    slots = auto_batch_size(golden_model, 512, 2 * per_slot)
    engine = Engine(golden_model, lambda ids: "", EngineConfig(max_batch_size=slots, max_model_len=512))
    cache_bytes = sum(t.numel() * t.element_size() for t in engine.cache.k + engine.cache.v)
    assert engine.cache.slots == 2 and cache_bytes == 2 * per_slot


def test_requests_cancelled_while_waiting_give_their_place_back(golden_model, processor):
    """A client that leaves while its request waits must not keep a place in the bounded queue (later clients
    were answered 429 until a slot freed), nor count in the queue depth."""
    engine = Engine(golden_model, processor.decode, EngineConfig(max_batch_size=1, max_queue=1, max_model_len=64))
    ids = processor.tokenizer.encode("Hello")
    requests = [Request(ids, SamplingParams(max_new_tokens=2), Collector()) for _ in range(4)]
    engine.submit(requests[0])  # takes the slot once the engine runs
    engine.submit(requests[1])  # waits
    with pytest.raises(QueueFull):
        engine.submit(requests[2])
    requests[1].cancel()  # its client left
    assert engine.waiting == 1
    engine.submit(requests[2])
    requests[0].cancel()
    requests[2].cancel()
    assert engine.waiting == 0
    engine.submit(requests[3])
    assert engine.waiting == 1


def test_a_stopped_engine_refuses_requests_and_fails_those_in_flight(golden_model, processor):
    """A request queued after stop() waited for ever (no thread runs it: its client hung until the server's
    graceful-shutdown timeout); one waiting at stop() got Failed but was never counted as finished."""
    engine = Engine(golden_model, processor.decode, EngineConfig(max_batch_size=1, max_model_len=4096),
                    ServeMetrics())
    ids = processor.tokenizer.encode("Hello")
    running, waiting = Collector(), Collector()
    engine.submit(Request(ids, SamplingParams(max_new_tokens=3000, stop_token_ids=()), running))
    engine.submit(Request(ids, SamplingParams(max_new_tokens=4), waiting))
    engine.start()
    deadline = time.monotonic() + 30
    while not running.events and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.stop()
    for c in (running, waiting):
        assert c.done.is_set() and c.events[-1] == Failed("the server is shutting down", 503), c.events[-1:]
    assert engine.metrics.finished.value(reason="error") == 2
    with pytest.raises(ShuttingDown, match="shutting down"):
        engine.submit(Request(ids, SamplingParams(max_new_tokens=2), Collector()))
    done = Collector()
    run_all(engine, [Request(ids, SamplingParams(max_new_tokens=2), done)])  # started again, it takes requests
    assert isinstance(done.events[-1], Finished)


@pytest.mark.parametrize("params", [
    dict(repetition_penalty=1.5),
    dict(min_new_tokens=6),
    dict(repetition_penalty=0.7, do_sample=True, temperature=0.8, top_k=50, seed=3),
], ids=["repetition_penalty", "min_new_tokens", "sampled_penalty"])
def test_every_sampling_parameter_is_honoured_as_generate_does(golden_model, processor, params):
    """The engine takes a whole SamplingParams: a repetition penalty (on the prompt and the answer so far, each
    slot its own, never the previous occupant's) and min_new_tokens (stop tokens banned until then, greedy or
    not) give the tokens of model.generate with the same parameters, also with another request in the batch."""
    ids = processor.tokenizer.encode("Hello")
    other = processor.tokenizer.encode("Something else entirely, and longer")
    plain = greedy(golden_model, ids, None, 12)
    stops = (plain[0], plain[2]) if "min_new_tokens" in params else ()
    p = SamplingParams(max_new_tokens=12, stop_token_ids=stops, **params)
    out = golden_model.generate(torch.tensor([ids]), params=p)[0, len(ids):].tolist()
    want = out[: next((k + 1 for k, t in enumerate(out) if t in stops), len(out))]
    if not p.do_sample:
        assert want != plain[: len(want)]  # the parameter changes the answer
    engine = Engine(golden_model, lambda t: " ".join(map(str, t)), EngineConfig(max_batch_size=2, max_model_len=64))
    # the slot's previous occupant had a penalty over other tokens, and a batch neighbour runs alongside
    before = Request(other, SamplingParams(max_new_tokens=5, stop_token_ids=(), repetition_penalty=3.0), Collector())
    run_all(engine, [before])
    requests = [Request(ids, copy.deepcopy(p), Collector()),
                Request(other, SamplingParams(max_new_tokens=12, stop_token_ids=()), Collector())]
    run_all(engine, requests)
    finished = requests[0].on_event.events[-1]
    assert finished.completion_tokens == len(want)
    assert finished.text == " ".join(map(str, [t for t in want if t not in p.stop_token_ids]))


def test_a_stop_string_released_by_the_last_token_is_a_stop(golden_model):
    """A token that ends with half a UTF-8 character holds its text back; when it is also the last token
    max_tokens allows, the flushed text may complete a stop string: the answer is cut there and ended by that
    stop string (finish_reason "stop", not "length")."""
    pieces = {1: b"a", 2: b" \xe7"}  # token 2: a space and the first byte of a 3-byte character
    decode = lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", "replace")  # noqa: E731

    class Scripted(Engine):
        def _pick(self, logits, rows):
            new = super()._pick(logits, rows)
            for i, s in enumerate(rows):
                if s is not None:
                    new[i] = [1, 2][min(s.generated, 1)]
            return new

    engine = Scripted(golden_model, decode, EngineConfig(max_batch_size=1, max_model_len=16))
    request = Request([9707], SamplingParams(max_new_tokens=2, stop_token_ids=()), Collector(), stop=[" "])
    run_all(engine, [request])
    assert request.on_event.events[-1] == Finished("stop", "a", 1, 2)
    assert request.on_event.text == "a"


def test_a_stream_whose_client_left_before_the_first_chunk_cancels_its_request():
    # the event generator cancels its request when it ends, but a generator that never started never ends: under
    # ASGI 2.4 Starlette sends the response head before starting it, and a client already gone stopped it there
    import asyncio

    from qwenvl.serve import app as app_module

    cancelled = []

    class Request:
        def cancel(self):
            cancelled.append(True)

    async def events():
        yield "data: [DONE]\n\n"

    async def receive():
        await asyncio.sleep(3600)

    async def send(message):
        raise OSError("the client is gone")

    response = app_module._EventStream(events(), Request())
    scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "POST", "path": "/v1/chat/completions"}
    with pytest.raises(Exception):  # noqa: B017, PT011 - Starlette's own error for the lost client
        asyncio.run(response(scope, receive, send))
    assert cancelled == [True]


def test_a_request_takes_one_seed(short_model):
    """SamplingParams.seed may list one seed per sequence (generate); a request is one sequence: a list of one
    seed samples as that seed, a longer list is refused when submitted (it failed in the engine's thread)."""
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    engine = Engine(short_model, decode, EngineConfig(max_batch_size=1, max_model_len=32))
    ids = list(range(100, 105))
    with pytest.raises(ValueError, match="seed has 2 values for the one sequence of a request"):
        engine.submit(Request(ids, SamplingParams(do_sample=True, seed=[1, 2]), Collector()))
    requests = [Request(ids, SamplingParams(max_new_tokens=8, stop_token_ids=(), do_sample=True, seed=s),
                        Collector()) for s in (7, [7])]
    run_all(engine, requests)
    assert requests[0].on_event.events[-1] == requests[1].on_event.events[-1]
    assert isinstance(requests[1].on_event.events[-1], Finished)


class _HostReads(TorchFunctionMode):
    """What makes a GPU's host wait, counted on the CPU: reads of tensor values (``item``/``tolist``/``bool``...,
    each a stream sync) and tensors made from Python values (a blocking host-to-device copy)."""

    READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__}

    def __init__(self) -> None:
        super().__init__()
        self.reads: collections.Counter = collections.Counter()
        self.copies: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if func in self.READS:
            self.reads[name] += 1
        elif name in ("tensor", "new_tensor", "as_tensor") or (
            name in ("__getitem__", "__setitem__")
            and any(isinstance(a, list) for a in (args[1] if isinstance(args[1], tuple) else (args[1],)))
        ):
            self.copies[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("params", [
    dict(),
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.8, do_sample=True, top_p=0.8, top_k=20, seed=3),
], ids=["greedy", "repetition_penalty", "sampled_penalty"])
def test_a_decode_step_reads_the_device_once_and_copies_nothing_to_it(short_model, params):
    """Per decode step, whatever the slots' parameters: the new tokens read back once (tolist), plus the eager
    model's check for an all-ones mask (module docstring), and no tensor made from Python values. A repetition
    penalty's history grew by a tensor made from each slot's int token: a host-to-device copy per slot per
    step, which on a GPU waits for the stream."""
    engine = Engine(short_model, lambda t: "", EngineConfig(max_batch_size=3, max_model_len=64, window_bucket=16))
    for k in range(3):
        engine.submit(Request(list(range(100, 106 + k)), SamplingParams(max_new_tokens=20, stop_token_ids=(), **params),
                              Collector()))
    steps = 5
    with torch.no_grad():
        engine._admit()
        engine._step()
        with _HostReads() as counted:
            for _ in range(steps):
                engine._step()
    assert engine.active == 3  # every slot decoded every counted step
    assert counted.copies == {}
    assert counted.reads["tolist"] == steps
    assert sum(counted.reads.values()) <= 2 * steps, counted.reads
