"""``mypy src/qwenvl`` finds no error: the package's annotations (it ships ``py.typed``) hold.

Here so that the README's one test command, and CI with it, type-checks the package too. mypy runs cold, with
its cache under the test's own tmp_path (~1 min on 2 cores, ~1.7 GB of memory): no cache in the repo is read.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_finds_no_error(tmp_path: Path) -> None:
    assert importlib.util.find_spec("mypy") is not None, \
        "mypy is not installed: it is in the dev extra (pip install -e \".[dev]\")"
    run = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy_cache"), "src/qwenvl"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, f"mypy src/qwenvl (exit {run.returncode}):\n{run.stdout}{run.stderr}"
