"""Stage-3 fine-tuning: the LM and the resampler train, the ViT stays frozen (DESIGN.md section 1).

One process on one device, or many under ``torchrun`` (:mod:`qwenvl.train.distributed`): then the model is
sharded with FSDP2 (:func:`qwenvl.train.parallelize.parallelize`) and each rank trains on its slice of every
global batch (``batch_size x gradient_accumulation_steps x world size`` samples, chosen by
:class:`~qwenvl.train.state.BatchOrder` from the seed and the global batch alone). Fused AdamW over fp32
master weights, bf16 autocast (or FSDP's bf16 parameters), cosine schedule with linear warmup down to
``min_lr``, gradient clipping, gradient accumulation, activation checkpointing. The frozen ViT records no
autograd graph. Every micro-batch is weighted by its share of the step's labelled tokens over all ranks, so
``k`` micro-batches of ``b`` samples on ``n`` ranks give the same update as one batch of ``k * b * n``
(up to rounding). A ``DataLoader`` with ``num_workers`` processes decodes the images of the next
micro-batches while the current one trains. A step whose loss or gradient is not finite (a run that diverged) is
not applied: the run stops with :class:`TrainingDivergedError` and saves no final model.

Checkpoints (``output_dir/checkpoint-STEP/``, the newest ``save_total_limit`` kept) are sharded
(:mod:`qwenvl.train.sharded_checkpoint`); a run started with ``resume_training`` continues exactly where the
checkpoint left off, on any number of ranks with the same global batch. The final weights go to
``output_dir`` in the official layout (gathered one file at a time; LoRA runs: ``output_dir/adapter``).
When ``train`` made the process group itself (under ``torchrun``), it destroys it at the end and the result's
``model`` is None: the sharded model needs that group, and one left to interpreter exit could abort a run
that had finished; load the saved folder instead.

The run (its rank 0) holds ``output_dir`` for itself (``qwenvl.outputs``): it must be new, empty or one of our outputs
(``overwrite``: any folder, of which only the files we write are replaced), must not be, contain or lie
inside ``load_checkpoint`` (nor be or contain the training data), and is locked for the whole run. A new
run (not resuming) in a folder that holds checkpoints or the final model (``config.json`` or ``adapter/``) of
an earlier one is refused unless ``overwrite`` (which deletes those checkpoints; the final model is replaced). Resuming refuses changed optimization settings
(:data:`~qwenvl.train.state.RESUME_KEYS`; the global batch, not its split), naming them, and data of another
length; other inputs (data file, its cut and prompt, the base model) are warned of in one line, naming them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..checkpoint import CheckpointError, is_sharded, save_pretrained
from ..config import ENDOFTEXT_ID, QwenVLConfig
from ..data.dataset import IGNORE_INDEX, ConversationDataset, DatasetError, collate
from ..fileio import atomic_write_text, parse_json, remove_tree, signals_held
from ..hardware import resolve_bf16
from ..model import QwenVL
from ..model.qwenvl import as_dtype
from ..outputs import OutputDirError, check_separate, claim_output, is_ours, read_marker, record_files
from . import distributed, lora
from . import sharded_checkpoint as sharded
from .config import NO_MODEL, TrainConfig, TrainConfigError
from .distributed import DistEnv, DistributedError
from .state import (
    RESUME_KEYS,
    STATE_JSON,
    BatchOrder,
    Progress,
    TrainStateError,
    check_resume_settings,
    checkpoint_dirs,
    is_checkpoint_name,
    latest_checkpoint,
    prune_checkpoints,
    read_state,
    saved_config,
)

__all__ = ["StepInfo", "TrainResult", "TrainingDivergedError", "cosine_with_warmup", "global_batch_size", "part_of",
           "select_trainable", "train"]

logger = logging.getLogger(__name__)
rank_logger = logging.getLogger(distributed.RANK_LOGGER)  # what this rank alone sees (heard from every rank)

# Trained with the LM in stage 3 although they sit in the vision tower (DESIGN.md section 1).
RESAMPLER = ("transformer.visual.attn_pool.", "transformer.visual.ln_post.", "transformer.visual.proj")
# Never trained: the resampler's fixed 2D sin-cos position table.
FIXED = frozenset({"transformer.visual.attn_pool.pos_embed"})
# The input embedding: part of the LM, but ``freeze_embedding`` keeps it alone frozen.
EMBEDDING = "transformer.wte.weight"
_WEIGHT_FILE_PREFIXES = ("model.safetensors", "model-", "pytorch_model")


class TrainingDivergedError(ValueError):
    """A step's loss or gradient is not finite: the step is not applied and the run stops (no final model)."""


@dataclass
class StepInfo:
    """Handed to ``train``'s callback after every optimizer step."""

    step: int
    total_steps: int
    loss: float
    learning_rate: float
    grad_norm: float
    tokens_per_second: float


@dataclass
class TrainResult:
    """What a run did. ``losses[i]`` is the token-weighted mean loss of optimizer step ``i + 1``."""

    output_dir: Path
    final_path: Path | None  # None when the run was stopped before the end
    steps: int
    total_steps: int
    losses: list[float]
    learning_rates: list[float]
    grad_norms: list[float]
    num_tokens: int  # non-pad input tokens trained on (all steps, resumed ones included)
    num_loss_tokens: int
    tokens_per_second: float
    train_seconds: float
    checkpoints: list[Path] = field(default_factory=list)
    resumed_from: Path | None = None
    stopped_early: bool = False
    model: nn.Module | None = field(default=None, repr=False)  # None after a torchrun job (module docstring)
    bad_samples: list[str] = field(default_factory=list)  # skipped during the run (skip_bad_samples), with why


@dataclass
class _Run:
    """The pieces of one run that the loop functions share."""

    cfg: TrainConfig
    model: QwenVL
    dataset: Any
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    order: BatchOrder
    progress: Progress
    total_steps: int
    env: DistEnv
    lora_config: Any = None
    params: list[nn.Parameter] = field(default_factory=list)
    bf16: bool = False  # bf16 autocast (single process), resolved from cfg.bf16 and the hardware
    bad_samples: list[str] = field(default_factory=list)
    batches: Any = None  # iterator over this rank's micro-batches, from progress.step on


# ---- public entry --------------------------------------------------------------------------------------------
def train(
    cfg: TrainConfig,
    model: QwenVL | None = None,
    processor: Any = None,
    dataset: Any = None,
    callback: Callable[[StepInfo], bool | None] | None = None,
) -> TrainResult:
    """Fine-tune ``model`` (default: ``cfg.load_checkpoint`` or ``cfg.preset``) on ``dataset`` (default: a
    :class:`ConversationDataset` over ``cfg.data_path``); return what happened.

    A given model is trained in place (moved to ``cfg.device``, fp32 master weights). ``dataset[i]`` must give
    ``input_ids``/``labels`` (1-D long) and ``images`` (or None), as :class:`ConversationDataset` does.
    ``callback(info)`` runs after each step (on every rank; all ranks must agree); returning True stops the run
    after saving a checkpoint. Under ``torchrun`` every rank calls this; see the module docstring.
    """
    env = distributed.setup(str(_resolve_device(cfg.device)), cfg.dist_timeout, cfg.use_parallel)
    try:
        with _hold_output_dir(cfg, env):
            done = env.broadcast(_completed_run(cfg, env.world_size) if env.is_main else None)  # rank 0 reads
            if done is not None:
                return done
            result = _train(cfg, model, processor, dataset, callback, env)
            if env.distributed and env.owns_group:
                # The sharded model holds the process group we are about to destroy (FSDP keeps it), and a
                # process group released only at interpreter exit can abort the process there ("terminate
                # called without an active exception", exit code -6, after a run that finished and saved).
                # It cannot compute without that group anyway: the saved folder is the result.
                result.model = None
            return result
    except torch.distributed.DistError as e:  # a collective outside our own helpers (FSDP, DCP) failed
        raise env.lost(e) from e
    except RuntimeError as e:
        if env.distributed and not isinstance(e, DistributedError) and _looks_like_lost_peer(e):
            raise env.lost(e) from e
        raise
    finally:
        distributed.teardown(env)


def _completed_run(cfg: TrainConfig, world_size: int = 1) -> TrainResult | None:
    """``resume_training`` (no checkpoint named) in a folder whose run has finished: that run's result, with
    nothing trained or written (see :func:`_finished_progress`)."""
    progress = _finished_progress(cfg, world_size)
    if progress is None:
        return None
    out = Path(cfg.output_dir)
    final_path = out / "adapter" if cfg.use_lora else out
    logger.info("the run in %s is complete (%d steps; final %s in %s): nothing to resume", out, progress.step,
                "adapter" if cfg.use_lora else "model", final_path)
    return TrainResult(
        output_dir=out, final_path=final_path, steps=progress.step, total_steps=progress.step,
        losses=progress.losses, learning_rates=progress.learning_rates, grad_norms=progress.grad_norms,
        num_tokens=progress.num_tokens, num_loss_tokens=progress.num_loss_tokens,
        tokens_per_second=progress.num_tokens / progress.train_seconds if progress.train_seconds else 0.0,
        train_seconds=progress.train_seconds, checkpoints=[p for _s, p in checkpoint_dirs(out)],
    )  # fmt: skip


def _finished_progress(cfg: TrainConfig, world_size: int = 1) -> Progress | None:
    """The final progress of the folder's run when ``resume_training`` (no checkpoint named) finds it finished:
    the final ``trainer_state.json`` has the settings of this run and is further along than the newest
    checkpoint, whose loss history it continues. The global batch counts, not its split over ranks and
    micro-batches (a run resumes on any number of ranks)."""
    if not cfg.resume_training or cfg.resume_from:
        return None
    out = Path(cfg.output_dir)
    try:
        final = parse_json((out / STATE_JSON).read_text(encoding="utf-8"), out / STATE_JSON, ValueError)
        progress = Progress(**final["progress"])
        saved = final["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(saved, dict):  # a damaged record (its "progress" read: it is an object)
        return None
    current = cfg.to_dict()
    same = (*RESUME_KEYS, "data_path", "load_checkpoint", "preset")
    global_batch = cfg.batch_size * cfg.gradient_accumulation_steps * world_size
    if final.get("global_batch_size", global_batch) != global_batch or any(
            saved.get(k) != current.get(k) for k in same if k != "global_batch_size"):
        return None  # another run's result: resuming goes on as usual (and names what differs)
    latest = latest_checkpoint(out)
    if latest is not None:
        file = latest / STATE_JSON
        try:
            ckpt = parse_json(file.read_text(encoding="utf-8"), file, ValueError)["progress"]
            n = int(ckpt["step"])
            if n >= progress.step or json.dumps(progress.losses[:n]) != json.dumps(ckpt["losses"]):
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return progress


def _check_same_data_size(env: DistEnv, size: int) -> None:
    """Every rank orders the samples from its own count (:class:`~qwenvl.train.state.BatchOrder`): counts that
    differ (a rank that skipped samples whose images only it could not read, ``skip_bad_samples``) would train on
    other samples than the documented order, or plan other step counts and hang. Stop every rank in one line."""
    sizes = env.gather(size)
    if len(set(sizes)) == 1:
        return
    counts = ", ".join(f"rank {r}: {n}" for r, n in enumerate(sizes))
    error = DatasetError(f"the ranks' training data differ in size ({counts} samples): a rank skipped samples that "
                         "the others kept (an image only some nodes cannot read?); every rank must read the same "
                         "data and images")
    if env.is_main:
        raise distributed.told_every_rank(error)
    raise distributed.ReportedByAnotherRank(f"rank {env.rank} of {env.world_size}: stopped because {error}")


def _train(
    cfg: TrainConfig,
    model: QwenVL | None,
    processor: Any,
    dataset: Any,
    callback: Callable[[StepInfo], bool | None] | None,
    env: DistEnv,
) -> TrainResult:
    def model_and_data() -> tuple[QwenVL, Any]:
        _seed_everything(cfg.seed)
        prepared = _prepare_model(cfg, model, env.device, env)
        return prepared, dataset if dataset is not None else build_dataset(cfg, processor, prepared)

    # every rank reads the same config, data and images: a problem with them is said once, by rank 0
    model, dataset = env.agree(model_and_data)
    _check_same_data_size(env, len(dataset))
    run = _setup_run(cfg, model, dataset, env.device, env)
    _seed_everything(cfg.seed)  # the loop's randomness (dropout) does not depend on the setup
    resumed_from = _maybe_resume(run)  # restores the RNG states of the checkpoint
    stopped = _loop(run, callback)
    final = None if stopped else _save_final(run)
    return _result(run, final, resumed_from, stopped)


@contextlib.contextmanager
def _hold_output_dir(cfg: TrainConfig, env: DistEnv) -> Iterator[None]:
    """Check ``output_dir`` against the inputs, lock it for the run and settle what an earlier run left (rank 0;
    the other ranks learn its verdict and fail with it)."""
    with contextlib.ExitStack() as stack:
        failure: Exception | None = None
        if env.is_main:
            try:
                check_separate(cfg.output_dir, {"load_checkpoint": cfg.load_checkpoint, "training data": cfg.data_path,
                                                "dataset_dir": cfg.dataset_dir},
                               may_lie_inside=("dataset_dir",), what="output_dir")
                stack.enter_context(claim_output(cfg.output_dir, "finetune", overwrite=cfg.overwrite,
                                                 flag="--overwrite (overwrite: true)"))
                _check_earlier_run(cfg, env.world_size)
            except (ValueError, OSError) as e:
                failure = e
        verdict = env.broadcast(None if failure is None else str(failure))
        if failure is not None:
            raise distributed.told_every_rank(failure)
        if verdict is not None:  # rank 0 reports it
            raise distributed.ReportedByAnotherRank(f"rank {env.rank} of {env.world_size}: stopped because rank 0 "
                                                    f"failed ({verdict})")
        yield


def _check_earlier_run(cfg: TrainConfig, world_size: int = 1) -> None:
    """A new run must not mix its checkpoints with an earlier run's; with ``overwrite`` ours are deleted.
    Resuming the newest checkpoint first finishes a pruning that an interrupted run did not get to.
    ``resume_training auto`` with no checkpoint to resume is a new run, unless the folder's run is complete."""
    found = checkpoint_dirs(cfg.output_dir)
    _refuse_foreign_save_names(cfg, new_run=not cfg.resume_from and not (cfg.resume_training and found))
    if cfg.resume_from:
        _check_same_run(cfg, found)
        return
    if cfg.resume_training:
        prune_checkpoints(cfg.output_dir, cfg.save_total_limit)
        # `auto` with no checkpoint starts at step 0: a new run (checked below), unless this run is complete
        starts_afresh = cfg.resume_training == "auto" and not found
        if not starts_afresh or _finished_progress(cfg, world_size) is not None:
            return
    if not found:
        out = Path(cfg.output_dir)
        final = [n for n in ("config.json", sharded.ADAPTER_DIR) if (out / n).exists()]
        if final and not cfg.overwrite:  # a finished run that kept no checkpoints (save_steps 0): its model
            why = (" that has no checkpoint to resume and other settings than this one (resume_training auto)"
                   if cfg.resume_training else "")
            raise OutputDirError(f"output_dir {cfg.output_dir} holds the trained model of an earlier run{why} "
                                 f"({', '.join(final)}): pass --overwrite to replace it, or choose another output_dir")
        return
    names = ", ".join(p.name for _s, p in found)
    if not cfg.overwrite:
        raise OutputDirError(f"output_dir {cfg.output_dir} holds checkpoints of an earlier run ({names}): resume it "
                             "with --resume_training, or pass --overwrite to start over (deletes them)")
    foreign = [p.name for _s, p in found if not is_ours(p)]
    if foreign:
        raise OutputDirError(f"output_dir {cfg.output_dir} holds checkpoint folders qwenvl did not write "
                             f"({', '.join(foreign)}); move them away or choose another output_dir")
    for _step, path in found:
        remove_tree(path)
        logger.info("overwrite: deleted %s of an earlier run", path)


def _refuse_foreign_save_names(cfg: TrainConfig, new_run: bool) -> None:
    """Refuse, with ``overwrite`` too, entries of ``output_dir`` that the run would replace whole and that we did
    not write: for a new run ``checkpoint-STEP`` (each save replaces its folder; a resumed run checks the one it
    saves, :func:`_save_checkpoint`) and, for LoRA, ``adapter`` (the final adapter's folder). ``overwrite``
    replaces the files a run writes, never a folder of the user's under one of its names."""
    out = Path(cfg.output_dir)
    if not out.is_dir():
        return
    ours = set((read_marker(out) or {}).get("files", []))
    foreign = sorted(p.name for p in out.iterdir() if new_run and is_checkpoint_name(p.name) and not is_ours(p))
    adapter = out / sharded.ADAPTER_DIR
    if cfg.use_lora and (adapter.exists() or adapter.is_symlink()) and sharded.ADAPTER_DIR not in ours:
        foreign.append(sharded.ADAPTER_DIR)
    if foreign:
        raise OutputDirError(f"output_dir {cfg.output_dir} holds {', '.join(foreign)}, which qwenvl did not write, "
                             f"under the name{'s' if len(foreign) > 1 else ''} of what this run saves (it would be "
                             "replaced whole, --overwrite or not): move it away or choose another output_dir")


def _check_same_run(cfg: TrainConfig, found: list[tuple[int, Path]]) -> None:
    """``resume_from`` PATH continues the run of PATH in ``output_dir``, where it prunes checkpoints and replaces
    the trained model: those of another run there (a loss history that is not a prefix or continuation of
    PATH's) are refused, or with ``overwrite`` their checkpoints deleted. So are the run's own checkpoints of
    later steps than PATH's (going back to an earlier checkpoint): pruning by step would delete the new ones
    and keep those, and ``resume_training`` would take them up again. Earlier ones stay."""
    def losses(folder: Path) -> list[Any] | None:
        try:
            file = folder / STATE_JSON
            value = parse_json(file.read_text(encoding="utf-8"), file, ValueError)["progress"]["losses"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return value if isinstance(value, list) else None

    source = Path(cfg.resume_from)
    mine = losses(source)
    if mine is None:
        return  # the resume itself names what is wrong with PATH

    def same_run(folder: Path) -> bool:
        theirs = losses(folder)
        n = min(len(mine), len(theirs or []))
        return theirs is not None and json.dumps(mine[:n]) == json.dumps(theirs[:n])

    here = source.resolve()
    others = [p for _s, p in found if p.resolve() != here and not same_run(p)]
    later = [p for s, p in found if s > len(mine) and p.resolve() != here and p not in others]
    out = Path(cfg.output_dir)
    their_model = (out / STATE_JSON).is_file() and not same_run(out)
    if not (others or their_model or later):
        return
    if not cfg.overwrite:
        if others or their_model:
            what = " and ".join(([", ".join(p.name for p in others)] if others else [])
                                + (["the trained model"] if their_model else []))
            raise OutputDirError(f"output_dir {cfg.output_dir} holds {what} of another run than {source} (their "
                                 "loss histories differ), which resuming there would prune or replace: pass "
                                 "--overwrite to delete them, or choose another output_dir")
        raise OutputDirError(f"output_dir {cfg.output_dir} holds checkpoints of later steps than {source} "
                             f"({', '.join(p.name for p in later)}): going back to step {len(mine)}, the run would "
                             "write new checkpoints among them, and pruning or resume_training auto would take theirs: "
                             "move them away, pass --overwrite to delete them, or choose another output_dir")
    foreign = [p.name for p in [*others, *later] if not is_ours(p)]
    if foreign:
        raise OutputDirError(f"output_dir {cfg.output_dir} holds checkpoint folders qwenvl did not write "
                             f"({', '.join(foreign)}); move them away or choose another output_dir")
    for path in others:
        remove_tree(path)
        logger.info("overwrite: deleted %s of another run", path)
    for path in later:
        remove_tree(path)
        logger.info("overwrite: deleted %s (a later step than %s, which this run goes back to)", path, source)


def _looks_like_lost_peer(e: BaseException) -> bool:
    text = str(e).lower()
    return any(w in text for w in ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout"))


# ---- setup ---------------------------------------------------------------------------------------------------
def _resolve_device(name: str) -> torch.device:
    from ..hardware import pick_device  # the one place device names are checked

    try:
        return torch.device(pick_device(name))
    except ValueError as e:
        raise TrainConfigError(str(e).replace("--device", "device", 1)) from None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _prepare_model(cfg: TrainConfig, model: QwenVL | None, device: torch.device, env: DistEnv | None = None) -> QwenVL:
    """The model to train, on ``device`` in fp32. Distributed runs from a checkpoint get it on the meta device:
    each rank reads only its shards once it is sharded (:func:`_setup_run`)."""
    if model is None:
        if cfg.load_checkpoint and env is not None and env.distributed:
            config = QwenVLConfig.from_pretrained(cfg.load_checkpoint)
            model = QwenVL.on_meta(config)
        elif cfg.load_checkpoint:
            model = QwenVL.from_pretrained(cfg.load_checkpoint, dtype=torch.float32, device=device)
        elif cfg.preset:
            model = QwenVL.from_config(cfg.preset, dtype=torch.float32, device=device, seed=cfg.seed)
        else:
            raise TrainConfigError(NO_MODEL)
    low = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if low:
        logger.warning("model weights are %s: training keeps fp32 master weights, casting the model to float32",
                       ", ".join(low))
        model.float()
    if not _on_meta(model):
        model.to(device)
    model.train()
    model.set_gradient_checkpointing(cfg.gradient_checkpointing)
    return model


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def build_dataset(cfg: TrainConfig, processor: Any, model: QwenVL) -> ConversationDataset:
    """The dataset :func:`train` reads when it is given none: ``cfg.data_path`` tokenized as ``cfg`` says."""
    if not cfg.data_path:
        raise TrainConfigError("no training data: set data_path (or pass a dataset)")
    if processor is None:
        from ..processor import Processor

        processor = Processor.from_pretrained(cfg.load_checkpoint or None, config=model.config,
                                              allow_any_local_path=cfg.allow_any_local_path)
    return ConversationDataset(cfg.data_path, processor, cfg.dataset_dir or None, max_length=cfg.max_length,
                               max_images=cfg.max_images, skip_bad=cfg.skip_bad_samples,
                               system_message=cfg.system_message)


def select_trainable(model: nn.Module, cfg: TrainConfig) -> list[str]:
    """Names of the parameters that full fine-tuning trains under ``cfg``'s freeze switches."""
    frozen = {"llm": cfg.freeze_llm, "resampler": cfg.freeze_resampler, "vision": cfg.freeze_vision}
    return [name for name, _ in model.named_parameters()
            if name not in FIXED and not frozen[part_of(name)] and not (name == EMBEDDING and cfg.freeze_embedding)]


def _set_trainable(model: QwenVL, cfg: TrainConfig, check: bool = True) -> Any:
    """Set ``requires_grad`` (adding LoRA adapters when asked); return the LoraConfig or None."""
    if cfg.use_lora:
        resampler = cfg.replace(freeze_llm=True, freeze_vision=True, freeze_resampler=False)
        extra = select_trainable(model, resampler) if cfg.lora_train_resampler else []
        return lora.apply_lora(model, cfg, extra, check=check)
    chosen = set(select_trainable(model, cfg))
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
    return None


def part_of(name: str) -> str:
    """Which part a parameter belongs to: ``"vision"`` (the ViT), ``"resampler"`` or ``"llm"`` (everything else)."""
    if name.startswith(RESAMPLER[:2]) or name == RESAMPLER[2]:
        return "resampler"
    return "vision" if name.startswith("transformer.visual.") else "llm"


def _build_optimizer(params: list[tuple[str, nn.Parameter]], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # As usual: no weight decay on biases and norm weights (every 1-D parameter). The ViT and the resampler
    # may train at ``learning_rate`` times their own multiplier (the schedule scales every group alike); each
    # (decay, multiplier) pair is one group, in parameter order, so with multipliers of 1 the groups are the
    # two they always were (checkpoints of earlier runs still resume).
    scale = {"llm": 1.0, "resampler": cfg.resampler_lr_scale, "vision": cfg.vision_lr_scale}
    grouped: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for decayed in (True, False):
        for name, p in params:
            if (p.ndim >= 2) == decayed:
                grouped.setdefault((decayed, scale[part_of(name)]), []).append(p)
    groups = [{"params": ps, "weight_decay": cfg.weight_decay if decayed else 0.0, "lr": cfg.learning_rate * k,
               "lr_scale": k} for (decayed, k), ps in grouped.items()]
    # fused: one pass over weights, grads and moments (benchmarks/finetune.py: ~15% faster steps than foreach)
    fused = True if device.type in ("cpu", "cuda") else None
    return torch.optim.AdamW(groups, lr=cfg.learning_rate,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, fused=fused)


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier of optimizer step ``step + 1``: linear warmup ``1/warmup, 2/warmup, ..., 1`` over the first
    ``warmup`` steps (the first step already moves the weights; a multiplier of 0 would waste it), then cosine
    1 -> ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def global_batch_size(cfg: TrainConfig, world_size: int = 1) -> int:
    return cfg.batch_size * cfg.gradient_accumulation_steps * world_size


def _plan_steps(cfg: TrainConfig, num_samples: int, world_size: int = 1) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return -(-cfg.num_epochs * num_samples // global_batch_size(cfg, world_size))


def _setup_run(cfg: TrainConfig, model: QwenVL, dataset: Any, device: torch.device, env: DistEnv | None = None) -> _Run:
    env = env or DistEnv.single(device)
    meta = _on_meta(model)
    lora_config = _set_trainable(model, cfg, check=not meta)
    if env.distributed:
        from .parallelize import parallelize

        parallelize(model, env.mesh, cfg)
        if meta:  # each rank reads its rows of the checkpoint
            from .load_sharded import load_sharded_weights

            model.to_empty(device=env.device)
            load_sharded_weights(model, cfg.load_checkpoint)
    if lora_config is not None:
        from .load_sharded import init_lora_parameters

        init_lora_parameters(model, cfg.seed)  # the same adapters whatever the number of ranks
        if meta:
            lora.check_adapters_are_used(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise TrainConfigError("nothing to train: every parameter is frozen")
    optimizer = _build_optimizer(named, cfg, device)
    total = _plan_steps(cfg, len(dataset), env.world_size)
    if cfg.warmup_steps >= total:
        logger.warning("warmup_steps=%d is not shorter than the run's %d steps: the learning rate never reaches "
                       "learning_rate=%g (it ends at %.3g) and never decays; lower warmup_steps", cfg.warmup_steps,
                       total, cfg.learning_rate, cfg.learning_rate * total / max(1, cfg.warmup_steps))
    g = global_batch_size(cfg, env.world_size)
    if g > len(dataset):  # BatchOrder fills every step from the next epochs: samples repeat within a step
        epochs = "" if cfg.max_steps else (f" (num_epochs={cfg.num_epochs} makes {total} step(s), "
                                           f"{total * g / len(dataset):.1f} passes over the data)")
        logger.warning("the global batch of %d samples (batch_size x gradient_accumulation_steps x ranks) is larger "
                       "than the data's %d: every step trains on some samples more than once%s; lower batch_size or "
                       "gradient_accumulation_steps", g, len(dataset), epochs)
    max_length, seq_length = getattr(dataset, "max_length", None), model.config.lm.seq_length
    if max_length is not None and max_length > seq_length:  # the model runs there, on positions it has not learnt
        logger.warning("max_length=%d is beyond the model's seq_length=%d (its config): tokens past position %d train "
                       "RoPE positions the model was not trained on (dynamic NTK and LogN scaling apply only at "
                       "inference); lower max_length to %d unless extending the context is the aim", max_length,
                       seq_length, seq_length, seq_length)
    if cfg.save_steps >= total:
        logger.warning("save_steps=%d is not smaller than the run's %d steps: no checkpoint is saved before the final "
                       "model", cfg.save_steps, total)
    schedule = functools.partial(cosine_with_warmup, warmup=cfg.warmup_steps, total=total,
                                 min_ratio=cfg.min_lr / cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    n_train = sum(p.numel() for _n, p in named)
    n_all = sum(p.numel() for p in model.parameters())
    logger.info("training %d of %d parameters (%.1f%%), %d samples, %d steps of %d samples (%d x %d micro-batches "
                "on %d rank(s))", n_train, n_all, 100 * n_train / n_all, len(dataset), total, g,
                cfg.gradient_accumulation_steps, cfg.batch_size, env.world_size)
    bf16 = resolve_bf16(cfg.bf16, device) if not env.distributed else False  # distributed: FSDP's bf16 parameters
    return _Run(cfg, model, dataset, device, optimizer, scheduler, BatchOrder(len(dataset), g, cfg.seed),
                Progress(), total, env, lora_config, [p for _n, p in named], bf16)


def _resume_path(cfg: TrainConfig, env: DistEnv) -> Path | None:
    """The checkpoint to resume: ``resume_from``, or rank 0's newest in ``output_dir`` on every rank (another rank's
    listing may lag, as an NFS client's cache does after a restart: ranks resuming different steps mixed two
    checkpoints into one model and trained on)."""
    if cfg.resume_from:
        return Path(cfg.resume_from)
    latest = env.broadcast(str(latest_checkpoint(cfg.output_dir) or "") if env.is_main else None)
    return Path(latest) if latest else None


def _maybe_resume(run: _Run) -> Path | None:
    cfg = run.cfg
    if not (cfg.resume_training or cfg.resume_from):
        return None
    path = _resume_path(cfg, run.env)
    if path is None:
        if cfg.resume_training == "auto":
            logger.info("resume_training auto: no checkpoint in %s yet, starting from step 0", cfg.output_dir)
            return None
        raise FileNotFoundError(f"resume_training: no checkpoint-STEP folder with a trainer state in {cfg.output_dir}")
    def checked_state() -> dict[str, Any]:
        state = read_state(path)  # a corrupt state fails here, before the model is touched
        saved = saved_config(path, state)
        g = run.order.global_batch
        check_resume_settings(path, None if saved is None else {**saved, "global_batch_size": state.get("global_batch_size")},
                              {**cfg.to_dict(), "global_batch_size": g})
        other = _other_inputs(saved, cfg) if saved is not None else []
        n = state["data"].get("num_samples") if isinstance(state["data"], dict) else None
        if n != run.order.num_samples:
            raise TrainStateError(f"cannot resume from {path}: it was trained on {n} samples, this run's data has "
                                  f"{run.order.num_samples}" + (f" ({', '.join(other)})" if other else "")
                                  + "; the sample order would differ: resume with the checkpoint's data, or start a "
                                  "new run in a new output_dir")
        run.order.load_state_dict(state["data"])
        _check_same_model(path, run.model.config)
        if run.lora_config is not None and saved is not None:
            _warn_other_base(path, saved, cfg, run.model)
        if other:
            logger.warning("%s was trained with other inputs: %s; the run goes on with this run's (the sample order "
                           "continues by step)", path, ", ".join(other))
        return state

    state = run.env.agree(checked_state)  # said once (every rank reads the same checkpoint)
    sharded.load_checkpoint(path, run.env, run.model, run.optimizer, trained_only=run.lora_config is not None,
                            state=state)
    run.scheduler.load_state_dict(state["scheduler"])
    run.progress = Progress(**state["progress"])
    run.batches = None
    logger.info("resumed from %s at step %d (saved by %s rank(s), now %d)", path, run.progress.step,
                state.get("world_size"), run.env.world_size)
    return path


def _warn_other_base(path: Path, saved: dict[str, Any], cfg: TrainConfig, model: nn.Module) -> None:
    """A LoRA checkpoint holds the adapter only; the frozen base it trained on comes from ``load_checkpoint``
    (or ``preset``). Another base of the same shapes (Qwen-VL for Qwen-VL-Chat, say) loads without an error, so
    it is said: by the base's weights when the adapter records their fingerprint (:func:`lora.base_fingerprint`),
    else by its name (a moved folder is said too: a path is all we know then)."""
    def base(c: dict[str, Any]) -> str:
        ckpt = c.get("load_checkpoint") or ""
        return str(Path(ckpt).resolve()) if ckpt else f"preset {c.get('preset') or ''}"

    before, now = base(saved), base(cfg.to_dict())
    try:
        recorded = lora.recorded_base_fingerprint(path / sharded.ADAPTER_DIR)
    except CheckpointError:  # an unreadable record: the names are still compared
        recorded = None
    if recorded is not None:  # (under FSDP only the main rank, which holds the first rows, logs warnings)
        if recorded != lora.base_fingerprint(model):
            logger.warning("%s is a LoRA checkpoint trained on the base %s; the weights this run loads (%s) are not "
                           "that base's. The adapter only fits the base it was trained on: resume with that "
                           "load_checkpoint", path, before, now)
        return
    if before != now:
        logger.warning("%s is a LoRA checkpoint: it was trained on the base %s; this run loads %s. The adapter only "
                       "fits the base it was trained on: resume with that load_checkpoint unless this is the same "
                       "model moved", path, before, now)


# What a resumed run reads besides the checkpoint: the sample order only checks the number of samples, so
# another data file of the same length, the same one cut or prompted otherwise, or another base model
# (full fine-tuning: the tokenizer and config come from it) would continue the run unsaid.
_INPUT_KEYS = ("data_path", "dataset_dir", "max_length", "max_images", "system_message", "load_checkpoint", "preset")
_PATH_KEYS = frozenset({"data_path", "dataset_dir", "load_checkpoint"})


def _other_inputs(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """``"key old -> new"`` for each of :data:`_INPUT_KEYS` that differs from the checkpoint's (a path spelled
    otherwise is the same; LoRA's base is said by :func:`_warn_other_base`)."""
    current = cfg.to_dict()

    def same(key: str) -> bool:
        before, now = saved.get(key), current.get(key)
        if before == now:
            return True
        return (key in _PATH_KEYS and isinstance(before, str) and isinstance(now, str) and bool(before) and bool(now)
                and Path(before).resolve() == Path(now).resolve())

    keys = [k for k in _INPUT_KEYS if k in saved and not (cfg.use_lora and k in ("load_checkpoint", "preset"))]
    return [f"{k} {saved[k]!r} -> {current[k]!r}" for k in keys if not same(k)]


def _check_same_model(path: Path, config: QwenVLConfig) -> None:
    """Refuse a checkpoint written for another model (its config.json describes other shapes), naming what
    differs, instead of failing inside the sharded load with a size mismatch that reads like a corrupt file."""
    if not (path / "config.json").is_file():
        return
    try:
        saved = QwenVLConfig.from_pretrained(path)
    except (OSError, ValueError):
        return  # unreadable: the load that follows names the problem
    diffs = [f"{part}.{k} {v!r} (this model: {getattr(getattr(config, part), k)!r})"
             for part in ("lm", "visual") for k, v in asdict(getattr(saved, part)).items()
             if v != getattr(getattr(config, part), k)]
    if diffs:
        raise sharded.CheckpointError(f"cannot resume from {path}: it was written for another model (its config.json "
                                      f"has {', '.join(diffs[:4])}); resume with the load_checkpoint it was trained "
                                      "from, or start a new run")


# ---- the loop ------------------------------------------------------------------------------------------------
class _StepSampler:
    """The micro-batches (index lists) of this rank for steps ``start, start + 1, ...`` (a DataLoader batch sampler)."""

    def __init__(self, run: _Run, start: int) -> None:
        self.order, self.start, self.stop = run.order, start, run.total_steps
        self.rank, self.world, self.batch_size = run.env.rank, run.env.world_size, run.cfg.batch_size
        self.accum = run.cfg.gradient_accumulation_steps

    def __iter__(self) -> Any:
        for step in range(self.start, self.stop):
            yield from self.order.micro_batches(step, self.rank, self.world, self.batch_size)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accum


class _Samples(Dataset[dict[str, Any]]):
    """The dataset as the loader's workers read it: a sample that fails to load (an image that decoded at the
    start no longer does) becomes ``{"bad": why}``; the loop skips it (``skip_bad_samples``) or stops with ``why``.
    Raised in a worker process, the error would reach the loop wrapped in DataLoader's traceback text."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return self.dataset[i]
        except ValueError as e:  # DatasetError
            return {"bad": str(e)}


def _collate_good(samples: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, list[str]]:
    good = [s for s in samples if "bad" not in s]
    return (collate(good) if good else None), [s["bad"] for s in samples if "bad" in s]


def _loader(run: _Run) -> DataLoader:
    workers = run.cfg.num_workers
    # its own generator: the loader draws a seed for its workers, which must not move the global (dropout) RNG
    return DataLoader(_Samples(run.dataset), batch_sampler=_StepSampler(run, run.progress.step),
                      collate_fn=_collate_good, num_workers=workers, prefetch_factor=2 if workers else None,
                      pin_memory=run.device.type == "cuda", generator=torch.Generator().manual_seed(run.cfg.seed))


def _next_micro_batches(run: _Run) -> list[dict[str, Any]]:
    """This rank's micro-batches of the next step (decoded ahead by the loader's workers). A sample that fails to
    load stops the run with a one-line DatasetError, or with skip_bad_samples is left out (and reported); under
    torchrun a micro-batch left with none becomes one token without a label (the ranks' forward passes must
    match; it adds nothing to the step)."""
    if run.batches is None:
        run.batches = iter(_loader(run))
    out = []
    for _ in range(run.cfg.gradient_accumulation_steps):
        batch, bad = next(run.batches)
        if bad and not run.cfg.skip_bad_samples:
            raise DatasetError(f"{bad[0]} (--skip_bad_samples true skips such samples)")
        for why in bad:  # this rank's own samples: every rank says its own
            run.bad_samples.append(why)
            rank_logger.warning("%sstep %d: skipping a bad sample (skip_bad_samples): %s", _rank_prefix(run.env),
                                run.progress.step + 1, why)
        if batch is not None:
            out.append(batch)
        elif run.env.distributed:  # every rank runs the same forward passes (FSDP's collectives): one token, no label
            out.append(collate([{"input_ids": torch.tensor([ENDOFTEXT_ID]), "labels": torch.tensor([IGNORE_INDEX]),
                                 "images": None}]))
    return out


def _rank_prefix(env: DistEnv) -> str:
    return f"rank {env.rank} of {env.world_size}: " if env.distributed else ""


def _loss_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _train_step(run: _Run, micro: list[dict[str, Any]]) -> tuple[float, float]:
    """Forward/backward over the micro-batches, clip, step; return (mean loss over all ranks, grad norm)."""
    env, dev, k = run.env, run.device, len(micro)
    counts = [_loss_tokens(b["labels"]) for b in micro]
    # one collective for the whole step: labelled tokens and image counts of every micro-batch over all ranks
    sums = env.sum([*counts, *(float(b["images"] is not None) for b in micro)])
    total, any_images = sum(sums[:k]), sums[k:]
    if total == 0:
        logger.warning("step %d has no labelled token; skipped", run.progress.step + 1)
        return float("nan"), 0.0
    loss_sum = torch.zeros((), dtype=torch.float32, device=dev)
    for b, n, imgs in zip(micro, counts, any_images):
        if n == 0 and not env.distributed:
            continue
        images = b["images"]
        if images is None and imgs:  # another rank encodes images: this one runs the vision tower on none
            size = run.model.config.visual.image_size
            images = torch.zeros(0, 3, size, size)
        images = images.to(dev, non_blocking=True) if images is not None else None
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=run.bf16):
            out = run.model(b["input_ids"].to(dev, non_blocking=True), images=images,
                            labels=b["labels"].to(dev, non_blocking=True))
        # weight by labelled tokens so accumulation (and ranks) equal one big batch
        (out.loss * (n / total)).backward()
        loss_sum += out.loss.detach().float() * n
    grad_norm = _clip_grad_norm(run.params, run.cfg.max_grad_norm or math.inf)
    if not math.isfinite(grad_norm):  # the norm is global: every rank stops here alike
        _diverged(run, grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    loss_total, tokens = env.sum([float(loss_sum), sum(int(b["attention_mask"].sum()) for b in micro)])
    run.progress.num_loss_tokens += int(total)
    run.progress.num_tokens += int(tokens)
    return loss_total / total, grad_norm


def _diverged(run: _Run, grad_norm: float) -> NoReturn:
    """Stop the run at a non-finite gradient (from a non-finite loss): applied, it would make every weight NaN,
    and the run would go on to save them as its final model."""
    run.optimizer.zero_grad(set_to_none=True)
    step, latest = run.progress.step + 1, latest_checkpoint(run.cfg.output_dir)
    raise distributed.met_by_every_rank(TrainingDivergedError(  # the norm is global: said once, naming no rank
        f"step {step}: the loss or its gradient is not finite (gradient norm {grad_norm}): the run diverged (or a "
        f"sample gives non-finite values); nothing of step {step} was applied and no final model is saved"
        + (f"; the newest checkpoint is {latest}" if latest is not None else "")
        + f"; lower learning_rate (now {run.cfg.learning_rate:g})"
        + (" or set max_grad_norm (0: no clipping)" if not run.cfg.max_grad_norm else "") + " and start again"))


def _clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the gradients to ``max_norm`` (global over all ranks' shards); return their norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):  # sharded gradients: the norm of each shard, reduced over ranks
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def _loop(run: _Run, callback: Callable[[StepInfo], bool | None] | None) -> bool:
    """Train until ``total_steps``; return True when the callback stopped the run."""
    cfg, prog = run.cfg, run.progress
    bar = tqdm(total=run.total_steps, initial=prog.step, desc="finetune", unit="step", dynamic_ncols=True,
               disable=not run.env.is_main)
    try:
        while prog.step < run.total_steps:
            t0 = time.perf_counter()
            tokens_before = prog.num_tokens
            group = run.optimizer.param_groups[0]
            lr = group["lr"] / group.get("lr_scale", 1.0)  # the base rate (learning_rate x schedule)
            loss, grad_norm = _train_step(run, _next_micro_batches(run))
            run.scheduler.step()
            dt = time.perf_counter() - t0
            prog.step += 1
            prog.train_seconds += dt
            prog.losses.append(loss)
            prog.learning_rates.append(lr)
            prog.grad_norms.append(grad_norm)
            tps = (prog.num_tokens - tokens_before) / dt
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
            if prog.step % cfg.logging_steps == 0 or prog.step == run.total_steps:
                logger.info("step %d/%d loss %.4f lr %.3e grad_norm %.3f tokens/s %.0f", prog.step,
                            run.total_steps, loss, lr, grad_norm, tps)
            saved = False
            if cfg.save_steps and prog.step % cfg.save_steps == 0 and prog.step < run.total_steps:
                _save_checkpoint(run)
                saved = True
            info = StepInfo(prog.step, run.total_steps, loss, lr, grad_norm, tps)
            if callback is not None and callback(info):
                if not saved:
                    _save_checkpoint(run)
                logger.info("stopped by the callback at step %d", prog.step)
                return True
    finally:
        bar.close()
    return False


# ---- saving --------------------------------------------------------------------------------------------------
def _trainer_state(run: _Run) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what a checkpoint needs to resume, the readable summary)."""
    p, env = run.progress, run.env
    info = {"world_size": env.world_size, "global_batch_size": run.order.global_batch}
    state = {"scheduler": run.scheduler.state_dict(), "data": run.order.state_dict(), "progress": asdict(p), **info,
             "config": run.cfg.to_dict()}
    readable = {"step": p.step, "data": run.order.state_dict(), "progress": asdict(p), **info,
                "config": run.cfg.to_dict()}
    return state, readable


def _save_checkpoint(run: _Run) -> Path:
    path = Path(run.cfg.output_dir) / f"checkpoint-{run.progress.step}"
    # a folder of that name that we did not write (made during the run, or kept beside the one resumed) would be
    # replaced whole: refused on every rank as rank 0 sees it
    foreign = run.env.is_main and (path.exists() or path.is_symlink()) and not is_ours(path)
    if run.env.broadcast(foreign):
        raise OutputDirError(f"{path} exists and qwenvl did not write it: the run stops at step {run.progress.step} "
                             "rather than replace it with its checkpoint; move it away and resume with "
                             "--resume_training")
    state, readable = _trainer_state(run)
    extra = functools.partial(_write_adapter, run) if run.lora_config is not None else None
    sharded.save_checkpoint(path, run.env, run.model, run.optimizer, state, readable, run.model.config,
                            trained_only=run.lora_config is not None, write_extra=extra)
    logger.info("saved %s", path)
    if run.env.is_main:
        prune_checkpoints(run.cfg.output_dir, run.cfg.save_total_limit)
    run.env.barrier()
    return path


def _write_adapter(run: _Run, folder: Path) -> Path:
    """The LoRA adapter (and the parameters trained in full next to it) in peft's format; gathered when sharded."""
    state = None
    if run.env.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # a model's state gathered in full onto the CPU: plain tensors (ValueType also covers optimizer states)
        state = cast(dict[str, torch.Tensor], get_model_state_dict(run.model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)))
        if not run.env.is_main:
            return folder / sharded.ADAPTER_DIR
    return lora.save_adapter(run.model, run.lora_config, folder / sharded.ADAPTER_DIR, state=state)


def _save_final(run: _Run) -> Path:
    # several files, moved in one by one (config.json last): Ctrl-C, SIGTERM and SIGHUP wait until they all are
    with signals_held("the final model"):
        return _write_final(run)


def _write_final(run: _Run) -> Path:
    out = Path(run.cfg.output_dir)
    if run.env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if run.lora_config is not None:
        final = _write_adapter(run, out)
        if run.env.is_main:
            record_files(out, [final.name])
    else:
        final = publish_weights(run.model, out, _save_dtype(run))
    if run.env.is_main:
        _state, summary = _trainer_state(run)
        summary = {"progress": summary["progress"], "world_size": summary["world_size"],
                   "global_batch_size": summary["global_batch_size"], "config": summary["config"]}
        atomic_write_text(out / "trainer_state.json", _json(summary))
        record_files(out, ["trainer_state.json"])
        logger.info("saved the final %s to %s", "adapter" if run.lora_config is not None else "model", final)
    run.env.barrier()
    return final


def _save_dtype(run: _Run) -> torch.dtype:
    name = run.cfg.save_dtype if run.cfg.save_dtype != "auto" else run.model.config.torch_dtype
    return as_dtype(name) or torch.float32


def publish_weights(model: QwenVL, out_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Save ``model`` in the official layout into our output folder ``out_dir``, leaving its other contents.

    :func:`~qwenvl.checkpoint.save_pretrained` stages the files in a unique hidden folder, moves them in
    (``config.json`` last) and deletes only weight files that our marker lists and the new save lacks. A sharded
    model is gathered one file at a time (every rank calls this; rank 0 writes).

    A whole (unsharded) model is cast to ``dtype`` as it is written, one tensor at a time on the host
    (:func:`~qwenvl.checkpoint.save_pretrained`'s ``load``): a cast copy of the whole state made up front would
    sit on the training GPU beside the fp32 weights and AdamW's moments (2 bytes a parameter in bf16: 17.9 GiB
    for the 9.6B model, enough to run out of memory at the final save). A sharded model's tensors are cast per
    rank (each holds 1/N of them) before they are gathered.
    """
    state = model.state_dict()
    if any(is_sharded(v) for v in state.values()):  # DTensors (FSDP)
        cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
        return save_pretrained(cast, model.config, out_dir)
    described = {k: torch.empty(v.shape, dtype=dtype if v.is_floating_point() else v.dtype, device="meta")
                 for k, v in state.items()}
    return save_pretrained(described, model.config, out_dir, load=state.__getitem__)


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=1) + "\n"


def _result(run: _Run, final: Path | None, resumed_from: Path | None, stopped: bool) -> TrainResult:
    p = run.progress
    return TrainResult(
        output_dir=Path(run.cfg.output_dir),
        final_path=final,
        steps=p.step,
        total_steps=run.total_steps,
        losses=list(p.losses),
        learning_rates=list(p.learning_rates),
        grad_norms=list(p.grad_norms),
        num_tokens=p.num_tokens,
        num_loss_tokens=p.num_loss_tokens,
        tokens_per_second=p.num_tokens / p.train_seconds if p.train_seconds else 0.0,
        train_seconds=p.train_seconds,
        checkpoints=[path for _s, path in checkpoint_dirs(run.cfg.output_dir)],
        resumed_from=resumed_from,
        stopped_early=stopped,
        model=run.model,
        bad_samples=list(run.bad_samples),
    )
