"""``qwenvl convert RUN/checkpoint-STEP OUT`` (consolidation of a sharded training checkpoint) refuses weights that
the folder it writes could not hold: NaN or infinite values, and a --dtype they overflow, with one line and no
output. The checkpoints here are written with DCP directly (one process), as the trainer writes them."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from qwenvl.cli import main
from qwenvl.model import QwenVL

NAME = "transformer.ln_f.weight"


@pytest.fixture(scope="module")
def model() -> QwenVL:
    return QwenVL.from_config("tiny", seed=0)


def _checkpoint(model: QwenVL, folder: Path, value: float) -> Path:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state[NAME][0] = value
    with warnings.catch_warnings():  # DCP in one process warns that it assumes one process
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": state}, checkpoint_id=folder, no_dist=True)
    model.config.save_pretrained(folder)
    return folder


def _fails(argv: list[str], capsys, *expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qwenvl convert: error:") and "\n" not in err, err
    for e in expected:
        assert e in err, err


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(model: QwenVL, tmp_path: Path, capsys, value: float) -> None:
    ckpt = _checkpoint(model, tmp_path / "checkpoint-3", value)
    _fails(["convert", str(ckpt), str(tmp_path / "out")], capsys, f"{ckpt}: {NAME} holds NaN or infinite values")
    assert not (tmp_path / "out").exists()


def test_a_dtype_the_weights_overflow_is_refused_and_a_wider_one_works(model: QwenVL, tmp_path: Path, capsys) -> None:
    ckpt = _checkpoint(model, tmp_path / "checkpoint-3", 1e5)  # float32 master weights beyond float16's 65504
    _fails(["convert", str(ckpt), str(tmp_path / "out"), "--dtype", "float16"], capsys,
           f"cannot consolidate {ckpt} as float16: {NAME}: 1 of 128 values", "--dtype bfloat16 or float32")
    assert not (tmp_path / "out").exists()
    assert main(["convert", str(ckpt), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    loaded = QwenVL.from_pretrained(tmp_path / "out")
    assert loaded.dtype == torch.bfloat16 and loaded.state_dict()[NAME][0].item() == pytest.approx(1e5, rel=1e-2)
