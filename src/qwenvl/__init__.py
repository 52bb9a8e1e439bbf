"""qwenvl: the maintained PyTorch implementation of Qwen-VL (ViT-bigG + resampler + Qwen-7B)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import GenerationDefaults, LMConfig, QwenVLConfig, VisionConfig

__version__ = "0.1.0"
__all__ = ["GenerationDefaults", "LMConfig", "Processor", "QwenVL", "QwenVLConfig", "VisionConfig", "__version__"]

if TYPE_CHECKING:
    from .model import QwenVL
    from .processor import Processor


def __getattr__(name: str) -> Any:
    # Lazy: `import qwenvl` stays cheap for the CLI's --help; torch loads on first use.
    if name == "QwenVL":
        from .model import QwenVL

        return QwenVL
    if name == "Processor":
        from .processor import Processor

        return Processor
    raise AttributeError(f"module 'qwenvl' has no attribute {name!r}")
