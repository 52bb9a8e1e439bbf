"""Typed configuration for Qwen-VL, mapped one-to-one onto the official ``config.json``.

Three dataclasses: :class:`VisionConfig` (ViT + resampler, the official ``visual`` dict),
:class:`LMConfig` (the Qwen language model) and :class:`QwenVLConfig` (both, plus the
generation defaults read from ``generation_config.json``). Named presets live in ``PRESETS``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

# Special token ids of the official tokenizer (DESIGN.md section 1, "Tokenizer").
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
REF_START_ID = 151851
REF_END_ID = 151852
BOX_START_ID = 151853
BOX_END_ID = 151854
QUAD_START_ID = 151855
QUAD_END_ID = 151856
IMG_START_ID = 151857
IMG_END_ID = 151858
IMG_PAD_ID = 151859
TOKENIZER_SIZE = 151860
IMG_TOKEN_SPAN = 256  # ids strictly between <img> and </img>
# the text of <img> and </img>: the processor reads the text between them as an image path
IMAGE_TAGS = ("<img>", "</img>")


def first_image_tag(text: str) -> str | None:
    """The first of :data:`IMAGE_TAGS` in ``text``, or None: text that comes with data (a question, a message, a
    LLaVA turn) must hold none, or the processor would read a file the data does not name as its image."""
    found = [(text.find(tag), tag) for tag in IMAGE_TAGS if tag in text]
    return min(found)[1] if found else None

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ConfigError(ValueError):
    """A configuration value is invalid or disagrees with something it must match."""


# Settings the weights' shapes do not show but that change what the model computes: a config.json that gets
# one of them wrong loads without a shape error and gives wrong answers (see qwenvl.checkpoint.check_config).
UNSEEN_FIELDS = ("num_attention_heads", "kv_channels", "layer_norm_epsilon", "rotary_emb_base", "visual.heads",
                 "visual.layer_norm_eps")
# Settings the shapes do fix (two configs that agree on these load the same weights).
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "visual.width",
                "visual.layers", "visual.mlp_ratio", "visual.output_dim", "visual.patch_size")
# Keys of the official ``visual`` section without a default in the official VisionTransformer.
_REQUIRED_VISUAL_KEYS = ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio")
# the weights' dtypes config.json's torch_dtype may name
_TORCH_DTYPES = ("bfloat16", "float16", "float32")


# a field's type -> (the values it takes, said as); bool is an int in Python but not a size in config.json
_JSON_TYPES = {"int": ((int,), "an integer"), "float": ((int, float), "a number"), "bool": ((bool,), "true or false")}


def _check_types(config: Any, prefix: str = "") -> None:
    """Every int, float and bool field holds a value of its type (``config.json`` may hold anything: 2.5 layers,
    "abc" as a width), else a ConfigError naming the field."""
    for f in fields(config):
        value = getattr(config, f.name)
        want, said = _JSON_TYPES.get(str(f.type), (None, ""))
        if want and (not isinstance(value, want) or (isinstance(value, bool) and f.type != "bool")):
            raise ConfigError(f"{prefix}{f.name} must be {said}, got {value!r}")


def _check_positive(config: Any, names: tuple[str, ...], prefix: str = "") -> None:
    """Finite numbers above 0 (a RoPE base of 0 or an mlp_ratio of NaN loads and computes NaN), else a ConfigError."""
    for name in names:
        value = getattr(config, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{prefix}{name} must be a positive number, got {value!r}")


def _check_non_negative(config: Any, names: tuple[str, ...], prefix: str = "") -> None:
    """Finite numbers >= 0 (a norm epsilon below 0 or NaN computes NaN), else a ConfigError."""
    for name in names:
        value = getattr(config, name)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{prefix}{name} must be a finite number >= 0, got {value!r}")


@dataclass
class VisionConfig:
    """The vision tower (ViT-bigG at full size) and its cross-attention resampler."""

    image_size: int = 448
    patch_size: int = 14
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_ratio: float = 4.9231
    output_dim: int = 4096
    n_queries: int = 256
    image_start_id: int = IMG_START_ID
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _check_types(self, "visual.")
        _check_positive(self, ("mlp_ratio",), "visual.")
        _check_non_negative(self, ("layer_norm_eps",), "visual.")
        for name in ("image_size", "patch_size", "width", "layers", "heads", "output_dim", "n_queries"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"visual.{name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"visual.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ConfigError(f"visual.width {self.width} is not divisible by heads {self.heads}")
        if self.output_dim % 128:
            raise ConfigError(f"visual.output_dim {self.output_dim} must be a multiple of 128 (resampler head size)")
        grid = math.isqrt(self.n_queries)
        if grid * grid != self.n_queries:
            raise ConfigError(f"visual.n_queries {self.n_queries} must be a perfect square")
        if self.image_start_id != IMG_START_ID:  # the official model finds pictures by it, ours by <img>'s fixed id
            raise ConfigError(f"visual.image_start_id {self.image_start_id} is not supported: the tokenizer's <img> "
                              f"is {IMG_START_ID}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def resampler_heads(self) -> int:
        return self.output_dim // 128

    def to_official(self) -> dict[str, Any]:
        out = {
            "heads": self.heads,
            "image_size": self.image_size,
            "image_start_id": self.image_start_id,
            "layers": self.layers,
            "mlp_ratio": self.mlp_ratio,
            "output_dim": self.output_dim,
            "patch_size": self.patch_size,
            "width": self.width,
        }
        if self.n_queries != 256:
            out["n_queries"] = self.n_queries
        return out

    @classmethod
    def from_official(cls, d: dict[str, Any]) -> VisionConfig:
        # the official VisionTransformer has no default for these: a config.json without one does not load there,
        # and ours would silently get the 9.6B model's value (a head count no weight shape shows)
        missing = [k for k in _REQUIRED_VISUAL_KEYS if d.get(k) is None]
        if missing:
            raise ConfigError(f"'visual' has no {', '.join(missing)} (the official vision tower needs "
                              f"{', '.join(_REQUIRED_VISUAL_KEYS)})")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class LMConfig:
    """The Qwen-7B language model (names follow the official ``config.json``)."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016
    seq_length: int = 2048
    max_position_embeddings: int = 8192
    layer_norm_epsilon: float = 1e-6
    rotary_emb_base: float = 10000.0
    rotary_pct: float = 1.0
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        _check_types(self)
        _check_positive(self, ("rotary_emb_base",))
        _check_non_negative(self, ("layer_norm_epsilon",))
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_channels",
                     "intermediate_size", "seq_length", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads * self.kv_channels != self.hidden_size:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) x kv_channels ({self.kv_channels}) "
                f"must equal hidden_size ({self.hidden_size})"
            )
        if self.intermediate_size % 2:
            raise ConfigError(f"intermediate_size must be even (w1/w2 are intermediate_size // 2), got {self.intermediate_size}")
        if self.rotary_pct != 1.0:
            raise ConfigError(f"rotary_pct {self.rotary_pct} is not supported: Qwen-VL rotates the whole head (1.0)")
        if self.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings=True is not Qwen-VL: wte and lm_head are separate")
        if self.vocab_size < TOKENIZER_SIZE:
            raise ConfigError(f"vocab_size {self.vocab_size} is smaller than the tokenizer ({TOKENIZER_SIZE} ids)")

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def ffn_dim(self) -> int:
        """Width of each of w1 and w2 (the official config stores twice this)."""
        return self.intermediate_size // 2


@dataclass
class GenerationDefaults:
    """What ``generation_config.json`` says (chat format and sampling defaults)."""

    chat_format: str = "chatml"
    do_sample: bool = True
    top_p: float = 0.3
    top_k: int = 0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512
    max_window_size: int = 6144
    eos_token_id: int = ENDOFTEXT_ID
    pad_token_id: int = ENDOFTEXT_ID
    # keys of generation_config.json we do not use (stop_words_ids, transformers_version, ...), written back as read
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.chat_format not in ("raw", "chatml"):
            raise ConfigError(f"chat_format must be 'raw' or 'chatml', got {self.chat_format!r}")
        _check_types(self)  # "do_sample": "no" would sample, "max_window_size": "6144" failed far from the file
        for name in ("max_new_tokens", "max_window_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        # the sampling defaults generate() takes: a top_p of 5 or a NaN temperature loaded and failed at the first
        # generation, naming no file
        _check_positive(self, ("temperature", "top_p", "repetition_penalty"))
        if self.top_p > 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

    @classmethod
    def from_file(cls, file: str | Path) -> GenerationDefaults:
        """A ``generation_config.json``; any problem with it is a ConfigError naming the file."""
        d = _read_json_object(Path(file))
        try:
            return cls.from_dict(d)
        except (TypeError, ConfigError) as e:
            raise ConfigError(f"{file}: {e}") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationDefaults:
        known = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: v for k, v in d.items() if k in known and v is not None}
        if isinstance(kw.get("eos_token_id"), list):
            if not kw["eos_token_id"]:
                raise ConfigError("eos_token_id must be a token id or a non-empty list of them, got []")
            kw["eos_token_id"] = kw["eos_token_id"][0]
        if kw.get("top_k") is None:
            kw["top_k"] = 0
        return cls(**kw, extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        extra = out.pop("extra")
        return {**out, **{k: v for k, v in extra.items() if k not in out}}


@dataclass
class QwenVLConfig:
    """The whole model: LM + vision tower, and the generation defaults of the checkpoint."""

    lm: LMConfig = field(default_factory=LMConfig)
    visual: VisionConfig = field(default_factory=VisionConfig)
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    torch_dtype: str = "bfloat16"
    # keys of config.json that no field holds (auto_map, transformers_version, ...) and values of the constant
    # keys we do not use (use_flash_attn, initializer_range, ...): written back as read, so that a converted
    # checkpoint still loads in the official remote code
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.visual.output_dim != self.lm.hidden_size:
            raise ConfigError(
                f"visual.output_dim ({self.visual.output_dim}) must equal hidden_size ({self.lm.hidden_size}): "
                "image features replace token embeddings"
            )
        if self.visual.n_queries != IMG_TOKEN_SPAN:
            raise ConfigError(f"n_queries must be {IMG_TOKEN_SPAN} (the tokens between <img> and </img>)")

    # ---- official config.json --------------------------------------------------------------
    def to_official(self) -> dict[str, Any]:
        lm = self.lm
        return {
            "architectures": ["QWenLMHeadModel"],
            "model_type": "qwen",
            "attn_dropout_prob": 0.0,
            "emb_dropout_prob": 0.0,
            "bf16": self.torch_dtype == "bfloat16",
            "fp16": self.torch_dtype == "float16",
            "fp32": self.torch_dtype == "float32",
            "hidden_size": lm.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": lm.intermediate_size,
            "kv_channels": lm.kv_channels,
            "layer_norm_epsilon": lm.layer_norm_epsilon,
            "max_position_embeddings": lm.max_position_embeddings,
            "no_bias": lm.no_bias,
            "num_attention_heads": lm.num_attention_heads,
            "num_hidden_layers": lm.num_hidden_layers,
            "rotary_emb_base": lm.rotary_emb_base,
            "rotary_pct": lm.rotary_pct,
            "scale_attn_weights": True,
            "seq_length": lm.seq_length,
            "tie_word_embeddings": lm.tie_word_embeddings,
            "tokenizer_type": "QWenTokenizer",
            "torch_dtype": self.torch_dtype,
            "use_cache": True,
            "use_dynamic_ntk": lm.use_dynamic_ntk,
            "use_flash_attn": False,
            "use_logn_attn": lm.use_logn_attn,
            "visual": self.visual.to_official(),
            "vocab_size": lm.vocab_size,
        } | {k: v for k, v in self.extra.items() if k not in _DERIVED_KEYS}

    @classmethod
    def from_official(cls, d: dict[str, Any], generation: dict[str, Any] | None = None) -> QwenVLConfig:
        if d.get("model_type", "qwen") != "qwen":  # e.g. a Qwen2-VL checkpoint ('qwen2_vl'), another architecture
            arch = d.get("architectures")
            named = f" ({', '.join(map(str, arch))})" if isinstance(arch, list) and arch else ""
            raise ConfigError(f"model_type is {d.get('model_type')!r}{named}, not Qwen-VL's 'qwen': this is not a "
                              "Qwen-VL checkpoint (qwenvl loads Qwen-VL and Qwen-VL-Chat, and checkpoints of their shape)")
        if "visual" not in d:
            raise ConfigError("config.json has no 'visual' section: this is a text-only Qwen checkpoint, not Qwen-VL")
        if d.get("scale_attn_weights", True) is not True:  # the official attention then skips its 1/sqrt(d)
            raise ConfigError(f"scale_attn_weights {d['scale_attn_weights']!r} is not supported: Qwen-VL scales "
                              "attention scores by 1/sqrt(kv_channels) (true)")
        known = {f.name for f in fields(LMConfig)}
        lm = LMConfig(**{k: v for k, v in d.items() if k in known})
        dtype = d.get("torch_dtype") or "bfloat16"
        if dtype not in _TORCH_DTYPES:  # "garbage" failed only in merge_lora, unnamed; saves took it as float32
            raise ConfigError(f'torch_dtype must be "bfloat16", "float16" or "float32", got {dtype!r}')
        gen = GenerationDefaults.from_dict(generation) if generation else GenerationDefaults()
        extra = {k: v for k, v in d.items() if k not in known and (k not in _DERIVED_KEYS or k in _DTYPE_FLAGS)}
        return cls(lm=lm, visual=VisionConfig.from_official(d["visual"]), generation=gen, torch_dtype=dtype,
                   extra=extra)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> QwenVLConfig:
        """Read ``config.json`` (and ``generation_config.json`` if present) from a checkpoint folder."""
        path = Path(path)
        cfg_file = path / "config.json" if path.is_dir() else path
        if path.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt") and path.is_file():  # read as JSON it was
            raise ConfigError(f"{path} is a weights file: give the checkpoint folder that holds it and its config.json")
        if not cfg_file.is_file():
            if path.is_dir():  # a LoRA adapter folder says so, and how to use it
                from .checkpoint import refuse_adapter_folder  # here: checkpoint imports this module

                refuse_adapter_folder(path)
            raise FileNotFoundError(f"no config.json in {path}")
        d = _read_json_object(cfg_file)
        gen_file = cfg_file.parent / "generation_config.json"
        generation = GenerationDefaults.from_file(gen_file) if gen_file.is_file() else GenerationDefaults()
        if not isinstance(d.get("visual", {}), dict):
            raise ConfigError(f"{cfg_file}: 'visual' must be a JSON object, got {type(d['visual']).__name__}")
        try:
            config = cls.from_official(d)
        except (TypeError, ConfigError) as e:
            raise ConfigError(f"{cfg_file}: {e}") from None
        for name in ("eos_token_id", "pad_token_id"):  # ids the model is fed or stops on: within its vocabulary
            value = getattr(generation, name)
            if not 0 <= value < config.lm.vocab_size:
                raise ConfigError(f"{gen_file}: {name} {value} is out of range: the model has ids 0.."
                                  f"{config.lm.vocab_size - 1}")
        return replace(config, generation=generation)

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.to_official(), indent=2) + "\n", encoding="utf-8")
        gen = self.generation.to_dict()
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")

    def stored_dtype_flags(self) -> dict[str, Any]:
        """``bf16``/``fp16``/``fp32`` as the config.json read stores them (the official code computes in the one set
        to true, and picks by hardware when none is); :meth:`to_official` writes them from ``torch_dtype``."""
        return {k: self.extra[k] for k in _DTYPE_FLAGS if k in self.extra}

    def fields_by_name(self, names: tuple[str, ...]) -> dict[str, Any]:
        """``{"num_attention_heads": 32, "visual.heads": 16, ...}`` for the dotted official names given."""
        out = {}
        for name in names:
            part, _, key = name.rpartition(".")
            out[name] = getattr(self.visual if part == "visual" else self.lm, key)
        return out

    @classmethod
    def from_preset(cls, name: str) -> QwenVLConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]()


def _read_json_object(file: Path) -> dict[str, Any]:
    """The JSON object in ``file``; text that is not UTF-8, not JSON or not an object is a ConfigError naming it."""
    from .fileio import read_json

    d = read_json(file, ConfigError)
    if not isinstance(d, dict):
        raise ConfigError(f"{file}: expected a JSON object, got {type(d).__name__}")
    return d


# the official config's dtype switches: kept in ``extra`` as read (for ``qwenvl info``), written from torch_dtype
_DTYPE_FLAGS = ("bf16", "fp16", "fp32")
# config.json keys computed from the fields above (never taken from ``extra``)
_DERIVED_KEYS = frozenset({f.name for f in fields(LMConfig)} | {"bf16", "fp16", "fp32", "torch_dtype", "visual",
                                                                 "model_type"})


def _preset_9_6b(chat: bool = False) -> QwenVLConfig:
    gen = GenerationDefaults(chat_format="chatml", top_p=0.3) if chat else GenerationDefaults(chat_format="raw", top_p=0.5)
    return QwenVLConfig(lm=LMConfig(), visual=VisionConfig(), generation=gen)


def _preset_tiny() -> QwenVLConfig:
    """A few-MB model with the real vocabulary, for tests (the golden fixture's shapes)."""
    return QwenVLConfig(
        lm=LMConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, kv_channels=64, intermediate_size=512),
        visual=VisionConfig(image_size=448, patch_size=14, width=64, layers=2, heads=2, mlp_ratio=2.0, output_dim=128),
        generation=GenerationDefaults(chat_format="chatml", top_p=0.3),
        torch_dtype="float32",
    )


def _preset_mid() -> QwenVLConfig:
    """The benchmark's mid-size model: hidden 1024, 8 layers, real vocabulary."""
    return QwenVLConfig(
        lm=LMConfig(hidden_size=1024, num_hidden_layers=8, num_attention_heads=8, kv_channels=128, intermediate_size=5632),
        visual=VisionConfig(width=256, layers=4, heads=4, mlp_ratio=4.0, output_dim=1024),
        generation=GenerationDefaults(chat_format="chatml", top_p=0.3),
        torch_dtype="float32",
    )


PRESETS = {
    "qwen-vl-9.6b": lambda: _preset_9_6b(chat=False),
    "qwen-vl-chat-9.6b": lambda: _preset_9_6b(chat=True),
    "mid": _preset_mid,
    "tiny": _preset_tiny,
}
