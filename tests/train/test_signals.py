"""Stop signals (Ctrl-C, SIGTERM, SIGHUP) and saves: :func:`qwenvl.fileio.signals_held` holds them while a
save runs and then acts on them as they would have been acted on; the CLI's SIGHUP keeps its name through DCP.

The whole runs (a signal from another process in the middle of a checkpoint, then resuming) are in
``test_fault_injection.py``; the terminal closing in ``tests/test_cli.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as dcp_fs

from qwenvl.cli import Terminated
from qwenvl.fileio import signals_held
from qwenvl.train import sharded_checkpoint


def test_ctrl_c_during_a_save_is_acted_on_when_the_save_ends(caplog) -> None:
    before = signal.getsignal(signal.SIGINT)
    done = []
    with pytest.raises(KeyboardInterrupt), caplog.at_level("WARNING"), signals_held("checkpoint-7"):
        os.kill(os.getpid(), signal.SIGINT)  # delivered before kill returns: held
        done.append("the rest of the save")
        with signals_held("its adapter"):  # a save inside a save: the outer one acts
            os.kill(os.getpid(), signal.SIGINT)
        done.append("after the inner save")
    assert done == ["the rest of the save", "after the inner save"]
    assert signal.getsignal(signal.SIGINT) is before
    assert [r.getMessage() for r in caplog.records] == [
        "SIGINT came while its adapter was being saved: acted on now that the save has ended",
        "SIGINT came while checkpoint-7 was being saved: acted on now that the save has ended"]


def test_a_signal_ignored_before_stays_ignored() -> None:
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with signals_held("checkpoint-1"):
            os.kill(os.getpid(), signal.SIGHUP)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_outside_the_main_thread_the_block_runs_as_it_is() -> None:
    errors: list[BaseException] = []

    def save() -> None:
        try:
            with signals_held("checkpoint-1"):  # signal.signal would raise ValueError here
                pass
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=save)
    t.start()
    t.join()
    assert errors == []


def test_with_the_default_action_the_process_ends_by_the_signal_after_the_save() -> None:
    # a library user's process (no handler of ours): SIGTERM still ends it, only once the save is complete
    script = ("import os, signal\n"
              "from qwenvl.fileio import signals_held\n"
              "with signals_held('checkpoint-1'):\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    print('saved', flush=True)\n"
              "print('went on', flush=True)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGTERM, run.stderr
    assert run.stdout == "saved\n"


def test_sighup_inside_dcp_load_stays_sighup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # DCP wraps what its reader raised: the interrupt is raised again as it came (it was re-created as a plain
    # Terminated, which the CLI reported as "terminated (SIGTERM)", status 143, for a closed terminal)
    with sharded_checkpoint._one_process_quiet(True):
        dcp.save({"model": {"w": torch.zeros(2)}}, checkpoint_id=tmp_path, no_dist=True)

    def hangs_up(*args: object, **kwargs: object) -> None:
        raise Terminated(signal.SIGHUP)

    monkeypatch.setattr(dcp_fs.FileSystemReader, "read_data", hangs_up)
    with pytest.raises(Terminated) as raised:
        sharded_checkpoint._load({"model": {"w": torch.empty(2)}}, tmp_path, no_dist=True)
    assert raised.value.signum == signal.SIGHUP
