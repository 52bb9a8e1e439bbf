"""What users of transformers and of the official Qwen-VL remote code type from habit, taken where it means the
same and refused in one line (saying what to use) where it does not: ``from_pretrained``'s options, ``forward``'s
keywords, and the official ``model.chat``/``model.chat_stream``. Kept out of :mod:`qwenvl.model`, whose code is the
model itself; :class:`~qwenvl.model.QwenVL` calls these. ``generate``'s keywords (``max_length``, ``eos_token_id``,
``num_beams``, ...) are translated beside the sampling options they become:
:func:`qwenvl.generation.from_transformers_options`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .model import QwenVL

__all__ = ["QUANTIZATION_ADVICE", "chat_stream", "check_forward_options", "load_options"]


# transformers' forward() keywords: the value that asks for what forward does anyway, and what to use otherwise
_FORWARD_OPTIONS = {
    "return_dict": (True, "the output is always a QwenVLOutput (.logits, .loss, .past_key_values)"),
    "use_cache": (False, "pass past_key_values=model.new_cache(batch, max_length) to fill a KV cache"),
    "output_attentions": (False, "the model does not return attentions"),
    "output_hidden_states": (False, "the model does not return hidden states"),
}


def check_forward_options(options: dict[str, Any]) -> None:
    """Refuse the keywords ``forward`` does not take, saying what to use for transformers' ones. ``token_type_ids``
    (what a transformers tokenizer returns) is ignored, as the official model ignores it; None is each option's
    default."""
    for name, value in options.items():
        if name == "token_type_ids" or value is None:
            continue
        if name not in _FORWARD_OPTIONS:
            raise TypeError(f"forward() got an unexpected keyword argument {name!r}")
        same, instead = _FORWARD_OPTIONS[name]
        if value is not same:
            raise TypeError(f"forward() does not take {name}={value!r}: {instead}")


# transformers' (and the official remote code's) from_pretrained options: the Hub's, which a local folder has no
# use for, and quantization, which is done otherwise here
_HUB_OPTIONS = ("revision", "cache_dir", "token", "use_auth_token", "force_download", "local_files_only", "subfolder",
                "resume_download", "proxies", "mirror")
QUANTIZATION_ADVICE = ("int8 weights: qwenvl.inference.load(dir, quantize='int8') (or "
                        "qwenvl.quantize.optimize_for_inference(model, 'int8')); 4-bit is not supported")


def load_options(options: dict[str, Any], dtype: torch.dtype | str | None,
                               device: str | torch.device) -> tuple[torch.dtype | str | None, str | torch.device]:
    """``(dtype, device)`` with transformers' and the official remote code's ``from_pretrained`` keywords applied:
    ``torch_dtype`` (an alias of ``dtype``), ``bf16``/``fp16``/``fp32=True`` (the official config switches),
    ``device_map`` naming one device ("auto": cuda when available, else cpu; N or ``{"": N}``: cuda:N);
    ``trust_remote_code``, ``low_cpu_mem_usage`` and ``use_flash_attn`` change nothing (no remote code runs, the
    load is always lazy and mmap'd, attention picks its kernel itself). Anything else is a TypeError: Hub
    options (local folders only) and quantization say what to use instead."""
    switches = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    given: dict[str, Any] = {}
    for name, value in options.items():
        if name == "torch_dtype":
            given[name] = value
        elif name in switches:
            if not isinstance(value, bool):
                raise TypeError(f"from_pretrained() {name} must be True or False, got {value!r}")
            if value:
                given[name] = switches[name]
        elif name == "device_map":
            if isinstance(value, dict) and list(value) == [""]:  # {"": 0}: the whole model on one device
                value = value[""]
            if isinstance(value, int) and not isinstance(value, bool):  # a GPU's index, as transformers takes it
                value = f"cuda:{value}"
            if isinstance(value, torch.device):
                value = str(value)
            if not isinstance(value, str) or value in ("balanced", "balanced_low_0", "sequential"):
                raise TypeError(f"from_pretrained() takes device_map naming one device (cpu, cuda, cuda:N, auto), "
                                f"got {value!r}: the model is loaded whole onto one device")
            given[name] = value
        elif name in ("trust_remote_code", "low_cpu_mem_usage", "use_flash_attn"):
            continue
        elif name in _HUB_OPTIONS:
            raise TypeError(f"from_pretrained() does not take {name}=: qwenvl loads a local folder; download the "
                            "checkpoint first (huggingface-cli download REPO --revision R --local-dir DIR)")
        elif name in ("load_in_8bit", "load_in_4bit", "quantization_config"):
            if value not in (False, None):
                raise TypeError(f"from_pretrained() does not take {name}=: {QUANTIZATION_ADVICE}")
        else:
            raise TypeError(f"from_pretrained() got an unexpected keyword argument {name!r}")
    dtypes = {k: v for k, v in given.items() if k != "device_map"}
    if len(dtypes) > 1 or (dtypes and dtype is not None):
        names = (["dtype"] if dtype is not None else []) + list(dtypes)
        raise TypeError(f"from_pretrained() got {' and '.join(names)}: give one dtype")
    if "device_map" in given:
        if device != "cpu":
            raise TypeError("from_pretrained() got device and device_map: give one")
        device = given["device_map"]
    return (next(iter(dtypes.values())) if dtypes else dtype), device


def chat_stream(model: QwenVL, tokenizer: Any, query: str, history: list[tuple[str, str]] | None,
                system: str, **options: Any) -> Iterator[str]:
    """The official ``model.chat_stream``: the whole response so far at each step, to ``query`` after ``history``
    in a ChatML prompt (see :meth:`qwenvl.model.QwenVL.chat`)."""
    from .inference import chat_params, stream_text
    from .processor import Processor
    from .tokenizer import QwenTokenizer

    if not isinstance(tokenizer, QwenTokenizer):
        raise TypeError(f"chat() takes qwenvl's tokenizer (Processor.from_pretrained(dir).tokenizer), got a "
                        f"{type(tokenizer).__name__}")
    g = model.config.generation
    if g.chat_format != "chatml":
        raise ValueError("chat() needs a chat checkpoint (chat_format chatml, e.g. Qwen-VL-Chat); this one is a "
                         "base model (raw): continue a prompt with model.generate(**processor(prompt)) instead")
    processor = Processor(tokenizer, image_size=model.config.visual.image_size, max_window_size=g.max_window_size,
                          system=system)
    messages = [{"role": "system", "content": system}]
    for q, r in history or []:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    messages.append({"role": "user", "content": query})
    response = ""
    for piece in stream_text(model, processor, messages, chat_params(model, **options)):
        response += piece
        yield response
