"""What a resumed run needs to continue exactly: data order, RNG states, and the checkpoint folders.

A checkpoint folder ``output_dir/checkpoint-STEP/`` holds the model (the official layout, or ``adapter/``
for LoRA runs) plus ``trainer_state.pt`` (optimizer, scheduler, step, data position, RNG states; loaded
with ``weights_only=True``) and ``trainer_state.json`` (the same in readable form, without tensors).
Folders are built in a temporary sibling and renamed into place, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fileio import atomic_dir

__all__ = [
    "STATE_FILE",
    "BatchOrder",
    "Progress",
    "checkpoint_dirs",
    "latest_checkpoint",
    "load_state",
    "prune_checkpoints",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


# ---- data order ------------------------------------------------------------------------------------------
class BatchOrder:
    """An endless stream of micro-batches of sample indices: each epoch is a fresh seeded permutation.

    The permutation of epoch ``e`` depends only on ``seed + e``, so the position ``(epoch, batch)`` is all a
    checkpoint must store to replay the same order. The last micro-batch of an epoch may be smaller.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError("no samples to train on")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.batch = 0  # micro-batches already taken from this epoch
        self._perm: list[int] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def _permutation(self) -> list[int]:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm = torch.randperm(self.num_samples, generator=g).tolist()
        return self._perm

    def next(self) -> list[int]:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch, self._perm = self.epoch + 1, 0, None
        start = self.batch * self.batch_size
        self.batch += 1
        return self._permutation()[start : start + self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "num_samples": self.num_samples,
                "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("num_samples", "batch_size", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: the checkpoint was trained with {key}={state[key]}, this run has "
                    f"{getattr(self, key)}; the data order would differ (use the same data and settings)"
                )
        self.epoch, self.batch, self._perm = state["epoch"], state["batch"], None


# ---- RNG ---------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy and torch (CPU and CUDA), as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---- progress ----------------------------------------------------------------------------------------------
@dataclass
class Progress:
    """Where the run is and what it measured so far (all of it goes into the checkpoint)."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    num_tokens: int = 0  # non-pad input tokens
    num_loss_tokens: int = 0
    train_seconds: float = 0.0


# ---- checkpoint folders ------------------------------------------------------------------------------------
def checkpoint_dirs(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete ``checkpoint-STEP`` folders of ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1][1] if dirs else None


def save_checkpoint(
    path: Path,
    write_model: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    order: BatchOrder,
    progress: Progress,
    config: dict[str, Any],
) -> Path:
    """Write a resumable checkpoint folder atomically: ``write_model(folder)`` then the trainer state."""
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "data": order.state_dict(),
        "rng": rng_state(),
        "progress": asdict(progress),
    }
    readable = {"step": progress.step, "data": order.state_dict(), "progress": asdict(progress), "config": config}
    with atomic_dir(path) as tmp:
        write_model(tmp)
        torch.save(state, tmp / STATE_FILE)
        (tmp / STATE_JSON).write_text(json.dumps(readable, indent=1) + "\n", encoding="utf-8")
    return path


def load_state(
    path: Path,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    order: BatchOrder,
) -> Progress:
    """Restore optimizer, scheduler, data position and RNG states from a checkpoint folder."""
    file = path / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint: no {STATE_FILE}")
    state = torch.load(file, map_location="cpu", weights_only=True)
    order.load_state_dict(state["data"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return Progress(**state["progress"])


def prune_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoint folders (``keep`` 0: keep all); return the deleted ones."""
    dirs = checkpoint_dirs(output_dir)
    if keep <= 0 or len(dirs) <= keep:
        return []
    doomed = [p for _step, p in dirs[:-keep]]
    for p in doomed:
        shutil.rmtree(p)
        logger.info("deleted old checkpoint %s (save_total_limit=%d)", p, keep)
    return doomed
