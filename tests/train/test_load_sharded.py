"""The per-rank checkpoint reader (qwenvl.train.load_sharded) in one process: the same weights as the ordinary
load, and the same refusals (NaN/inf values, a config.json that does not describe the weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenvl.checkpoint import CheckpointError
from qwenvl.config import QwenVLConfig
from qwenvl.model import QwenVL
from qwenvl.train.load_sharded import load_sharded_weights


def _empty_model(ckpt: Path) -> QwenVL:
    with torch.device("meta"):
        model = QwenVL(QwenVLConfig.from_pretrained(ckpt))
    return model.to_empty(device="cpu")


def _copy(golden_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(golden_dir, out, ignore=shutil.ignore_patterns("expected*", "images"))
    return out


def test_reads_the_same_weights_as_the_ordinary_load(golden_dir) -> None:
    got = load_sharded_weights(_empty_model(golden_dir), golden_dir).state_dict()
    want = QwenVL.from_pretrained(golden_dir).state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k].to(got[k].dtype)) for k in want)


def test_refuses_nan_values_naming_the_tensor(golden_dir, tmp_path) -> None:
    ckpt = _copy(golden_dir, tmp_path)
    tensors = load_file(ckpt / "model.safetensors")
    name = "transformer.h.0.mlp.w1.weight"
    tensors[name][3, 5] = float("nan")
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"NaN or infinite.*{name} \(rows 0\.\.\d+\): 1 of \d+ values \(1 NaN\)"):
        load_sharded_weights(_empty_model(ckpt), ckpt)


def test_refuses_a_config_that_does_not_describe_the_weights(golden_dir, tmp_path) -> None:
    ckpt = _copy(golden_dir, tmp_path)
    model = QwenVL.from_pretrained(golden_dir)
    model.save_pretrained(ckpt / "saved")  # our save records the settings the shapes do not show
    cfg_file = ckpt / "saved" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["layer_norm_epsilon"] = 1e-3
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="layer_norm_epsilon"):
        load_sharded_weights(_empty_model(ckpt / "saved"), ckpt / "saved")
