"""Checkpoint folders in the official Hugging Face layout of ``Qwen/Qwen-VL``: find, read, check, write.

Reading: :func:`find_weights` locates ``model.safetensors``, ``model-0000K-of-0000N.safetensors`` + index, or
the older ``pytorch_model*.bin`` (+ index); safetensors win when a folder has both. :func:`load_state_dict`
opens them lazily (``safe_open``; ``torch.load(mmap=True, weights_only=True)``): nothing is read until used,
no pickled code is run, and ``.py`` files in the folder are ignored. :func:`verify_weights` reads every value, one
file at a time, and lists the tensors holding NaN or infinity and the files that cannot be read (``qwenvl info
--verify``).

Loading: :func:`load_weights` checks every key and shape *before* touching the model, then fills it (usually
built on the meta device) with ``load_state_dict(assign=True)``, casting/moving one tensor at a time.
On CPU with the stored dtype the parameters *are* the file pages, mapped copy-on-write (``MAP_PRIVATE``, as
both safetensors >= 0.4 and ``torch.load(mmap=True)`` map): peak RSS is about 1x the weight bytes, reached
as pages are first touched, and those pages are clean and file-backed (reclaimable). In-place updates
(training) copy only the written pages into private memory, replacing their file-backed twins: the file never
changes and RSS stays about 1x. Never rewrite a checkpoint file *in place* while a model loaded from it lives
(untouched pages would read the new bytes); :func:`save_pretrained` builds a new folder and renames it in.
With a cast (bf16 -> fp32) or a move to a GPU the host holds the converted tensors plus at most one shard
of touched source pages, released shard by shard.

Writing: :func:`save_pretrained` writes ``config.json``, ``generation_config.json``, ``qwen.tiktoken`` and
the weights (sharded at ``max_shard_size``; safetensors streamed tensor by tensor, no second copy of a
shard in memory) through :func:`qwenvl.outputs.output_files`: a new folder is built in a temporary sibling and
renamed into place (complete or absent); an existing one must be empty or ours (``overwrite`` to write into
another), gets its files replaced one by one (``config.json`` last) and keeps every file we did not write.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeGuard

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import PRESETS, SHAPE_FIELDS, UNSEEN_FIELDS, QwenVLConfig
from .fileio import error_line, parse_json, read_json
from .outputs import output_files

__all__ = [
    "CheckpointError",
    "WeightsReport",
    "cast_checked",
    "check_cast",
    "check_config",
    "check_finite",
    "find_weights",
    "is_sharded",
    "iter_tensor_bytes",
    "load_state_dict",
    "load_weights",
    "parse_size",
    "refuse_adapter_folder",
    "save_pretrained",
    "verify_weights",
]

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
VOCAB_NAME = "qwen.tiktoken"
ADAPTER_CONFIG_NAME = "adapter_config.json"  # peft's: a LoRA adapter folder (qwenvl.train.lora), not a checkpoint
BUNDLED_VOCAB = Path(__file__).resolve().parent / "vocab" / VOCAB_NAME

MAX_LISTED_PROBLEMS = 20
# safetensors metadata key under which we record the config settings the shapes do not show (UNSEEN_FIELDS)
CONFIG_METADATA_KEY = "qwenvl.unseen_config"

# safetensors dtype names (the format's spec) <-> torch dtypes.
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
DTYPE_NAMES: dict[torch.dtype, str] = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


TensorLoader = Callable[[str], torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint folder is missing, malformed, unsafe, or does not match the model."""


# ---- sizes ---------------------------------------------------------------------------------------------
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string like ``"5GB"`` (10^9, as Hugging Face), ``"2GiB"`` (2^30), ``"300MB"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        unit = m.group(2).upper() if m else ""
        if not m or unit not in _SIZE_UNITS:
            raise ValueError(f"cannot parse size {size!r}: use bytes or a number with KB/MB/GB/TB or KiB/MiB/GiB/TiB")
        value = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


# ---- finding the files ---------------------------------------------------------------------------------
def _read_index(index_file: Path, allow_missing: bool = False) -> dict[str, str]:
    """The ``weight_map`` of an index file, checked: plain file names only, all files present (unless
    ``allow_missing``)."""
    try:
        index = read_json(index_file, CheckpointError)  # also nesting too deep to parse, 5000-digit numbers
    except OSError as e:
        raise CheckpointError(f"cannot read the index {index_file}: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_file} has no 'weight_map' (a non-empty object of tensor name -> shard file)")
    folder = index_file.parent
    suffix = ".safetensors" if index_file.name == SAFE_INDEX_NAME else ".bin"
    missing: list[str] = []
    for name in weight_map.values():
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{index_file} names the shard {name!r}: shards must be plain file names in the folder")
        if not name.endswith(suffix):  # another file of the folder (config.json) would be read as weights
            raise CheckpointError(f"{index_file} names the shard {name!r}: its shards must be {suffix} files")
    for name in sorted(set(weight_map.values())):
        if not (folder / name).is_file():
            missing.append(name)
    if missing and not allow_missing:
        raise CheckpointError(
            f"{index_file} references shard(s) missing from {folder}: {', '.join(missing)} "
            "(an incomplete download?)"
        )
    return weight_map


def refuse_adapter_folder(ckpt_dir: str | os.PathLike[str]) -> None:
    """Raise :class:`CheckpointError`, saying how to use it, when ``ckpt_dir`` is a LoRA adapter folder (peft's
    ``adapter_config.json`` and adapter weights, no model weights) given where a model checkpoint belongs: it was
    "no config.json in DIR". A checkpoint folder that also holds an adapter's files loads as the checkpoint."""
    path = Path(ckpt_dir)
    weights = (SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME, BIN_WEIGHTS_NAME, BIN_INDEX_NAME)
    if not (path / ADAPTER_CONFIG_NAME).is_file() or any((path / name).is_file() for name in weights):
        return
    raise CheckpointError(
        f"{path} is a LoRA adapter ({ADAPTER_CONFIG_NAME}, no model weights), not a checkpoint: merge it into the "
        f"checkpoint it was trained from with `qwenvl convert BASE OUT --merge_lora --adapter {path}` "
        "(qwenvl.train.lora.merge_lora in Python), then use OUT"
    )


def locate_weights(ckpt_dir: str | os.PathLike[str],
                   allow_missing: bool = False) -> tuple[list[Path], dict[str, str] | None]:
    """Weight files of a checkpoint (in order) and the index's weight_map (None for a single file).
    ``allow_missing``: the index may name shards the folder lacks (listed all the same), else a
    :class:`CheckpointError` names them."""
    path = Path(ckpt_dir)
    if path.is_file() and path.suffix in (".safetensors", ".bin"):
        return [path], None
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint folder (nor a .safetensors or .bin weights file)")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    refuse_adapter_folder(path)
    for single, index_name in ((SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME), (BIN_WEIGHTS_NAME, BIN_INDEX_NAME)):
        if (path / single).is_file():
            return [path / single], None
        if (path / index_name).is_file():
            weight_map = _read_index(path / index_name, allow_missing)
            stem = single.split(".")[0]
            unlisted = sorted(p.name for p in path.glob(f"{stem}-*-of-*{Path(single).suffix}")
                              if p.name not in weight_map.values())
            if unlisted:
                logger.warning("%s does not list %s: ignored", index_name, ", ".join(unlisted))
            return [path / name for name in sorted(set(weight_map.values()))], weight_map
    stray = sorted(p.name for p in path.glob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"))
    hint = f"; found {', '.join(stray)}" if stray else ""
    if any(re.fullmatch(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)", s) for s in stray):
        hint += " (sharded weights need their index .json file)"
    elif any(s.endswith(".ckpt") for s in stray):
        hint += " (a MindSpore .ckpt must be converted first: `qwenvl convert`)"
    if (path / ".metadata").is_file():  # torch.distributed.checkpoint's: a sharded training checkpoint
        hint += f" (a sharded training checkpoint: `qwenvl convert {path} OUT` writes it in the official layout)"
    elif dcp_shards := sorted(p.name for p in path.glob("*.distcp")):  # without .metadata, which `cp DIR/*` leaves out
        hint += (f"; it holds the shards of a sharded training checkpoint ({dcp_shards[0]}) but not their .metadata: "
                 "copy the whole checkpoint-STEP folder, hidden files included")
    raise CheckpointError(
        f"no weights in {path}: expected {SAFE_WEIGHTS_NAME}, {SAFE_INDEX_NAME}, {BIN_WEIGHTS_NAME} or {BIN_INDEX_NAME}"
        + hint
    )


def find_weights(ckpt_dir: str | os.PathLike[str]) -> list[Path]:
    """The weight files of a checkpoint folder, in shard order.

    The format is their suffix: all ``.safetensors`` or all ``.bin``. Safetensors are preferred when the folder
    has both. An index must name existing shard files (else :class:`CheckpointError` naming the missing ones).
    ``ckpt_dir`` may also be a single ``.safetensors``/``.bin`` file.
    """
    return locate_weights(ckpt_dir)[0]


# ---- reading ------------------------------------------------------------------------------------------
def _open_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, mapped copy-on-write (no data read yet)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot read {file}: {e} (truncated or corrupt file?)") from e


def _open_bin(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``torch.save`` file with ``weights_only=True``: a pickle that wants code is refused."""
    try:
        # mmap needs the zip format (torch >= 1.6); the legacy format is read into memory. (is_zipfile itself
        # raises BadZipFile for some damaged zip directories.)
        mmap = zipfile.is_zipfile(file)
        with warnings.catch_warnings():  # torch warns (two lines) about a pickle protocol it then refuses
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(str(file), map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        first_line = error_line(e)
        if "weights only" in first_line.lower():
            raise CheckpointError(
                f"refusing to load {file}: it is not a plain tensor file, weights_only=True rejected it "
                f"(it may reference code): {weights_only_reason(e)}"
            ) from e
        raise CheckpointError(f"cannot read {file}: {first_line} (truncated or corrupt file?)") from e
    except (RuntimeError, EOFError, ValueError, KeyError, zipfile.BadZipFile, OSError,
            # what torch's unpickler raises on some damaged bytes (a flipped byte of a valid file)
            TypeError, AssertionError, IndexError, AttributeError) as e:
        raise CheckpointError(f"cannot read {file}: {error_line(e)} (truncated or corrupt file?)") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{file} does not hold a state dict (a mapping of names to tensors): it holds a "
                              f"{type(obj).__name__}")
    for k, v in obj.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{file} does not hold a state dict (a mapping of names to tensors): the key {k!r} "
                                  "is not a tensor name")
        if not isinstance(v, torch.Tensor):
            nested = " (the weights may be nested under it: save that mapping alone)" if isinstance(v, Mapping) else ""
            raise CheckpointError(f"{file} does not hold a state dict (a mapping of names to tensors): {k!r} is "
                                  f"{type(v).__name__}, not a tensor{nested}")
    # weights_only admits sparse tensors, which nothing here can use (reshape, finiteness check: RuntimeError)
    odd = [f"{k} ({v.layout})" for k, v in obj.items() if v.layout != torch.strided]
    if odd:
        raise CheckpointError(f"{file} holds {len(odd)} tensor(s) that are not dense: {', '.join(odd[:3])}"
                              + (" ..." if len(odd) > 3 else ""))
    return dict(obj)


def weights_only_reason(e: Exception) -> str:
    """The line of torch's weights_only message that names the refused global, if any, without torch's advice to
    allow it (``Please use torch.serialization.add_safe_globals(...)``: advice for a file one trusts)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln:
            return ln.split(". Please use")[0]
    return lines[0] if lines else repr(e)


def _open_shard(file: Path) -> dict[str, torch.Tensor]:
    return _open_safetensors(file) if file.suffix == ".safetensors" else _open_bin(file)


def format_problems(header: str, problems: list[str], footer: str = "") -> str:
    """``header`` and the problems: on one line when there is one, else one per line below it."""
    if len(problems) == 1:
        return f"{header} {problems[0]}" + (f" ({footer})" if footer else "")
    shown = problems[:MAX_LISTED_PROBLEMS]
    lines = [header, *(f"  - {p}" for p in shown)]
    if len(problems) > len(shown):
        lines.append(f"  ... and {len(problems) - len(shown)} more")
    if footer:
        lines.append(footer)
    return "\n".join(lines)


def iter_shards(ckpt_dir: str | os.PathLike[str]) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """(file, its tensors) per shard, after checking the shards against each other and against the index.

    Every shard is opened (lazily, nothing read) before the first is yielded, so that a bad shard or an
    inconsistent index fails before anything is used.
    """
    files, weight_map = locate_weights(ckpt_dir)
    shards = [(file, _open_shard(file)) for file in files]
    empty = [file for file, tensors in shards if not tensors]
    if empty:  # not a list of every key the model misses
        raise CheckpointError(f"{empty[0]} holds no tensors (an empty or unfinished save?)")
    problems: list[str] = []
    seen: dict[str, Path] = {}
    for file, tensors in shards:
        for key in tensors:
            if key in seen:
                problems.append(f"{key} is in both {seen[key].name} and {file.name}")
            else:
                seen[key] = file
    if weight_map is not None:
        for key, name in sorted(weight_map.items()):
            if key not in seen:
                problems.append(f"the index puts {key} in {name}, which does not contain it")
            elif seen[key].name != name:
                problems.append(f"the index puts {key} in {name}, but it is in {seen[key].name}")
        for key, file in sorted(seen.items()):
            if key not in weight_map:
                problems.append(f"{file.name} contains {key}, which the index does not list")
    if problems:
        raise CheckpointError(format_problems(f"inconsistent checkpoint {ckpt_dir}:", problems))
    yield from shards


def load_state_dict(ckpt_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, by official name.

    On CPU the tensors are copy-on-write maps of the files (read on first use, safe to modify). Raises
    :class:`CheckpointError` for a missing, truncated, corrupt or code-carrying file, a key in two shards, or
    an index that disagrees with the shards.
    """
    device = torch.device(device)
    out: dict[str, torch.Tensor] = {}
    for _file, tensors in iter_shards(ckpt_dir):
        for key in list(tensors):
            out[key] = tensors.pop(key).to(device)
    return out


# ---- loading into a model --------------------------------------------------------------------------------
def _shape(t: torch.Tensor | torch.Size) -> str:
    return str(list(t.shape if isinstance(t, torch.Tensor) else t))


def check_against_model(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], ckpt_dir: str | os.PathLike[str], strict: bool
) -> None:
    """Raise one CheckpointError listing every missing/extra key and every shape mismatch."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    mismatched = [k for k in expected if k in found and expected[k].shape != found[k].shape]
    problems = [
        f"shape mismatch for {k}: the model expects {_shape(expected[k])}, the checkpoint has {_shape(found[k])}"
        for k in mismatched
    ]
    problems += [
        f"dtype mismatch for {k}: the model expects a floating-point tensor, the checkpoint has {found[k].dtype}"
        for k in expected
        if k in found and expected[k].is_floating_point() and not found[k].is_floating_point()
    ]
    if strict:
        problems += [f"missing from the checkpoint: {k} (expected shape {_shape(expected[k])})" for k in missing]
        problems += [f"unexpected in the checkpoint: {k} (shape {_shape(found[k])})" for k in extra]
    elif missing or extra:
        logger.warning("non-strict load from %s: %d key(s) missing, %d unexpected key(s) ignored",
                       ckpt_dir, len(missing), len(extra))
    if not problems:
        return
    hints = []
    if mismatched:
        hints.append("config.json may not match the weights (hidden_size, num_hidden_layers, intermediate_size, "
                     "vocab_size, visual.*)")
    if strict and any(k.startswith(("llm_model.", "vision_encoder.")) for k in extra):
        hints.append("these look like MindFormers names: convert the checkpoint first (`qwenvl convert`)")
    footer = "hint: " + "; ".join(hints) if hints else ""
    raise CheckpointError(
        format_problems(f"checkpoint {ckpt_dir} does not match the model ({len(problems)} problem(s)):",
                         problems, footer)
    )


def _float_dtypes(tensors: Iterable[torch.Tensor]) -> list[torch.dtype]:
    """The floating dtypes among ``tensors``, the one holding most bytes first."""
    counts: Counter[torch.dtype] = Counter()
    for t in tensors:
        if t.is_floating_point():
            counts[t.dtype] += t.numel() * t.element_size()
    return [d for d, _ in counts.most_common()]


def load_weights(
    model: nn.Module,
    ckpt_dir: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
    check_finite: bool = True,
) -> nn.Module:
    """Fill ``model`` (on any device, typically meta) with the checkpoint's tensors; return it.

    Every checkpoint tensor the model has must match its shape; with ``strict`` (the default) every model key
    must also be in the checkpoint and the checkpoint must have no other keys (non-strict: extra keys are
    ignored, missing ones keep their values, or fail the meta check below). All problems are collected and
    raised as one :class:`CheckpointError` before any parameter changes.

    ``dtype``: floating tensors are cast to it. ``None`` keeps the checkpoint's stored dtype (the official
    weights are bf16, as ``config.json``'s ``torch_dtype`` says), so loading on CPU is a zero-copy map; a
    checkpoint that mixes floating dtypes is cast to the one holding most bytes. Integer tensors are never
    cast. ``device``: where the parameters end up.

    ``requires_grad`` of each parameter is kept (``assign=True`` wraps new tensors in Parameters with the
    model's flag). Raises if a parameter or buffer is still on the meta device afterwards, if an integer
    tensor stands where the model has a floating one, and (``check_finite``, one reduction per tensor as it
    is loaded) if a floating tensor holds NaN or infinity.
    """
    device = torch.device(device)
    shards = list(iter_shards(ckpt_dir))
    found = {k: t for _file, tensors in shards for k, t in tensors.items()}
    expected = model.state_dict(keep_vars=True)
    check_against_model(expected, found, ckpt_dir, strict)
    if dtype is None:
        stored = _float_dtypes(t for k, t in found.items() if k in expected)
        dtype = stored[0] if stored else None
        if len(stored) > 1:
            logger.warning("%s mixes floating dtypes %s: casting all floating tensors to %s",
                           ckpt_dir, [str(d) for d in stored], dtype)
    del found

    state: dict[str, torch.Tensor] = {}
    non_finite: list[str] = []
    for file, tensors in shards:
        spans: dict[int, list[tuple[int, int, str]]] = {}  # storage -> byte ranges of the tensors kept on it
        # pop each source as it is converted, so a shard's mapping is released once its last tensor is done
        for key in list(tensors):
            src = tensors.pop(key)
            if key not in expected:
                continue
            target_dtype = dtype if dtype is not None and src.is_floating_point() else src.dtype
            state[key] = src.to(device=device, dtype=target_dtype)
            if file.suffix != ".safetensors":  # safetensors itself refuses overlapping tensors
                state[key] = _unshared(state[key], key, file, spans)
            if check_finite and not all_finite(state[key]):
                if target_dtype != src.dtype and all_finite(src):  # the file is fine: its values do not fit
                    as_name = str(target_dtype).removeprefix("torch.")
                    check_cast(f"cannot load {ckpt_dir} as {as_name}: {key}", src, target_dtype)
                non_finite.append(f"{key}: {count_non_finite(state[key])}")
            del src
    shards.clear()
    if non_finite:
        raise CheckpointError(format_problems(
            f"checkpoint {ckpt_dir} holds NaN or infinite values in {len(non_finite)} tensor(s) (a corrupt file, "
            "or a training run that diverged):", non_finite))
    model.load_state_dict(state, strict=strict, assign=True)
    del state

    on_meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if on_meta:
        raise CheckpointError(
            format_problems(
                f"after loading {ckpt_dir}, {len(on_meta)} tensor(s) are still on the meta device "
                "(not in the checkpoint, or a non-persistent buffer the model must create itself):",
                on_meta,
            )
        )
    logger.info("loaded %s (%d tensors, dtype %s) onto %s", ckpt_dir, len(expected), dtype, device)
    return model


def _unshared(t: torch.Tensor, key: str, file: Path, spans: dict[int, list[tuple[int, int, str]]]) -> torch.Tensor:
    """``t``, copied if its bytes overlap those of a tensor already loaded from ``file`` (a ``.bin`` can store two
    names on one storage, e.g. a tied lm_head): two parameters on one memory would change together."""
    if t.numel() == 0:
        return t
    start = int(t.storage_offset()) * t.element_size()  # int: eager sizes are ints, not symbolic
    end = start + (1 + sum((int(n) - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()
    kept = spans.setdefault(t.untyped_storage().data_ptr(), [])
    other = next((k for a, b, k in kept if a < end and start < b), None)
    if other is None:
        kept.append((start, end, key))
        return t
    logger.warning("%s: %s shares its storage with %s: loaded as a separate copy (the model does not tie them)",
                   file, key, other)
    return t.clone()


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/inf in ``t``: one sum (NaN and inf propagate), confirmed elementwise only when it is not finite."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    flat = t.reshape(-1)
    # in slices: a half-precision sum with dtype=float32 converts its whole input first (a float32 copy of the
    # largest tensor would raise the load's peak memory by 2x its size)
    chunk = 1 << 22
    if all(bool(torch.isfinite(flat[i : i + chunk].sum(dtype=torch.float32))) for i in range(0, flat.numel(), chunk)):
        return True
    return bool(torch.isfinite(t).all())  # the sum may overflow float32 without any bad value


def non_finite_counts(t: torch.Tensor) -> tuple[int, int]:
    """How many values of ``t`` are not finite, and how many of those are NaN; counted in slices, so that no
    mask of the whole tensor is made."""
    if not t.is_floating_point():
        return 0, 0
    flat = t.reshape(-1)
    bad = nan = 0
    for i in range(0, flat.numel(), 1 << 22):
        part = flat[i : i + (1 << 22)]
        bad += int((~torch.isfinite(part)).sum())
        nan += int(torch.isnan(part).sum())
    return bad, nan


def describe_non_finite(bad: int, nan: int, numel: int) -> str:
    """"3 of 32768 values (2 NaN, 1 infinite)": ``bad`` values not finite of ``numel``, ``nan`` of them NaN."""
    kinds = [f"{nan} NaN"] if nan else []
    kinds += [f"{bad - nan} infinite"] if bad > nan else []
    return f"{bad} of {numel} values ({', '.join(kinds)})"


def count_non_finite(t: torch.Tensor) -> str:
    return describe_non_finite(*non_finite_counts(t), t.numel())


def _overflow(t: torch.Tensor, dtype: torch.dtype) -> tuple[int, float]:
    """How many finite values of ``t`` become infinite when cast to ``dtype``, and the largest magnitude among
    them; checked in blocks of rows, so no full-size copy of ``t`` is made."""
    if not (t.is_floating_point() and dtype.is_floating_point) or t.dtype == dtype or t.numel() == 0:
        return 0, 0.0
    if torch.finfo(dtype).max >= torch.finfo(t.dtype).max:
        return 0, 0.0
    rows = t.reshape(1, -1) if t.dim() == 0 else t
    step = max(1, (1 << 22) // max(1, rows[0].numel()))
    bad, largest = 0, 0.0
    for i in range(0, rows.shape[0], step):
        block = rows[i:i + step]
        over = torch.isinf(block.to(dtype)) & torch.isfinite(block)
        if over.any():
            bad += int(over.sum())
            largest = max(largest, float(block[over].abs().max()))
    return bad, largest


def check_cast(name: str, parts: torch.Tensor | Sequence[torch.Tensor], dtype: torch.dtype) -> None:
    """Raise :class:`CheckpointError` if casting the tensor (or the parts of one) to ``dtype`` turns finite
    values into infinities (float32/bfloat16 values beyond 65504 cast to float16, say), rather than writing
    them silently. ``name`` starts the message."""
    parts = [parts] if isinstance(parts, torch.Tensor) else list(parts)
    found = [_overflow(p, dtype) for p in parts]
    bad = sum(n for n, _ in found)
    if bad:
        largest = max(m for _, m in found)
        numel = sum(p.numel() for p in parts)
        raise CheckpointError(
            f"{name}: {bad} of {numel} values (largest magnitude {largest:.6g}) are beyond the range of "
            f"{str(dtype).removeprefix('torch.')} (at most {torch.finfo(dtype).max:.6g}) and would become "
            "infinite: choose a wider dtype (--dtype bfloat16 or float32)")


@torch.no_grad()
def cast_checked(model: nn.Module, dtype: torch.dtype, what: str) -> None:
    """``model.to(dtype)`` (floating parameters and buffers; integer ones stay), after :func:`check_cast` of each:
    a finite weight that would become infinite (beyond float16's 65504) raises, ``what: NAME`` starting the
    message."""
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        check_cast(f"{what}: {name}", t, dtype)
    model.to(dtype)


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise :class:`CheckpointError` if ``t`` holds NaN or infinite values, as loading refuses them (a file
    converted with them would not load). ``name`` starts the message."""
    if not all_finite(t):
        raise CheckpointError(f"{name} holds NaN or infinite values ({count_non_finite(t)}): a corrupt file, or a "
                              "training run that diverged")


# ---- reading every value ----------------------------------------------------------------------------------
@dataclass
class WeightsReport:
    """What :func:`verify_weights` found in a checkpoint's weight files."""

    files: int = 0  # weight files (shards) of the checkpoint
    tensors: int = 0  # tensors whose every value was read
    nbytes: int = 0  # their bytes
    non_finite: list[dict[str, Any]] = field(default_factory=list)  # {"name", "file", "count", "nan", "numel"}
    unreadable: list[dict[str, str]] = field(default_factory=list)  # {"file", "problem"}: the problem names the file

    @property
    def ok(self) -> bool:
        return not (self.non_finite or self.unreadable)

    def verdict(self) -> str:
        """One line: OK, or FAILED and what."""
        whole = self.files - len(self.unreadable)
        read = (f"{self.tensors} tensors, {self.nbytes / 1e9:.2f} GB read from "
                + (f"{whole} of {self.files}" if self.unreadable else f"{self.files}") + " file(s)")
        if self.ok:
            return f"verify: OK: every value finite ({read})"
        found = [f"{len(self.non_finite)} tensor(s) with NaN or infinite values"] if self.non_finite else []
        found += [f"{len(self.unreadable)} of {self.files} file(s) unreadable"] if self.unreadable else []
        return f"verify: FAILED: {', '.join(found)} ({read})"

    def lines(self) -> list[str]:
        """A line per problem, then the verdict."""
        lines = [f"NaN/inf in {t['name']} ({Path(t['file']).name}): "
                 + describe_non_finite(t["count"], t["nan"], t["numel"]) for t in self.non_finite]
        if len(lines) > MAX_LISTED_PROBLEMS:  # a diverged run: every tensor (--json lists them all)
            lines[MAX_LISTED_PROBLEMS:] = [f"... and {len(lines) - MAX_LISTED_PROBLEMS} more tensors"]
        lines += [f"unreadable: {u['problem']}" for u in self.unreadable]
        return [*lines, self.verdict()]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "files": self.files, "tensors": self.tensors, "bytes": self.nbytes,
                "non_finite": self.non_finite, "unreadable": self.unreadable, "verdict": self.verdict()}


def verify_weights(ckpt_dir: str | os.PathLike[str]) -> WeightsReport:
    """Read every value of every weight file of ``ckpt_dir`` (a folder or one weights file), one file at a time,
    and report the tensors that hold NaN or infinite values (with their counts) and the files that cannot be read
    (truncated, corrupt, refused), instead of stopping at the first: ``qwenvl info --verify``.

    Each file is opened as :func:`load_state_dict` opens it (mapped, read as its tensors are checked) and released
    before the next, so memory holds about one file's pages at a time (the kernel can drop them: they are clean
    file pages). A shard the index names but the folder lacks (an incomplete download) is reported as unreadable,
    the others are read; an unreadable index, or a folder with no weights, raises :class:`CheckpointError` as
    loading does.
    """
    files, _ = locate_weights(ckpt_dir, allow_missing=True)
    report = WeightsReport(files=len(files))
    for i, file in enumerate(files, 1):
        logger.info("reading %s (%d of %d)", file, i, len(files))
        try:
            if not file.is_file():
                raise CheckpointError(f"{file} is missing: the index names it (an incomplete download?)")
            tensors = _open_shard(file)
            if not tensors:
                raise CheckpointError(f"{file} holds no tensors (an empty or unfinished save?)")
            for key in list(tensors):
                t = tensors.pop(key)  # released once checked: the file's mapping goes with its last tensor
                if not all_finite(t):
                    bad, nan = non_finite_counts(t)
                    report.non_finite.append({"name": key, "file": str(file), "count": bad, "nan": nan,
                                              "numel": t.numel()})
                report.tensors += 1
                report.nbytes += _tensor_bytes(t)
                del t
        except CheckpointError as e:
            report.unreadable.append({"file": str(file), "problem": str(e)})
        except (RuntimeError, OSError) as e:  # the data past a readable header (an I/O error)
            report.unreadable.append({"file": str(file), "problem": f"cannot read {file}: {error_line(e)}"})
    return report


# ---- config settings the shapes do not show ---------------------------------------------------------------
def _saved_unseen_config(ckpt_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What our save recorded about the config (in the first safetensors shard's metadata), or None."""
    files = [f for f in locate_weights(ckpt_dir)[0] if f.suffix == ".safetensors"]
    if not files:
        return None
    try:
        with safe_open(str(files[0]), framework="pt") as f:
            raw = (f.metadata() or {}).get(CONFIG_METADATA_KEY)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {files[0]}: {e} (truncated or corrupt file?)") from e
    if raw is None:
        return None
    try:
        saved = parse_json(raw, files[0], CheckpointError)
    except CheckpointError:
        saved = None
    if not isinstance(saved, dict):
        logger.warning("%s: unreadable %s metadata, ignored", files[0], CONFIG_METADATA_KEY)
        return None
    return saved


def check_config(config: QwenVLConfig, ckpt_dir: str | os.PathLike[str]) -> None:
    """Catch a ``config.json`` that fits the weights' shapes but not the model they were trained as.

    Head count (and so head size), norm epsilons and the RoPE base do not show in the shapes. Checkpoints we
    save record them in the safetensors metadata: a disagreement raises :class:`CheckpointError` naming each
    setting. For other checkpoints (the official ones), a config whose shapes are a known preset's (e.g.
    Qwen-VL 9.6B) but whose unseen settings differ from it is warned about.
    """
    mine = config.fields_by_name(UNSEEN_FIELDS)
    saved = _saved_unseen_config(ckpt_dir)
    if saved is not None:
        diffs = [f"{k}: config.json says {mine[k]!r}, the weights were saved with {v!r}"
                 for k, v in sorted(saved.items()) if k in mine and v != mine[k]]
        if diffs:
            raise CheckpointError(format_problems(
                f"config.json of {ckpt_dir} does not describe the model its weights were saved from "
                "(same shapes, different computation):", diffs, "hint: restore these settings in config.json"))
        return
    shapes = config.fields_by_name(SHAPE_FIELDS)
    for name, make in PRESETS.items():
        preset = make()
        if preset.fields_by_name(SHAPE_FIELDS) != shapes:
            continue
        expected = preset.fields_by_name(UNSEEN_FIELDS)
        diffs = [f"{k}={mine[k]!r} (the preset has {v!r})" for k, v in expected.items() if v != mine[k]]
        if diffs:
            logger.warning("%s has the shapes of %s but a different %s: unless that is intended, config.json is "
                           "wrong and the model will compute something else", ckpt_dir, name, ", ".join(diffs))
        return


# ---- writing ------------------------------------------------------------------------------------------------
def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _plan_shards(state: Mapping[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Keys per shard, in order (Hugging Face's rule: start a new shard when the next tensor would overflow)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in state.items():
        n = _tensor_bytes(t)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def _warn_oversized(state: Mapping[str, torch.Tensor], max_bytes: int, max_shard_size: int | str) -> None:
    """One warning line when tensors are larger than the shard limit (each then fills a shard over it)."""
    over = sorted(((_tensor_bytes(t), k) for k, t in state.items() if _tensor_bytes(t) > max_bytes), reverse=True)
    if not over:
        return
    size, key = over[0]
    others = f" and {len(over) - 1} more" if len(over) > 1 else ""
    logger.warning("max_shard_size %s is smaller than %s (%.1f MB)%s: a tensor is never split, so %s written "
                   "alone in a shard over the limit", max_shard_size, key, size / 1e6, others,
                   "each is" if others else "it is")


def _host_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def is_sharded(t: torch.Tensor) -> TypeGuard[DTensor]:
    """Whether ``t`` is a DTensor (FSDP2, tensor parallel): its rows live on several ranks."""
    return hasattr(t, "full_tensor")


def _gathered(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor: DTensors are gathered from every rank (a collective: all ranks must call it in turn)."""
    return _host_contiguous(t.full_tensor()) if is_sharded(t) else t


def _writes_files() -> bool:
    """Whether this process writes a sharded state (rank 0 of the default process group does)."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


CAST_BLOCK_BYTES = 64 * 2**20  # a cast while writing converts this much at a time, not the whole tensor


def iter_tensor_bytes(t: torch.Tensor, dtype: torch.dtype | None = None) -> Iterator[memoryview]:
    """The raw bytes of ``t`` (row-major, native byte order), cast to ``dtype`` on the way in blocks.

    Without a cast the bytes are the tensor's own memory (no copy); with one, at most
    :data:`CAST_BLOCK_BYTES` of converted data exist at a time.
    """
    flat = _host_contiguous(t).reshape(-1)
    if dtype is None or flat.dtype == dtype:
        if flat.numel():
            yield memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]  # numpy stubs: no Buffer before 3.12
        return
    step = max(1, CAST_BLOCK_BYTES // max(flat.element_size(), torch.empty((), dtype=dtype).element_size()))
    for i in range(0, flat.numel(), step):
        yield memoryview(flat[i:i + step].to(dtype).view(torch.uint8).numpy())  # type: ignore[arg-type]  # as above


def _write_tensor_data(f: BinaryIO, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    for block in iter_tensor_bytes(t, dtype):
        f.write(block)


def _write_safetensors(
    file: Path, state: Mapping[str, torch.Tensor], metadata: dict[str, str], load: TensorLoader | None = None
) -> None:
    """Write one safetensors file, streaming one tensor at a time.

    Layout per the format: u64 little-endian header size, the JSON header (padded with spaces to a multiple
    of 8), then the tensors' bytes back to back. Tensors are ordered by decreasing element size then name,
    as safetensors itself does, so every tensor starts aligned to its element size. With ``load``, ``state``
    only describes the tensors (meta tensors will do) and ``load(key)`` gives each one's data when it is
    written (cast to the described dtype on the way).
    """
    order = sorted(state, key=lambda k: (-state[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key in order:
        t = state[key]
        if t.dtype not in _ST_DTYPES:
            raise CheckpointError(f"cannot save {key}: dtype {t.dtype} has no safetensors equivalent")
        n = _tensor_bytes(t)
        header[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key in order:
            if load is None:
                _write_tensor_data(f, state[key])
                continue
            t = load(key)
            if t.shape != state[key].shape:
                raise CheckpointError(f"{key}: expected shape {_shape(state[key])}, got {_shape(t)}")
            _write_tensor_data(f, t, state[key].dtype)
            del t


def _write_bin(file: Path, state: Mapping[str, torch.Tensor]) -> None:
    """``torch.save`` one shard; views of a larger storage are copied so only their own bytes are written."""
    out = {}
    for key, t in state.items():
        t = _host_contiguous(t)
        if t.untyped_storage().nbytes() != _tensor_bytes(t):
            t = t.clone()
        out[key] = t
    torch.save(out, file)


def _state_dict_of(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], lazy: bool = False
) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state_dict, nn.Module):
        state = model_or_state_dict.state_dict()
    else:
        state = dict(model_or_state_dict)
    problems = [f"{k}: not a tensor ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)]
    problems += [f"{k}: on the meta device (no data)" for k, v in state.items()
                 if isinstance(v, torch.Tensor) and v.is_meta and not lazy]
    if problems:
        raise CheckpointError(format_problems("cannot save this state dict:", problems))
    if not state:
        raise CheckpointError("cannot save an empty state dict")
    _refuse_unofficial_layers(state)
    return state


def _refuse_unofficial_layers(state: Mapping[str, torch.Tensor]) -> None:
    """Refuse what would be written as an official checkpoint that nothing can load: int8 layers of
    :func:`qwenvl.quantize.quantize_int8` (``weight`` int8 with its columns interleaved, plus ``scales``) and
    unmerged LoRA adapters (``base_layer``/``lora_A``/``lora_B`` names)."""
    int8 = [k.removesuffix(".scales") for k in state if k.endswith(".scales")
            and not state.get(k.removesuffix("scales") + "weight", torch.empty(0)).is_floating_point()]
    if int8:
        raise CheckpointError(
            f"cannot save an int8-quantized model ({len(int8)} int8 layers, e.g. {int8[0]}): "
            "its weights are not the checkpoint's; save the model loaded without quantize=\"int8\"")
    lora = [k for k in state if ".lora_" in k or ".base_layer." in k]
    if lora:
        raise CheckpointError(
            f"cannot save a model with unmerged LoRA adapters as a checkpoint ({lora[0]}, ...): merge them first "
            "(peft's merge_and_unload, or `qwenvl convert --merge_lora`) or save the adapter alone")


def save_pretrained(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    config: QwenVLConfig | None,
    out_dir: str | os.PathLike[str],
    max_shard_size: int | str = "5GB",
    safe_serialization: bool = True,
    vocab_file: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    load: TensorLoader | None = None,
) -> Path:
    """Write a checkpoint folder in the official layout, crash-safely; return its path.

    ``config`` defaults to ``model.config``; its ``torch_dtype`` is rewritten to the weights' floating dtype.
    One shard -> ``model.safetensors``; more -> ``model-0000K-of-0000N.safetensors`` plus
    ``model.safetensors.index.json``. ``safe_serialization=False`` writes ``pytorch_model*.bin`` instead.
    ``vocab_file`` (default: the bundled official ``qwen.tiktoken``) is copied as ``qwen.tiktoken``.
    A new ``out_dir`` appears complete or not at all. An existing one must be empty or one of our outputs
    (``overwrite=True``: any folder); its files are replaced only once the new ones are complete, weight
    files of an earlier save of ours that this one does not rewrite are deleted, and nothing else is
    touched (:func:`qwenvl.outputs.output_files`). Raises :class:`qwenvl.outputs.OutputDirError` otherwise.

    ``load`` (safetensors only): ``model_or_state_dict`` is a mapping that only describes the tensors (meta
    tensors of the wanted shape and dtype) and ``load(key)`` produces each one when it is written, so that a
    converter holds one tensor at a time.

    A sharded model (DTensor parameters, e.g. after FSDP2's ``fully_shard``) is saved collectively: every rank
    calls this, the tensors of one output file at a time are gathered, and rank 0 writes them.
    """
    if config is None:
        config = getattr(model_or_state_dict, "config", None)
        if not isinstance(config, QwenVLConfig):
            raise CheckpointError("save_pretrained needs a QwenVLConfig (none given and the model has no .config)")
    if load is not None and not safe_serialization:
        raise CheckpointError("tensors produced one by one (load=...) can only be written as safetensors")
    state = _state_dict_of(model_or_state_dict, lazy=load is not None)
    max_bytes = parse_size(max_shard_size)
    vocab = Path(vocab_file) if vocab_file is not None else BUNDLED_VOCAB
    if not vocab.is_file():
        raise FileNotFoundError(f"vocabulary file {vocab} not found")
    stored = _float_dtypes(state.values())
    if stored and stored[0] in DTYPE_NAMES and config.torch_dtype != DTYPE_NAMES[stored[0]]:
        config = replace(config, torch_dtype=DTYPE_NAMES[stored[0]])

    stem, ext, index_name = ("model", "safetensors", SAFE_INDEX_NAME) if safe_serialization else \
        ("pytorch_model", "bin", BIN_INDEX_NAME)
    plan = _plan_shards(state, max_bytes)
    _warn_oversized(state, max_bytes, max_shard_size)
    names = [f"{stem}.{ext}"] if len(plan) == 1 else \
        [f"{stem}-{i + 1:05d}-of-{len(plan):05d}.{ext}" for i in range(len(plan))]

    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(config.fields_by_name(UNSEEN_FIELDS))}
    out = Path(out_dir)
    if any(is_sharded(t) for t in state.values()) and not _writes_files():
        for keys in plan:  # take part in every gather, in the writer's order; rank 0 writes
            for k in keys:
                _gathered(state[k])
        return out
    with output_files(out, overwrite=overwrite) as tmp:
        config.save_pretrained(tmp)
        weight_map: dict[str, str] = {}
        for name, keys in zip(names, plan):
            shard = {k: _gathered(state[k]) for k in keys}  # a sharded model: one file's tensors at a time
            if safe_serialization:
                if load is None:
                    _write_safetensors(tmp / name, shard, metadata)
                else:
                    _write_safetensors(tmp / name, shard, metadata, load)
            else:
                _write_bin(tmp / name, shard)
            weight_map.update(dict.fromkeys(keys, name))
            logger.debug("wrote %s (%d tensors)", name, len(keys))
        if len(plan) > 1:
            total = sum(_tensor_bytes(t) for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / index_name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        shutil.copyfile(vocab, tmp / VOCAB_NAME)
    logger.info("saved %d tensors in %d shard(s) to %s", len(state), len(plan), out)
    return out
