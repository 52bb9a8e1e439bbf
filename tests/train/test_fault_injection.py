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


# `qwenvl finetune` in a subprocess that waits at a chosen point (argv: module, attribute, the point's name for
# fault_point or "" for any call, which call) until the test has sent its signal and then writes a line
PAUSE = """
import functools, importlib, sys
module, attr, point, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
owner = importlib.import_module(module)
*path, name = attr.split(".")
owner = functools.reduce(getattr, path, owner)
real, calls = getattr(owner, name), []
def paused(*args, **kwargs):
    if not point or args[-1] == point:
        calls.append(1)
        if len(calls) == nth:
            print("paused", flush=True)
            sys.stdin.readline()
    return real(*args, **kwargs)
setattr(owner, name, paused)
from qwenvl.cli import main
sys.exit(main(sys.argv[5:]))
"""


@pytest.mark.parametrize(("where", "sig", "group", "saved", "held_in"), [
    # inside dcp.save of checkpoint-2 (its writer about to write the shards), to the whole process group as a
    # scheduler's cancel sends it: the DataLoader workers die too, and torch's SIGCHLD handler raised inside
    # the save (the checkpoint was lost)
    (("torch.distributed.checkpoint.filesystem", "FileSystemWriter.write_data", "", 2), signal.SIGTERM, True,
     "checkpoint-2", "checkpoint-2"),
    # the same, to the main process alone (`kill PID`)
    (("torch.distributed.checkpoint.filesystem", "FileSystemWriter.write_data", "", 2), signal.SIGTERM, False,
     "checkpoint-2", "checkpoint-2"),
    # checkpoint-3 complete in its staging folder, not yet renamed into place
    (("qwenvl.fileio", "fault_point", "atomic_dir.staged", 3), signal.SIGINT, False, "checkpoint-3", "checkpoint-3"),
    # the final model: one file moved into output_dir, config.json not yet (the terminal closed)
    (("qwenvl.outputs", "fault_point", "publish.moving", 1), signal.SIGHUP, True, "model.safetensors",
     "the final model"),
    # no save under way (step 3 starts): the dead workers' SIGCHLD printed a traceback at exit
    (("qwenvl.train.trainer", "_train_step", "", 3), signal.SIGTERM, True, "checkpoint-2", None),
])
def test_a_stop_signal_during_a_save_waits_for_it_then_the_run_resumes_exactly(
        reference, tmp_path: Path, where: tuple, sig: int, group: bool, saved: str, held_in: str | None) -> None:
    # a real signal from another process while a save runs: the save completes and lands, then the run stops as
    # that signal stops it (status 128 + signal), and resuming gives the files and losses of an unstopped run
    ref_cfg, ref_result, ref_files = reference
    cfg = ref_cfg.replace(output_dir=str(tmp_path / "out"))
    assert cfg.num_workers > 0  # DataLoader worker processes, which a signal to the group reaches too
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(cfg.to_dict()))  # YAML reads JSON
    log = tmp_path / "stderr.txt"
    argv = [sys.executable, "-c", PAUSE, *map(str, where), "finetune", "--config", str(config)]
    with log.open("w") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
        assert proc.stdout.readline() == "paused\n", log.read_text()[-3000:]
        # delivered while the hook waits for its line (Python runs handlers in the wait)
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        proc.communicate("go\n", timeout=600)
    stderr = log.read_text()
    assert proc.returncode == 128 + sig, stderr[-3000:]
    out = Path(cfg.output_dir)
    assert (out / saved).exists()  # what was being saved is in place, complete
    last_line = "interrupted" if sig == signal.SIGINT else f"terminated ({signal.Signals(sig).name})"
    assert stderr.strip().splitlines()[-1] == last_line and "Traceback" not in stderr, stderr[-3000:]
    held = f"{signal.Signals(sig).name} came while {held_in} was being saved: acted on now that the save has ended"
    assert (held in stderr) == (held_in is not None)
    assert not (out / ".qwenvl-lock").exists()  # the run ended as Ctrl-C ends it: the lock released

    resumed = train(cfg.replace(resume_training=True))
    assert resumed.losses == ref_result.losses
    assert _files(out) == ref_files  # same files, bit-identical weights, nothing left over


def test_sigterm_while_convert_consolidates_a_checkpoint_waits_for_the_whole_model(reference, tmp_path: Path) -> None:
    # `qwenvl convert checkpoint-STEP OUT` moves the model's files into OUT one by one, config.json last: SIGTERM
    # after the first one left OUT without config.json (an incomplete model); now OUT is complete, then it stops
    ref_cfg, _result, _files_ = reference
    out = tmp_path / "model"
    argv = [sys.executable, "-c", PAUSE, "qwenvl.outputs", "fault_point", "publish.moving", "1", "convert",
            str(Path(ref_cfg.output_dir) / "checkpoint-3"), str(out)]
    with (tmp_path / "stderr.txt").open("w") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.stdout.readline() == "paused\n", (tmp_path / "stderr.txt").read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        proc.communicate("go\n", timeout=600)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert stderr.strip().splitlines()[-1] == "terminated (SIGTERM)"
