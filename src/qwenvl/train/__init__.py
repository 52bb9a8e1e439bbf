"""Fine-tuning Qwen-VL: full stage-3 training or LoRA, with exact resume (see :mod:`qwenvl.train.trainer`).

Names are imported on first use, so that ``qwenvl.train.cli`` (and the ``qwenvl`` command's ``--help``)
does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["StepInfo", "TrainConfig", "TrainConfigError", "TrainResult", "merge_lora", "train"]

_HOME = {"TrainConfig": "config", "TrainConfigError": "config", "merge_lora": "lora", "StepInfo": "trainer",
         "TrainResult": "trainer", "train": "trainer"}

if TYPE_CHECKING:
    from .config import TrainConfig, TrainConfigError
    from .lora import merge_lora
    from .trainer import StepInfo, TrainResult, train


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
