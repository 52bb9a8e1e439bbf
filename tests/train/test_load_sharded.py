"""The per-rank checkpoint reader (qwenvl.train.load_sharded) in one process: the same weights as the ordinary
load, and the same refusals (NaN/inf values, a config.json that does not describe the weights)."""

from __future__ import annotations

import json
import re
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


@pytest.mark.parametrize("header", [b"[" * 100_000 + b"]" * 100_000, b"[]"], ids=["nested-too-deeply", "a-list"])
def test_a_shard_header_that_is_not_a_json_object_is_a_one_line_error(golden_dir, tmp_path, header: bytes) -> None:
    # json.loads raised RecursionError, and a list a TypeError (its pop takes no default): a traceback. The last
    # shard's header: safetensors itself opens the first shard (the settings the shapes do not show) and says it
    ckpt = tmp_path / "ckpt"
    QwenVL.from_pretrained(golden_dir).save_pretrained(ckpt, max_shard_size="20MB")
    bad = sorted(ckpt.glob("*.safetensors"))[-1]
    bad.write_bytes(len(header).to_bytes(8, "little") + header)
    said = ("JSON nested too deeply to parse" if len(header) > 2 else
            r"not a safetensors file \(its header is not a JSON object\)")
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(bad))}: {said}$"):
        load_sharded_weights(_empty_model(ckpt), ckpt)
