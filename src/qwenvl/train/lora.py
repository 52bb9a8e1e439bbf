"""LoRA fine-tuning through peft, on our plain ``nn.Module`` (no Hugging Face ``PreTrainedModel`` needed).

Adapters go on the language model's ``attn.c_attn``, ``attn.c_proj``, ``mlp.w1`` and ``mlp.w2`` (the official
Qwen-VL LoRA targets), selected by a regex anchored on ``transformer.h.N`` so that the vision tower's own
``c_proj``/``out_proj`` are never touched. ``peft.inject_adapter_in_model`` wraps those Linears in place:
the model stays a :class:`~qwenvl.model.QwenVL`, and only the adapter weights (plus, optionally, the
resampler trained in full) require gradients.

Saved adapter folder (peft's ``PeftModel.save_pretrained`` format, so ``PeftModel.from_pretrained(QwenVL(...),
folder)`` reads it too)::

    adapter_config.json            the LoraConfig (base_model_name_or_path: the load_checkpoint or preset trained on)
    adapter_model.safetensors      base_model.model.<module>.lora_A.weight / lora_B.weight
    non_lora_trainables.safetensors  parameters trained in full next to the adapters (official names), if any
    base_model.json                ours (peft ignores it): {"base_model_fingerprint": "sha256:..."}

:func:`merge_lora` folds the adapters into the base weights and writes a normal checkpoint in the
official layout, after checking that the base is the one the adapter was trained on (:func:`load_adapter` checks it
too): another model of the same shapes (Qwen-VL for Qwen-VL-Chat, another random init) merges without an error
into weights the adapter never saw.
A path says little (folders move and get copied), so the base's weights are fingerprinted
(:func:`base_fingerprint`).

Nothing is downloaded: an adapter is a local folder, checked before peft sees it (peft would take a missing
folder for a Hugging Face Hub id and go online), and peft is imported with ``HF_HUB_OFFLINE=1`` unless the
environment says otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..fileio import atomic_dir, error_line, parse_json, set_default_mode
from .config import TrainConfig

__all__ = [
    "ADAPTER_PREFIX",
    "adapter_folder",
    "apply_lora",
    "base_fingerprint",
    "recorded_base_fingerprint",
    "check_adapters_are_used",
    "load_adapter",
    "lora_config_from",
    "merge_lora",
    "save_adapter",
]

logger = logging.getLogger(__name__)

ADAPTER_PREFIX = "base_model.model."  # how PeftModel.save_pretrained names adapter weights
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
EXTRA_WEIGHTS = "non_lora_trainables.safetensors"
BASE_MODEL = "base_model.json"
# Weights whose first row identifies a base model: a few KB of it, read from the loaded model, and rows that any
# fine-tune of the language model changes (Qwen-VL -> Qwen-VL-Chat trained them all).
_FLOAT16_TINY = 2.0**-14  # float16's smallest normal number: below it float16 keeps fewer bits than bfloat16
FINGERPRINT_WEIGHTS = ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.w1.weight",
                       "lm_head.weight")

# What peft (or safetensors under it) raises for a bad adapter folder: a corrupt file, a config with unknown
# fields, weights that do not fit the base model.
_ADAPTER_ERRORS = (SafetensorError, OSError, TypeError, KeyError, RuntimeError, ValueError)


def _peft():  # noqa: ANN202 - the module; imported lazily so that plain fine-tuning does not need peft
    # peft reaches the Hugging Face Hub through huggingface_hub, which reads this when first imported
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import peft
    except ImportError as e:  # pragma: no cover - peft is a declared extra
        raise ImportError("LoRA needs peft: pip install 'qwenvl[lora]'") from e
    return peft


def require_peft(what: str) -> None:
    """For the command line: peft missing is a one-line error (``ValueError``) said before any work starts."""
    try:
        _peft()
    except ImportError:
        raise ValueError(f"{what} needs peft: pip install 'qwenvl[lora]'") from None


def lora_config_from(cfg: TrainConfig):  # noqa: ANN201 - peft.LoraConfig
    return _peft().LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target,
        bias="none",
        base_model_name_or_path=cfg.load_checkpoint or cfg.preset or None,  # as given (a model passed in: None)
    )


def _adapter_weights(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    # never the embeddings (the targets are inside transformer.h.N); peft's "auto" would look base_model_name_or_path
    # up, on the Hub for a preset name
    return _peft().get_peft_model_state_dict(model, state_dict=state, save_embedding_layers=False)


def base_fingerprint(model: nn.Module) -> str:
    """``"sha256:HEX"`` of the first row of each of :data:`FINGERPRINT_WEIGHTS` of ``model`` (with or without LoRA
    layers), rounded to bfloat16: milliseconds, whatever the model's size.

    The same for the same weights loaded in bfloat16 or float32, on any device, for a float32 checkpoint and its
    bfloat16 copy (bfloat16 values are exact in float32, and a float32 value cast to bfloat16 rounds the same way
    once), and for a bfloat16 checkpoint and its float16 copy: float16 holds every bfloat16 value of its normal
    range exactly, and the smaller ones (below 2**-14, which float16 keeps only in part) count as 0. Hashing float32
    bytes would tell a bfloat16 copy from its float32 original (the same model); a float16 copy of a float32
    checkpoint (rounded twice) may still differ (``ignore_mismatched_base`` then).
    """
    from torch.distributed.tensor import DTensor

    params = _base_parameters(model)
    digest = hashlib.sha256()
    for name in FINGERPRINT_WEIGHTS:
        weight: torch.Tensor = params[name]
        if isinstance(weight, DTensor):  # FSDP shards rows: rank 0, the one that saves, holds the first ones
            weight = weight.to_local()
        row = weight.detach()[0].to("cpu", torch.bfloat16)
        row = torch.where(row.abs() < _FLOAT16_TINY, 0, row)  # what a float16 copy keeps of them differs
        digest.update(name.encode() + row.view(torch.int16).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def _base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s parameters by their names without LoRA's wrapping (peft's ``.base_layer.``)."""
    return {name.replace(".base_layer.", "."): p for name, p in model.named_parameters()}


def _fingerprintable(model: nn.Module) -> bool:
    """Whether ``model`` has the weights :func:`base_fingerprint` reads as parameters (int8 layers hold buffers)."""
    return set(FINGERPRINT_WEIGHTS) <= _base_parameters(model).keys()


def apply_lora(model: nn.Module, cfg: TrainConfig, extra_trainable: list[str] | None = None,  # noqa: ANN201
               check: bool = True):
    """Freeze ``model``, add LoRA adapters in place and return the ``LoraConfig``.

    ``extra_trainable``: names of parameters trained in full next to the adapters (the resampler).
    Raises ValueError when the target regex matches no module. ``check``: run :func:`check_adapters_are_used`
    (a model on the meta device is checked once it has weights).
    """
    peft = _peft()
    lora_cfg = lora_config_from(cfg)
    model.requires_grad_(False)
    try:
        peft.inject_adapter_in_model(lora_cfg, model)
    except ValueError as e:
        raise ValueError(f"LoRA target {cfg.lora_target!r} matches no module of the model: {e}") from e
    if check:
        check_adapters_are_used(model)
    _warn_rank_beyond_layers(model, cfg.lora_r)
    params = dict(model.named_parameters())
    for name in extra_trainable or []:
        params[name].requires_grad_(True)
    n_lora = sum(p.numel() for n, p in params.items() if "lora_" in n)
    logger.info("LoRA r=%d alpha=%d on %r: %d adapter parameters (+%d trained in full)", cfg.lora_r,
                cfg.lora_alpha, cfg.lora_target, n_lora, sum(params[n].numel() for n in extra_trainable or []))
    return lora_cfg


def _warn_rank_beyond_layers(model: nn.Module, r: int) -> None:
    """Warn when ``r`` exceeds min(in, out) of a layer with an adapter: its update ``B @ A`` cannot have a higher
    rank than that, so the extra rank is parameters without capacity (and a smaller lora_alpha / lora_r scale).
    A warning, not an error: peft accepts it, training is correct, and one lora_r for layers of several widths
    should not be refused for its narrowest ones."""
    narrow = sorted((min(m.in_features, m.out_features), name, m.in_features, m.out_features)
                    for name, m in model.named_modules()
                    if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and min(m.in_features, m.out_features) < r)
    if narrow:
        low, name, n_in, n_out = narrow[0]
        logger.warning("lora_r=%d is larger than min(in, out) of %d layer(s) with an adapter (smallest: %s, %d in, %d "
                       "out): an adapter's update cannot have a rank above that, so the rest adds parameters but no "
                       "capacity; lower lora_r to %d or less", r, len(narrow), name, n_in, n_out, low)


def check_adapters_are_used(model: nn.Module) -> None:
    """Run two tokens through the model and make sure a LoRA layer took part.

    peft swaps modules in place, so a forward that reads ``layer.weight`` itself instead of calling
    ``layer(x)`` would skip the adapters: training would then silently change nothing.
    """
    from peft.tuners.lora import LoraLayer

    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    calls: list[bool] = []
    handle = layer.register_forward_hook(lambda *_: calls.append(True))
    was_training = model.training
    model.eval()  # no dropout: the check must not draw random numbers
    try:
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device))
    finally:
        handle.remove()
        model.train(was_training)
    if not calls:
        raise RuntimeError(
            "the model's forward does not call the LoRA-wrapped modules (it uses their .weight directly), so the "
            "adapters would never train; call the modules (layer(x)) for anything that is not a plain nn.Linear"
        )


def _extra_trainables(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters that are not adapter weights, by their official name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}


def save_adapter(model: nn.Module, lora_cfg, out_dir: str | os.PathLike[str],  # noqa: ANN001
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapters (and the parameters trained in full) to ``out_dir`` atomically; return it.

    ``state``: the trained parameters by name, whole (for a sharded model: gathered), instead of the model's own.
    """
    adapters = {ADAPTER_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in _adapter_weights(model, state).items()}
    trained = _extra_trainables(model) if state is None else {k: v for k, v in state.items() if "lora_" not in k}
    extras = {k: v.detach().to("cpu").contiguous() for k, v in trained.items()}
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        save_file(adapters, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        set_default_mode(tmp / ADAPTER_WEIGHTS)
        lora_cfg.save_pretrained(str(tmp))
        if extras:
            save_file(extras, str(tmp / EXTRA_WEIGHTS), metadata={"format": "pt"})
            set_default_mode(tmp / EXTRA_WEIGHTS)
        (tmp / BASE_MODEL).write_text(json.dumps({"base_model_fingerprint": base_fingerprint(model)}) + "\n",
                                      encoding="utf-8")
    return out


def adapter_folder(adapter_dir: str | os.PathLike[str]) -> Path:
    """``adapter_dir`` checked to be a local adapter folder (config readable, weights present); raise if not.

    Checked here, before peft sees the name: peft takes anything that is not a local folder for a Hub id.
    """
    from ..checkpoint import CheckpointError

    folder = Path(adapter_dir)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"adapter {folder} is a file; give the adapter folder (with {ADAPTER_CONFIG} and "
                              f"{ADAPTER_WEIGHTS}) that `qwenvl finetune` with use_lora wrote")
    if not folder.is_dir():
        raise CheckpointError(f"adapter folder {folder} not found (an adapter is a local folder written by "
                              "`qwenvl finetune` with use_lora; nothing is downloaded)")
    config = folder / ADAPTER_CONFIG
    try:
        loaded = parse_json(config.read_text(encoding="utf-8"), config, CheckpointError)
    except FileNotFoundError:  # a LoRA run's output_dir holds its adapter in adapter/ (checkpoints: checkpoint-N/)
        inside = [p for p in (folder / "adapter", *sorted(folder.glob("checkpoint-*/adapter")))
                  if (p / ADAPTER_CONFIG).is_file()]
        hint = f" (the adapter of a LoRA run is in its adapter/ folder: --adapter {inside[0]})" if inside else ""
        raise CheckpointError(f"{folder} is not an adapter folder: it has no {ADAPTER_CONFIG}{hint}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {config}: {e}") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{config} does not describe a LoRA adapter: it holds a {type(loaded).__name__}")
    if loaded.get("peft_type") != "LORA":  # peft needs the key (else a bare KeyError: 'peft_type')
        raise CheckpointError(f"{config} does not describe a LoRA adapter: its peft_type is "
                              f"{loaded.get('peft_type', 'missing')!r} (peft writes \"peft_type\": \"LORA\")")
    for key, positive_int in (("r", True), ("lora_alpha", False)):  # peft fails on others with a bare TypeError
        value = loaded.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int if positive_int else (int, float)) or value <= 0:
            raise CheckpointError(f"{config}: {key} must be a positive {'integer' if positive_int else 'number'}, "
                                  f"got {value!r}")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"adapter folder {folder} has no {ADAPTER_WEIGHTS}")
    return folder


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    from ..checkpoint import CheckpointError

    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {file}: {error_line(e)} (truncated or corrupt file?)") from None


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike[str], ignore_mismatched_base: bool = False) -> None:
    """Load saved adapter (and full-trained) weights into a model that already has the same adapters.

    As :func:`merge_lora`, an adapter that records the base it was trained on (:func:`base_fingerprint`) is refused
    (:class:`~qwenvl.checkpoint.CheckpointError`) by a model of the same shapes with other base weights, unless
    ``ignore_mismatched_base``: it would load without an error into weights it never saw.
    """
    peft = _peft()
    folder = Path(adapter_dir)
    file = folder / ADAPTER_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {folder}")
    state = {k.removeprefix(ADAPTER_PREFIX): v for k, v in _read_weights(file).items()}
    expected = set(_adapter_weights(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"adapter {folder} does not match the model's adapters: missing {missing[:5]}, "
                         f"unexpected {extra[:5]} (different lora_r or lora_target?)")
    if not ignore_mismatched_base:  # the shapes fit: are these the weights it was trained on? (before the
        if _fingerprintable(model):  # parameters trained in full replace some of them)
            _check_base(folder, model)
        else:
            logger.warning("the model's weights are quantized (int8): whether the adapter %s was trained on them "
                           "cannot be checked; load it before quantizing to check it", folder)
    peft.set_peft_model_state_dict(model, state)
    _load_extras(model, folder)


def _load_extras(model: nn.Module, folder: Path) -> None:
    file = folder / EXTRA_WEIGHTS
    if not file.is_file():
        return
    params = dict(model.named_parameters())
    extras = _read_weights(file)
    unknown = [k for k in extras if k not in params]
    bad = [k for k in extras if k in params and params[k].shape != extras[k].shape]
    if unknown or bad:
        raise ValueError(f"{file}: unknown parameters {unknown[:5]} or shape mismatches {bad[:5]}")
    with torch.no_grad():
        for k, v in extras.items():
            params[k].copy_(v)


def recorded_base_fingerprint(adapter_dir: str | os.PathLike[str]) -> str | None:
    """The :func:`base_fingerprint` of the base an adapter folder was trained on (its :data:`BASE_MODEL`), or None
    when it records none (an adapter written by peft, or by qwenvl before it recorded one);
    :class:`~qwenvl.checkpoint.CheckpointError` when the record cannot be read."""
    from ..checkpoint import CheckpointError

    file = Path(adapter_dir) / BASE_MODEL
    if not file.is_file():
        return None
    try:
        recorded = parse_json(file.read_text(encoding="utf-8"), file, CheckpointError)
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {file}: {error_line(e)}") from None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("base_model_fingerprint"), str):
        raise CheckpointError(f"{file} holds no \"base_model_fingerprint\" string: the base cannot be checked "
                              "(--ignore_mismatched_base, ignore_mismatched_base=True in Python, skips the check)")
    return recorded["base_model_fingerprint"]


def _check_base(adapter_dir: Path, model: nn.Module, base_dir: str | os.PathLike[str] | None = None) -> None:
    """Raise :class:`~qwenvl.checkpoint.CheckpointError` when the adapter in ``adapter_dir`` records a base
    fingerprint (:data:`BASE_MODEL`) other than ``model``'s base weights; warn when it records none (an adapter
    written by peft, or by qwenvl before it recorded one): its base cannot be checked. ``base_dir``: the folder
    ``model`` was loaded from, to merge into (:func:`merge_lora`); None: a model to load it into (:func:`load_adapter`).
    """
    from ..checkpoint import CheckpointError

    recorded = recorded_base_fingerprint(adapter_dir)
    if recorded is None:
        target = base_dir if base_dir is not None else "the model it is loaded into"
        logger.warning("the adapter %s does not record the base model it was trained on (no %s): make sure %s is that "
                       "model", adapter_dir, BASE_MODEL, target)
        return
    if recorded == base_fingerprint(model):
        return
    try:  # read by adapter_folder for a merge; a folder given to load_adapter needs only its weights
        config = adapter_dir / ADAPTER_CONFIG
        name = parse_json(config.read_text(encoding="utf-8"), config, ValueError).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        name = None
    if name and base_dir is not None and Path(name).resolve() == Path(base_dir).resolve():  # other weights now
        trained_on = f"the weights {base_dir} held then, not on those it holds now"
    else:
        weights = f"the weights in {base_dir}" if base_dir is not None else "this model's base weights"
        trained_on = f"{'the base ' + str(name) if name else 'another base'}, not on {weights}"
    fix = (f"merge it into the base it was trained on, or add --ignore_mismatched_base (ignore_mismatched_base=True "
           f"in Python) to merge it into {base_dir} all the same" if base_dir is not None else
           "load it into the base it was trained on, or pass ignore_mismatched_base=True to load it all the same")
    raise CheckpointError(f"the adapter {adapter_dir} was trained on {trained_on} (they differ: another model of the "
                          f"same shapes, or a copy rounded to another dtype?): {fix}")


def merge_lora(
    base_dir: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
    safe_serialization: bool = True,
    ignore_mismatched_base: bool = False,
) -> Path:
    """Fold a saved adapter into the base checkpoint and write a full checkpoint in the official layout.

    The merge is computed in float32; the result is stored in ``dtype`` (default: the base checkpoint's
    dtype). Parameters trained in full next to the adapters (``non_lora_trainables.safetensors``) replace
    the base ones. ``out_dir`` appears complete or not at all. ``adapter_dir`` must be a local folder
    (see :func:`adapter_folder`); a bad adapter, or one whose weights do not match the base model's layers
    one for one, or weights holding NaN or infinity (a run that diverged), raises
    :class:`qwenvl.checkpoint.CheckpointError`; so does a base of the same shapes whose weights are not those the
    adapter was trained on (:func:`base_fingerprint`), unless ``ignore_mismatched_base``.
    """
    folder = adapter_folder(adapter_dir)  # before anything slow, and before peft could go online
    peft = _peft()
    from ..checkpoint import CheckpointError, cast_checked, check_finite, save_pretrained
    from ..config import QwenVLConfig
    from ..model import QwenVL
    from ..model.qwenvl import as_dtype

    config = QwenVLConfig.from_pretrained(base_dir)
    target = as_dtype(dtype if dtype is not None else config.torch_dtype) or torch.float32
    base = QwenVL.from_pretrained(base_dir, dtype=torch.float32)
    try:
        with warnings.catch_warnings():  # its list of the keys it missed (lines of them): checked and said below
            warnings.filterwarnings("ignore", message="Found missing adapter keys", category=UserWarning)
            adapted = peft.PeftModel.from_pretrained(base, str(folder))
    except _ADAPTER_ERRORS as e:
        raise CheckpointError(f"cannot merge the adapter {folder} into {base_dir}: {error_line(e)}") from None
    # peft loads non-strictly: weights for layers the base lacks are dropped, layers without weights stay unadapted
    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as f:  # read by peft above: only the names
        stored = set(f.keys())  # noqa: SIM118 (safe_open is not a dict)
    expected = set(_adapter_weights(adapted))
    if stored != expected:
        missing, extra = sorted(expected - stored), sorted(stored - expected)
        raise CheckpointError(f"the adapter {folder} is not for the model in {base_dir}: missing {missing[:3]} "
                              f"({len(missing)}), unexpected {extra[:3]} ({len(extra)}) (trained on another model, "
                              "or with another lora_target?)")
    if not ignore_mismatched_base:  # the shapes fit: are these the weights it was trained on?
        _check_base(folder, base, base_dir)  # base: wrapped in place by peft
    merged = adapted.merge_and_unload()
    _load_extras(merged, folder)
    for name, t in merged.state_dict().items():  # the base loaded finite: a NaN comes from the adapter's weights
        check_finite(f"cannot merge the adapter {folder} into {base_dir}: {name}", t)  # saved, it would not load
    cast_checked(merged, target, f"cannot merge into {str(target).removeprefix('torch.')}")  # float16: <= 65504
    out = save_pretrained(merged, merged.config, out_dir, max_shard_size=max_shard_size,
                          safe_serialization=safe_serialization)
    logger.info("merged %s into %s -> %s (%s)", adapter_dir, base_dir, out, target)
    return out

