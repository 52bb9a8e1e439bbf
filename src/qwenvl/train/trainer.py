"""Stage-3 fine-tuning: the LM and the resampler train, the ViT stays frozen (DESIGN.md section 1).

One process, one device. Fused AdamW over fp32 master weights, bf16 autocast (on the CPU as fast as or faster
than bf16 weights with an fp32 master copy: ``benchmarks/finetune.py --compare``), cosine schedule with linear
warmup down to ``min_lr``, gradient clipping, gradient accumulation, activation checkpointing. The frozen
ViT records no autograd graph (no input or weight of it requires grad), so it costs one forward. Gradient
accumulation weights each micro-batch by its labelled-token count, so ``k`` micro-batches of size ``b``
give the same update as one batch of ``k * b`` (up to rounding).

Checkpoints (``output_dir/checkpoint-STEP/``, the newest ``save_total_limit`` kept) hold the weights in
the official layout and the trainer state; a run started with ``resume_training`` continues exactly where
the checkpoint left off: same following losses and bit-identical final weights as an uninterrupted run.
The final weights go to ``output_dir`` (LoRA runs: ``output_dir/adapter``).

The run holds ``output_dir`` for itself (``qwenvl.outputs``): it must be new, empty or one of our outputs
(``overwrite``: any folder, of which only the files we write are replaced), must not be, contain or lie
inside ``load_checkpoint`` (nor be or contain the training data), and is locked for the whole run. A new
run (not resuming) in a folder that holds checkpoints of an earlier one is refused unless ``overwrite``
(which deletes those checkpoints). Resuming refuses changed optimization settings
(:data:`~qwenvl.train.state.RESUME_KEYS`), naming them.
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
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import load_state_dict as read_checkpoint
from ..checkpoint import save_pretrained
from ..data.dataset import IGNORE_INDEX, ConversationDataset, collate
from ..fileio import atomic_write_text, remove_tree
from ..hardware import resolve_bf16
from ..model import QwenVL
from ..outputs import OutputDirError, check_separate, claim_output, is_ours, record_files
from . import lora
from .config import TrainConfig, TrainConfigError
from .state import (
    BatchOrder,
    Progress,
    check_resume_settings,
    checkpoint_dirs,
    latest_checkpoint,
    load_state,
    prune_checkpoints,
    read_state,
    save_checkpoint,
    saved_config,
)

__all__ = ["StepInfo", "TrainResult", "cosine_with_warmup", "part_of", "select_trainable", "train"]

logger = logging.getLogger(__name__)

# Trained with the LM in stage 3 although they sit in the vision tower (DESIGN.md section 1).
RESAMPLER = ("transformer.visual.attn_pool.", "transformer.visual.ln_post.", "transformer.visual.proj")
# Never trained: the resampler's fixed 2D sin-cos position table.
FIXED = frozenset({"transformer.visual.attn_pool.pos_embed"})
# The input embedding: part of the LM, but ``freeze_embedding`` keeps it alone frozen.
EMBEDDING = "transformer.wte.weight"


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
    model: nn.Module | None = field(default=None, repr=False)
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
    lora_config: Any = None
    params: list[nn.Parameter] = field(default_factory=list)
    bf16: bool = False  # bf16 autocast, resolved from cfg.bf16 and the hardware
    bad_samples: list[str] = field(default_factory=list)


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
    ``callback(info)`` runs after each step; returning True stops the run after saving a checkpoint.
    """
    if cfg.use_parallel:
        logger.warning("use_parallel: this trainer runs single-process on one device; training on %s", cfg.device)
    with _hold_output_dir(cfg):
        return _train(cfg, model, processor, dataset, callback)


def _train(
    cfg: TrainConfig,
    model: QwenVL | None,
    processor: Any,
    dataset: Any,
    callback: Callable[[StepInfo], bool | None] | None,
) -> TrainResult:
    device = _resolve_device(cfg.device)
    _seed_everything(cfg.seed)
    model = _prepare_model(cfg, model, device)
    if dataset is None:
        dataset = _build_dataset(cfg, processor, model)
    run = _setup_run(cfg, model, dataset, device)
    _seed_everything(cfg.seed)  # the loop's randomness (dropout) does not depend on the setup
    resumed_from = _maybe_resume(run)  # restores the RNG states of the checkpoint
    stopped = _loop(run, callback)
    final = None if stopped else _save_final(run)
    return _result(run, final, resumed_from, stopped)


@contextlib.contextmanager
def _hold_output_dir(cfg: TrainConfig) -> Iterator[None]:
    """Check ``output_dir`` against the inputs, lock it for the run and settle what an earlier run left."""
    check_separate(cfg.output_dir, {"load_checkpoint": cfg.load_checkpoint, "training data": cfg.data_path,
                                    "dataset_dir": cfg.dataset_dir},
                   may_lie_inside=("dataset_dir",), what="output_dir")
    with claim_output(cfg.output_dir, "finetune", overwrite=cfg.overwrite, flag="--overwrite (overwrite: true)"):
        _check_earlier_run(cfg)
        yield


def _check_earlier_run(cfg: TrainConfig) -> None:
    """A new run must not mix its checkpoints with an earlier run's; with ``overwrite`` ours are deleted.
    Resuming the newest checkpoint first finishes a pruning that an interrupted run did not get to."""
    found = checkpoint_dirs(cfg.output_dir)
    if cfg.resume_training or cfg.resume_from:
        if not cfg.resume_from:
            prune_checkpoints(cfg.output_dir, cfg.save_total_limit)
        return
    if not found:
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


# ---- setup ---------------------------------------------------------------------------------------------------
def _resolve_device(name: str) -> torch.device:
    from ..inference import pick_device  # the one place device names are checked

    try:
        return torch.device(pick_device(name))
    except ValueError as e:
        raise TrainConfigError(str(e).replace("--device", "device", 1)) from None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _prepare_model(cfg: TrainConfig, model: QwenVL | None, device: torch.device) -> QwenVL:
    if model is None:
        if cfg.load_checkpoint:
            model = QwenVL.from_pretrained(cfg.load_checkpoint, dtype=torch.float32, device=device)
        elif cfg.preset:
            model = QwenVL.from_config(cfg.preset, dtype=torch.float32, device=device, seed=cfg.seed)
        else:
            raise TrainConfigError("no model: set load_checkpoint (a checkpoint folder) or preset")
    low = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if low:
        logger.warning("model weights are %s: training keeps fp32 master weights, casting the model to float32",
                       ", ".join(low))
        model.float()
    model.to(device)
    model.train()
    model.set_gradient_checkpointing(cfg.gradient_checkpointing)
    return model


def _build_dataset(cfg: TrainConfig, processor: Any, model: QwenVL) -> ConversationDataset:
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


def _set_trainable(model: QwenVL, cfg: TrainConfig) -> Any:
    """Set ``requires_grad`` (adding LoRA adapters when asked); return the LoraConfig or None."""
    if cfg.use_lora:
        resampler = cfg.replace(freeze_llm=True, freeze_vision=True, freeze_resampler=False)
        extra = select_trainable(model, resampler) if cfg.lora_train_resampler else []
        return lora.apply_lora(model, cfg, extra)
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


def _plan_steps(cfg: TrainConfig, num_samples: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    micro = cfg.num_epochs * -(-num_samples // cfg.batch_size)
    return -(-micro // cfg.gradient_accumulation_steps)


def _setup_run(cfg: TrainConfig, model: QwenVL, dataset: Any, device: torch.device) -> _Run:
    lora_config = _set_trainable(model, cfg)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise TrainConfigError("nothing to train: every parameter is frozen")
    optimizer = _build_optimizer(named, cfg, device)
    total = _plan_steps(cfg, len(dataset))
    schedule = functools.partial(cosine_with_warmup, warmup=cfg.warmup_steps, total=total,
                                 min_ratio=cfg.min_lr / cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    n_train = sum(p.numel() for _n, p in named)
    n_all = sum(p.numel() for p in model.parameters())
    logger.info("training %d of %d parameters (%.1f%%), %d samples, %d steps of %d x %d micro-batches", n_train,
                n_all, 100 * n_train / n_all, len(dataset), total, cfg.gradient_accumulation_steps, cfg.batch_size)
    return _Run(cfg, model, dataset, device, optimizer, scheduler, BatchOrder(len(dataset), cfg.batch_size, cfg.seed),
                Progress(), total, lora_config, [p for _n, p in named], resolve_bf16(cfg.bf16, device))


def _maybe_resume(run: _Run) -> Path | None:
    cfg = run.cfg
    if not (cfg.resume_training or cfg.resume_from):
        return None
    path = Path(cfg.resume_from) if cfg.resume_from else latest_checkpoint(cfg.output_dir)
    if path is None:
        raise FileNotFoundError(f"resume_training: no checkpoint-STEP folder with a trainer state in {cfg.output_dir}")
    trainer_state = read_state(path)  # a corrupt state fails here, before the model is touched
    check_resume_settings(path, saved_config(path, trainer_state), cfg.to_dict())
    if run.lora_config is not None:
        lora.load_adapter(run.model, path / "adapter")
    else:
        state = read_checkpoint(path)
        with torch.no_grad():
            run.model.load_state_dict(state, strict=True)
        del state
    run.progress = load_state(path, run.optimizer, run.scheduler, run.order, trainer_state)
    logger.info("resumed from %s at step %d", path, run.progress.step)
    return path


# ---- the loop ------------------------------------------------------------------------------------------------
def _next_micro_batches(run: _Run) -> list[dict[str, Any]]:
    """The step's micro-batches; with skip_bad_samples a sample that fails to load is left out (and reported)."""
    out = []
    for _ in range(run.cfg.gradient_accumulation_steps):
        samples = [s for i in run.order.next() if (s := _load_sample(run, i)) is not None]
        if samples:
            out.append(collate(samples))
    return out


def _load_sample(run: _Run, i: int) -> dict[str, Any] | None:
    try:
        return run.dataset[i]
    except ValueError as e:  # DatasetError: an image that decoded at the start no longer does
        if not run.cfg.skip_bad_samples:
            raise
        run.bad_samples.append(str(e))
        logger.warning("step %d: skipping a bad sample (skip_bad_samples): %s", run.progress.step + 1, e)
        return None


def _loss_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _train_step(run: _Run, micro: list[dict[str, Any]]) -> tuple[float, float]:
    """Forward/backward over the micro-batches, clip, step; return (mean loss, grad norm)."""
    counts = [_loss_tokens(b["labels"]) for b in micro]
    total = sum(counts)
    if total == 0:
        logger.warning("step %d has no labelled token; skipped", run.progress.step + 1)
        return float("nan"), 0.0
    loss_sum = torch.zeros((), dtype=torch.float32, device=run.device)
    dev = run.device
    for b, n in zip(micro, counts):
        if n == 0:
            continue
        images = b["images"].to(dev, non_blocking=True) if b["images"] is not None else None
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=run.bf16):
            out = run.model(b["input_ids"].to(dev, non_blocking=True), images=images,
                            labels=b["labels"].to(dev, non_blocking=True))
        # weight by labelled tokens so accumulation equals one big batch
        (out.loss * (n / total)).backward()
        loss_sum += out.loss.detach().float() * n
    max_norm = run.cfg.max_grad_norm or math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, max_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.progress.num_loss_tokens += total
    run.progress.num_tokens += sum(int(b["attention_mask"].sum()) for b in micro)
    return float(loss_sum) / total, float(grad_norm)


def _loop(run: _Run, callback: Callable[[StepInfo], bool | None] | None) -> bool:
    """Train until ``total_steps``; return True when the callback stopped the run."""
    cfg, prog = run.cfg, run.progress
    bar = tqdm(total=run.total_steps, initial=prog.step, desc="finetune", unit="step", dynamic_ncols=True)
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
def _write_model(run: _Run, folder: Path) -> None:
    """The weights a checkpoint needs: the full model (master dtype) or, for LoRA, the adapter."""
    if run.lora_config is not None:
        lora.save_adapter(run.model, run.lora_config, folder / "adapter")
    else:
        save_pretrained(run.model, run.model.config, folder)


def _save_checkpoint(run: _Run) -> Path:
    path = Path(run.cfg.output_dir) / f"checkpoint-{run.progress.step}"
    save_checkpoint(path, functools.partial(_write_model, run), run.optimizer, run.scheduler, run.order,
                    run.progress, run.cfg.to_dict())
    logger.info("saved %s", path)
    prune_checkpoints(run.cfg.output_dir, run.cfg.save_total_limit)
    return path


def _save_final(run: _Run) -> Path:
    out = Path(run.cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if run.lora_config is not None:
        final = lora.save_adapter(run.model, run.lora_config, out / "adapter")
        record_files(out, [final.name])
    else:
        final = publish_weights(run.model, out, _save_dtype(run))
    summary = {"progress": asdict(run.progress), "config": run.cfg.to_dict()}
    atomic_write_text(out / "trainer_state.json", _json(summary))
    record_files(out, ["trainer_state.json"])
    logger.info("saved the final %s to %s", "adapter" if run.lora_config is not None else "model", final)
    return final


def _save_dtype(run: _Run) -> torch.dtype:
    name = run.cfg.save_dtype if run.cfg.save_dtype != "auto" else run.model.config.torch_dtype
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def publish_weights(model: QwenVL, out_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Save ``model`` in the official layout into our output folder ``out_dir``, leaving its other contents.

    :func:`~qwenvl.checkpoint.save_pretrained` stages the files in a unique hidden folder, moves them in
    (``config.json`` last) and deletes only weight files that our marker lists and the new save lacks.
    """
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    return save_pretrained(state, model.config, out_dir)


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
