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
import os
import pickle
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..checkpoint import CheckpointError, check_cast, check_finite, save_pretrained
from ..config import QwenVLConfig
from ..fileio import atomic_dir, error_line, fault_point, signals_held, write_error
from ..outputs import record_files
from .distributed import RANK_LOGGER, DistEnv
from .state import STATE_FILE, STATE_JSON, load_weights_only, read_state, rng_state, set_rng_state

__all__ = ["consolidate", "is_sharded_checkpoint", "load_checkpoint", "save_checkpoint"]

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"

# What DCP's .metadata pickle may name: its own metadata classes and the values they hold, nothing callable else
_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    *((m, n) for m in ("pathlib", "pathlib._local") for n in ("PosixPath", "WindowsPath", "PurePosixPath",
                                                               "PureWindowsPath")),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                    torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not checkpoint metadata (refused: "
                                     "unpickling it could run code)")


class _SafeReader(dcp.FileSystemReader):
    """DCP's reader, except that ``.metadata`` (a pickle, which DCP itself reads with ``pickle.load``: a crafted
    file would run code) is unpickled with only DCP's metadata classes allowed."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        rank = kwargs.get("rank")
        get_path = getattr(self, "_get_metadata_path", None)
        path = get_path(rank) if get_path is not None else os.path.join(self.path, ".metadata")
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, dcp.metadata.Metadata):
            raise pickle.UnpicklingError(f"it holds a {type(metadata).__name__}, not DCP metadata")
        storage_meta = getattr(metadata, "storage_meta", None)
        if storage_meta is None:
            storage_meta = metadata.storage_meta = dcp.metadata.StorageMeta()
        storage_meta.load_id = self.load_id
        return metadata


def _reason(e: BaseException) -> str:
    """``Type: first line`` of an error (DCP wraps each rank's in a CheckpointException)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        e = next(iter(failures.values()))[0]
    return f"{type(e).__name__}: {error_line(e)}" if str(e).strip() else type(e).__name__


def _interrupted(e: BaseException) -> KeyboardInterrupt | None:
    """The interrupt (Ctrl-C, or SIGTERM and SIGHUP as the CLI raises them) that caused ``e``, if one did: DCP wraps
    what each rank raised, KeyboardInterrupt included, and torch.save hit by one fails on its way out with an error
    of its own. Returned as raised (the CLI's names its signal), without the traceback through DCP."""
    failures = getattr(e, "failures", None)
    for cause in [f[0] for f in failures.values()] if isinstance(failures, dict) else [e]:
        while cause is not None:
            if isinstance(cause, KeyboardInterrupt):
                return cause.with_traceback(None)
            cause = cause.__cause__ or cause.__context__
    return None


# what reading a damaged checkpoint raises (CheckpointException is a BaseException: DCP's wrapper of the above)
_READ_ERRORS = (OSError, EOFError, ValueError, RuntimeError, KeyError, IndexError, AssertionError, pickle.UnpicklingError,
                AttributeError, TypeError, dcp.api.CheckpointException)


def _read_metadata(path: Path) -> Any:
    """The DCP metadata of ``path``, read safely; a missing, corrupt or foreign file is a one-line CheckpointError."""
    try:
        return _SafeReader(str(path)).read_metadata()
    except _READ_ERRORS as e:
        raise CheckpointError(f"cannot read {path / '.metadata'}: {_reason(e)} (truncated or corrupt file?)") from None


@contextlib.contextmanager
def _one_process_quiet(no_dist: bool) -> Iterator[None]:
    """DCP in one process (``no_dist``) still warns, at every save and load, that it assumes one process."""
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _load(state: dict[str, Any], path: Path, no_dist: bool) -> None:
    """``dcp.load`` with the safe reader; a damaged or missing shard is a one-line CheckpointError."""
    _read_metadata(path)  # first: DCP would log each failed read with its traceback
    try:
        with _one_process_quiet(no_dist):
            dcp.load(state, storage_reader=_SafeReader(str(path)), no_dist=no_dist)
    except _READ_ERRORS as e:
        interrupt = _interrupted(e)
        if interrupt is not None:
            raise interrupt from None
        raise CheckpointError(f"cannot read the training checkpoint {path}: {_reason(e)} "
                              "(truncated or corrupt file?)") from None


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
    write_extra: Callable[[Path], object] | None = None,
) -> Path:
    """Write ``path`` (module docstring). ``trained_only``: leave frozen parameters out (LoRA). ``write_extra(folder)``
    runs on every rank (it may gather) after the shards are written. Ctrl-C, SIGTERM and SIGHUP wait until the
    folder is in place (:func:`~qwenvl.fileio.signals_held`)."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(trained_only))
    with signals_held(path.name), _shared_staging(path, env) as tmp:
        try:  # a rank that cannot write there (a read-only mount, a folder only rank 0's node has): one line
            torch.save(rng_state(), tmp / f"rng-{env.rank}.pt")
        except (OSError, RuntimeError) as e:
            raise write_error(e, path, tmp) or CheckpointError(
                f"cannot write the training checkpoint {path}: {_reason(e)}") from None
        # collective: when it returns every rank's shards (and its RNG file, written before) are on disk
        try:
            with _one_process_quiet(not env.distributed):
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, no_dist=not env.distributed)
        except dcp.api.CheckpointException as e:
            interrupt = _interrupted(e)
            if interrupt is not None:  # Ctrl-C: the staging folder goes, the run ends as interrupted
                raise interrupt from None
            # a full disk, say: one line naming the checkpoint (the staging folder goes)
            raise write_error(e, path, tmp) or CheckpointError(
                f"cannot write the training checkpoint {path}: {_reason(e)}") from None
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
    _load({"model": model_sd, "optim": optim_sd}, path, no_dist=not env.distributed)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=_options(trained_only))
    rng = path / f"rng-{env.rank}.pt"
    if state.get("world_size") == env.world_size and rng.is_file():
        try:
            set_rng_state(load_weights_only(rng, CheckpointError))  # a dict of other keys or values: a KeyError, ...
        except CheckpointError:
            raise
        except _READ_ERRORS as e:
            raise CheckpointError(f"cannot read {rng}: {_reason(e)} (truncated or corrupt file?)") from None
    elif state.get("world_size") == env.world_size:
        logging.getLogger(RANK_LOGGER).warning("%s has no %s (deleted?): random streams (dropout) restart from the "
                                               "seed", path, rng.name)
    else:
        logger.warning("%s was saved by %s rank(s), this run has %d: random streams (dropout) restart from the seed",
                       path, state.get("world_size"), env.world_size)
    return state


def consolidate(
    ckpt_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None, max_shard_size: int | str = "5GB"
) -> Path:
    """Write the model of a sharded training checkpoint in the official layout (one process, no process group).

    The output equals, byte for byte, what ``save_pretrained`` writes for the same weights in one process.
    Host memory: the whole model once, in the stored dtype. NaN or infinite weights (a run that diverged), and
    a ``dtype`` that cannot hold them (float16 beyond 65504), raise :class:`CheckpointError` before anything is
    written: the folder would not load.
    """
    src = Path(ckpt_dir)
    if not is_sharded_checkpoint(src):
        raise CheckpointError(f"{src} is not a sharded training checkpoint (no DCP .metadata)")
    if (src / ADAPTER_DIR).is_dir():
        raise CheckpointError(f"{src} is a LoRA checkpoint (it holds the adapter, not the model): merge it with "
                              f"`qwenvl convert --merge_lora --load_checkpoint BASE --adapter {src / ADAPTER_DIR} --output_dir OUT`")
    from ..model import QwenVL

    config = QwenVLConfig.from_pretrained(src)
    stored = _read_metadata(src).state_dict_metadata
    expected = QwenVL.on_meta(config).state_dict()
    names = list(expected)
    missing = [n for n in names if f"model.{n}" not in stored]
    if missing:
        raise CheckpointError(f"{src} lacks {len(missing)} model tensor(s), e.g. {missing[:3]}")
    extra = [k.removeprefix("model.") for k in stored if k.startswith("model.") and k.removeprefix("model.") not in expected]
    mismatched = [f"{n} {list(stored[f'model.{n}'].size)} (config.json: {list(expected[n].shape)})" for n in names
                  if getattr(stored[f"model.{n}"], "size", None) != expected[n].shape]
    problems = ([f"{len(extra)} tensor(s) it does not describe, e.g. {', '.join(extra[:3])}"] if extra else []) + \
        ([f"{len(mismatched)} of another shape, e.g. {', '.join(mismatched[:3])}"] if mismatched else [])
    if problems:  # written anyway, the output would silently lack them or not load
        raise CheckpointError(f"{src} does not match its config.json: {'; '.join(problems)}")
    state = {n: torch.empty(stored[f"model.{n}"].size, dtype=stored[f"model.{n}"].properties.dtype) for n in names}
    _load({"model": state}, src, no_dist=True)
    for n, t in state.items():  # written anyway, the folder would not load (NaN, or float16's overflow to inf)
        check_finite(f"{src}: {n}", t)
        if dtype is not None:
            check_cast(f"cannot consolidate {src} as {str(dtype).removeprefix('torch.')}: {n}", t, dtype)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    with signals_held(f"the consolidated model {out_dir}"):  # its files are moved in one by one
        out = save_pretrained(state, config, out_dir, max_shard_size=max_shard_size)
    logger.info("consolidated %s -> %s", src, out)
    return out
