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
