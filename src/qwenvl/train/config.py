"""The fine-tuning run configuration: one flat typed dataclass, read from YAML with command-line overrides.

The YAML file may group keys in sections (``data:``, ``model:``, ``optim:`` ...): sections are flattened,
so a key means the same wherever it sits. Unknown keys are errors that name them; values are converted to
the field's type (YAML writes ``1e-5`` as a string, for instance), with errors naming the key and where it was
set (the YAML file or the command line), every problem on one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from .. import fileio
from ..config import PRESETS

__all__ = ["LM_LORA_TARGET", "TrainConfig", "TrainConfigError", "parse_value"]

# The LM's attention and MLP projections; anchored on ``transformer.h.N`` so the vision tower's
# ``mlp.c_proj`` / ``attn.out_proj`` are never hit.
LM_LORA_TARGET = r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.w1|mlp\.w2)"


class TrainConfigError(ValueError):
    """A training setting is unknown, has the wrong type or an invalid value.

    ``problems`` lists what :class:`TrainConfig` found wrong as ``(fields, message)`` pairs, so that
    :meth:`TrainConfig.from_yaml` can name where each of those fields was set (the YAML file, the command line).
    """

    def __init__(self, message: str, problems: Sequence[tuple[tuple[str, ...], str]] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


NO_MODEL = "no model: set load_checkpoint (a checkpoint folder) or preset"
NO_DATA = "no training data: set data_path (--data FILE)"


@dataclass
class TrainConfig:
    """Everything a fine-tuning run needs. Defaults are the stage-3 values of the paper (DESIGN.md section 1)."""

    # ---- data
    data_path: str = ""  # JSON/JSONL conversations; not needed when train() is given a dataset
    dataset_dir: str = ""  # relative image paths are resolved here ("" = the data file's folder)
    max_length: int = 2048
    max_images: int | None = None  # per sample; None = no limit
    skip_bad_samples: bool = False  # drop (and report) bad records instead of stopping
    allow_any_local_path: bool = False  # images may lie outside dataset_dir (absolute paths, .., links out)
    system_message: str = "You are a helpful assistant."
    # ---- model
    load_checkpoint: str = ""  # official-layout folder to start from
    preset: str = ""  # random init from a preset when there is no load_checkpoint (tests, benchmarks)
    # ---- output and checkpoints
    output_dir: str = "output"
    save_steps: int = 0  # 0 = only the final save
    save_total_limit: int = 2  # checkpoint-STEP folders kept (0 = all)
    save_dtype: str = "auto"  # dtype of the final weights: auto (= training dtype), bfloat16, float16, float32
    logging_steps: int = 10
    # ---- schedule
    batch_size: int = 1  # per micro-batch
    gradient_accumulation_steps: int = 1
    max_steps: int = 0  # optimizer steps; 0 = num_epochs passes over the data
    num_epochs: int = 1
    learning_rate: float = 1e-5
    min_lr: float = 1e-6
    warmup_steps: int = 300
    # ---- optimizer
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 = no clipping
    # ---- precision and memory
    # bf16 autocast over fp32 master weights: auto (where the device has native bf16), true, false (under torchrun:
    # FSDP gathers the parameters in bf16 instead)
    bf16: str = "auto"
    gradient_checkpointing: bool = True
    reshard_after_forward: bool = True  # distributed: free gathered weights after each forward (ZeRO-3; false: ZeRO-2)
    # ---- what trains
    freeze_vision: bool = True  # the ViT; the resampler (attn_pool, ln_post, proj) follows freeze_resampler
    freeze_resampler: bool = False
    freeze_llm: bool = False
    freeze_embedding: bool = False  # the input embedding (transformer.wte) alone; the rest of the LM follows freeze_llm
    vision_lr_scale: float = 1.0  # the ViT trains at learning_rate x this (min_lr too)
    resampler_lr_scale: float = 1.0  # the resampler trains at learning_rate x this
    # ---- LoRA (peft)
    use_lora: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target: str = LM_LORA_TARGET
    lora_train_resampler: bool = False  # train the resampler fully next to the adapters
    # ---- run
    seed: int = 42
    device: str = "auto"  # auto = cuda when available, else cpu
    # continue from the newest checkpoint-STEP in output_dir; "auto": if there is one (restarts under torchrun)
    resume_training: bool | str = False
    resume_from: str = ""  # or from this checkpoint folder
    overwrite: bool = False  # output_dir may be a non-empty folder we did not write / start over from its checkpoints
    num_workers: int = 2  # DataLoader processes per rank decoding images ahead of the step (0: in the loop)
    dist_timeout: float = 300.0  # seconds a collective may wait for the other ranks before the job fails
    # ---- compatibility with the MindFormers-style command line
    run_mode: str = "finetune"
    use_parallel: bool = False  # accepted; parallelism comes from the launch (torchrun sets RANK and WORLD_SIZE)

    def __post_init__(self) -> None:
        if isinstance(self.bf16, bool):  # YAML true/false, Python True/False
            self.bf16 = "true" if self.bf16 else "false"
        for f in fields(self):
            try:
                setattr(self, f.name, _coerce(f.name, getattr(self, f.name), _field_types()[f.name]))
            except TrainConfigError as e:
                raise TrainConfigError(str(e), [((f.name,), str(e))]) from None
        problems: list[tuple[tuple[str, ...], str]] = []

        def need(ok: bool, msg: str, *names: str) -> None:
            """Record ``msg`` unless ``ok``; ``names``: the fields it is about (default: the first word)."""
            if not ok:
                problems.append((names or (msg.split()[0],), msg))

        # the words every true/false setting takes (yes/no, on/off, 1/0), too
        low = self.bf16.strip().lower()
        self.bf16 = "true" if low in _TRUE else "false" if low in _FALSE else low
        need(self.bf16 in ("auto", "true", "false"), f"bf16 must be auto, true or false, got {self.bf16!r}")
        need(self.run_mode == "finetune", f"run_mode must be 'finetune', got {self.run_mode!r}")
        need(self.max_length >= 2, f"max_length must be >= 2, got {self.max_length}")
        need(self.max_images is None or self.max_images >= 0, f"max_images must be >= 0, got {self.max_images}")
        need(not self.preset or self.preset in PRESETS,
             f"unknown preset {self.preset!r}; known: {', '.join(sorted(PRESETS))}", "preset")
        for name in ("batch_size", "gradient_accumulation_steps", "logging_steps"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        finite = ("learning_rate", "min_lr", "weight_decay", "adam_eps", "vision_lr_scale", "resampler_lr_scale",
                  "dist_timeout")  # inf passes the bounds: a rate or decay of inf trains a model of NaNs
        for name in ("save_steps", "save_total_limit", "max_steps", "num_epochs", "warmup_steps", "lora_dropout",
                     "weight_decay", "max_grad_norm", "min_lr", "adam_eps", "vision_lr_scale", "resampler_lr_scale"):
            value = getattr(self, name)  # NaN fails both checks: said once, as not finite, where that is checked
            need(value >= 0 or (name in finite and math.isnan(value)), f"{name} must be >= 0, got {value}")
        for name in finite:
            need(math.isfinite(getattr(self, name)), f"{name} must be a finite number, got {getattr(self, name)}")
        need(self.max_steps > 0 or self.num_epochs > 0, "set max_steps or num_epochs (both are 0)",
             "max_steps", "num_epochs")
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        need(self.min_lr <= self.learning_rate,
             f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})", "min_lr", "learning_rate")
        for name in ("adam_beta1", "adam_beta2"):
            need(0 <= getattr(self, name) < 1, f"{name} must be in [0, 1), got {getattr(self, name)}")
        need(self.save_dtype in ("auto", "bfloat16", "float16", "float32"),
             f"save_dtype must be auto, bfloat16, float16 or float32, got {self.save_dtype!r}")
        need(self.lora_r >= 1, f"lora_r must be >= 1, got {self.lora_r}")
        need(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha} (the adapters are scaled by "
                                  "lora_alpha / lora_r)")
        need(self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        try:
            re.compile(self.lora_target)
        except re.error as e:
            need(False, f"lora_target {self.lora_target!r} is not a regular expression: {e}")
        need(not (self.freeze_llm and self.freeze_resampler and self.freeze_vision and not self.use_lora),
             "nothing to train: freeze_llm, freeze_resampler and freeze_vision are all true",
             "freeze_llm", "freeze_resampler", "freeze_vision", "use_lora")
        need(bool(self.output_dir), "output_dir must not be empty")
        if isinstance(self.resume_training, str):
            self.resume_training = self.resume_training.strip()
            if self.resume_training.lower() == "auto":
                self.resume_training = "auto"
        need(self.resume_training in (True, False, "auto"),
             f"resume_training must be true, false or auto, got {self.resume_training!r} (a checkpoint folder to "
             "resume from goes in resume_from)")
        # torch.manual_seed takes at most 2**64 - 1, and epoch e of the data order is seeded with seed + e
        need(0 <= self.seed < 2**63, f"seed must be in [0, 2**63), got {self.seed}")
        need(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        # init_process_group overflows past ~1e13 s (8e13: "timed out after 6213023705161793ms" at once)
        need(0 < self.dist_timeout <= 1e9, f"dist_timeout must be in (0, 1e9] seconds, got {self.dist_timeout}")
        if problems:
            raise TrainConfigError(_join_problems(problems), problems)

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a flat or sectioned mapping; unknown keys raise naming them (with a suggestion)."""
        flat = flatten(values, source)
        check_known(flat, source)
        return cls(**flat)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str] | None, overrides: dict[str, str] | None = None) -> TrainConfig:
        """Read ``path`` (None: defaults only), then apply ``overrides`` (field -> text, as typed on a command line)."""
        values: dict[str, Any] = {}
        source = "defaults"
        if path is not None:
            source = str(path)
            values = flatten(read_yaml(path), source)
        where = dict.fromkeys(values, source)  # field -> where it was set, for the errors
        over = dict(overrides or {})
        check_known(over, "command line")
        types_ = _field_types()
        for key, text in over.items():
            try:
                values[key] = parse_value(key, text, types_[key]) if isinstance(text, str) else text
            except TrainConfigError as e:
                raise TrainConfigError(f"command line: {e}") from None
            where[key] = "command line"
        check_known(values, source)
        try:
            return cls(**values)
        except TrainConfigError as e:  # name the file (or the command line) each wrong value came from
            if not e.problems:
                raise
            raise TrainConfigError(_join_problems(e.problems, where), e.problems) from None

    def check_files(self) -> None:
        """What a run from the command line needs on disk: the model (a ``load_checkpoint`` folder, or a
        ``preset``) and the ``data_path`` file. Needs no torch, so ``qwenvl finetune`` says a mistyped path at
        once instead of after loading torch and building the model (seconds)."""
        if self.load_checkpoint:
            fileio.require_folder(self.load_checkpoint)
        elif not self.preset:
            raise TrainConfigError(NO_MODEL)
        if not self.data_path:  # the command line has no other way to give a dataset
            raise TrainConfigError(NO_DATA)
        if not os.path.exists(self.data_path):
            raise FileNotFoundError(f"training data file not found: {fileio.shown_path(self.data_path)}")
        if not os.path.isfile(self.data_path):  # a folder, a FIFO, /dev/zero: there, but not a data file
            raise TrainConfigError(f"training data path is not a file: {fileio.shown_path(self.data_path)}")
        if self.dataset_dir:
            fileio.require_folder(self.dataset_dir, "dataset_dir folder")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _join_problems(problems: Sequence[tuple[tuple[str, ...], str]], where: dict[str, str] | None = None) -> str:
    """One line for all ``problems``, each prefixed with where its fields were set (``where``: field -> the YAML
    file or "command line"; fields left at their defaults have no place)."""
    parts, placed = [], True
    for names, msg in problems:
        places = list(dict.fromkeys(where[n] for n in names if where and n in where))
        parts.append(f"{', '.join(places)}: {msg}" if places else msg)
        placed = placed and bool(places)
    return "; ".join(parts) if placed else "invalid training config: " + "; ".join(parts)


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings of a YAML run config (bounded parsing: expanded size, depth and file size limits)."""
    return fileio.read_yaml(path, TrainConfigError, what="training config")


def flatten(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Lift the keys of nested sections to the top; a key set twice is an error."""
    known = {f.name for f in fields(TrainConfig)}
    out: dict[str, Any] = {}
    where: dict[str, str] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for key, value in d.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and key not in known:
                walk(value, path + ".")
                continue
            if key in out:
                raise TrainConfigError(f"{source}: {key!r} is set twice ({where[key]} and {path})")
            out[key] = value
            where[key] = path

    walk(values, "")
    return out


# What the official Qwen-VL finetune.py (Hugging Face's TrainingArguments) and habit call some of our settings: no
# spelling is close enough for difflib ("lr" for learning_rate), so they are named outright
OTHER_NAMES = {
    "lr": "learning_rate",
    "epochs": "num_epochs",
    "num_train_epochs": "num_epochs",
    "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "model_max_length": "max_length",
    "model_name_or_path": "load_checkpoint",
    "fix_vit": "freeze_vision",
}


def check_known(values: dict[str, Any], source: str, flags: Sequence[str] = ()) -> None:
    """Refuse the names in ``values`` that are not TrainConfig fields, each with the closest field or, on the
    command line, the closest of ``flags`` (the command's named flags, without dashes: ``--modl`` is a misspelled
    ``--model``, not a setting)."""
    known = [f.name for f in fields(TrainConfig)]
    unknown = [k for k in values if k not in known]
    if not unknown:
        return
    hints = []
    for k in unknown:
        close = [OTHER_NAMES[k]] if k in OTHER_NAMES else difflib.get_close_matches(str(k), [*known, *flags], n=1)
        hint = [f"did you mean {close[0]!r}?" if close[0] in known else f"did you mean --{close[0]}?"] if close else []
        if values[k] is None:  # `lora:` with every line below commented out reads as lora: null
            hint.insert(0, "an empty section?")
        hints.append(f"{k!r}" + (f" ({' '.join(hint)})" if hint else ""))
    raise TrainConfigError(f"{source}: unknown training setting(s): {', '.join(hints)}")


# ---- typed values --------------------------------------------------------------------------------------
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); X -> (X, False)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _is_bool_or_word(tp: Any) -> bool:
    """``bool | str``: true/false, or a word such as ``auto``."""
    return set(typing.get_args(tp)) == {bool, str}


def parse_value(key: str, text: str, tp: Any) -> Any:
    """Text from a command line -> the field's type (``none``/``null`` for optional fields)."""
    if _is_bool_or_word(tp):
        low = text.strip().lower()
        return True if low in _TRUE else False if low in _FALSE else text.strip()  # the word as written
    base, optional = _split_optional(tp)
    if optional and text.strip().lower() in ("none", "null", ""):
        return None
    try:
        if base is bool:
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError("expected true or false")
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        return text
    except ValueError as e:
        raise TrainConfigError(f"{key}: cannot read {text!r} as {base.__name__}: {e}") from None


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """A value from YAML or Python -> the field's type; strings are parsed, ints widen to floats."""
    if _is_bool_or_word(tp):
        if isinstance(value, str):
            return parse_value(key, value, tp)
        if isinstance(value, bool):
            return value
        raise TrainConfigError(f"{key} must be true, false or auto, got {value!r} ({type(value).__name__})")
    base, optional = _split_optional(tp)
    if value is None:
        if optional:
            return None
        raise TrainConfigError(f"{key} must not be null")
    if isinstance(value, str) and base is not str:
        return parse_value(key, value, tp)
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif base is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise TrainConfigError(f"{key} must be {getattr(base, '__name__', base)}, got {value!r} ({type(value).__name__})")
