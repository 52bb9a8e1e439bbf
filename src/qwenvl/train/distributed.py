"""The process group of a ``torchrun`` launch: who we are, which device we use, how ranks talk.

``qwenvl finetune`` runs unchanged under ``torchrun`` (one node or many, c10d rendezvous): torchrun sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, and :func:`setup` joins the
group (NCCL for CUDA tensors and gloo for CPU ones on GPUs, gloo on CPUs) with ``dist_timeout`` seconds as
the limit for every collective. Without those variables the run is a plain single process with no process
group at all (:meth:`DistEnv.single`); every helper here is then a no-op or the identity.

A rank that dies or hangs makes the others fail within ``dist_timeout`` instead of waiting forever; the
error they raise (:class:`DistributedError`) names their own rank, and torchrun's summary names the rank that
failed first. With ``torchrun --max_restarts K`` the whole group is restarted and ``resume_training: auto``
continues from the newest complete checkpoint.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..fileio import error_line

__all__ = ["RANK_LOGGER", "DistEnv", "DistributedError", "ReportedByAnotherRank", "setup", "teardown"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class DistributedError(RuntimeError):
    """Another rank died or stopped answering within ``dist_timeout`` (or the network failed)."""


class ReportedByAnotherRank(DistributedError):
    """This rank stops because another rank failed, and that rank reports the error (``qwenvl finetune`` prints
    nothing more for this one: one line per problem, not one per rank)."""


# What only one rank sees (a sample of its slice that fails to load, a file of its own that is missing) is logged
# here, and heard from every rank; everything else is said by rank 0 alone (setup() quiets the others).
RANK_LOGGER = "qwenvl.ranks"


def _launch_vars() -> tuple[int, int, int] | None:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun sets them; None when neither RANK nor WORLD_SIZE is set. Half a
    launch (one of the two) or values that are no ranks are a one-line :class:`DistributedError`."""
    given = [name for name in ("RANK", "WORLD_SIZE") if name in os.environ]
    if not given:
        return None
    if len(given) == 1:
        other = "WORLD_SIZE" if given == ["RANK"] else "RANK"
        raise DistributedError(f"{given[0]}={os.environ[given[0]]!r} is set but {other} is not: launch with torchrun "
                               f"(it sets both), or unset {given[0]} to train in one process")
    values = []
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = os.environ.get(name, "0")
        try:
            values.append(int(text))
        except ValueError:
            raise DistributedError(f"environment variable {name}={text!r} is not an integer: launch with torchrun, "
                                   "which sets RANK, WORLD_SIZE and LOCAL_RANK") from None
    rank, world, local_rank = values
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise DistributedError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank}: ranks run from 0 to "
                               "WORLD_SIZE - 1 (and LOCAL_RANK from 0); launch with torchrun, which sets them")
    return rank, world, local_rank


@dataclass
class DistEnv:
    """This process's place in the job. ``mesh`` is None for a single process without a process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: Any = None  # torch.distributed.device_mesh.DeviceMesh (1-D, all ranks: data parallel + FSDP)
    owns_group: bool = False  # setup() created the process group, so teardown() destroys it
    timeout_s: float = 0.0

    @classmethod
    def single(cls, device: torch.device) -> DistEnv:
        return cls(0, 1, 0, device)

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (float64, so token counts stay exact)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._collective(dist.all_reduce, t)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            self._collective(dist.barrier)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        self._collective(dist.broadcast_object_list, box, src=0)
        return box[0]

    def agree(self, fn: Callable[[], T]) -> T:
        """``fn()`` on every rank (it must run no collective); when it fails on any rank, every rank stops. The
        lowest rank that met an error re-raises it, the ranks with the same error or none raise
        :class:`ReportedByAnotherRank`: what every rank reads alike (the data, the checkpoint) is said once."""
        if not self.distributed:
            return fn()
        error: Exception | None = None
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after every rank has learnt of it
            error, result = e, None
        said: list[str | None] = [None] * self.world_size
        self._collective(dist.all_gather_object, said, None if error is None else f"{type(error).__name__}: "
                         f"{error_line(error)}")
        if not any(said):
            return result  # type: ignore[return-value]
        if error is not None and said.index(said[self.rank]) == self.rank:
            raise error
        first = next(r for r, line in enumerate(said) if line)
        raise ReportedByAnotherRank(f"rank {self.rank} of {self.world_size}: stopped because rank {first} failed "
                                    f"({said[first]})")

    def _collective(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (dist.DistError, RuntimeError) as e:
            raise self.lost(e) from e

    def lost(self, error: BaseException) -> DistributedError:
        """The error to raise when a collective failed: names this rank, the timeout and the cause."""
        first = error_line(error)
        return DistributedError(
            f"rank {self.rank} of {self.world_size}: lost the other ranks (one died, hung for more than "
            f"dist_timeout={self.timeout_s:g} s, or the network failed; torchrun's summary names the rank that "
            f"failed first): {first}"
        )


def _device_for(name: str, local_rank: int, launched: bool = False) -> torch.device:
    """The device of this rank: ``cuda`` (or ``auto`` on a GPU node) means the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda" or not launched:
        return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device
    per_node = os.environ.get("LOCAL_WORLD_SIZE", "1")
    if device.index is not None and per_node != "1":
        raise DistributedError(f"device {name} names one GPU for all {per_node} processes of this node: use device "
                               "cuda (or auto), and each rank takes the GPU of its LOCAL_RANK")
    if device.index is None:
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise DistributedError(f"LOCAL_RANK={local_rank}, but this node has {count} CUDA device(s) visible: start "
                                   f"at most {count} process(es) per node (torchrun --nproc_per_node {count}), or "
                                   "check CUDA_VISIBLE_DEVICES")
        device = torch.device("cuda", local_rank)
    return device


def _attempt_store(timeout: datetime.timedelta) -> dict[str, Any]:
    """``init_process_group`` arguments that give each torchrun restart its own keys in torchrun's store.

    torchrun's agent keeps one store across ``--max_restarts`` (``TORCHELASTIC_USE_AGENT_STORE``); the
    restarted ranks would otherwise find the addresses the dead ones published and time out connecting to them.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}  # the env:// default
    world = int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"qwenvl/attempt-{attempt}", store), "rank": int(os.environ["RANK"]),
            "world_size": world}


def setup(device_name: str, timeout_s: float, use_parallel: bool = False) -> DistEnv:
    """Join torchrun's process group when launched by it (or use the one the caller made); else one process."""
    joined = dist.is_available() and dist.is_initialized()
    launch = None if joined else _launch_vars()
    if launch is None and not joined:
        if use_parallel:
            logger.warning("use_parallel: not launched by torchrun (no RANK/WORLD_SIZE), training in one process; "
                           "launch with `torchrun --nproc_per_node N --no-python qwenvl finetune ...`")
        return DistEnv.single(_device_for(device_name, 0))
    if not dist.is_available():
        raise DistributedError("launched by torchrun, but this torch build has no torch.distributed")
    rank, world, local_rank = launch or (dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    device = _device_for(device_name, local_rank, launched=launch is not None)
    owns = not joined
    try:
        if owns:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
            timeout = datetime.timedelta(seconds=timeout_s)
            dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None,
                                    **_attempt_store(timeout))
        from torch.distributed.device_mesh import init_device_mesh

        rank, world = dist.get_rank(), dist.get_world_size()
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    except (dist.DistError, RuntimeError, ValueError) as e:  # no rendezvous: MASTER_ADDR unset or wrong, peers absent
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise DistributedError(f"rank {rank} of {world}: cannot join the process group at {where} within "
                               f"dist_timeout={timeout_s:g} s (launch with torchrun, every rank with the same "
                               f"MASTER_ADDR, MASTER_PORT and WORLD_SIZE): {error_line(e)}") from e
    if rank != 0:  # one voice in the logs: the other ranks say only errors and what they alone see (RANK_LOGGER)
        logging.getLogger("qwenvl").setLevel(logging.ERROR)
        logging.getLogger(RANK_LOGGER).setLevel(logging.WARNING)
    logger.info("rank %d of %d (local rank %d) on %s, dist_timeout %g s", rank, world, local_rank, device, timeout_s)
    return DistEnv(rank, world, local_rank, device, mesh, owns, timeout_s)


def teardown(env: DistEnv) -> None:
    """Destroy the process group we created, then collect the garbage that still refers to it (a sharded
    model's hooks form reference cycles): its threads must stop while the interpreter is fully alive."""
    if env.owns_group and dist.is_initialized():
        env.mesh = None
        dist.destroy_process_group()
        gc.collect()
