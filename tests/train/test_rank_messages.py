"""One line, said once: a sample that breaks in a DataLoader worker, odd torchrun variables, a rendezvous that
fails, a LOCAL_RANK beyond the node's GPUs, the command-line errors every process of a node meets alike, and
an error one rank alone meets, which names that rank. (The 2-process runs that check "once per job" are in
test_distributed.py.)"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from qwenvl.checkpoint import CheckpointError
from qwenvl.train import distributed, train
from qwenvl.train.distributed import DistEnv, DistributedError, ReportedByAnotherRank

_LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
           "TORCHELASTIC_USE_AGENT_STORE")


@pytest.fixture
def launch_env(monkeypatch: pytest.MonkeyPatch):
    """Set torchrun's variables for one test (none of them is left from the environment)."""
    for name in _LAUNCH:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env


def test_a_sample_that_breaks_in_a_loader_worker_is_one_line(make_cfg, processor, broken_after_check,
                                                             tmp_path: Path) -> None:
    # raised in a worker process, DataLoader re-raised it with its own header and the worker's whole traceback
    # in the message ("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback ..."), which the
    # command printed as its "one-line" error
    from qwenvl.data.dataset import DatasetError

    data_path, dataset = broken_after_check
    cfg = make_cfg(tmp_path / "out", data_path=str(data_path), max_steps=2, num_workers=1)
    with pytest.raises(DatasetError) as e:
        train(cfg, processor=processor, dataset=dataset)
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message and "worker" not in message, message
    assert "street.jpg" in message and "skip_bad_samples" in message


@pytest.mark.parametrize(("values", "message"), [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE='2' is set but RANK is not"),
    ({"RANK": "1"}, "RANK='1' is set but WORLD_SIZE is not"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "one"}, "LOCAL_RANK='one' is not an integer"),
    ({"RANK": "3", "WORLD_SIZE": "2"}, "RANK=3, WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
])
def test_half_a_launch_or_odd_rank_variables_are_one_line(launch_env, values: dict[str, str], message: str) -> None:
    # WORLD_SIZE without RANK trained in one process without a word; RANK=x was "invalid literal for int()";
    # RANK=3 of 2 waited for the rendezvous until it timed out with a traceback
    launch_env(**values)
    with pytest.raises(DistributedError, match=message) as e:
        distributed.setup("cpu", 5.0)
    assert "\n" not in str(e.value)


def test_a_rendezvous_that_fails_is_one_line_naming_the_address(launch_env) -> None:
    # rank 0 of 2 whose peer never comes: torch's DistStoreError traceback after the timeout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch_env(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with pytest.raises(DistributedError, match=f"rank 0 of 2: cannot join the process group at 127.0.0.1:{port}") as e:
        distributed.setup("cpu", 1.0)
    assert "\n" not in str(e.value)
    assert not torch.distributed.is_initialized()


def test_a_local_rank_beyond_the_gpus_is_one_line(launch_env, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.cuda.set_device(cuda:LOCAL_RANK) failed with CUDA's "invalid device ordinal" traceback; a device that
    # names one GPU put every process of the node on it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    launch_env(LOCAL_WORLD_SIZE="4")
    with pytest.raises(DistributedError, match="LOCAL_RANK=2, but this node has 2 CUDA device"):
        distributed._device_for("cuda", 2, launched=True)
    assert distributed._device_for("cuda", 1, launched=True) == torch.device("cuda", 1)
    with pytest.raises(DistributedError, match="device cuda:0 names one GPU for all 4 processes"):
        distributed._device_for("cuda:0", 1, launched=True)


def test_command_line_errors_are_said_by_one_process_per_node(train_data: Path, tmp_path: Path, launch_env,
                                                              capsys) -> None:
    # every process of a torchrun job parses the same command line: each printed the same error
    from qwenvl.cli import main

    argv = ["finetune", "--train_data", str(train_data), "--output_dir", str(tmp_path / "out"), "--preset", "tiny",
            "--warmup_steps", "-1"]
    launch_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1")
    assert main(argv) == 2
    assert "error" not in capsys.readouterr().err
    launch_env(RANK="0", LOCAL_RANK="0")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("qwenvl finetune: error:") == 1 and "warmup_steps" in err


def test_usage_errors_are_said_by_one_process_per_node(launch_env, capsys) -> None:
    # argparse's own errors (a flag without its value, a bad choice) were still printed by every process
    from qwenvl.cli import main

    for argv in (["finetune", "--config"], ["eval", "grounding", "--batch_size", "x"], ["nonsense"]):
        launch_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1")
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and capsys.readouterr().err == "", argv
        launch_env(RANK="0", LOCAL_RANK="0")
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("error:") == 1 and err.startswith("usage: qwenvl"), (argv, err)



def test_a_rank_stopped_by_torchrun_before_it_met_the_error_says_nothing(train_data: Path, tmp_path: Path,
                                                                         launch_env, capsys, monkeypatch) -> None:
    # every process meets a missing data file alike, and local rank 0 says it; torchrun stops the others (SIGTERM)
    # when it exits: one still reading the config (2 of 20 launches) printed "terminated (SIGTERM)" as well
    import os
    import signal
    import time

    from qwenvl.cli import main
    from qwenvl.train import cli as train_cli

    real = train_cli.config_from_args

    def terminated_while_reading_the_config(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's agent, at this point
        time.sleep(30)  # interrupted by the handler's Terminated
        return real(*args, **kwargs)

    monkeypatch.setattr(train_cli, "config_from_args", terminated_while_reading_the_config)
    argv = ["finetune", "--train_data", str(train_data), "--output_dir", str(tmp_path / "out"), "--preset", "tiny"]
    launch_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", TORCHELASTIC_RUN_ID="r")
    assert main(argv) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == ""
    # local rank 0 says a stop (of the whole job) as before, and so does every rank of a launcher other than
    # torchrun's agent, which does not stop the others
    launch_env(RANK="0", LOCAL_RANK="0")
    assert main(argv) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "terminated (SIGTERM)\n"
    launch_env(RANK="1", LOCAL_RANK="1")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert main(argv) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "terminated (SIGTERM)\n"

# ---- what one rank alone meets (the other ranks' view is simulated: gather returns what they said) ------------
def _rank(rank: int, said_by_others: dict[int, str | None], world: int = 2) -> DistEnv:
    """Rank ``rank`` of ``world`` whose collectives are answered with what the other ranks said."""
    env = DistEnv(rank, world, rank, torch.device("cpu"), mesh=object())
    env.gather = lambda obj: [obj if r == rank else said_by_others.get(r)  # type: ignore[method-assign]
                              for r in range(world)]
    return env


def _fails(error: Exception):
    def fn() -> None:
        raise error

    return fn


def test_an_error_one_rank_alone_meets_names_that_rank() -> None:
    # agree() re-raised the failing rank's error as it was: "error: /ckpt/model.safetensors is truncated", said by
    # one process of the job, with torchrun's summary often naming another rank as the first to fail
    truncated = CheckpointError("/ckpt/model.safetensors is truncated: 0 of 100 bytes read")
    with pytest.raises(CheckpointError, match=r"^rank 1 of 2: /ckpt/model.safetensors is truncated") as e:
        _rank(1, {0: None}).agree(_fails(truncated))
    assert e.value.__cause__ is truncated  # the original, with its traceback
    denied = PermissionError(13, "Permission denied", "/ckpt/x")
    with pytest.raises(PermissionError, match=r"^ranks 1, 2 of 4: \[Errno 13\] Permission denied: '/ckpt/x'"):
        _rank(1, {2: "PermissionError: [Errno 13] Permission denied: '/ckpt/x'"}, world=4).agree(_fails(denied))
    # the others stop without a word of their own (the CLI prints nothing for them), naming rank 1 and its cause
    with pytest.raises(ReportedByAnotherRank, match=r"rank 0 of 2: stopped because rank 1 failed \(CheckpointError: "
                                                    r"/ckpt/model.safetensors is truncated"):
        _rank(0, {1: "CheckpointError: /ckpt/model.safetensors is truncated: 0 of 100 bytes read"}).agree(lambda: 3)
    # what every rank meets alike is said once, as it is (no rank: it is not about one)
    line = "CheckpointError: no model.safetensors in /ckpt"
    with pytest.raises(CheckpointError, match=r"^no model.safetensors in /ckpt$"):
        _rank(0, {1: line}).agree(_fails(CheckpointError("no model.safetensors in /ckpt")))
    assert _rank(1, {0: None}).agree(lambda: 3) == 3


def test_an_error_that_cannot_carry_the_rank_is_a_distributed_error() -> None:
    undecodable = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")  # made from 5 arguments
    with pytest.raises(DistributedError, match=r"^rank 1 of 2: UnicodeDecodeError: 'utf-8' codec can't decode"):
        _rank(1, {0: None}).agree(_fails(undecodable))


def test_non_finite_rows_of_any_rank_are_one_error_said_by_rank_0() -> None:
    # every rank raised its own "holds NaN or infinite values ...": rank 1 with its finds, rank 0 with "found by
    # other ranks" and nothing else (which rank, which tensor)
    from qwenvl.train.load_sharded import _raise_if_non_finite

    found = [[], ["transformer.h.0.mlp.w1.weight (rows 32..64): 1 of 2048 values (1 NaN)"]]
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in 1 tensor shard\(s\) .*: rank 1: "
                                              r"transformer.h.0.mlp.w1.weight \(rows 32..64\)") as e:
        _raise_if_non_finite(_rank(0, {}), found, "/ckpt")
    assert "\n" not in str(e.value)
    with pytest.raises(ReportedByAnotherRank, match="rank 1 of 2: stopped because rank 0 failed"):
        _raise_if_non_finite(_rank(1, {}), found, "/ckpt")
    _raise_if_non_finite(_rank(1, {}), [[], []], "/ckpt")


def test_a_rank_that_fails_alone_leaves_word_for_the_others(launch_env) -> None:
    # a sample that fails to load on rank 1 mid-run (or its out of memory error) was said by rank 1 without its rank,
    # and rank 0, whose collective failed when rank 1 left, said "rank 0 of 2: lost the other ranks ... Connection
    # closed by peer" too: two lines, the only one with a rank naming the wrong one
    from qwenvl.data.dataset import DatasetError

    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    launch_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port))
    ranks = [_rank(0, {}), _rank(1, {})]
    with pytest.raises(DatasetError) as e:
        try:
            raise DatasetError("cannot read image a.png: Permission denied")
        finally:
            distributed.teardown(ranks[1])
    assert distributed.failed_on(e.value) == "rank 1 of 2" and not distributed.said_by_another_rank(e.value)
    with pytest.raises(ReportedByAnotherRank, match=r"^rank 0 of 2: stopped because rank 1 failed \(DatasetError: "
                                                    r"cannot read image a.png: Permission denied\)$"):
        raise ranks[0].lost(RuntimeError("Connection closed by peer"))
    # a collective that raises rank 1's failure on every rank (DCP's save): the ranks that leave word later are quiet
    with pytest.raises(DatasetError) as e:
        try:
            raise DatasetError("cannot read image a.png: Permission denied")
        finally:
            distributed.teardown(ranks[0])
    assert distributed.said_by_another_rank(e.value) and distributed.failed_on(e.value) is None


def test_an_error_every_rank_meets_alike_is_said_by_the_first_naming_no_rank(launch_env) -> None:
    # a step whose global gradient norm is not finite stops every rank alike: the rank that left word first said it
    # as "rank 1 of 2: step 3: ...", as if rank 1 alone had met it (which rank was first is a race)
    from qwenvl.train.trainer import TrainingDivergedError

    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    launch_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port))
    for rank, quiet in ((1, False), (0, True)):
        with pytest.raises(TrainingDivergedError) as e:
            try:
                raise distributed.met_by_every_rank(TrainingDivergedError("step 3: the loss is not finite"))
            finally:
                distributed.teardown(_rank(rank, {}))
        assert distributed.failed_on(e.value) is None and distributed.said_by_another_rank(e.value) is quiet, rank
