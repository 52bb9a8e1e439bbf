"""A demo rerun into an earlier demo's folder that is stopped half-way (Ctrl-C, a crash) leaves no report of the
earlier run next to the data and model it was replacing."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwenvl.demo import run as demo_run
from qwenvl.outputs import MARKER_FILE, claim_output, record_files


def test_a_rerun_stopped_half_way_leaves_no_report_of_the_earlier_run(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "demo_out"
    with claim_output(out, "demo"):  # an earlier, finished demo (its files as the demo records them)
        (out / "report.md").write_text("Acc@0.5 0% -> 52%")
        (out / "metrics.json").write_text("{}")
        (out / "model").mkdir()
        (out / "data" / "images").mkdir(parents=True)
        (out / "data" / "train.json").write_text("[]")
        record_files(out, ["report.md", "metrics.json", "model", "data"], command="demo")
    (out / "notes.txt").write_text("mine")  # the user's own file there

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C while the new run rebuilds data/ (then model/)

    monkeypatch.setattr(demo_run, "make_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo_run.run_demo(out, steps=1)
    assert sorted(p.name for p in out.iterdir()) == [MARKER_FILE, "data", "model", "notes.txt"]
    assert [p.name for p in (out / "data").iterdir()] == ["images"]  # no train.json naming half-rewritten images


def test_a_report_the_demo_did_not_write_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "report.md").write_text("the user's report")  # a folder of the user's, used with overwrite
    monkeypatch.setattr(demo_run, "make_dataset", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        demo_run.run_demo(tmp_path, steps=1, overwrite=True)
    assert (tmp_path / "report.md").read_text() == "the user's report"


def test_the_terminal_closing_while_the_demo_saves_its_model_stops_it_after_the_save(tmp_path: Path) -> None:
    # SIGHUP to the process group (the terminal closed) while the trained model's files are being moved into
    # model/: it was killed on the spot (model/ without config.json, the lock left); now the model is saved
    # whole, then the demo stops as for SIGTERM (status 129) without writing a report
    import os
    import signal
    import subprocess
    import sys

    script = ("import sys\n"
              "from qwenvl import outputs\n"
              "real = outputs.fault_point\n"
              "def paused(name):\n"
              "    if name == 'publish.moving':\n"
              "        print('paused', flush=True)\n"
              "        sys.stdin.readline()\n"
              "    real(name)\n"
              "outputs.fault_point = paused\n"
              "from qwenvl.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "demo_out"
    argv = [sys.executable, "-c", script, "demo", "--steps", "2", "--output_dir", str(out), "--threads", "1"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline() == "paused\n"
    os.killpg(proc.pid, signal.SIGHUP)
    _, err = proc.communicate("go\n", timeout=600)
    assert proc.returncode == 128 + signal.SIGHUP, err[-3000:]
    assert err.strip().splitlines()[-1] == "terminated (SIGHUP)" and "Traceback" not in err
    assert (out / "model" / "config.json").is_file() and (out / "model" / "model.safetensors").is_file()
    assert not (out / "report.md").exists() and not (out / ".qwenvl-lock").exists()
