"""``qwenvl demo``: a tiny Qwen-VL trained from scratch to box coloured shapes, evaluated before and after.

``from qwenvl.demo import run_demo`` (see :mod:`qwenvl.demo.run`); the data generator is
:mod:`qwenvl.demo.synthetic`, the figures :mod:`qwenvl.demo.report`, and what makes a training step cheap
without changing it :mod:`qwenvl.demo.vocab` (only the vocabulary rows training touches) and
:mod:`qwenvl.demo.cache` (each image through the frozen vision tower once).
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEMO_PROMPTS", "DemoConfig", "DemoResult", "demo_model_config", "local_resampler_init", "run_demo"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `qwenvl --help` (which imports qwenvl.demo.cli) does not load torch.
    if name in __all__:
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module 'qwenvl.demo' has no attribute {name!r}")
