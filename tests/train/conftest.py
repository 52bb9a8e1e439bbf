"""Fixtures for the training tests: a small conversation dataset and a fast tiny-preset TrainConfig."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from qwenvl.train import TrainConfig

FIXTURE_IMAGES = Path(__file__).parents[1] / "fixtures" / "qwenvl-tiny" / "images"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's ops are far too small for two threads: on a shared 2-core machine the second thread
    mostly waits to be scheduled (10x slower steps). Results are compared within one setting only."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def processor():
    from qwenvl.processor import Processor

    return Processor.from_pretrained()


@pytest.fixture(scope="session")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 short conversations, 4 of them with an image; returns the JSON file."""
    d = tmp_path_factory.mktemp("train_data")
    shutil.copy(FIXTURE_IMAGES / "cat.png", d / "cat.png")
    shutil.copy(FIXTURE_IMAGES / "street.jpg", d / "street.jpg")
    answers = ["A cat.", "Four.", "A busy street.", "Blue.", "The cat sleeps.", "Ten.", "Cars and people.", "Yes."]
    records = []
    for i, answer in enumerate(answers):
        image = ["cat.png", "street.jpg"][i % 4 // 2] if i % 2 == 0 else None
        question = f"Picture 1: <img>{image}</img>\nWhat is shown?" if image else f"Question number {i}?"
        records.append({"id": f"s{i}", "conversations": [{"from": "user", "value": question},
                                                         {"from": "assistant", "value": answer}]})
    path = d / "train.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def make_cfg(train_data: Path) -> Callable[..., TrainConfig]:
    """TrainConfig for a seconds-long run of the tiny preset on ``train_data`` (fields overridable)."""

    def make(output_dir: Path, **changes: Any) -> TrainConfig:
        values: dict[str, Any] = dict(
            data_path=str(train_data), preset="tiny", output_dir=str(output_dir), batch_size=4, max_steps=6,
            learning_rate=1e-2, min_lr=1e-3, warmup_steps=0, logging_steps=1, seed=0, device="cpu",
        )
        values.update(changes)
        return TrainConfig(**values)

    return make


@pytest.fixture
def broken_after_check(train_data: Path, processor, tmp_path: Path):
    """A copy of ``train_data`` in ``tmp_path/data`` and its dataset, built while every image decoded; then
    ``street.jpg`` breaks (a sample that fails mid-run). Returns (the copy's JSON file, the dataset)."""
    from qwenvl.data.dataset import ConversationDataset

    data = tmp_path / "data"
    shutil.copytree(train_data.parent, data)
    dataset = ConversationDataset(data / "train.json", processor)  # every image decodes now ...
    (data / "street.jpg").write_bytes(b"\xff\xd8 broken")  # ... and one breaks after the check
    return data / "train.json", dataset
