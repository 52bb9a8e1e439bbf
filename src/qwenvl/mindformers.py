"""MindFormers' Qwen-VL checkpoints (``research/qwenvl``, a MindSpore ``.ckpt``) to and from the official layout.

:func:`export_checkpoint` writes what MindFormers' ``research/qwenvl/convert_weight.py`` writes from an official
folder: the official tensors in the official model's ``named_parameters()`` order, renamed, split, transposed
and padded by the rules below, all cast to one dtype (``float16`` by default, as there).
:func:`import_checkpoint` undoes them, for those files and for MindFormers trainer checkpoints (whose optimizer
moments and step counters are reported and skipped), and writes an official folder.

The rules (*fact*, DESIGN.md "MindFormers checkpoint names"):

- LM: prefix ``llm_model.``; ``.h.`` -> ``.layers.``; ``wte.weight`` -> ``wte.embedding_weight``;
  ``attn.c_proj.`` -> ``attention.wo.``; ``ln_1.``/``ln_2.`` -> ``attention_norm.``/``ffn_norm.``;
  ``mlp.w1.``/``mlp.w2.``/``mlp.c_proj.`` -> ``feed_forward.w1.``/``w3.``/``w2.``; ``attn.c_attn.*`` cut in
  three row blocks ``attention.wq|wk|wv.*`` (or whole as ``attention.w.*`` with ``use_qkv_concat``); with the
  embedding optimization (``emb_strategy``) ``wte``/``lm_head`` get zero rows up to a multiple of 512 x strategy.
- Vision: ``transformer.visual.`` -> ``vision_encoder.``; LayerNorm ``weight``/``bias`` -> ``gamma``/``beta``;
  block ``attn.in_proj.*`` is laid out per head ([heads, q|k|v, head_dim] rows) and becomes ``attn.dense1|2|3.*``
  (q, k, v: every third head_dim-row chunk); resampler ``attn.in_proj_weight|bias`` (q|k|v row blocks) ->
  ``attn.dense1|2|3.weight|bias``; ``out_proj`` -> ``projection``, its weight transposed.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from .checkpoint import DTYPE_NAMES, CheckpointError, check_cast, check_finite, iter_shards, save_pretrained
from .config import IMG_START_ID, PRESETS, ConfigError, LMConfig, QwenVLConfig, VisionConfig
from .fileio import atomic_file, read_yaml
from .mindspore_ckpt import CODE_OF_DTYPE, CkptTensor, CkptWriter, CrcCheck, read_tensor, scan
from .outputs import refusing_appeared

if TYPE_CHECKING:
    from .config import GenerationDefaults

__all__ = ["convert", "export_checkpoint", "import_checkpoint", "is_mindspore_path", "load_config", "ms_names",
           "official_generation", "official_shapes", "rules"]

logger = logging.getLogger(__name__)

COPY, ROWS3, HEADS3, TRANSPOSE, VOCAB = "copy", "rows3", "heads3", "transpose", "vocab"


def is_mindspore_path(path: str | os.PathLike[str] | None) -> bool:
    return path is not None and Path(path).suffix == ".ckpt"


# ---- names and layouts ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """How one official tensor becomes MindFormers tensors: their names and the transform (``kind``)."""

    official: str
    ms_names: tuple[str, ...]
    kind: str


def _lm_name(name: str) -> str:
    for old, new in ((".h.", ".layers."), (".wte.weight", ".wte.embedding_weight"), ("attn.c_proj.", "attention.wo."),
                     ("ln_1.", "attention_norm."), ("ln_2.", "ffn_norm."), ("mlp.w1.", "feed_forward.w1."),
                     ("mlp.w2.", "feed_forward.w3."), ("mlp.c_proj.", "feed_forward.w2.")):
        name = name.replace(old, new)
    return "llm_model." + name


def _layer_norm(name: str) -> str:
    return name.replace("weight", "gamma").replace("bias", "beta")


def rule(official: str, use_qkv_concat: bool = False) -> Rule:
    """The MindFormers names of one official tensor and how its data maps onto them."""
    if "visual" not in official:
        name = _lm_name(official)
        if official in ("transformer.wte.weight", "lm_head.weight"):
            return Rule(official, (name,), VOCAB)
        if ".attn.c_attn." in name:
            if use_qkv_concat:
                return Rule(official, (name.replace("attn.c_attn.", "attention.w."),), COPY)
            return Rule(official, tuple(name.replace("attn.c_attn.", f"attention.{p}.") for p in ("wq", "wk", "wv")),
                        ROWS3)
        return Rule(official, (name,), COPY)
    name = "vision_encoder." + official.removeprefix("transformer.visual.")
    if ".ln_" in name:
        return Rule(official, (_layer_norm(name),), COPY)
    if ".attn_pool.attn.in_proj_" in name:  # nn.MultiheadAttention: q|k|v row blocks
        suffix = name.rsplit("in_proj_", 1)[1]
        return Rule(official, tuple(name.replace(f"in_proj_{suffix}", f"dense{i}.{suffix}") for i in (1, 2, 3)), ROWS3)
    if ".resblocks." in name and ".attn.in_proj." in name:  # per-head q|k|v
        return Rule(official, tuple(name.replace("in_proj", f"dense{i}") for i in (1, 2, 3)), HEADS3)
    if ".attn.out_proj." in name:
        return Rule(official, (name.replace("out_proj", "projection"),), TRANSPOSE if name.endswith("weight") else COPY)
    return Rule(official, (name,), COPY)


def _block_order(name: str) -> int:
    """Rank of a ViT block tensor in the official ``VisualAttentionBlock``, which registers ln_1, ln_2, attn, mlp
    (our block registers attn before ln_2; the converter's order follows the official module)."""
    part = name.split(".resblocks.", 1)[1].split(".", 1)[1]
    return next(i for i, prefix in enumerate(("ln_1.", "ln_2.", "attn.", "mlp.")) if part.startswith(prefix))


def official_shapes(config: QwenVLConfig) -> dict[str, torch.Size]:
    """Every official tensor and its shape, in the official model's ``named_parameters()`` order
    (``convert_weight.py`` iterates that)."""
    from .model import QwenVL

    model = QwenVL.on_meta(config)
    shapes = {name: t.shape for name, t in model.state_dict().items()}

    names = list(shapes)
    blocks = [n for n in names if ".resblocks." in n]
    start = names.index(blocks[0])
    assert names[start:start + len(blocks)] == blocks, "the ViT blocks' tensors are not contiguous"
    # a stable sort: within one rank (e.g. attn.*) our order is the official one
    names[start:start + len(blocks)] = sorted(
        blocks, key=lambda n: (int(n.split(".resblocks.", 1)[1].split(".", 1)[0]), _block_order(n)))
    return {name: shapes[name] for name in names}


def rules(config: QwenVLConfig, use_qkv_concat: bool = False) -> list[Rule]:
    """The rules of all tensors of a model, in the order MindFormers' converter writes them."""
    return [rule(name, use_qkv_concat) for name in official_shapes(config)]


def ms_shapes(r: Rule, shape: torch.Size) -> list[tuple[int, ...]]:
    """The shapes of the MindFormers tensors of ``r`` (before any vocabulary padding)."""
    if r.kind in (ROWS3, HEADS3):
        return [(shape[0] // 3, *shape[1:])] * 3
    if r.kind == TRANSPOSE:
        return [tuple(reversed(shape))]
    return [tuple(shape)]


def _split(r: Rule, t: torch.Tensor, heads: int, pad_rows: int) -> list[list[torch.Tensor]]:
    """Official tensor -> the parts (concatenated along dim 0) of each MindFormers tensor of ``r``."""
    if r.kind == ROWS3:
        return [[c] for c in t.chunk(3)]
    if r.kind == HEADS3:
        per_head = t.reshape(heads, 3, t.shape[0] // (3 * heads), *t.shape[1:])  # [heads, q|k|v, head_dim, ...]
        return [[per_head[:, i].reshape(t.shape[0] // 3, *t.shape[1:])] for i in range(3)]
    if r.kind == TRANSPOSE:
        return [[t.t()]]
    if r.kind == VOCAB and pad_rows:
        return [[t, torch.zeros(pad_rows, *t.shape[1:], dtype=t.dtype)]]
    return [[t]]


def _join(r: Rule, parts: list[torch.Tensor], heads: int, vocab: int) -> torch.Tensor:
    """MindFormers tensors of ``r`` -> the official tensor (the inverse of :func:`_split`)."""
    if r.kind == ROWS3:
        return torch.cat(parts)
    if r.kind == HEADS3:
        rest = parts[0].shape[1:]
        per_head = torch.stack([p.reshape(heads, p.shape[0] // heads, *rest) for p in parts], dim=1)
        return per_head.reshape(3 * parts[0].shape[0], *rest)
    if r.kind == TRANSPOSE:
        return parts[0].t()
    if r.kind == VOCAB:
        return parts[0][:vocab]  # drop the embedding optimization's padding rows
    return parts[0]


# ---- configs ------------------------------------------------------------------------------------------------
def load_config(spec: str | os.PathLike[str]) -> QwenVLConfig:
    """A config from a checkpoint folder, a ``config.json``, a preset name or a MindFormers YAML."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        return config_from_yaml(path)
    if path.is_dir() or path.suffix == ".json":
        return QwenVLConfig.from_pretrained(path)
    if str(spec) in PRESETS:
        return QwenVLConfig.from_preset(str(spec))
    raise ConfigError(f"--config {str(spec)!r} is neither a folder with config.json, a config.json file, a "
                      f"MindFormers YAML nor a preset ({', '.join(sorted(PRESETS))})")


def _mlp_ratio(intermediate: int, width: int) -> float:
    """A ratio whose ``int(width * ratio)`` is ``intermediate`` (4.9231 for the 9.6B ViT, as its config.json)."""
    try:
        ratio = round(intermediate / width, 4)
        return ratio if int(width * ratio) == intermediate else (intermediate + 0.5) / width
    except OverflowError:  # YAML integers beyond any float (a traceback)
        big = max(("intermediate_size", intermediate), ("hidden_size", width), key=lambda kv: kv[1])
        raise ConfigError(f"vision_model.model_config.{big[0]} is too large: an integer of {len(str(big[1]))} "
                          "digits") from None


def config_from_yaml(path: Path) -> QwenVLConfig:
    """Map the model section of a MindFormers Qwen-VL YAML (``predict_qwenvl_9.6b.yaml``, the finetune YAML).

    MindFormers' ``intermediate_size`` is the width of each of w1 and w2 (11008), the official one twice that;
    the ViT's ``hidden_size``/``intermediate_size`` become ``width``/``mlp_ratio``. Unset vision keys take
    MindFormers' defaults (the 9.6B ViT). A YAML does not tell a base model from a chat model: the generation
    settings are the base model's (``chat_format`` raw, as MindFormers' own predict prompts), see
    :func:`official_generation`.
    """
    if not path.is_file():
        raise FileNotFoundError(f"config {path} not found")
    doc = read_yaml(path, ConfigError, "MindFormers config")  # bounded: expanded size, depth and file size limits
    model = doc.get("model")
    section = model.get("model_config") if isinstance(model, dict) else None
    llm = _sub(section, "llm_model")
    if section is None and "run_mode" in doc:  # configs/predict_qwenvl_9.6b.yaml, named as MindFormers' own
        raise ConfigError(f"{path} is a qwenvl run config (run_mode: {doc['run_mode']}), not a MindFormers model YAML: "
                          "it holds no model sizes; give --config the MindFormers YAML trained with (its model: "
                          "model_config: section), a checkpoint folder with config.json, or a preset "
                          f"({', '.join(sorted(PRESETS))})")
    if llm is None or not isinstance(section, dict):  # (llm is None whenever section is not a dict)
        raise ConfigError(f"{path}: no model.model_config.llm_model.model_config section (a MindFormers Qwen-VL YAML?)")
    vision = _sub(section, "vision_model") or {}

    def setting(d: dict, where: str, keys: tuple[str, ...], default: Any, kind: type) -> Any:
        """The first of ``keys`` set in ``d`` (else ``default``; None: required) as ``kind``, int or float (YAML 1.1
        reads ``1e-6`` as a string, so numeric strings are floats too); true/false is neither. Errors name it."""
        key = next((k for k in keys if d.get(k) is not None), next((k for k in keys if k in d), None))  # null: wrong
        if key is None:
            if default is None:
                raise ConfigError(f"{where} has no {keys[0]}")
            return default
        value = d[key]
        try:
            if isinstance(value, bool) or (kind is int and not isinstance(value, int)):
                raise TypeError
            return kind(value)
        except (TypeError, ValueError):
            said = "an integer" if kind is int else "a number"
            raise ConfigError(f"{where}.{key} must be {said}, got {value!r}") from None
        except OverflowError:  # an integer beyond any float (a traceback)
            raise ConfigError(f"{where}.{key} must be a number of float range, got an integer of "
                              f"{len(str(value))} digits") from None

    lm_at, vit_at, top_at = "llm_model.model_config", "vision_model.model_config", "model.model_config"
    try:
        hidden = setting(llm, lm_at, ("hidden_size",), None, int)
        heads = setting(llm, lm_at, ("num_heads", "num_attention_heads"), None, int)
        width = setting(vision, vit_at, ("hidden_size",), 1664, int)
        for where, value in ((f"{lm_at}.num_heads", heads), (f"{vit_at}.hidden_size", width)):
            if value <= 0:  # divisors below (a ZeroDivisionError traceback)
                raise ConfigError(f"{where} must be positive, got {value}")
        lm = LMConfig(
            vocab_size=setting(llm, lm_at, ("vocab_size",), 151936, int), hidden_size=hidden,
            num_hidden_layers=setting(llm, lm_at, ("num_layers", "num_hidden_layers"), None, int),
            num_attention_heads=heads, kv_channels=setting(llm, lm_at, ("kv_channels",), hidden // heads, int),
            intermediate_size=2 * setting(llm, lm_at, ("intermediate_size",), None, int),
            seq_length=setting(llm, lm_at, ("seq_length",), 2048, int),
            layer_norm_epsilon=setting(llm, lm_at, ("rms_norm_eps",), 1e-6, float),
            rotary_emb_base=setting(llm, lm_at, ("rotary_emb_base",), 10000.0, float),
            rotary_pct=setting(llm, lm_at, ("rotary_pct",), 1.0, float),
        )
        visual = VisionConfig(
            image_size=setting(vision, vit_at, ("image_size",), 448, int),
            patch_size=setting(vision, vit_at, ("patch_size",), 14, int), width=width,
            layers=setting(vision, vit_at, ("num_hidden_layers",), 48, int),
            heads=setting(vision, vit_at, ("num_attention_heads",), 16, int),
            mlp_ratio=_mlp_ratio(setting(vision, vit_at, ("intermediate_size",), 8192, int), width),
            output_dim=setting(section, top_at, ("proj_output_dim",), setting(vision, vit_at, ("output_dim",), hidden,
                                                                               int), int),
            n_queries=setting(section, top_at, ("num_queries",), 256, int),
            image_start_id=setting(section, top_at, ("image_start_id",), IMG_START_ID, int),
        )
        return QwenVLConfig(lm=lm, visual=visual, generation=official_generation("raw"))
    except ConfigError as e:  # a value of the wrong type, out of range, or sizes that disagree
        raise ConfigError(f"{path}: {e}") from e


def official_generation(chat_format: str) -> GenerationDefaults:
    """The generation settings of the official Qwen/Qwen-VL (``raw``) or Qwen/Qwen-VL-Chat (``chatml``) folder."""
    presets = {"raw": "qwen-vl-9.6b", "chatml": "qwen-vl-chat-9.6b"}
    if chat_format not in presets:
        raise ValueError(f"--chat_format must be raw (a base model, as Qwen/Qwen-VL) or chatml (a chat model, as "
                         f"Qwen/Qwen-VL-Chat), got {chat_format!r}")
    return PRESETS[presets[chat_format]]().generation


def _says_generation(spec: str | os.PathLike[str]) -> bool:
    """Whether ``--config`` carries generation settings: a preset, or a folder or config.json with a
    generation_config.json (not a MindFormers YAML)."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        return False
    if path.is_dir():
        return (path / "generation_config.json").is_file()
    if path.suffix == ".json":
        return (path.parent / "generation_config.json").is_file()
    return True  # a preset


def _sub(section: object, name: str) -> dict | None:
    part = section.get(name) if isinstance(section, dict) else None
    cfg = part.get("model_config") if isinstance(part, dict) else None
    return cfg if isinstance(cfg, dict) else None


# ---- summaries --------------------------------------------------------------------------------------------
def _size(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k} x{v}" if v > 1 else k for k, v in counter.most_common())


def _ignored_group(name: str) -> str:
    return name.split(".", 1)[0] + ".*" if "." in name else name


def _one_line(what: str, items: list[str]) -> str:
    more = f" (and {len(items) - 3} more)" if len(items) > 3 else ""
    return f"{what}: {', '.join(items[:3])}{more}"


# ---- import -------------------------------------------------------------------------------------------------
def _choose_rules(shapes: dict[str, torch.Size], present: set[str]) -> list[Rule]:
    """Per tensor, the layout the file uses (split or fused qkv); the split one where neither is complete."""
    chosen = []
    for name in shapes:
        candidates = [rule(name, False), rule(name, True)]
        chosen.append(next((r for r in candidates if set(r.ms_names) <= present), candidates[0]))
    return chosen


def _classify(entries: dict[str, CkptTensor], wanted: set[str], path: str) -> list[str]:
    """Names of the trainer state among ``entries`` (optimizer states of weights, scalar counters);
    raise for anything else that is not a weight."""
    ignored, unknown = [], []
    for name, t in entries.items():
        if name in wanted:
            continue
        if ("." in name and name.split(".", 1)[1] in wanted) or ("." not in name and t.numel <= 1):
            ignored.append(name)  # adam_m.<weight>, adam_v.<weight>, accu_grads.<weight>; global_step, epoch_num...
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(_one_line(
            f"{path}: {len(unknown)} tensor(s) are neither MindFormers Qwen-VL weights nor trainer state",
            [f"{n!r} {list(entries[n].shape)}" for n in unknown]) + f" ({_layer_hint(entries, wanted)})")
    return ignored


_BLOCKS = {".layers.": "language-model layers", ".resblocks.": "vision layers"}


def _layer_hint(entries: dict[str, CkptTensor], wanted: set[str]) -> str:
    """Why tensors were not expected: where the file holds more blocks than the config says (a smaller preset or
    another model's --config), the two counts; else that it may not be a Qwen-VL checkpoint at all."""

    def blocks(names: Iterable[str], key: str) -> int:
        found = {int(part.split(".", 1)[0]) for n in names if key in n
                 and (part := n.split(key, 1)[1]).split(".", 1)[0].isdigit()}
        return max(found) + 1 if found else 0

    counts = [(what, blocks(entries, key), blocks(wanted, key)) for key, what in _BLOCKS.items()]
    differ = [f"{have} {what} where the config has {want}" for what, have, want in counts if have > want > 0]
    if differ:
        return f"the file holds {' and '.join(differ)}: does --config describe this checkpoint?"
    return "not a Qwen-VL checkpoint?"


@dataclass
class Summary:
    """What a conversion wrote, as one line."""

    source: str
    output: str
    tensors: int
    dtypes: Counter[str]
    nbytes: int
    ignored: list[str]
    crc: str = ""  # what became of a crc_num trailer ("CRC32 verified", "CRC32 trailer written"); "": none

    def __str__(self) -> str:
        line = (f"converted {self.source} -> {self.output}: {self.tensors} tensors ({_counts(self.dtypes)}), "
                f"{_size(self.nbytes)}")
        if self.ignored:
            line += (f"; ignored {len(self.ignored)} trainer tensors "
                     f"({_counts(Counter(_ignored_group(n) for n in self.ignored))})")
        if self.crc:
            line += f"; {self.crc}"
        return line


def import_checkpoint(
    ckpt: str | os.PathLike[str], out_dir: str | os.PathLike[str], config: QwenVLConfig,
    dtype: torch.dtype | None = None, max_shard_size: int | str = "5GB",
) -> Summary:
    """Write the official folder ``out_dir`` from a MindFormers ``.ckpt`` (converted or trainer checkpoint).

    Everything is checked before anything is written: names (either qkv layout; trainer state is skipped
    and reported), shapes against ``config`` (embedding rows may be padded). ``dtype`` defaults to the
    dtype holding most of the weights' bytes. Tensors are read, joined and written one at a time.
    """
    path = os.fspath(ckpt)
    entries = {t.name: t for t in scan(path)}
    shapes = official_shapes(config)
    chosen = _choose_rules(shapes, set(entries))
    wanted = {n for r in chosen for n in r.ms_names}
    ignored = _classify(entries, wanted, path)
    missing = [n for r in chosen for n in r.ms_names if n not in entries]
    if missing:
        raise CheckpointError(_one_line(f"{path}: {len(missing)} Qwen-VL weight(s) missing for this config",
                                        [repr(n) for n in missing]) + " (does --config match the checkpoint?)")
    vocab = config.lm.vocab_size
    for r in chosen:
        for name, want in zip(r.ms_names, ms_shapes(r, shapes[r.official])):
            t = entries[name]
            if t.dtype is None or not t.dtype.is_floating_point:
                raise CheckpointError(f"{path}: tensor {name!r} holds {t.code}, not floating-point weights")
            padded = r.kind == VOCAB and len(t.shape) == 2 and t.shape[0] >= vocab and t.shape[1] == want[1]
            if t.shape != want and not padded:
                raise CheckpointError(f"{path}: tensor {name!r} has shape {list(t.shape)}, the config needs "
                                      f"{list(want)} (does --config match the checkpoint?)")
    if dtype is None:
        by_bytes: Counter[torch.dtype] = Counter()
        for name in wanted:  # each one's dtype was checked above to be a floating dtype (not None)
            by_bytes[cast(torch.dtype, entries[name].dtype)] += entries[name].nbytes
        dtype = by_bytes.most_common(1)[0][0]
        if len(by_bytes) > 1:
            logger.info("%s mixes %s: writing everything as %s (choose with --dtype)", path,
                        sorted(CODE_OF_DTYPE[d] for d in by_bytes), dtype)
    if dtype not in DTYPE_NAMES:  # only a default: --dtype offers none other
        raise CheckpointError(f"{path}: most of its weights are {CODE_OF_DTYPE.get(dtype, dtype)}, which a checkpoint "
                              "folder does not hold: choose --dtype float32, bfloat16 or float16")
    by_official = {r.official: r for r in chosen}
    specs = {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape in shapes.items()}
    heads = config.visual.heads
    crc = CrcCheck.of(path)  # a crc_num trailer: summed as the tensors are read, checked before the folder is done
    loaded: set[str] = set()
    with open(path, "rb") as f:

        def load(official: str) -> torch.Tensor:
            r = by_official[official]
            # every entry read here was checked above to hold floating-point weights: tensors, never str
            t = _join(r, [cast(torch.Tensor, read_tensor(f, entries[n], crc)) for n in r.ms_names], heads, vocab)
            try:
                check_finite(f"{path}: tensor {r.ms_names[0]!r}", t)
                check_cast(f"{path}: tensor {r.ms_names[0]!r}", t, dtype)  # an overflow to inf would not load
            except CheckpointError:
                if crc is not None:  # a damaged file says so, rather than as NaN or huge weights
                    crc.verify(f)
                raise
            loaded.add(official)
            if crc is not None and len(loaded) == len(specs):  # the last tensor: nothing is in place yet
                crc.verify(f)
            return t

        save_pretrained(specs, replace(config, torch_dtype=DTYPE_NAMES[dtype]), out_dir,
                        max_shard_size=max_shard_size, load=load)
    nbytes = sum(math.prod(s) for s in shapes.values()) * specs["lm_head.weight"].element_size()
    return Summary(path, os.fspath(out_dir), len(specs), Counter({DTYPE_NAMES[dtype]: len(specs)}), nbytes, ignored,
                   "CRC32 verified" if crc is not None and crc.verified else "")


# ---- export -------------------------------------------------------------------------------------------------
def _official_tensors(src: str | os.PathLike[str], shapes: dict[str, torch.Size]) -> Callable[[str], torch.Tensor]:
    """Check the folder's tensors against ``shapes``; return a reader of one tensor at a time.

    Safetensors shards are reopened per tensor, so only that tensor's pages are mapped while it is converted
    (RSS stays near one tensor); ``.bin`` shards stay mapped whole (their pages count until the end).
    """
    where: dict[str, Path] = {}
    kept: dict[str, torch.Tensor] = {}
    problems = []
    for file, tensors in iter_shards(src):
        for key, t in tensors.items():
            where[key] = file
            if key in shapes and t.shape != shapes[key]:
                problems.append(f"{key} has shape {list(t.shape)}, config.json needs {list(shapes[key])}")
            if key in shapes and not t.is_floating_point():  # would be cast to float and written as weights
                problems.append(f"{key} holds {t.dtype}, not floating-point weights")
            if file.suffix != ".safetensors":
                kept[key] = t
    problems += [f"{key} is missing" for key in shapes if key not in where]
    problems += [f"{key} is not a Qwen-VL tensor" for key in where if key not in shapes]
    if problems:
        raise CheckpointError(_one_line(f"{src} does not match its config.json ({len(problems)} problem(s))",
                                        problems))

    def get(key: str) -> torch.Tensor:
        if key in kept:
            return kept.pop(key)
        from safetensors import safe_open

        with safe_open(str(where[key]), framework="pt") as f:
            return f.get_tensor(key)

    return get


def export_checkpoint(
    src: str | os.PathLike[str], out_file: str | os.PathLike[str], dtype: torch.dtype = torch.float16,
    use_qkv_concat: bool = False, emb_strategy: int | None = None, crc_check: bool = False, overwrite: bool = True,
) -> Summary:
    """Write the ``.ckpt`` that MindFormers' ``convert_weight.py`` writes from the official folder ``src``.

    Same names, order, shapes and values; every tensor cast to ``dtype`` (convert_weight's ``--dtype``,
    float16 by default). ``use_qkv_concat`` keeps the LM's qkv fused; ``emb_strategy`` N pads wte and lm_head
    with zero rows to a multiple of 512 x N (``--enable_emb_opt True --emb_strategy N``). ``crc_check`` ends the
    file with the CRC32 trailer of ``save_checkpoint(..., crc_check=True)``. Written atomically, one tensor at a
    time; without ``overwrite`` a file at ``out_file`` (there at the start, or appearing meanwhile) is never
    replaced (:class:`~qwenvl.outputs.OutputDirError`).
    """
    config = QwenVLConfig.from_pretrained(src)
    shapes = official_shapes(config)
    get = _official_tensors(src, shapes)
    heads = config.visual.heads
    if emb_strategy is not None and emb_strategy < 1:
        raise ValueError(f"--emb_strategy must be a positive number of cards, got {emb_strategy}")
    vocab = config.lm.vocab_size
    if emb_strategy and 512 * emb_strategy > vocab:  # the padding would outnumber the vocabulary (10**9: no memory)
        raise ValueError(f"--emb_strategy {emb_strategy} pads wte and lm_head to a multiple of {512 * emb_strategy} "
                         f"rows, more than their {vocab}: it is the number of cards the embedding is split over "
                         f"(at most {vocab // 512} here)")
    # without overwrite, a file that appeared at out_file meanwhile stays (the check before the run saw none)
    with refusing_appeared(out_file, "--overwrite"), atomic_file(out_file, replace=overwrite) as f:
        writer = CkptWriter(f, crc_check=crc_check)
        for name, shape in shapes.items():
            r = rule(name, use_qkv_concat)
            pad = 0
            if r.kind == VOCAB and emb_strategy:
                pad = -shape[0] % (512 * emb_strategy)
            t = get(name)
            check_finite(f"{src}: {name}", t)
            for ms_name, parts in zip(r.ms_names, _split(r, t, heads, pad)):
                writer.write(ms_name, parts, dtype)
            del t
        writer.finish()
    return Summary(os.fspath(src), os.fspath(out_file), writer.tensors, Counter(writer.dtypes), writer.bytes, [],
                   "CRC32 trailer written" if crc_check else "")


def ms_names(config: QwenVLConfig, use_qkv_concat: bool = False) -> list[str]:
    """The MindFormers tensor names of a model, in the order convert_weight.py writes them."""
    return [n for r in rules(config, use_qkv_concat) for n in r.ms_names]


# ---- the command ------------------------------------------------------------------------------------------
def convert(
    source: str, output: str, config: str | None = None, dtype: str | None = None, use_qkv_concat: bool = False,
    emb_strategy: int | None = None, max_shard_size: int | str = "5GB", chat_format: str | None = None,
    crc_check: bool = False, overwrite: bool = True,
) -> Summary:
    """``qwenvl convert`` where SOURCE or OUTPUT is a ``.ckpt``: import (needs ``config``) or export.

    An import's ``generation_config.json``: that of ``chat_format`` (:func:`official_generation`) if given, else
    the one ``config`` carries (a preset; a folder's or config.json's generation_config.json), else the base
    model's (raw: nothing in a ``.ckpt`` or a MindFormers YAML tells a chat model); logged. ``crc_check``
    (export): end the ``.ckpt`` with a CRC32 trailer. An import checks a trailer whenever the file has one.
    ``overwrite`` (export): see :func:`export_checkpoint` (an import writes into a folder its caller holds).
    """
    from .model.qwenvl import as_dtype

    torch_dtype = as_dtype(dtype)
    if is_mindspore_path(source) and is_mindspore_path(output):
        raise ValueError("SOURCE and OUTPUT are both .ckpt files: one of them must be an official checkpoint folder")
    if is_mindspore_path(source):
        if not config:
            raise ValueError("importing a MindSpore .ckpt needs --config: a folder with config.json, a config.json, "
                             f"a preset ({', '.join(sorted(PRESETS))}) or a MindFormers YAML")
        if use_qkv_concat or emb_strategy:
            raise ValueError("--use_qkv_concat and --emb_strategy describe an export; an import detects the layout")
        if crc_check:
            raise ValueError("--crc_check is for an export: an import checks the CRC32 of a .ckpt that has one")
        if Path(source).is_dir():
            raise IsADirectoryError(f"{source} is a folder: a MindSpore checkpoint is one .ckpt file")
        if not Path(source).is_file():
            raise FileNotFoundError(f"checkpoint {source} not found")
        gen = official_generation(chat_format) if chat_format is not None else None
        cfg = load_config(config)  # before reading the checkpoint: a bad --config fails fast
        if gen is not None:
            why = "--chat_format"
        elif _says_generation(config):
            why = f"from --config {config}"
        else:
            gen, why = official_generation("raw"), f"the base model's, as --config {config} does not say"
        cfg = replace(cfg, generation=gen or cfg.generation)
        logger.info("%s/generation_config.json: chat_format %s, top_p %s (%s; choose with --chat_format raw|chatml)",
                    output, cfg.generation.chat_format, cfg.generation.top_p, why)
        return import_checkpoint(source, output, cfg, dtype=torch_dtype, max_shard_size=max_shard_size)
    if config:
        raise ValueError("--config is for importing a .ckpt; an export reads SOURCE's config.json")
    if chat_format is not None:
        raise ValueError("--chat_format is for importing a .ckpt (the generation_config.json written with the "
                         "folder); an export writes weights only")
    return export_checkpoint(source, output, dtype=torch_dtype or torch.float16, use_qkv_concat=use_qkv_concat,
                             emb_strategy=emb_strategy, crc_check=crc_check, overwrite=overwrite)
