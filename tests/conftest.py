"""Shared fixtures: the golden checkpoint (what the official implementation computes) and tiny models."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "fixtures" / "qwenvl-tiny"
GOLDEN_IMAGES = {"{0}": "images/cat.png", "{1}": "images/street.jpg"}


def pytest_configure(config: pytest.Config) -> None:
    """The suite compiles in-process (``stream_tokens(compile=True)``): under ``ATEN_CPU_CAPABILITY`` (the suite
    run as on an older CPU) it gets a compile cache of its own, as the ``qwenvl`` command does; with torch 2.13
    kernels cached for another capability crash the process (:func:`qwenvl.hardware.separate_compile_cache`).
    Under pytest-xdist each worker computes with one thread: two threads per worker on a 2-core machine wait for
    each other's core (a test took 2x as long beside another process as with one thread)."""
    from qwenvl.hardware import separate_compile_cache

    separate_compile_cache()
    # Ctrl-C's tests need SIGINT to arrive: a shell starts a background job (`pytest &` without job control) with
    # SIGINT ignored, which Python and every process the tests start inherit (and qwenvl rightly keeps ignoring)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N workers share the cores, one thread each
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"  # and the processes the tests start (torchrun, the CLI)


@pytest.fixture(scope="module")
def module_tmp_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A temporary folder shared by one test module and removed when the module is done: the training and
    checkpoint tests write gigabytes in all, and the suite must fit on a small disk (pytest itself removes
    each passing test's ``tmp_path``: ``tmp_path_retention_policy = "failed"`` in pyproject.toml)."""
    import shutil

    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def golden_expected() -> dict:
    from safetensors.torch import load_file

    meta = json.loads((GOLDEN / "expected.json").read_text())
    meta["tensors"] = load_file(GOLDEN / "expected.safetensors")
    meta["texts"] = [golden_prompt(p) for p in meta["prompts"]]
    return meta


def golden_prompt(template: str) -> str:
    for k, v in GOLDEN_IMAGES.items():
        template = template.replace(k, v)
    return template


@pytest.fixture(scope="session")
def golden_model():
    from qwenvl import QwenVL

    return QwenVL.from_pretrained(GOLDEN, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_model():
    from qwenvl import QwenVL

    return QwenVL.from_config("tiny", seed=0)


@pytest.fixture(scope="session")
def mindformers_ckpt(tmp_path_factory: pytest.TempPathFactory):
    """``mindformers_ckpt(name)``: the path of ``fixtures/mindformers/<name>.ckpt.gz`` decompressed (once per
    session; treat it as read-only). The fixtures were written by MindSpore itself (make_fixtures.py)."""
    import gzip
    import shutil

    folder = tmp_path_factory.mktemp("mindformers")

    def get(name: str) -> Path:
        out = folder / f"{name}.ckpt"
        if not out.exists():
            with gzip.open(GOLDEN.parent / "mindformers" / f"{name}.ckpt.gz", "rb") as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return out

    return get


@pytest.fixture()
def fake_ghostscript(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PIL's Ghostscript pointed at a script that only leaves a file behind: the returned path exists once anything
    made PIL run it (PIL decodes PostScript/EPS so)."""
    from PIL import EpsImagePlugin

    ran = tmp_path / "ghostscript-ran"
    fake = tmp_path / "gs"
    fake.write_text(f"#!/bin/sh\ntouch {ran}\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", str(fake))
    return ran
