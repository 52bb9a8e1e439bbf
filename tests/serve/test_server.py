"""The server through the real ``openai`` client: answers equal ``model.generate`` (greedy), streamed or not,
alone or among 16 concurrent requests; completions, models, health, metrics, grounding."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import openai
import pytest
import torch
from PIL import Image

from qwenvl import Processor
from qwenvl.generation import STOP_IDS
from qwenvl.serve.metrics import ServeMetrics

from .conftest import GROUNDED_ANSWER, MODEL_NAME, data_url, expected_answer, make_engine, running

CAT = "tests/fixtures/qwenvl-tiny/images/cat.png"
STREET = "tests/fixtures/qwenvl-tiny/images/street.jpg"


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


def image_messages(question: str, image: str = CAT) -> tuple[list, list]:
    """The same conversation for the server (OpenAI parts) and for the processor (list format)."""
    ours = [{"role": "user", "content": [{"image": "x"}, {"text": question}]}]
    theirs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                           {"type": "text", "text": question}]}]
    return ours, theirs


def test_chat_equals_generate_streamed_or_not(server, golden_model, processor):
    ours, theirs = image_messages("What is in the picture?")
    want, prompt_len, n = expected_answer(golden_model, processor, ours, [Image.open(CAT)], 24)
    c = client(server)
    got = c.chat.completions.create(model=MODEL_NAME, messages=theirs, max_tokens=24, temperature=0)
    assert got.choices[0].message.content == want
    assert got.choices[0].finish_reason == ("length" if n == 24 else "stop")
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (prompt_len, n)

    chunks = list(c.chat.completions.create(model=MODEL_NAME, messages=theirs, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
    assert chunks[-2].choices[0].finish_reason == got.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == prompt_len + n


def test_history_and_system_messages(server, golden_model, processor):
    ours = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"image": "x"}, {"text": "What is it?"}]},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": [{"image": "y"}, {"text": "And this one?"}]}]
    theirs = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(CAT)}},
                                           {"type": "text", "text": "What is it?"}]},
              {"role": "assistant", "content": "A cat."},
              {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(STREET)}},
                                           {"type": "text", "text": "And this one?"}]}]
    want, _, _ = expected_answer(golden_model, processor, ours, [Image.open(CAT), Image.open(STREET)], 12)
    got = client(server).chat.completions.create(model=MODEL_NAME, messages=theirs, max_tokens=12, temperature=0)
    assert got.choices[0].message.content == want


def test_no_local_files_without_a_media_folder(server):
    """The default server (its processor has no media folder) reads no file, whatever the URL or text says."""
    for url in ("file:///etc/hostname", CAT, "tests/fixtures/qwenvl-tiny/images/cat.png"):
        r = httpx.post(server.v1 + "/chat/completions", json={"model": MODEL_NAME, "max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
        assert r.status_code == 400 and "allowed_local_media_path" in r.json()["error"]["message"]


def test_sse_wire_format(server):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1


def test_sixteen_concurrent_requests_equal_each_alone(server, golden_model, processor):
    """4 slots, 16 requests of different prompt and answer lengths, half streamed: they queue, join between
    decode steps and leave at different times; every text equals model.generate for that prompt alone."""
    cases = []
    for k in range(16):
        question = "Tell me " + "more " * (k * 3) + f"about item {k}."
        max_tokens = 6 + (k * 5) % 17
        if k % 3 == 0:
            ours, theirs = image_messages(question, CAT if k % 2 else STREET)
            images = [Image.open(CAT if k % 2 else STREET)]
        else:
            ours = theirs = [{"role": "user", "content": question}]
            images = []
        cases.append((theirs, max_tokens, expected_answer(golden_model, processor, ours, images, max_tokens)[0]))

    async def one(c: openai.AsyncOpenAI, k: int) -> str:
        messages, max_tokens, _ = cases[k]
        if k % 2:
            r = await c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=max_tokens,
                                                temperature=0)
            return r.choices[0].message.content
        stream = await c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=max_tokens,
                                                 temperature=0, stream=True)
        return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

    async def all_of_them() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, k) for k in range(16)))

    got = asyncio.run(all_of_them())
    assert got == [want for _, _, want in cases]
    metrics = httpx.get(server.url + "/metrics").text
    steps_over_one = [line for line in metrics.splitlines() if line.startswith('qwenvl_batch_size_bucket{le="1"}')]
    total = [line for line in metrics.splitlines() if line.startswith("qwenvl_batch_size_count")]
    assert int(steps_over_one[0].split()[-1]) < int(total[0].split()[-1])  # some steps really decoded a batch


def test_completions_with_images_extension(server, golden_model, processor):
    prompt = "Picture 1: <img>any-name.png</img>\nDescribe the image in English:"
    want, prompt_len, n = expected_answer(golden_model, processor, prompt, [Image.open(CAT)], 10, STOP_IDS["raw"])
    c = client(server)
    got = c.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=10, temperature=0,
                               extra_body={"images": [data_url(CAT)]})
    assert got.choices[0].text == want
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (prompt_len, n)
    pieces = list(c.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                       extra_body={"images": [data_url(CAT)]}))
    assert "".join(p.choices[0].text for p in pieces) == want


def test_stop_strings_and_seeded_sampling(server, golden_model, processor):
    c = client(server)
    messages = [{"role": "user", "content": "Count for me"}]
    want, _, _ = expected_answer(golden_model, processor, messages, [], 30)
    stop = want[8:11]
    assert stop and want.find(stop) >= 0
    got = c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=30, temperature=0, stop=[stop])
    assert got.choices[0].message.content == want[: want.find(stop)]
    assert got.choices[0].finish_reason == "stop"
    streamed = c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=30, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == want[: want.find(stop)]

    def sample(seed: int) -> str:
        r = c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=1.0,
                                      top_p=0.9, seed=seed)
        return r.choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(1, 5)}) > 1  # sampling really samples


def test_models_health_metrics(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [MODEL_NAME]
    assert c.models.retrieve(MODEL_NAME).id == MODEL_NAME
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["slots"] == 4
    assert httpx.head(server.url + "/health").status_code == 200
    text = httpx.get(server.url + "/metrics").text
    for name in ("qwenvl_requests_total", "qwenvl_prompt_tokens_total", "qwenvl_generation_tokens_total",
                 "qwenvl_queue_depth", "qwenvl_active_slots", "qwenvl_batch_size_bucket",
                 "qwenvl_time_to_first_token_seconds_bucket", "qwenvl_inter_token_latency_seconds_bucket",
                 "qwenvl_request_latency_seconds_count"):
        assert f"\n{name}" in text, name
    assert 'qwenvl_requests_total{endpoint="/v1/models",status="200"}' in text


def test_a_labelled_counter_has_no_unlabelled_series():
    """Before their first count, the counters by labels showed an unlabelled 0 (`qwenvl_sequences_finished_total
    0`): a series that then vanished, beside the labelled ones, in every sum by reason. Plain counters show 0."""
    metrics = ServeMetrics()
    lines = metrics.render().splitlines()
    assert "# TYPE qwenvl_sequences_finished_total counter" in lines and "qwenvl_server_busy_total 0" in lines
    assert not [line for line in lines if line.split(" ")[0] in ("qwenvl_sequences_finished_total",
                                                                 "qwenvl_requests_total")]
    metrics.finished.inc(reason="stop")
    assert [line for line in metrics.render().splitlines()
            if line.startswith("qwenvl_sequences_finished_total")] == ['qwenvl_sequences_finished_total{reason="stop"} 1']


def test_grounding_boxes_in_pixels(grounding_server):
    width, height = Image.open(CAT).size
    _, theirs = image_messages("Where is the cat?")
    c = client(grounding_server)
    got = c.chat.completions.create(model=MODEL_NAME, messages=theirs, max_tokens=40)
    message = got.choices[0].message
    assert message.content == GROUNDED_ANSWER
    box = [round(v, 2) for v in (100 / 999 * width, 200 / 999 * height, 500 / 999 * width, 800 / 999 * height)]
    assert message.grounding == [{"ref": "the cat", "box_normalized": [100, 200, 500, 800], "box": box, "image": 1}]
    chunks = list(c.chat.completions.create(model=MODEL_NAME, messages=theirs, max_tokens=40, stream=True))
    assert chunks[-1].choices[0].delta.grounding == message.grounding
    text_only = c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "where?"}],
                                          max_tokens=40)
    assert text_only.choices[0].message.grounding == [{"ref": "the cat", "box_normalized": [100, 200, 500, 800]}]


def test_the_checkpoints_repetition_penalty_applies_when_a_request_leaves_it_out(golden_dir, processor):
    # generation_config.json's repetition_penalty (as transformers' generate applies it) was never used
    import dataclasses

    from qwenvl.model import QwenVL

    from .conftest import make_engine, running

    model = QwenVL.from_pretrained(golden_dir, dtype=torch.float32).eval()
    model.config = dataclasses.replace(model.config, generation=dataclasses.replace(model.config.generation,
                                                                                 repetition_penalty=1.8))
    inputs = processor([{"role": "user", "content": "Tell me more"}])
    out = model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=16,
                         stop_token_ids=STOP_IDS["chatml"], repetition_penalty=1.8)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    cut = next((k for k, t in enumerate(new) if t in STOP_IDS["chatml"]), len(new))
    with running(make_engine(model, processor, max_batch_size=1), processor) as server:
        got = client(server).chat.completions.create(model=MODEL_NAME, max_tokens=16, temperature=0,
                                                     messages=[{"role": "user", "content": "Tell me more"}])
    assert got.choices[0].message.content == processor.decode(new[:cut])


def test_repetition_penalty_and_min_tokens_per_request(server, golden_model, processor):
    """vLLM's extra sampling parameters: each request's own ``repetition_penalty`` and ``min_tokens`` give what
    ``model.generate`` gives with them (they were refused as unknown before: ignored, the checkpoint's applied)."""
    c = client(server)

    def ask(question: str, **extra) -> tuple[str, int]:
        got = c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": question}],
                                        max_tokens=24, temperature=0, extra_body=extra)
        return got.choices[0].message.content, got.usage.completion_tokens

    ours = [{"role": "user", "content": "Tell me more"}]
    plain, _, n = expected_answer(golden_model, processor, ours, [], 24)
    assert n <= 12  # this prompt stops by the 12th token (the stop token), so min_tokens has something to do
    want, _, n_min = expected_answer(golden_model, processor, ours, [], 24, min_new_tokens=12)
    assert want != plain and ask("Tell me more", min_tokens=12) == (want, n_min)

    ours = [{"role": "user", "content": "hi"}]
    plain, _, _ = expected_answer(golden_model, processor, ours, [], 24)
    want, _, n = expected_answer(golden_model, processor, ours, [], 24, repetition_penalty=1.8)
    assert want != plain and ask("hi", repetition_penalty=1.8) == (want, n)
    assert ask("hi", repetition_penalty=1.0)[0] == plain


def test_a_request_without_model_is_for_the_served_model(server):
    # "model" was required ("model: Field required"); vLLM answers with the served model, and so do we now
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                       ("/v1/completions", {"prompt": "Hi"})):
        r = httpx.post(server.url + path, json={**body, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == MODEL_NAME
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "model": "other", "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_chat_to_a_base_checkpoint_refuses_what_it_would_drop(golden_model, golden_dir, caplog):
    """A base (chat_format raw) checkpoint is prompted with the last message alone, as the official code does: a
    system message or earlier turns were dropped with a 200 answer to a question the client did not ask (only the
    server's log said so). They are refused, naming the messages; one user message is answered as before. No
    request makes the processor's advice to use --chat_format chatml (a flag serve has not) reach the log."""
    caplog.set_level(logging.INFO)
    processor = Processor.from_pretrained(golden_dir, allowed_media_dir=None)
    assert processor.chat_format == "raw"  # the golden checkpoint's generation_config
    with running(make_engine(golden_model, processor, max_batch_size=1), processor) as r:
        c = client(r)
        for messages in ([{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}],
                         [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                          {"role": "user", "content": "And?"}]):
            with pytest.raises(openai.BadRequestError) as e:
                c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=3)
            error = e.value.body
            assert error["param"] == "messages" and "base checkpoint" in error["message"], error
            assert f"the {len(messages) - 1} message(s) before it" in error["message"], error
        question = [{"role": "user", "content": "Hi"}]
        want, _, _ = expected_answer(golden_model, processor, question, [], 3, STOP_IDS["raw"])
        got = c.chat.completions.create(model=MODEL_NAME, messages=question, max_tokens=3, temperature=0)
        assert got.choices[0].message.content == want
        prompt = "<img>x</img>Generate the caption in English:"
        done = c.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=3, extra_body={"images": [data_url(CAT)]})
        assert done.choices[0].text is not None
    assert not [r.getMessage() for r in caplog.records if "--chat_format" in r.getMessage()]
