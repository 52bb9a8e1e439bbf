"""The process group of a ``torchrun`` launch: who we are, which device we use, how ranks talk.

``qwenvl finetune`` runs unchanged under ``torchrun`` (one node or many, c10d rendezvous): torchrun sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, and :func:`setup` joins the
group (NCCL for CUDA tensors and gloo for CPU ones on GPUs, gloo on CPUs) with ``dist_timeout`` seconds as
the limit for every collective. Without those variables the run is a plain single process with no process
group at all (:meth:`DistEnv.single`); every helper here is then a no-op or the identity.

A rank that dies or hangs makes the others fail within ``dist_timeout`` instead of waiting forever; the
error they raise (:class:`DistributedError`) names their own rank, and torchrun's summary names the rank that
failed first. A rank that fails with an error of its own (a file it alone cannot read, out of memory) says it
as one line naming itself (``rank 1 of 2: ...``) and leaves word of it in torchrun's store (:func:`teardown`):
the others stop as :class:`ReportedByAnotherRank`, without a line of their own. With ``torchrun --max_restarts
K`` the whole group is restarted and ``resume_training: auto`` continues from the newest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..fileio import error_line

__all__ = ["RANK_LOGGER", "DistEnv", "DistributedError", "ReportedByAnotherRank", "failed_on", "met_by_every_rank",
           "said_by_another_rank", "setup", "teardown", "told_every_rank", "word_of_another_rank"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


class DistributedError(RuntimeError):
    """Another rank died or stopped answering within ``dist_timeout`` (or the network failed)."""


class ReportedByAnotherRank(DistributedError):
    """This rank stops because another rank failed, and that rank reports the error (``qwenvl finetune`` prints
    nothing more for this one: one line per problem, not one per rank)."""


# What only one rank sees (a sample of its slice that fails to load, a file of its own that is missing) is logged
# here, and heard from every rank; everything else is said by rank 0 alone (setup() quiets the others).
RANK_LOGGER = "qwenvl.ranks"

# dist_timeout of the group setup() joined, for the DistEnvs of helpers given none (DistEnv.of_mesh); how many
# times setup() ran in this process (every rank alike: the runs of one launch leave word apart, see teardown)
_timeout_s = 0.0
_runs = 0


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

    @classmethod
    def of_mesh(cls, mesh: Any, device: torch.device) -> DistEnv:
        """The place in the job of a helper that is given a model sharded over ``mesh`` (all ranks) but no DistEnv
        (:mod:`~qwenvl.train.load_sharded`): the caller set up the process group."""
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), device, mesh,
                   timeout_s=_timeout_s)

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

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), by rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._collective(dist.all_gather_object, out, obj)
        return out

    def agree(self, fn: Callable[[], T]) -> T:
        """``fn()`` on every rank (it must run no collective); when it fails on any rank, every rank stops. The
        lowest rank that met an error re-raises it, the ranks with the same error or none raise
        :class:`ReportedByAnotherRank`: what every rank reads alike (the data, the checkpoint) is said once. An
        error that not every rank met (a file only one node cannot read) names the rank(s) that met it: the
        other ranks stop without a word, and torchrun's summary may name one of them as the first to fail."""
        if not self.distributed:
            return fn()
        error: Exception | None = None
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after every rank has learnt of it
            error, result = e, None
        said = self.gather(None if error is None else f"{type(error).__name__}: {error_line(error)}")
        if not any(said):
            return result  # type: ignore[return-value]
        if error is not None and said.index(said[self.rank]) == self.rank:
            alike = [r for r, line in enumerate(said) if line == said[self.rank]]
            if len(alike) < self.world_size:
                raise told_every_rank(_on_ranks(error, alike, self.world_size)) from error
            raise told_every_rank(error)
        first = next(r for r, line in enumerate(said) if line)
        raise ReportedByAnotherRank(f"rank {self.rank} of {self.world_size}: stopped because rank {first} failed "
                                    f"({said[first]})")

    def _collective(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (dist.DistError, RuntimeError) as e:
            raise self.lost(e) from e

    def lost(self, error: BaseException) -> DistributedError:
        """The error to raise when a collective failed: :class:`ReportedByAnotherRank` when another rank failed
        and left word of why (:func:`teardown`), else one naming this rank, the timeout and the cause."""
        word = word_of_another_rank(self.rank) if self.distributed else None
        if word is not None:
            return ReportedByAnotherRank(f"rank {self.rank} of {self.world_size}: stopped because rank {word[0]} "
                                         f"failed ({word[1]})")
        first = error_line(error)
        limit = f"dist_timeout={self.timeout_s:g} s" if self.timeout_s else "dist_timeout"
        return DistributedError(
            f"rank {self.rank} of {self.world_size}: lost the other ranks (one died, hung for more than {limit}, or "
            "the network failed; a rank that died is the one torchrun's summary names first, but after a timeout that "
            f"is the rank that waited, this one, not the one that hung): {first}"
        )


def _on_ranks(error: Exception, ranks: list[int], world: int) -> Exception:
    """``error`` with its message prefixed by the rank(s) that met it (``rank 1 of 2: ...``), of the same type when
    that type is made from a message (callers catch CheckpointError, OSError, ...), else a DistributedError."""
    who = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
    text = f"{who} of {world}: {error}"
    try:
        named = type(error)(text)
    except Exception:  # noqa: BLE001 - a type with another signature: said as a DistributedError
        named = None
    if named is None or str(named) != text:
        return DistributedError(f"{who} of {world}: {type(error).__name__}: {error_line(error)}")
    return named


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
        device = _device_for(device_name, 0)
        if device.type == "cuda":  # the pin-memory thread and all that uses the current device: this GPU, not 0
            torch.cuda.set_device(device)
        return DistEnv.single(device)
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
    global _timeout_s, _runs
    _timeout_s, _runs = timeout_s, _runs + 1
    return DistEnv(rank, world, local_rank, device, mesh, owns, timeout_s)


def teardown(env: DistEnv) -> None:
    """Destroy the process group we created, then collect the garbage that still refers to it (a sharded
    model's hooks form reference cycles): its threads must stop while the interpreter is fully alive.

    Called while an error that not every rank has learnt of is on its way out (``finally``), it first leaves word
    of it in torchrun's store: the other ranks, whose collectives fail when this rank's connections close, then
    stop as :class:`ReportedByAnotherRank` instead of each saying "lost the other ranks". The first rank to leave
    word says it (:func:`failed_on` names the rank: ``qwenvl finetune`` prints ``rank 1 of 2: ...``); a rank
    that met the same error later stays quiet (a collective can raise one rank's failure on every rank). An error
    that every rank meets alike (:func:`met_by_every_rank`) is said by the first as it is, naming no rank."""
    failure = sys.exc_info()[1]
    if env.distributed and isinstance(failure, Exception) and not isinstance(failure, DistributedError) \
            and not getattr(failure, _TOLD, False):
        line = f"{type(failure).__name__}: {error_line(failure)}"
        first = _leave_word(env, line)
        if first is not None and first != (env.rank, line) and first[1] == line:
            with contextlib.suppress(AttributeError, TypeError):
                setattr(failure, _SAID_BY, first[0])  # the rank that was first says it
        elif not getattr(failure, _ALIKE, False):
            with contextlib.suppress(AttributeError, TypeError):
                setattr(failure, _RANK, f"rank {env.rank} of {env.world_size}")
    if env.owns_group and dist.is_initialized():
        env.mesh = None
        dist.destroy_process_group()
        gc.collect()


# attributes of an error on its way out: every rank has learnt of it (agree); "rank R of N", the rank that says it
# for the job (teardown); the other rank that says it (teardown: the same error met by several ranks); every rank
# meets it alike (met_by_every_rank)
_TOLD, _RANK, _SAID_BY = "_qwenvl_told_every_rank", "_qwenvl_failed_on", "_qwenvl_said_by"
_ALIKE = "_qwenvl_met_by_every_rank"


def told_every_rank(error: E) -> E:
    """``error``, marked as one that every rank has learnt of (by :meth:`DistEnv.agree`, or a verdict rank 0
    broadcast): :func:`teardown` leaves no word of it, and it is said as it is."""
    with contextlib.suppress(AttributeError, TypeError):  # an exception type that takes no attributes
        setattr(error, _TOLD, True)
    return error


def met_by_every_rank(error: E) -> E:
    """``error``, marked as one that every rank meets alike, at the same point, from what they all computed (a
    verdict on the global gradient norm): :func:`teardown` has the first rank to leave word say it as it is,
    naming no rank (whichever rank is first says nothing about where the problem is), and the others stay quiet."""
    with contextlib.suppress(AttributeError, TypeError):
        setattr(error, _ALIKE, True)
    return error


def failed_on(error: BaseException) -> str | None:
    """``"rank R of N"`` when ``error`` is one that rank R met and says for the job (see :func:`teardown`)."""
    return getattr(error, _RANK, None)


def said_by_another_rank(error: BaseException) -> bool:
    """Whether another rank that met ``error`` too says it for the job (see :func:`teardown`)."""
    return getattr(error, _SAID_BY, None) is not None


def _word_store() -> Any:
    """A client of the launch's store (torchrun's, at MASTER_ADDR:MASTER_PORT), where the first rank that fails
    leaves word of why for the others; None without one (a process group made another way) or when it is gone."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
    if not addr or not port.isdigit():
        return None
    try:
        store = dist.TCPStore(addr, int(port), is_master=False, timeout=datetime.timedelta(seconds=5))
    except (dist.DistError, RuntimeError, ValueError):
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"qwenvl/failed/attempt-{attempt}/run-{_runs}", store)


def _leave_word(env: DistEnv, line: str) -> tuple[int, str] | None:
    """Leave (this rank, ``line``) as the job's failure unless a rank did first; return the word there (None
    without a store)."""
    store = _word_store()
    if store is None:
        return None
    try:
        first = store.compare_set("first", "", f"{env.rank}\t{line}").decode("utf-8", "replace")
    except (dist.DistError, RuntimeError):  # gone: the others say they lost this rank
        return None
    rank, _, said = first.partition("\t")
    return int(rank), said


def word_of_another_rank(rank: int | None = None) -> tuple[int, str] | None:
    """(rank, why) of the rank other than ``rank`` (default: this process's RANK) that failed first in this
    launch and left word of it (:func:`teardown`), if one did."""
    if rank is None:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or not os.environ["RANK"].isdigit():
            return None
        rank = int(os.environ["RANK"])
    store = _word_store()
    if store is None:
        return None
    try:
        if not store.check(["first"]):
            return None
        first, _, said = store.get("first").decode("utf-8", "replace").partition("\t")
    except (dist.DistError, RuntimeError):
        return None
    return (int(first), said) if int(first) != rank else None
