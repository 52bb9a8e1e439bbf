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
        # the official finetune.py's (Hugging Face's) names and "lr": no spelling is close enough for a hint
        ("", {"lr": "2"}, r"'lr' \(did you mean 'learning_rate'\?\)"),
        ("num_train_epochs: 3\nper_device_train_batch_size: 2\n", {},
         r"'num_train_epochs' \(did you mean 'num_epochs'\?\), 'per_device_train_batch_size' \(did you mean 'batch_size'\?\)"),
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
        # NaN fails ">= 0" too: it was said twice in one line
        ("weight_decay: .nan\n", {}, r"^[^;]*c\.yaml: weight_decay must be a finite number, got nan$"),
        ("", {"lora_dropout": "2"}, r"lora_dropout must be in \[0, 1\), got 2\.0"),
        ("", {"lora_target": "("}, r"lora_target '\(' is not a regular expression: missing \)"),
        ("", {"lora_alpha": "0"}, r"lora_alpha must be > 0, got 0"),
        # accepted before: any non-empty list or non-zero number resumed (bool(value)); null did not
        ("resume_training: [a]\n", {}, r"resume_training must be true, false or auto, got \['a'\] \(list\)"),
        ("resume_training: 5\n", {}, r"resume_training must be true, false or auto, got 5 \(int\)"),
        # the path was shown lower-cased, and nothing said where a checkpoint folder goes
        ("resume_training: /Runs/A/checkpoint-4\n", {},
         r"got '/Runs/A/checkpoint-4' \(a checkpoint folder to resume from goes in resume_from\)"),
        # torch.manual_seed failed at the start of the run with "Overflow when unpacking long long"
        ("", {"seed": str(2**64)}, r"seed must be in \[0, 2\*\*63\), got 18446744073709551616"),
        ("seed: -1\n", {}, r"seed must be in \[0, 2\*\*63\), got -1"),
        # torchrun: init_process_group failed at once ("timed out after 6213023705161793ms") or overflowed
        ("", {"dist_timeout": "8e13"}, r"dist_timeout must be in \(0, 1e9\] seconds, got 80000000000000\.0"),
        # `lora:` with its settings commented out is lora: null; it was said as a misspelled 'lora_r'
        ("lora:\n#  use_lora: true\n", {}, r"'lora' \(an empty section\? did you mean 'lora_r'\?\)"),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, yaml_text: str, overrides: dict, message: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text)
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig.from_yaml(f, overrides)


def test_errors_are_one_line_naming_where_the_value_was_set(tmp_path: Path) -> None:
    # they were "invalid training config:" and an indented line per problem, naming no file
    f = tmp_path / "c.yaml"
    f.write_text("schedule:\n  batch_size: 0\n  learning_rate: 1e-4\n")
    with pytest.raises(TrainConfigError) as e:
        TrainConfig.from_yaml(f, {"max_steps": "-1", "min_lr": "1e-3"})
    assert str(e.value) == (
        f"{f}: batch_size must be >= 1, got 0; command line: max_steps must be >= 0, got -1; "
        f"command line, {f}: min_lr (0.001) must not exceed learning_rate (0.0001)")
    for text, message in (("load_checkpoint: null\n", f"{f}: load_checkpoint must not be null"),
                          ("batch_size: two\n", f"{f}: batch_size: cannot read 'two' as int")):
        f.write_text(text)
        with pytest.raises(TrainConfigError) as e:
            TrainConfig.from_yaml(f)
        assert str(e.value).startswith(message), e.value
    with pytest.raises(TrainConfigError) as e:  # a value at its default is named alone
        TrainConfig.from_yaml(None, {"learning_rate": "1e-7"})
    assert str(e.value) == "command line: min_lr (1e-06) must not exceed learning_rate (1e-07)"
    with pytest.raises(TrainConfigError) as e:  # the API: no file, one line
        TrainConfig(batch_size=0, logging_steps=0)
    assert str(e.value) == "invalid training config: batch_size must be >= 1, got 0; logging_steps must be >= 1, got 0"


def test_bf16_takes_the_words_of_every_true_false_setting(tmp_path: Path) -> None:
    # `--use_lora yes` worked, `--bf16 yes` (and YAML bf16: 1) were refused
    for word, value in (("yes", "true"), ("On", "true"), ("1", "true"), ("no", "false"), ("0", "false"),
                        ("AUTO", "auto")):
        assert TrainConfig.from_yaml(None, {"bf16": word}).bf16 == value
    f = tmp_path / "c.yaml"
    f.write_text("bf16: 1\n")
    assert TrainConfig.from_yaml(f).bf16 == "true"


def test_missing_yaml_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="training config not found"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")
