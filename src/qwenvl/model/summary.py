"""Parameter counts by part and the stored dtype of a model or checkpoint (``qwenvl info``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..config import QwenVLConfig
from .qwenvl import QwenVL

# Stage-3 trainable parts of the vision tower: the resampler and what follows it.
RESAMPLER_PREFIXES = ("transformer.visual.attn_pool.", "transformer.visual.ln_post.", "transformer.visual.proj")


def part_of(name: str) -> str:
    if name.startswith(RESAMPLER_PREFIXES):
        return "resampler"
    if name.startswith("transformer.visual."):
        return "vision tower (ViT)"
    if name.startswith("transformer.wte."):
        return "LM embedding (wte)"
    if name.startswith("lm_head."):
        return "LM head (lm_head)"
    return "LM blocks (h, ln_f)"


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for name, p in model.named_parameters():
        counts[part_of(name)] += p.numel()
    out = dict(sorted(counts.items()))
    out["total"] = sum(counts.values())
    return out


def describe(source: str | Path | QwenVLConfig) -> dict[str, Any]:
    """Config, parameter counts by part (built on the meta device: no weights are read) and stored dtype.

    For a checkpoint also ``loads_as``: the dtype and device that :func:`qwenvl.inference.load` (``qwenvl predict``,
    ``chat``, ``serve``, ``eval``) picks for it with dtype and device auto on this machine, and the config's
    ``bf16``/``fp16``/``fp32`` as config.json stores them (qwenvl does not read them; the official code does)."""
    loads_as = None
    if isinstance(source, QwenVLConfig):
        config, where, dtype = source, "preset", source.torch_dtype
        model = QwenVL.on_meta(config)
    else:
        from ..checkpoint import check_against_model, load_state_dict

        config, where = QwenVLConfig.from_pretrained(source), str(source)
        model = QwenVL.on_meta(config)
        tensors = load_state_dict(source)  # memory-mapped: only headers are read
        # the counts below are config.json's: said only for weights that match it (as loading would check)
        check_against_model(model.state_dict(), tensors, source, strict=True)
        dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())
        dtype = ", ".join(f"{d} ({n} tensors)" for d, n in dtypes.most_common())
        del tensors
        from ..hardware import default_dtype, pick_device

        device = pick_device(None)  # as qwenvl.inference.load picks them
        loads_as = (f"{str(default_dtype(device)).removeprefix('torch.')} on {device} (dtype and device auto: "
                    "bfloat16 where the device computes it natively, else float32; --dtype to choose)")
    official = config.to_official() | config.stored_dtype_flags()
    return {
        "source": where,
        "dtype": dtype,
        **({"loads_as": loads_as} if loads_as else {}),
        "parameters": count_parameters(model),
        "config": {k: v for k, v in official.items() if k not in ("architectures",)},
        "generation": config.generation.to_dict(),
    }
