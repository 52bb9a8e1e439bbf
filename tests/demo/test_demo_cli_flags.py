"""``qwenvl demo`` flags with bad values: a one-line error naming the flag, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwenvl.cli import main


@pytest.mark.parametrize(("flags", "error"), [
    (["--seed", str(2**64)], f"--seed must be an integer in [-2**63, 2**63), got {2**64}"),
    (["--colors", ","], "--colors names no colour"),
    (["--colors", "red"], "--colors needs at least 2 colours (each shape of a picture has its own), got 1: red"),
    (["--colors", "red,red"], "colours must differ (each shape of a picture has its own), got red twice"),
])
def test_bad_flag_values_are_named_before_anything_is_written(flags, error, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo_out"
    assert main(["demo", "--steps", "1", "--output_dir", str(out), *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"qwenvl demo: error: {error}"
    assert not out.exists()
