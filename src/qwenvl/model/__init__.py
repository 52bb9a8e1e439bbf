"""Qwen-VL modeling: vision tower + resampler (``vision``), the Qwen LM (``llm``), the KV cache and the glue."""

from .kv_cache import KVCache
from .qwenvl import QwenVL, QwenVLOutput

__all__ = ["KVCache", "QwenVL", "QwenVLOutput"]
