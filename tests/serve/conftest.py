"""A real server on 127.0.0.1 (uvicorn in a thread, a free port) around the golden tiny checkpoint."""

from __future__ import annotations

import base64
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qwenvl import Processor, QwenVL
from qwenvl.config import IM_END_ID
from qwenvl.generation import STOP_IDS
from qwenvl.serve.app import Server, ServeSettings, create_app
from qwenvl.serve.connection import server_config
from qwenvl.serve.engine import Engine, EngineConfig

GOLDEN = "tests/fixtures/qwenvl-tiny"
MODEL_NAME = "qwenvl-tiny"
GROUNDED_ANSWER = "<ref>the cat</ref><box>(100,200),(500,800)</box> is here"


@dataclass
class Running:
    url: str  # http://127.0.0.1:PORT
    engine: Engine

    @property
    def v1(self) -> str:
        return self.url + "/v1"


@pytest.fixture(scope="session")
def processor(golden_dir) -> Processor:
    """As ``qwenvl serve`` builds it: no local files (no media folder); ChatML prompts, as Qwen-VL-Chat's (the
    golden checkpoint's generation_config says "raw")."""
    p = Processor.from_pretrained(golden_dir, allowed_media_dir=None)
    p.chat_format = "chatml"
    return p


@contextlib.contextmanager
def running(engine: Engine, processor: Processor, settings: ServeSettings | None = None,
            max_connections: int | None = None) -> Iterator[Running]:
    """Serve ``engine`` on 127.0.0.1 at a free port until the block ends."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    settings = settings or ServeSettings(model_name=MODEL_NAME)
    app = create_app(engine, processor, settings)
    config = server_config(app, settings.request_body_timeout, max_connections, log_level="warning",
                           timeout_graceful_shutdown=2)
    server = Server(config, engine)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        yield Running(f"http://127.0.0.1:{sock.getsockname()[1]}", engine)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def make_engine(model: QwenVL, processor: Processor, cls: type[Engine] = Engine, **config) -> Engine:
    config.setdefault("max_model_len", 1024)
    config.setdefault("window_bucket", 32)
    return cls(model, processor.decode, EngineConfig(**config))


@pytest.fixture(scope="module")
def server(golden_model, processor) -> Iterator[Running]:
    """4 slots, so 16 concurrent requests queue and join between decode steps."""
    with running(make_engine(golden_model, processor, max_batch_size=4), processor) as r:
        yield r


def raw(url: str, data: bytes) -> socket.socket:
    """A connection to the server at ``url`` that has sent ``data`` (a request, or the start of one)."""
    host, port = url.split("//")[1].split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(data)
    return s


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def expected_answer(model: QwenVL, processor: Processor, prompt, images, max_tokens: int,
                    stop_ids=STOP_IDS["chatml"], **generate_kwargs) -> tuple[str, int, int]:
    """What model.generate (greedy, with ``generate_kwargs``) answers: text up to the stop token, prompt and
    answer token counts."""
    inputs = processor(prompt, images=images)
    out = model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], images=inputs["images"],
                         max_new_tokens=max_tokens, stop_token_ids=stop_ids, **generate_kwargs)
    prompt_len = inputs["input_ids"].shape[1]
    new = out[0, prompt_len:].tolist()
    cut = next((k for k, t in enumerate(new) if t in stop_ids), None)
    return processor.decode(new if cut is None else new[:cut]), prompt_len, len(new) if cut is None else cut + 1


class ScriptedEngine(Engine):
    """Answers with fixed tokens (a random tiny model never writes boxes), through the real engine."""

    script: list[int] = []

    def _pick(self, logits, rows):
        new = super()._pick(logits, rows)
        for i, s in enumerate(rows):
            if s is not None:
                new[i] = self.script[min(s.generated, len(self.script) - 1)]
        return new


@pytest.fixture(scope="module")
def grounding_server(golden_model, processor):
    engine = make_engine(golden_model, processor, ScriptedEngine, max_batch_size=2)
    engine.script = processor.tokenizer.encode(GROUNDED_ANSWER) + [IM_END_ID]
    with running(engine, processor) as r:
        yield r
