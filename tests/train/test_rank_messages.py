"""One line, said once: a sample that breaks in a DataLoader worker, odd torchrun variables, a rendezvous that
fails, a LOCAL_RANK beyond the node's GPUs, and the command-line errors every process of a node meets alike.
(The 2-process runs that check "once per job" are in test_distributed.py.)"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from qwenvl.train import distributed, train
from qwenvl.train.distributed import DistributedError

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
