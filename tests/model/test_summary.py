"""qwenvl.model.summary: what `qwenvl info` says of a checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qwenvl.checkpoint import CheckpointError
from qwenvl.model.summary import describe

GOLDEN = Path(__file__).parents[1] / "fixtures" / "qwenvl-tiny"


def test_info_refuses_weights_that_do_not_match_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # info printed config.json's parameter counts for a folder whose weights would not load (one layer fewer here)
    folder = tmp_path / "ckpt"
    shutil.copytree(GOLDEN, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: transformer\.h\.2\."):
        describe(folder)
    from qwenvl.cli import main

    assert main(["info", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qwenvl info: error: checkpoint {folder} does not match the model"), err
    assert describe(GOLDEN)["parameters"]["total"] == 39_502_720  # the folder as it is: counted


@pytest.mark.parametrize("native_bf16", [False, True])
def test_info_says_what_the_folder_stores_and_what_a_load_picks(native_bf16: bool, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """info listed bf16/fp16/fp32 recomputed from torch_dtype (fp16: True) where config.json stores them all false,
    and never said which dtype a load computes in (the hardware's choice, not the stored float16)."""
    from qwenvl import hardware
    from qwenvl.cli import main
    from qwenvl.inference import load

    monkeypatch.setattr(hardware, "pick_device", lambda device: "cpu")
    monkeypatch.setattr(hardware, "supports_bf16", lambda device="cpu": native_bf16)
    info = describe(GOLDEN)
    stored = json.loads((GOLDEN / "config.json").read_text())
    assert {k: info["config"][k] for k in ("bf16", "fp16", "fp32")} == {k: stored[k] for k in ("bf16", "fp16", "fp32")}
    assert info["dtype"] == "float16 (61 tensors)"
    model, _ = load(GOLDEN, device="cpu")  # dtype auto, as `qwenvl predict` without --dtype
    picked = str(model.dtype).removeprefix("torch.")
    assert picked == ("bfloat16" if native_bf16 else "float32")
    assert info["loads_as"].startswith(f"{picked} on cpu ")
    assert main(["info", str(GOLDEN)]) == 0
    out = capsys.readouterr().out
    assert f"\nloads as: {picked} on cpu " in out and "\n  fp16: False\n" in out
