"""Training data: converting public datasets into the Qwen-VL conversation format, and the fine-tuning
dataset (tokenized conversations, image-safe truncation, padded batches). The dataset names are imported
on first use (they need torch)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qwenvl.data.convert import ConvertSummary, MalformedRecord, convert_llava, convert_records

__all__ = ["ConversationDataset", "ConvertSummary", "DatasetError", "MalformedRecord", "collate", "convert_llava",
           "convert_records"]

_DATASET = ("ConversationDataset", "DatasetError", "collate")

if TYPE_CHECKING:
    from qwenvl.data.dataset import ConversationDataset, DatasetError, collate


def __getattr__(name: str) -> Any:
    if name in _DATASET:
        return getattr(importlib.import_module("qwenvl.data.dataset"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
