"""Data-parallel fine-tuning under torchrun (gloo, real processes): N ranks equal one, any-world-size resume,
two nodes with c10d rendezvous, a killed rank (failure and restart), LoRA, sharded checkpoints consolidated.

Every run trains the tiny preset (loaded from a saved checkpoint, so each rank reads only its rows) for 4
steps of 4 samples in fp32; the 1-process reference runs in this process without a process group. Losses
and final weights must agree within 1e-5 (lr 1e-3: Adam turns rounding differences in near-zero gradients
into update differences proportional to the learning rate).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from safetensors.torch import load_file

from qwenvl.model import QwenVL
from qwenvl.train import train
from qwenvl.train.lora import base_fingerprint, recorded_base_fingerprint
from qwenvl.train.sharded_checkpoint import consolidate

ROOT = Path(__file__).parents[2]
TINY = ROOT / "configs" / "finetune_qwenvl_tiny.yaml"
TOL = 1e-5


def _flags(**over: Any) -> dict[str, Any]:
    flags = dict(batch_size=2, max_steps=4, save_steps=2, save_total_limit=0, bf16=False, learning_rate=1e-3,
                 min_lr=1e-4, warmup_steps=0, num_workers=0, seed=0, logging_steps=1, dist_timeout=60)
    flags.update(over)
    return flags


@pytest.fixture(scope="module")
def setup(module_tmp_path: Path, train_data: Path) -> dict[str, Path]:
    root = module_tmp_path
    QwenVL.from_config("tiny", seed=0).save_pretrained(root / "base")
    return {"root": root, "base": root / "base", "data": train_data}


def _cfg(setup: dict[str, Path], out: Path, **over: Any):
    from qwenvl.train import TrainConfig

    values = TrainConfig.from_yaml(TINY).to_dict()
    values.update(data_path=str(setup["data"]), load_checkpoint=str(setup["base"]), output_dir=str(out),
                  **_flags(batch_size=4, **over))
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def reference(setup, processor):
    """One process, batch 4 (= 2 ranks x batch 2): the run every distributed one must equal."""
    return train(_cfg(setup, setup["root"] / "ref"), processor=processor)


@pytest.fixture(scope="module")
def lora_reference(setup, processor):
    return train(_cfg(setup, setup["root"] / "lora-ref", use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                      lora_train_resampler=True), processor=processor)


def _command(setup: dict[str, Path], out: Path, launch: list[str], **over: Any) -> list[str]:
    args = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "qwenvl", "finetune", "--config", str(TINY),
            "--train_data", str(setup["data"]), "--load_checkpoint", str(setup["base"]), "--output_dir", str(out)]
    for key, value in _flags(**over).items():
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


_SCRATCH: dict[str, Path] = {}  # the launched processes' temporary folder (see scratch_tmpdir)


@pytest.fixture(scope="module", autouse=True)
def scratch_tmpdir(module_tmp_path: Path) -> Path:
    """torchrun's agents and ranks write ``torchelastic_*`` and ``pymp-*`` folders to the temporary folder, and
    the ranks these tests kill on purpose never remove theirs: they go under this module's folder, which is
    removed when the module is done, instead of piling up in /tmp."""
    _SCRATCH["tmp"] = module_tmp_path / "scratch"
    _SCRATCH["tmp"].mkdir()
    return _SCRATCH["tmp"]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if "tmp" in _SCRATCH:
        env["TMPDIR"] = str(_SCRATCH["tmp"])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _standalone(nproc: int = 2, restarts: int = 0) -> list[str]:
    return ["--standalone", "--nproc_per_node", str(nproc), "--max_restarts", str(restarts), "--monitor_interval", "0.2"]


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return res


def _losses(out: Path) -> list[float]:
    return json.loads((out / "trainer_state.json").read_text())["progress"]["losses"]


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=TOL, msg=k)


def _final(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def _worker(agent: psutil.Process, rank: int) -> psutil.Process | None:
    for child in agent.children():  # the workers (their DataLoader processes would be grandchildren)
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    return None


# ---- N ranks = 1 rank, killed rank restarted, resume on another world size ----------------------------------
@pytest.fixture(scope="module")
def restarted_run(setup):
    """2 ranks, batch 2 each, ``--max_restarts 1``: rank 1 is killed once checkpoint-2 exists; the restarted job
    resumes from it by itself (``resume_training auto``) and finishes."""
    out = setup["root"] / "restarted"
    cmd = _command(setup, out, _standalone(2, restarts=1), resume_training="auto")
    agent = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    try:
        deadline = time.monotonic() + 240
        while killed is None and agent.poll() is None and time.monotonic() < deadline:
            if (out / "checkpoint-2" / "trainer_state.pt").is_file():
                worker = _worker(psutil.Process(agent.pid), 1)
                if worker is not None:
                    worker.send_signal(signal.SIGKILL)
                    killed = worker.pid
            time.sleep(0.05)
        log, _ = agent.communicate(timeout=240)
    finally:
        if agent.poll() is None:
            agent.kill()
    return out, agent.returncode, log, killed


def test_two_ranks_equal_one_and_a_killed_rank_restarts_from_the_checkpoint(restarted_run, reference) -> None:
    out, rc, log, killed = restarted_run
    assert killed is not None, log[-3000:]
    assert rc == 0, log[-5000:]
    assert "resumed from" in log and "checkpoint-2" in log  # the restarted workers continued from step 2
    losses = _losses(out)
    assert len(losses) == 4
    assert losses == pytest.approx(reference.losses, abs=TOL)
    _assert_same_weights(_final(out), _final(reference.output_dir))
    state = json.loads((out / "trainer_state.json").read_text())
    assert (state["world_size"], state["global_batch_size"]) == (2, 4)


def test_a_two_rank_checkpoint_resumes_on_one_process(restarted_run, reference, setup, processor, tmp_path) -> None:
    out = restarted_run[0]
    ckpt = out / "checkpoint-2"
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one per rank
    resumed = train(_cfg(setup, tmp_path, resume_from=str(ckpt), resume_training=True), processor=processor)
    assert resumed.resumed_from == ckpt
    assert resumed.losses == pytest.approx(reference.losses, abs=TOL)
    _assert_same_weights(_final(tmp_path), _final(reference.output_dir))
    # consolidated, the 2-rank checkpoint is the official layout of the step-2 weights of the 1-process run
    at_2 = consolidate(ckpt, tmp_path / "step2")
    _assert_same_weights(load_file(str(at_2 / "model.safetensors")),
                         load_file(str(consolidate(reference.output_dir / "checkpoint-2", tmp_path / "ref2")
                                       / "model.safetensors")))


# ---- two nodes, c10d rendezvous, resuming a 1-process checkpoint ---------------------------------------------
def test_two_nodes_resume_a_one_process_checkpoint(setup, reference) -> None:
    """Two torchrun agents ("nodes") on 127.0.0.1 with one process each continue the 1-process run's checkpoint-2
    and end where it ended."""
    out = setup["root"] / "nodes"
    port = _free_port()
    agents = []
    for node in (0, 1):
        launch = ["--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                  "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "qwenvl-test", "--monitor_interval", "0.2"]
        cmd = _command(setup, out, launch, resume_from=str(reference.output_dir / "checkpoint-2"))
        agents.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [a.communicate(timeout=240)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], logs[0][-4000:] + logs[1][-4000:]
    # what every rank sees alike is said once, by rank 0 (it was said by each rank)
    assert (logs[0] + logs[1]).count("random streams (dropout) restart from the seed") == 1, logs[1][-3000:]
    assert _losses(out) == pytest.approx(reference.losses, abs=TOL)
    _assert_same_weights(_final(out), _final(reference.output_dir))


# ---- LoRA ---------------------------------------------------------------------------------------------------
def test_lora_on_two_ranks_equals_one(setup, lora_reference) -> None:
    out = setup["root"] / "lora"
    res = _run(_command(setup, out, _standalone(2), use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                        lora_train_resampler=True, num_workers=1))
    assert "returned a view tensor" not in res.stderr  # FSDP2's warning, twice per step and rank (parallelize.py)
    assert _losses(out) == pytest.approx(lora_reference.losses, abs=TOL)
    got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(Path(lora_reference.output_dir) / "adapter" / "adapter_model.safetensors"))
    _assert_same_weights(got, want)
    _assert_same_weights(load_file(str(out / "adapter" / "non_lora_trainables.safetensors")),
                         load_file(str(Path(lora_reference.output_dir) / "adapter" / "non_lora_trainables.safetensors")))
    # the base the adapters record is the one they trained on: under FSDP each rank holds a shard of the rows that
    # base_fingerprint reads (rank 0, which saves, the first ones), and a wrong record refuses every merge and load
    base = base_fingerprint(QwenVL.from_pretrained(setup["base"]))
    for adapter in (out / "adapter", out / "checkpoint-2" / "adapter"):
        assert recorded_base_fingerprint(adapter) == base, adapter


# ---- failure ------------------------------------------------------------------------------------------------
def test_a_killed_rank_fails_the_job_naming_it(setup) -> None:
    out = setup["root"] / "killed"
    timeout = 30
    cmd = _command(setup, out, _standalone(2), dist_timeout=timeout, max_steps=50, save_steps=1)
    agent = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        worker = None
        deadline = time.monotonic() + 240
        while worker is None and agent.poll() is None and time.monotonic() < deadline:
            if (out / "checkpoint-1").is_dir():
                worker = _worker(psutil.Process(agent.pid), 1)
            time.sleep(0.05)
        assert worker is not None, "the run ended before rank 1 could be killed"
        worker.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        log, _ = agent.communicate(timeout=timeout + 60)
        elapsed = time.monotonic() - t0
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode != 0
    assert elapsed < timeout, elapsed
    assert "rank      : 1 (local_rank: 1)" in log and "Signal 9 (SIGKILL)" in log, log[-3000:]
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("case", ["bad image", "output_dir in use", "diverged"])
def test_an_error_every_rank_meets_is_said_once(setup, tmp_path: Path, case: str) -> None:
    """A record whose image is missing (every rank reads the data), an output_dir another run holds (rank 0
    finds it and tells the others), or a step whose gradient is not finite (a sample of rank 1 gives a NaN loss:
    the global gradient norm is NaN on every rank): one line for the job, not one per rank, and naming no rank.
    (The divergence was said by whichever rank left word first, as "rank 1 of 2: step 3: ...".)"""
    from qwenvl.outputs import claim_output

    records = json.loads(setup["data"].read_text())
    records[0]["conversations"][0]["value"] = "Picture 1: <img>missing.png</img>\nWhat is shown?"
    data = setup["data"].parent / "missing-image.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "out"
    cmd = _command(setup, out, _standalone(2), dist_timeout=30)
    with contextlib.ExitStack() as stack:
        if case == "bad image":
            cmd[cmd.index("--train_data") + 1] = str(data)
            want = "missing.png"
        elif case == "output_dir in use":
            stack.enter_context(claim_output(out, "finetune"))
            want = "in use by another qwenvl run"
        else:
            _with_fault(cmd, tmp_path, "nan")
            want = (f"error: step 3: the loss or its gradient is not finite (gradient norm nan): the run diverged (or "
                    f"a sample gives non-finite values); nothing of step 3 was applied and no final model is saved; "
                    f"the newest checkpoint is {out / 'checkpoint-2'}; lower learning_rate")
        res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, check=False)
    log = res.stdout + res.stderr
    assert res.returncode != 0
    errors = [line for line in log.splitlines() if "qwenvl finetune: error:" in line]
    assert len(errors) == 1 and want in errors[0], log[-4000:]
    if case == "diverged":
        assert "exitcode  : 2" in log, log[-3000:]  # a ValueError's status, from the rank that said it
        assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
        assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()


_RANK_1_FAILS = """
import os, sys
import torch
from qwenvl.checkpoint import CheckpointError
from qwenvl.cli import main
from qwenvl.model import QwenVL
from qwenvl.train import load_sharded

def truncated(file, *args):  # the file as rank 1 sees it (its node's copy, say)
    raise CheckpointError(f"{file} is truncated: 0 of 4096 bytes read")

def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

forward, calls = QwenVL.forward, []

def nan_at_step_3(self, *args, **kwargs):  # one forward per step: a sample of step 3 gives a NaN loss
    out = forward(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == 3:
        out.loss = out.loss * float("nan")
    return out

if os.environ["RANK"] == "1":
    if sys.argv[1] == "rows":
        load_sharded._read_rows = truncated
    elif sys.argv[1] == "memory":
        QwenVL.forward = out_of_memory
    else:
        QwenVL.forward = nan_at_step_3
sys.exit(main(sys.argv[2:]))
"""


def _with_fault(cmd: list[str], tmp_path: Path, fault: str) -> list[str]:
    """``cmd`` (a torchrun command line from :func:`_command`), changed in place to run `qwenvl finetune` with the
    same flags through :data:`_RANK_1_FAILS`, which gives rank 1 ``fault``."""
    script = tmp_path / "rank1_fails.py"
    script.write_text(_RANK_1_FAILS)
    at = cmd.index("-m", cmd.index("--monitor_interval"))
    cmd[at:at + 2] = [str(script), fault]
    return cmd


@pytest.mark.parametrize(("fault", "want"), [
    ("rows", "rank 1 of 2: {base}/model.safetensors is truncated: 0 of 4096 bytes read"),
    ("memory", "rank 1 of 2: CUDA out of memory. Tried to allocate 2.00 GiB"),
])
def test_a_failure_of_one_rank_is_one_line_naming_that_rank(setup, tmp_path: Path, fault: str, want: str) -> None:
    """Only rank 1 fails: it cannot read its rows of the weights (as loading, every rank then learns of it), or it
    runs out of memory in the first step (while rank 0 waits in a collective). One line for the job, naming rank
    1 and the cause, and every rank exits. (Rank 1 said its error without its rank, or as a traceback, and rank 0
    "error: rank 0 of 2: lost the other ranks ... Connection closed by peer": the only line that named a rank was
    about the wrong one, as is torchrun's summary when rank 0 exits first.)"""
    cmd = _with_fault(_command(setup, tmp_path / "out", _standalone(2), dist_timeout=60), tmp_path, fault)
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, check=False)
    log = res.stdout + res.stderr
    assert res.returncode != 0
    errors = [line for line in log.splitlines() if "error:" in line]
    assert len(errors) == 1, log[-4000:]
    assert errors[0].endswith(f"qwenvl finetune: error: {want.format(base=setup['base'])}"), errors
    assert "[rank0]" not in log and "[rank1]" not in log  # no rank's traceback
    assert not (tmp_path / "out" / "model.safetensors").exists()


_LOCAL_RANK_0_LAST = """
import os, sys, time
from pathlib import Path
from qwenvl import cli
from qwenvl.train import cli as finetune_cli

reached = Path(sys.argv[1])  # rank 1 has reached the end of its silent exit
if os.environ["LOCAL_RANK"] == "0":
    for _ in range(2400):  # rank 0 meets the error last: the order in which it was stopped before saying it
        if reached.exists():
            break
        time.sleep(0.05)
else:
    wait = getattr(cli, "left_to_local_rank_0", None)  # where rank 1 waits (none: it exits at once)

    def waiting(status):
        reached.touch()
        return wait(status)

    if wait is not None:
        cli.left_to_local_rank_0 = finetune_cli.left_to_local_rank_0 = waiting
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize(("argv", "want"), [
    (["--train_data", "/nonexistent/train.json"], "error: training data file not found: /nonexistent/train.json"),
    (["--config"], "error: argument --config: expected one argument"),
])
def test_an_error_every_process_meets_is_said_even_when_local_rank_0_meets_it_last(tmp_path: Path, argv: list[str],
                                                                                   want: str) -> None:
    """A missing data file or a bad flag, which every process meets alike and local rank 0 alone says: the others
    exited at once, silently, and torchrun stopped local rank 0 (SIGTERM) before it said it when it met the error
    last (4 of 30 launches on 2 cores): no line at all, only torchrun's summary naming rank 1 with exit code 2."""
    script = tmp_path / "local_rank_0_last.py"
    script.write_text(_LOCAL_RANK_0_LAST)
    cmd = [sys.executable, "-m", "torch.distributed.run", *_standalone(2), str(script), str(tmp_path / "reached"),
           "finetune", "--config", str(TINY), "--output_dir", str(tmp_path / "out"), *argv]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, check=False)
    log = res.stdout + res.stderr
    assert res.returncode != 0
    errors = [line for line in log.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].endswith(f"qwenvl finetune: {want}"), log[-4000:]
    assert "rank      : 0 (local_rank: 0)\n  exitcode  : 2" in log.split("Root Cause")[-1], log[-3000:]



_STOPPED_READING_THE_CONFIG = """
import os, sys, time
from pathlib import Path
from qwenvl import cli
from qwenvl.train import cli as finetune_cli

reached = Path(sys.argv[1])  # rank 1 is reading the config
if os.environ["LOCAL_RANK"] == "0":
    while not reached.exists():  # rank 0 meets the error once rank 1 reads the config: torchrun stops it there
        time.sleep(0.05)
else:
    def reading(*args, **kwargs):
        reached.touch()
        time.sleep(600)  # until torchrun's SIGTERM, once rank 0 has said the error

    finetune_cli.config_from_args = reading
sys.exit(cli.main(sys.argv[2:]))
"""


def test_a_rank_torchrun_stops_before_it_meets_the_error_says_nothing(tmp_path: Path) -> None:
    """Local rank 0 said the missing data file and exited while rank 1 still read the config (2 of 20 launches on
    2 cores): torchrun's SIGTERM made rank 1 print "terminated (SIGTERM)" after the error."""
    script = tmp_path / "stopped_reading_the_config.py"
    script.write_text(_STOPPED_READING_THE_CONFIG)
    cmd = [sys.executable, "-m", "torch.distributed.run", *_standalone(2), str(script), str(tmp_path / "reached"),
           "finetune", "--config", str(TINY), "--output_dir", str(tmp_path / "out"), "--train_data",
           "/nonexistent/train.json"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, check=False)
    log = res.stdout + res.stderr
    assert res.returncode != 0 and (tmp_path / "reached").exists(), log[-4000:]
    said = [line for line in log.splitlines() if "error:" in line or "terminated" in line or "interrupted" in line]
    assert said == ["qwenvl finetune: error: training data file not found: /nonexistent/train.json"], log[-4000:]
    assert "rank      : 1 (local_rank: 1)\n  exitcode  : 143" in log, log[-3000:]

# ---- the Python API under torchrun -----------------------------------------------------------------------------
_API_SCRIPT = """
import gc, sys
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
from qwenvl.train import TrainConfig, train
values = TrainConfig.from_yaml(sys.argv[1]).to_dict()
values.update(data_path=sys.argv[2], load_checkpoint=sys.argv[3], output_dir=sys.argv[4], batch_size=2, max_steps=2,
              save_steps=0, save_total_limit=0, bf16=False, num_workers=0)
result = train(TrainConfig(**values))
gc.collect()
print("model:", result.model, "sharded parameter groups alive:", sum(isinstance(o, FSDPParamGroup) for o in gc.get_objects()))
"""


def test_train_under_torchrun_lets_go_of_the_process_group(setup, tmp_path) -> None:
    """``train()`` destroys the process group it created, and nothing it returns still holds it: the sharded
    model (FSDP keeps the group) is not returned, so the group is not left to be torn down at interpreter exit,
    where it could abort a finished run (exit code -6)."""
    script = tmp_path / "api.py"
    script.write_text(_API_SCRIPT)
    out = tmp_path / "out"
    res = _run([sys.executable, "-m", "torch.distributed.run", *_standalone(2), str(script), str(TINY),
                str(setup["data"]), str(setup["base"]), str(out)])
    assert res.stdout.count("model: None sharded parameter groups alive: 0") == 2, res.stdout[-3000:]
    assert (out / "model.safetensors").is_file()
