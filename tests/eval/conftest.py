from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    """A folder of two pictures, a.png (200x100, white) and b.png (100x100, gray), for evaluation data to name."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (200, 100), "white").save(folder / "a.png")
    Image.new("RGB", (100, 100), "gray").save(folder / "b.png")
    return folder
