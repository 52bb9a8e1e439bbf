"""What a resumed run needs to continue exactly: data order, RNG states, and the checkpoint folders.

A checkpoint folder ``output_dir/checkpoint-STEP/`` (written by :mod:`qwenvl.train.sharded_checkpoint`: the
weights and optimizer state sharded with ``torch.distributed.checkpoint``) is complete when it holds
``trainer_state.pt`` (scheduler, step, data order, world size and global batch, the run's settings; loaded
with ``weights_only=True``), beside ``trainer_state.json`` (the same in readable form) and our output marker
(``qwenvl.outputs``). Folders are built in a temporary sibling and renamed into place, so a crash never leaves
a half-written one; pruning renames a folder to a hidden trash name before deleting it, so a crash never
leaves a half-deleted one under its real name (the next run in the folder deletes the trash). Only folders
holding our marker are pruned. A stop signal (Ctrl-C, SIGTERM, SIGHUP) that comes while a save runs waits for
it to end (:func:`qwenvl.fileio.signals_held`).
"""

from __future__ import annotations

import logging
import pickle
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ..checkpoint import weights_only_reason
from ..fileio import error_line, parse_json, remove_tree
from ..outputs import is_ours

__all__ = [
    "STATE_FILE",
    "STATE_JSON",
    "BatchOrder",
    "RESUME_KEYS",
    "TrainStateError",
    "check_resume_settings",
    "Progress",
    "checkpoint_dirs",
    "latest_checkpoint",
    "load_weights_only",
    "prune_checkpoints",
    "read_state",
    "rng_state",
    "saved_config",
    "set_rng_state",
]

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def is_checkpoint_name(name: str) -> bool:
    """Whether ``name`` is one a run gives its checkpoint folders (``checkpoint-STEP``)."""
    return _CKPT_RE.match(name) is not None


class TrainStateError(ValueError):
    """A checkpoint's trainer state cannot be read or does not fit this run."""


# ---- data order ------------------------------------------------------------------------------------------
class BatchOrder:
    """Which samples each optimizer step trains on: seeded epoch permutations back to back, cut into global batches.

    Step ``s`` takes positions ``[s * G, (s + 1) * G)`` of the stream (``G`` = global batch = micro-batch size x
    accumulation steps x world size), the permutation of epoch ``e`` depending only on ``seed + e``: the samples
    of a step depend on the seed and ``G`` alone, so runs on N and on M ranks with the same ``G`` train on the
    same samples, and the step number is all a checkpoint needs to replay the order. A step that crosses the
    end of an epoch takes the rest of it and the start of the next, so every step is full and every rank gets
    the same number of samples. Rank ``r`` trains on the ``r``-th of ``world`` equal slices of a step's samples,
    in micro-batches of ``batch_size``.
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError("no samples to train on")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perms[epoch] = torch.randperm(self.num_samples, generator=g).tolist()
        return self._perms[epoch]

    def step_samples(self, step: int) -> list[int]:
        """The ``global_batch`` sample indices of 0-based optimizer step ``step``."""
        out: list[int] = []
        pos = step * self.global_batch
        while len(out) < self.global_batch:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(self.global_batch - len(out), self.num_samples - offset)
            out += self._permutation(epoch)[offset : offset + take]
            pos += take
        return out

    def micro_batches(self, step: int, rank: int, world_size: int, batch_size: int) -> list[list[int]]:
        """Rank ``rank``'s micro-batches of step ``step``."""
        per_rank = self.global_batch // world_size
        mine = self.step_samples(step)[rank * per_rank : (rank + 1) * per_rank]
        return [mine[i : i + batch_size] for i in range(0, per_rank, batch_size)]

    def state_dict(self) -> dict[str, int]:
        return {"num_samples": self.num_samples, "global_batch": self.global_batch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Check that a checkpoint's order is this one (the position is the step count)."""
        for key in ("num_samples", "global_batch", "seed"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"cannot resume: the checkpoint was trained with {key}={state.get(key)}, this run has "
                    f"{getattr(self, key)}; the data order would differ (use the same data, seed and global batch "
                    "= batch_size x gradient_accumulation_steps x world size)"
                )


# ---- RNG ---------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy and torch (CPU and CUDA), as tensors and plain values."""
    # the legacy tuple: numpy's global generator is MT19937 (a dict only if someone swapped its bit generator)
    legacy = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    kind, keys, pos, has_gauss, gauss = legacy
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


def load_weights_only(file: Path, error: type[ValueError]) -> Any:
    """``torch.load(file, weights_only=True)`` of a file a run wrote (trainer state, RNG states). A pickle naming a
    global that weights_only does not allow (code: a crafted or foreign file) raises ``error`` refusing it, as a
    ``.bin`` checkpoint is refused (:func:`qwenvl.checkpoint.load_state_dict`); an opcode weights_only does not read
    (damaged bytes, another pickle protocol) raises ``pickle.UnpicklingError`` with that reason alone, like other
    errors of a damaged file. Neither passes on torch's message, which advises loading it with weights_only=False."""
    with warnings.catch_warnings():  # torch warns (two lines) about a pickle protocol it then refuses
        warnings.simplefilter("ignore", UserWarning)
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "weights only" not in error_line(e).lower():
                raise
            reason = weights_only_reason(e)
            if "global" not in reason.lower():
                raise pickle.UnpicklingError(reason) from None
            raise error(f"refusing to load {file}: it is not a plain tensor file, weights_only=True rejected it "
                        f"(it may reference code): {reason}") from None


def read_state(path: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint folder; a missing, truncated or corrupt file is a one-line
    :class:`TrainStateError` (``FileNotFoundError`` when there is none)."""
    file = path / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint: no {STATE_FILE}")
    try:
        state = load_weights_only(file, TrainStateError)
    except TrainStateError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes the unpickler raise (IndexError, ...)
        raise TrainStateError(f"{file}: corrupt or unreadable trainer state ({type(e).__name__}: {error_line(e)}); "
                              "resume from another checkpoint (--resume_training DIR) or delete this one") from None
    if not isinstance(state, dict) or not {"scheduler", "data", "progress", "world_size"} <= set(state):
        raise TrainStateError(f"{file}: not a trainer state (missing keys); resume from another checkpoint")
    return state


def saved_config(path: Path, state: dict[str, Any]) -> dict[str, Any] | None:
    """The run settings a checkpoint was written with (older checkpoints: from trainer_state.json)."""
    config = state.get("config")
    if isinstance(config, dict):
        return config
    try:
        readable = parse_json((path / STATE_JSON).read_text(encoding="utf-8"), path / STATE_JSON, ValueError)
    except (OSError, ValueError):
        return None
    config = readable.get("config") if isinstance(readable, dict) else None
    return config if isinstance(config, dict) else None


def prune_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` of our checkpoint folders (``keep`` 0: keep all); return the deleted
    ones. Each is renamed to a hidden trash name first (see the module docstring)."""
    dirs = [(step, p) for step, p in checkpoint_dirs(output_dir) if is_ours(p)]
    if keep <= 0 or len(dirs) <= keep:
        return []
    doomed = [p for _step, p in dirs[:-keep]]
    for p in doomed:
        remove_tree(p)
        logger.info("deleted old checkpoint %s (save_total_limit=%d)", p, keep)
    return doomed


# ---- resuming with other settings ----------------------------------------------------------------------------
# Settings that shape the optimization: a resumed run with other values would continue a different schedule
# (or optimizer) from a state made under the old one, while the checkpoint records the new values. The global
# batch (batch_size x gradient_accumulation_steps x world size) counts, not how it is split: a checkpoint of
# 2 ranks x batch 2 resumes on 1 rank x batch 4 (see BatchOrder).
RESUME_KEYS = (
    "learning_rate", "min_lr", "warmup_steps", "max_steps", "num_epochs", "global_batch_size", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "max_grad_norm",
    "vision_lr_scale", "resampler_lr_scale", "seed", "freeze_vision", "freeze_resampler", "freeze_llm",
    "freeze_embedding", "use_lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target", "lora_train_resampler",
)


def check_resume_settings(path: Path, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse to resume from ``path`` when a :data:`RESUME_KEYS` setting differs from the checkpoint's, naming
    each one (``num_epochs`` counts only when ``max_steps`` is 0 in both)."""
    if saved is None:
        logger.warning("%s records no run settings (an older checkpoint): cannot check that they match", path)
        return
    changed = []
    for key in RESUME_KEYS:
        if key not in saved or key not in current:
            continue
        if key == "num_epochs" and (saved.get("max_steps") or current.get("max_steps")):
            continue
        if saved[key] != current[key]:
            changed.append(f"{key} {saved[key]!r} -> {current[key]!r}")
    if changed:
        raise TrainStateError(
            f"cannot resume from {path}: {', '.join(changed)} differ from the checkpoint's settings (a resumed run "
            "must continue the same schedule); use the checkpoint's values, or start a new run in a new output_dir"
        )
