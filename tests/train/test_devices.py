"""The device of a single-process run: an explicit ``cuda:N`` is made the current CUDA device."""

from __future__ import annotations

import pytest
import torch

from qwenvl.train import distributed

_LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_a_single_process_on_cuda_n_makes_it_the_current_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """One process on cuda:1 never called torch.cuda.set_device: the DataLoader's pin-memory thread pins on the
    current device, so it opened a CUDA context (a few hundred MB) on GPU 0, as did all else that uses the current
    device. A CPU run leaves CUDA alone."""
    for name in _LAUNCH:  # not launched by torchrun
        monkeypatch.delenv(name, raising=False)
    made: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: made.append(torch.device(device)))
    env = distributed.setup("cuda:1", 5.0)
    assert env.device == torch.device("cuda", 1) and not env.distributed
    assert made == [torch.device("cuda", 1)]
    assert distributed.setup("cpu", 5.0).device == torch.device("cpu")
    assert made == [torch.device("cuda", 1)]
