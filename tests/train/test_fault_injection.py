"""``kill -9`` at the worst moments of saving and pruning, then resume: the same result as never being killed.

A tiny finetune (4 steps, a checkpoint every step, the newest 2 kept) runs in a subprocess that SIGKILLs
itself at a named point (``QWENVL_FAULT_POINT``, see ``qwenvl.fileio.fault_point``); the resumed run (here,
in-process) must end with bit-identical weights, the same losses and exactly the files of an uninterrupted
run: no temporary folders, no half-pruned checkpoints, no lock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qwenvl.train import train

RUN = "import json, sys, torch; torch.set_num_threads(1); from qwenvl.train import TrainConfig, train; " \
      "train(TrainConfig(**json.loads(sys.argv[1])))"


def _files(root: Path) -> dict[str, bytes | None]:
    """Every file under ``root``: weights and markers by content, the rest (timings inside) by name."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            keep = p.suffix == ".safetensors" or p.name == ".qwenvl-output.json"
            out[str(p.relative_to(root))] = p.read_bytes() if keep else None
    return out


@pytest.fixture(scope="module")
def reference(make_cfg, module_tmp_path):
    cfg = make_cfg(module_tmp_path / "out", max_steps=4, save_steps=1, save_total_limit=2, batch_size=2,
                   gradient_checkpointing=False)
    result = train(cfg)
    return cfg, result, _files(Path(cfg.output_dir))


@pytest.mark.parametrize(("point", "resumes_from"), [
    ("checkpoint.model_written@2", "checkpoint-1"),  # checkpoint-2 half-written in its temporary folder
    ("atomic_dir.staged@3", "checkpoint-2"),  # checkpoint-3 complete but not yet renamed into place
    ("remove_tree.renamed", "checkpoint-3"),  # pruning checkpoint-1: renamed to trash, not deleted yet
    ("publish.moving@1", "checkpoint-3"),  # the final save (checkpoints are DCP folders): one file moved in, config.json not yet
])
def test_killed_then_resumed_run_equals_an_uninterrupted_one(reference, tmp_path: Path, point: str,
                                                             resumes_from: str) -> None:
    ref_cfg, ref_result, ref_files = reference
    cfg = ref_cfg.replace(output_dir=str(tmp_path / "out"))
    env = {**os.environ, "QWENVL_FAULT_POINT": point, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", RUN, json.dumps(cfg.to_dict())], env=env, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert f"fault injection: killing the process at {point}" in killed.stderr
    out = Path(cfg.output_dir)
    assert (out / ".qwenvl-lock").exists()  # the dead run's lock file is still there

    resumed = train(cfg.replace(resume_training=True))
    assert resumed.resumed_from == out / resumes_from
    assert resumed.losses == ref_result.losses
    assert _files(out) == ref_files  # same files, bit-identical weights, nothing left over
