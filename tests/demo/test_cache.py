"""cached_image_features: each distinct image through the frozen vision tower once, the same features."""

from __future__ import annotations

import copy

import pytest
import torch

from qwenvl.demo.cache import cached_image_features
from qwenvl.model import QwenVL


def test_each_image_is_encoded_once_with_the_same_features(tiny_model: QwenVL) -> None:
    model = copy.deepcopy(tiny_model).requires_grad_(False)
    size = model.config.visual.image_size
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(3, size, size, generator=gen) for _ in range(3))
    seen: list[int] = []
    model.transformer.visual.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        want = model.encode_images(torch.stack([a, b, c]))
    seen.clear()
    with cached_image_features(model) as cache:
        first = model.encode_images(torch.stack([a, b, a]))  # a twice in one batch: one forward of 2 images
        second = model.encode_images(torch.stack([c, b, a]))  # only c is new
        third = model.encode_images(torch.stack([b, a]))  # nothing new: no forward
    assert seen == [2, 1] and len(cache) == 3
    for got, idx in ((first, [0, 1, 0]), (second, [2, 1, 0]), (third, [1, 0])):
        torch.testing.assert_close(got, want[idx], rtol=1e-4, atol=1e-5)  # batch-size rounding only
    assert "encode_images" not in vars(model)  # the method is back


def test_a_trainable_vision_tower_is_refused(tiny_model: QwenVL) -> None:
    model = copy.deepcopy(tiny_model)
    size = model.config.visual.image_size
    with cached_image_features(model), pytest.raises(RuntimeError, match="frozen vision tower"):
        model.encode_images(torch.zeros(1, 3, size, size))
