"""Training checkpoints written with ``torch.distributed.checkpoint`` (DCP): every rank writes its own shards.

A folder ``output_dir/checkpoint-STEP/`` holds::

    .metadata, __R_0.distcp    DCP: the model (all parameters; LoRA runs: the trained ones) and AdamW's state,
                               by official parameter name, each rank's rows written by that rank
    trainer_state.pt           scheduler, progress, data order, world size and global batch (rank 0)
    trainer_state.json         the same, readable (no tensors)
    rng-R.pt                   RNG states of rank R
    config.json                the model config (``qwenvl convert`` needs it)
    adapter/                   LoRA runs: the adapter in peft's format, gathered (small)

The folder is built in a hidden staging folder that rank 0 creates and renames into place once every rank
has written its part, so a ``checkpoint-STEP`` folder is always complete. DCP reshards on load, so a
checkpoint saved by N ranks resumes on M ranks (or on one process without a process group), and
:func:`consolidate` turns one into the official layout on a single process.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..checkpoint import CheckpointError, save_pretrained
from ..config import QwenVLConfig
from ..fileio import atomic_dir, fault_point
from ..outputs import record_files
from .distributed import DistEnv
from .state import STATE_FILE, STATE_JSON, read_state, rng_state, set_rng_state

__all__ = ["consolidate", "is_sharded_checkpoint", "load_checkpoint", "save_checkpoint"]

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


def is_sharded_checkpoint(path: str | Path) -> bool:
    return (Path(path) / ".metadata").is_file()


def _options(trained_only: bool) -> StateDictOptions:
    # trained_only: the frozen parameters are neither saved nor expected back (they come from the base model)
    return StateDictOptions(ignore_frozen_params=trained_only, strict=not trained_only)


@contextlib.contextmanager
def _shared_staging(path: Path, env: DistEnv) -> Iterator[Path]:
    """A staging folder every rank writes into; rank 0 renames it to ``path`` after all ranks are done."""
    if env.is_main:
        with atomic_dir(path) as tmp:
            env.broadcast(str(tmp))
            yield tmp
            env.barrier()  # every rank has written its part
    else:
        tmp = Path(env.broadcast(None))
        yield tmp
        env.barrier()
    env.barrier()  # renamed: nobody looks for it (or prunes) too early


def save_checkpoint(
    path: Path,
    env: DistEnv,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    readable: dict[str, Any],
    config: QwenVLConfig,
    trained_only: bool = False,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``path`` (module docstring). ``trained_only``: leave frozen parameters out (LoRA). ``write_extra(folder)``
    runs on every rank (it may gather) after the shards are written."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(trained_only))
    with _shared_staging(path, env) as tmp:
        torch.save(rng_state(), tmp / f"rng-{env.rank}.pt")
        # collective: when it returns every rank's shards (and its RNG file, written before) are on disk
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, no_dist=not env.distributed)
        fault_point("checkpoint.model_written")
        if write_extra is not None:
            write_extra(tmp)
        if env.is_main:
            config.save_pretrained(tmp)
            torch.save(trainer_state, tmp / STATE_FILE)
            (tmp / STATE_JSON).write_text(json.dumps(readable, indent=1) + "\n", encoding="utf-8")
            record_files(tmp, [p.name for p in tmp.iterdir()], command="finetune")
    return path


def load_checkpoint(
    path: Path, env: DistEnv, model: nn.Module, optimizer: torch.optim.Optimizer, trained_only: bool = False,
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore model, optimizer and (same world size) this rank's RNG states from ``path``; return the trainer
    state (what :func:`save_checkpoint` got as ``trainer_state``; ``state``: it, already read)."""
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a sharded training checkpoint (no DCP .metadata)")
    state = read_state(path) if state is None else state
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(trained_only))
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path, no_dist=not env.distributed)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=_options(trained_only))
    rng = path / f"rng-{env.rank}.pt"
    if state.get("world_size") == env.world_size and rng.is_file():
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=True))
    else:
        logger.warning("%s was saved by %s rank(s), this run has %d: random streams (dropout) restart from the seed",
                       path, state.get("world_size"), env.world_size)
    return state


def consolidate(
    ckpt_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None, max_shard_size: int | str = "5GB"
) -> Path:
    """Write the model of a sharded training checkpoint in the official layout (one process, no process group).

    The output equals, byte for byte, what ``save_pretrained`` writes for the same weights in one process.
    Host memory: the whole model once, in the stored dtype.
    """
    src = Path(ckpt_dir)
    if not is_sharded_checkpoint(src):
        raise CheckpointError(f"{src} is not a sharded training checkpoint (no DCP .metadata)")
    if (src / ADAPTER_DIR).is_dir():
        raise CheckpointError(f"{src} is a LoRA checkpoint (it holds the adapter, not the model): merge it with "
                              f"`qwenvl convert --merge_lora --load_checkpoint BASE --adapter {src / ADAPTER_DIR} OUT`")
    from ..model import QwenVL

    config = QwenVLConfig.from_pretrained(src)
    stored = dcp.FileSystemReader(str(src)).read_metadata().state_dict_metadata
    names = list(QwenVL.on_meta(config).state_dict())
    missing = [n for n in names if f"model.{n}" not in stored]
    if missing:
        raise CheckpointError(f"{src} lacks {len(missing)} model tensor(s), e.g. {missing[:3]}")
    state = {n: torch.empty(stored[f"model.{n}"].size, dtype=stored[f"model.{n}"].properties.dtype) for n in names}
    dcp.load({"model": state}, checkpoint_id=src, no_dist=True)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    out = save_pretrained(state, config, out_dir, max_shard_size=max_shard_size)
    logger.info("consolidated %s -> %s", src, out)
    return out
