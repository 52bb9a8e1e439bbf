"""TrainConfig: sectioned YAML, typed overrides, clear errors for unknown or invalid settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwenvl.train import TrainConfig, TrainConfigError

CONFIGS = Path(__file__).parents[2] / "configs"


def test_stage3_yaml_holds_the_design_values() -> None:
    cfg = TrainConfig.from_yaml(CONFIGS / "finetune_qwenvl_9.6b_bf16.yaml")
    assert (cfg.learning_rate, cfg.min_lr, cfg.warmup_steps) == (1e-5, 1e-6, 300)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps, cfg.weight_decay) == (0.9, 0.95, 1e-8, 0.1)
    assert (cfg.max_grad_norm, cfg.max_length, cfg.bf16, cfg.gradient_checkpointing) == (1.0, 2048, "auto", True)
    assert (cfg.freeze_vision, cfg.freeze_resampler, cfg.freeze_llm) == (True, False, False)
    assert cfg.max_images is None
    tiny = TrainConfig.from_yaml(CONFIGS / "finetune_qwenvl_tiny.yaml")
    assert tiny.preset == "tiny" and tiny.max_steps > 0


def test_sections_are_flattened_and_overrides_typed(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  max_length: 128\noptim:\n  learning_rate: 1e-4\n  max_grad_norm: 2\nseed: 3\n")
    cfg = TrainConfig.from_yaml(f, {"seed": "7", "bf16": "false", "max_images": "none", "min_lr": "0"})
    assert cfg.max_length == 128 and cfg.learning_rate == 1e-4  # YAML reads 1e-4 as a string
    assert cfg.max_grad_norm == 2.0 and isinstance(cfg.max_grad_norm, float)
    assert (cfg.seed, cfg.bf16, cfg.max_images, cfg.min_lr) == (7, "false", None, 0.0)
    assert TrainConfig.from_yaml(None, {"max_images": "2"}).max_images == 2


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "message"),
    [
        ("optim:\n  learning_rat: 1e-4\n", {}, r"unknown training setting\(s\): 'learning_rat' \(did you mean 'learning_rate'\?\)"),
        ("", {"bogus": "1"}, r"command line: unknown training setting\(s\): 'bogus'"),
        ("a:\n  seed: 1\nb:\n  seed: 2\n", {}, r"'seed' is set twice \(a\.seed and b\.seed\)"),
        ("batch_size: two\n", {}, r"batch_size: cannot read 'two' as int"),
        ("bf16: maybe\n", {}, r"bf16 must be auto, true or false, got .maybe."),
        ("batch_size: 1.5\n", {}, r"batch_size must be int, got 1.5"),
        ("batch_size: 0\n", {}, r"batch_size must be >= 1"),
        ("run_mode: predict\n", {}, r"run_mode must be 'finetune'"),
        ("learning_rate: 1e-6\nmin_lr: 1e-5\n", {}, r"min_lr \(1e-05\) must not exceed learning_rate"),
        ("preset: huge\n", {}, r"unknown preset 'huge'"),
        ("vision_lr_scale: -0.1\n", {}, r"vision_lr_scale must be >= 0"),
        ("- a\n- b\n", {}, r"expected a mapping"),
        # accepted before: an infinite rate or decay trains a model of NaNs and saves it (exit 0)
        ("", {"learning_rate": "inf"}, r"learning_rate must be a finite number, got inf"),
        ("weight_decay: .inf\n", {}, r"weight_decay must be a finite number, got inf"),
        ("", {"lora_dropout": "2"}, r"lora_dropout must be in \[0, 1\), got 2\.0"),
        ("", {"lora_target": "("}, r"lora_target '\(' is not a regular expression: missing \)"),
        ("", {"lora_alpha": "0"}, r"lora_alpha must be > 0, got 0"),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, yaml_text: str, overrides: dict, message: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text)
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig.from_yaml(f, overrides)


def test_missing_yaml_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="training config not found"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")
