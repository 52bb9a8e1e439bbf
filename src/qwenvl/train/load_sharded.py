"""Fill a model sharded by :func:`~qwenvl.train.parallelize.parallelize` from an official checkpoint folder,
each rank reading only its own rows.

The model is built on the meta device, sharded, then given memory with ``to_empty``: each parameter is a
DTensor whose local shard holds rows ``[r * ceil(R / N), (r + 1) * ceil(R / N))`` of dim 0 on rank ``r`` of ``N``
(FSDP2's even split). For safetensors files the header is parsed (the format is a u64 length, a JSON header,
then the raw tensors back to back) and each rank reads just its byte range with positioned reads straight
into the shard's memory (through a small buffer when the dtype or device differs), so no rank ever holds
the whole model: peak host memory is about the rank's share of the weights. ``.bin`` checkpoints are mapped
with ``torch.load(mmap=True)`` and sliced.

Checking is as strict as :func:`qwenvl.checkpoint.load_weights`: every key and every shape, all problems in
one :class:`~qwenvl.checkpoint.CheckpointError` before anything is read; ``config.json`` against the settings the
weights were saved with (:func:`qwenvl.checkpoint.check_config`); and, as the rows are read, no NaN or infinity
(each rank checks its rows; rank 0 names every rank's finds). Under a process group a failure on any rank stops
every rank, and one that a rank alone meets (its rows truncated or unreadable on its node) names that rank.
Parameters that LoRA adds (``lora_A``/``lora_B``) are not in the checkpoint and are initialized here, identically
on every rank; LoRA-wrapped layers keep their weights under ``.base_layer.``, which is mapped back to the official
names.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..checkpoint import (
    CheckpointError,
    all_finite,
    check_against_model,
    check_config,
    count_non_finite,
    format_problems,
    load_state_dict,
    locate_weights,
)
from ..config import QwenVLConfig
from ..fileio import error_line, parse_json
from .distributed import DistEnv, ReportedByAnotherRank

__all__ = ["init_lora_parameters", "load_sharded_weights", "local_rows"]

logger = logging.getLogger(__name__)

_ST_TO_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


def local_rows(t: torch.Tensor) -> tuple[int, int]:
    """The rows ``[start, stop)`` of dim 0 that this rank's shard of ``t`` holds (all rows for a plain tensor)."""
    if not isinstance(t, DTensor):
        return 0, t.shape[0] if t.dim() else 1
    mesh = t.device_mesh
    rows = t.shape[0]
    chunk = math.ceil(rows / mesh.size())
    start = min(rows, mesh.get_local_rank() * chunk)
    stop = min(rows, start + chunk)
    if t.to_local().shape[:1] != (stop - start,):  # FSDP2 splits dim 0 evenly; anything else is not ours
        raise RuntimeError(f"unexpected shard layout {t.placements} of shape {tuple(t.to_local().shape)}")
    return start, stop


def _official_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


def _is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or ".lora_embedding_" in name


def _read_header(file: Path) -> tuple[int, dict]:
    """Where the data of the safetensors file ``file`` starts, and its header's entries; CheckpointError (naming
    ``file``) when it cannot be read."""
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            raw = f.read(n).decode("utf-8")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the header of {file}: {e}") from e
    header = parse_json(raw, file, CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    return 8 + n, header


def _safetensors_index(files: list[Path]) -> tuple[dict[str, tuple[Path, int, dict]], dict[str, torch.Tensor]]:
    """Where each stored tensor's bytes are, and a meta tensor of its shape (what the strict check compares)."""
    where: dict[str, tuple[Path, int, dict]] = {}
    shapes: dict[str, torch.Tensor] = {}
    for file in files:
        start, header = _read_header(file)
        for key, info in header.items():
            if info["dtype"] not in _ST_TO_TORCH:
                raise CheckpointError(f"{file}: {key} has dtype {info['dtype']}, which this loader does not read")
            if key in where:
                raise CheckpointError(f"{key} is in both {where[key][0].name} and {file.name}")
            where[key] = (file, start, info)
            shapes[key] = torch.empty(info["shape"], dtype=_ST_TO_TORCH[info["dtype"]], device="meta")
    return where, shapes


def _read_rows(file: Path, data_start: int, info: dict, start: int, stop: int, out: torch.Tensor) -> None:
    """Rows ``[start, stop)`` of a stored tensor into ``out`` (cast and moved as needed)."""
    shape, dtype = info["shape"], _ST_TO_TORCH[info["dtype"]]
    row_bytes = math.prod(shape[1:]) * dtype.itemsize if shape else dtype.itemsize
    offset = data_start + info["data_offsets"][0] + start * row_bytes
    direct = out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
    buf = out if direct else torch.empty(out.shape, dtype=dtype)
    if buf.numel():
        # numpy's stubs give ndarray the buffer protocol (__buffer__) on Python 3.12+ only
        view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
        with open(file, "rb", buffering=0) as f:
            f.seek(offset)
            got = f.readinto(view)
        if got != (stop - start) * row_bytes:
            raise CheckpointError(f"{file} is truncated: {got} of {(stop - start) * row_bytes} bytes read")
    if not direct:
        out.copy_(buf)


@torch.no_grad()
def load_sharded_weights(model: nn.Module, ckpt_dir: str | Path) -> nn.Module:
    """Fill the (sharded, ``to_empty``-allocated) parameters of ``model`` from ``ckpt_dir``; return ``model``.

    Stored floating tensors are cast to the parameters' dtype. LoRA parameters are left to
    :func:`init_lora_parameters`. Under a process group every rank stops when any rank fails: a problem every
    rank meets (a missing key, a config.json that does not match) is said once, one that a rank alone meets
    (its rows truncated or unreadable on its node) names that rank (:meth:`DistEnv.agree`).
    """
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    wanted = {_official_name(n): t for n, t in tensors.items() if not _is_lora(n)}
    env = _env_of(wanted.values())

    def read() -> list[str]:
        files, _weight_map = locate_weights(ckpt_dir)
        if isinstance(config := getattr(model, "config", None), QwenVLConfig):
            check_config(config, ckpt_dir)
        _read_local_rows(wanted, files, ckpt_dir)
        non_finite = []
        for name, t in wanted.items():  # each rank checks the rows it holds
            local = t.to_local() if isinstance(t, DTensor) else t
            if not all_finite(local):
                start, stop = local_rows(t)
                non_finite.append(f"{name} (rows {start}..{stop}): {count_non_finite(local)}")
        return non_finite

    _raise_if_non_finite(env, env.gather(env.agree(read)), ckpt_dir)
    logger.info("loaded %s: %d tensors, this rank's rows only", ckpt_dir, len(wanted))
    return model


def _env_of(tensors: Iterable[torch.Tensor]) -> DistEnv:
    """The job of the ranks that hold shards of ``tensors`` (one process when none is a DTensor: every process
    then reads all rows, and none waits for another)."""
    t = next((t for t in tensors if isinstance(t, DTensor)), None)
    if t is None:
        return DistEnv.single(torch.device("cpu"))
    return DistEnv.of_mesh(t.device_mesh, t.to_local().device)


def _read_local_rows(wanted: dict[str, torch.Tensor], files: list[Path], ckpt_dir: str | Path) -> None:
    """Check the stored keys and shapes against ``wanted`` (strictly), then fill this rank's rows of each."""
    if all(f.suffix == ".safetensors" for f in files):
        where, shapes = _safetensors_index(files)
        check_against_model(wanted, shapes, ckpt_dir, strict=True)
        for name, t in wanted.items():
            file, data_start, info = where[name]
            start, stop = local_rows(t)
            _read_rows(file, data_start, info, start, stop, t.to_local() if isinstance(t, DTensor) else t)
        return
    found = load_state_dict(ckpt_dir)  # .bin: mapped (torch.load mmap=True), then sliced
    check_against_model(wanted, found, ckpt_dir, strict=True)
    for name, t in wanted.items():
        start, stop = local_rows(t)
        local = t.to_local() if isinstance(t, DTensor) else t
        local.copy_(found.pop(name)[start:stop] if t.dim() else found.pop(name))


def _raise_if_non_finite(env: DistEnv, found: list[list[str]], ckpt_dir: str | Path) -> None:
    """Every rank's NaN/inf finds (``found[rank]``) in one error, said by rank 0 (the other ranks stop too)."""
    problems = [f"rank {r}: {p}" if env.distributed else p for r, finds in enumerate(found) for p in finds]
    if not problems:
        return
    error = CheckpointError(format_problems(
        f"checkpoint {ckpt_dir} holds NaN or infinite values in {len(problems)} tensor shard(s) (a corrupt file, or "
        "a training run that diverged):", problems))
    if env.is_main:
        raise error
    raise ReportedByAnotherRank(f"rank {env.rank} of {env.world_size}: stopped because rank 0 failed "
                                f"({error_line(error)})")


@torch.no_grad()
def init_lora_parameters(model: nn.Module, seed: int) -> int:
    """Initialize LoRA's parameters as peft does (``lora_A`` Kaiming-uniform with a = sqrt(5), ``lora_B``
    zeros), each from its own generator, so every rank computes the same full tensor and keeps its rows.
    Returns how many were initialized. When it fails on any rank, every rank stops (:meth:`DistEnv.agree`)."""
    params = list(model.named_parameters())

    def init() -> int:
        n = 0
        for i, (name, p) in enumerate(params):
            if not _is_lora(name):
                continue
            full = torch.zeros(p.shape, dtype=torch.float32)
            if ".lora_A." in name:
                g = torch.Generator().manual_seed(seed * 1_000_003 + i)
                bound = 1.0 / math.sqrt(full.shape[1])  # kaiming_uniform_(a=sqrt(5)): gain sqrt(1/3), 1/sqrt(fan_in)
                full.uniform_(-bound, bound, generator=g)
            start, stop = local_rows(p)
            local = p.to_local() if isinstance(p, DTensor) else p
            local.copy_(full[start:stop])
            n += 1
        return n

    return _env_of(p for _n, p in params).agree(init)
