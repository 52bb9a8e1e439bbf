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
