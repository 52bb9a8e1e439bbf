"""Data parallelism for fine-tuning: FSDP2 (``fully_shard``) applied to the unchanged model, as torchtitan does.

Order: activation checkpointing (the model's own switch: each block's forward runs under
``torch.utils.checkpoint``), then ``fully_shard`` on the units that are gathered one at a time

- every ViT block, the resampler (``attn_pool``) and the rest of the vision tower (conv1, position table,
  ln_pre, ln_post, proj);
- the input embedding ``wte``;
- every LM block;
- ``[ln_f, lm_head]`` as one unit: the loss reads ``lm_head.weight`` without calling ``lm_head``
  (:func:`qwenvl.model.cross_entropy.linear_cross_entropy`), so ``lm_head`` must be gathered by ``ln_f``'s
  forward; FSDP2 completes a unit whose modules did not all run at the end of the root's forward;
- the root (whatever is left, and the once-per-step bookkeeping).

Parameters are sharded on dim 0 across all ranks; each rank keeps fp32 master shards, and AdamW sees only
the trainable ones, so the frozen ViT costs its 1/N shard and nothing else. Where the device multiplies bf16
natively (:func:`qwenvl.hardware.resolve_bf16`) the gathered parameters are bf16
(``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``); module inputs are not cast, so the RoPE
tables stay fp32. ``reshard_after_forward`` true frees each unit after its forward (ZeRO-3), false keeps it
gathered until its backward (ZeRO-2: more memory, one all-gather less per unit). Gradients are summed over
ranks, not averaged: the trainer weights each rank's loss by its share of the global batch's labelled tokens.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from ..hardware import resolve_bf16
from ..model import QwenVL
from .config import TrainConfig

__all__ = ["mixed_precision", "parallelize"]

logger = logging.getLogger(__name__)


def mixed_precision(cfg: TrainConfig, device_type: str) -> MixedPrecisionPolicy:
    bf16 = resolve_bf16(cfg.bf16, device_type, "FSDP parameters gathered")
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32,
                                cast_forward_inputs=False)


def parallelize(model: QwenVL, mesh: DeviceMesh, cfg: TrainConfig) -> QwenVL:
    """Shard ``model`` in place over ``mesh`` (module docstring); returns it. Set ``requires_grad`` (and add
    LoRA adapters) before, build the optimizer after."""
    model.set_gradient_checkpointing(cfg.gradient_checkpointing)
    shard = functools.partial(fully_shard, mesh=mesh, mp_policy=mixed_precision(cfg, mesh.device_type),
                              reshard_after_forward=cfg.reshard_after_forward)
    visual = model.transformer.visual
    for block in visual.transformer.resblocks:
        shard(block)
    shard(visual.attn_pool)
    shard(visual)
    shard(model.transformer.wte)
    for block in model.transformer.h:
        shard(block)
    # needed again at the start of the backward pass: kept gathered (as torchtitan does)
    shard([model.transformer.ln_f, model.lm_head], reshard_after_forward=False)
    shard(model)
    # FSDP2 warns at every forward (on every rank) that the resampler returns a view (nn.MultiheadAttention's
    # batch-first transpose): an in-place op on it would skip a hook, but its one consumer, ln_post, is out of place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPResampler\) returned a view tensor",
                            category=UserWarning)
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # sum over ranks (see the module docstring)
        if mesh.device_type == "cpu":
            unit.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    logger.info("FSDP2 over %d ranks: %d units, reshard_after_forward=%s, activation checkpointing %s",
                mesh.size(), len(units), cfg.reshard_after_forward, "on" if cfg.gradient_checkpointing else "off")
    return model
