"""config.json / generation_config.json values that would load and fail later fail when read, naming the file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qwenvl.config import ConfigError, GenerationDefaults, QwenVLConfig


@pytest.mark.parametrize(("gen", "message"), [
    # all loaded, and the first generation failed with "top_p must be in (0, 1], got 5", naming no file
    ({"top_p": 5}, "top_p must be in (0, 1], got 5"),
    ({"top_p": 0}, "top_p must be a positive number, got 0"),
    ({"temperature": float("nan")}, "temperature must be a positive number, got nan"),  # json writes NaN
    ({"temperature": -1.0}, "temperature must be a positive number, got -1.0"),
    ({"repetition_penalty": 0}, "repetition_penalty must be a positive number, got 0"),
    ({"top_k": -3}, "top_k must be >= 0 (0 = off), got -3"),
])
def test_sampling_defaults_out_of_range_name_the_generation_config(tmp_path: Path, gen: dict, message: str) -> None:
    QwenVLConfig.from_preset("tiny").save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    with pytest.raises(ConfigError, match=re.escape(f"generation_config.json: {message}")):
        QwenVLConfig.from_pretrained(tmp_path)


def test_sampling_defaults_in_range_load() -> None:
    g = GenerationDefaults.from_dict({"top_p": 1, "top_k": 0, "temperature": 0.01, "repetition_penalty": 1.05})
    assert (g.top_p, g.top_k, g.temperature, g.repetition_penalty) == (1, 0, 0.01, 1.05)


def test_a_checkpoint_of_another_architecture_is_said_to_be_not_qwen_vl(tmp_path: Path) -> None:
    # a Qwen2-VL folder was "model_type is 'qwen2_vl', expected 'qwen'": not what the folder is, nor what is wanted
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2VLForConditionalGeneration"],
                                                      "model_type": "qwen2_vl", "vision_config": {"depth": 32}}))
    with pytest.raises(ConfigError) as e:
        QwenVLConfig.from_pretrained(tmp_path)
    assert str(e.value) == (f"{tmp_path / 'config.json'}: model_type is 'qwen2_vl' (Qwen2VLForConditionalGeneration), "
                            "not Qwen-VL's 'qwen': this is not a Qwen-VL checkpoint (qwenvl loads Qwen-VL and "
                            "Qwen-VL-Chat, and checkpoints of their shape)")
