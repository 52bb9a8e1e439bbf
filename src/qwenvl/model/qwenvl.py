"""The glue: embeddings, image features scattered into the ``<img>`` spans, the LM stack, ``lm_head``.

``QwenVL`` takes tensors only (``input_ids``, ``attention_mask``, ``images`` as pixels); turning text and
pictures into those tensors is the processor's job.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import IMG_END_ID, IMG_START_ID, IMG_TOKEN_SPAN, GenerationDefaults, QwenVLConfig
from ..transformers_compat import QUANTIZATION_ADVICE, check_forward_options, load_options
from .cross_entropy import linear_cross_entropy
from .kv_cache import KVCache, SlotDecode
from .llm import Block, RMSNorm, logn_scale, ntk_alpha, rope_cos_sin, rope_inv_freq
from .vision import VisionTower

try:  # FSDP2 shards parameters as DTensors; absent from builds without torch.distributed
    from torch.distributed.tensor import DTensor

    _DTENSOR: tuple[type, ...] = (DTensor,)
except ImportError:  # pragma: no cover
    _DTENSOR = ()  # isinstance(x, ()) is False: no weight is sharded

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100
_ID_DTYPES = (torch.int64, torch.int32)  # what nn.Embedding takes


@dataclass
class QwenVLOutput:
    logits: torch.Tensor | None = None  # (B, T_kept, vocab) or None when only the loss was asked for
    loss: torch.Tensor | None = None
    num_loss_tokens: int = 0
    past_key_values: KVCache | SlotDecode | None = None


class QwenModel(nn.Module):
    """Everything under ``transformer.``: ``wte``, ``h``, ``ln_f`` and the vision tower ``visual``."""

    def __init__(self, config: QwenVLConfig) -> None:
        super().__init__()
        lm = config.lm
        self.wte = nn.Embedding(lm.vocab_size, lm.hidden_size)
        self.h = nn.ModuleList(Block(lm) for _ in range(lm.num_hidden_layers))
        self.ln_f = RMSNorm(lm.hidden_size, lm.layer_norm_epsilon)
        self.visual = VisionTower(config.visual)


def image_span_mask(input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Boolean (B, T) mask of the 256 positions strictly inside each ``<img>..</img>`` span, and the span count.

    Raises ValueError when a span is malformed (no ``</img>`` exactly 257 positions after ``<img>``).
    """
    starts = (input_ids == IMG_START_ID).nonzero()
    n = starts.shape[0]
    if n == 0:
        return torch.zeros_like(input_ids, dtype=torch.bool), 0
    t = input_ids.shape[1]
    ends = starts[:, 1] + IMG_TOKEN_SPAN + 1
    ok = (ends < t) & (input_ids[starts[:, 0], ends.clamp(max=t - 1)] == IMG_END_ID)
    if not bool(ok.all()):
        b, p = starts[~ok][0].tolist()
        raise ValueError(
            f"malformed image span in sequence {b} at position {p}: <img> must be followed by {IMG_TOKEN_SPAN} ids "
            "and </img> (use the Processor to build input_ids)"
        )
    offsets = torch.arange(1, IMG_TOKEN_SPAN + 1, device=input_ids.device)
    cols = (starts[:, 1:2] + offsets).reshape(-1)
    rows = starts[:, 0:1].expand(-1, IMG_TOKEN_SPAN).reshape(-1)
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    mask[rows, cols] = True
    return mask, n


def attention_bias(
    attention_mask: torch.Tensor | None, t: int, past: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean (B|1, 1, t, past+t) mask, or None when plain causal attention (or none) is exact.

    Padded query rows may attend to themselves so that no row is fully masked (SDPA would give NaN).
    Padding only on the right (training batches) with no cache needs no mask: a real token at position i
    attends to positions <= i, all real, so causal attention gives every real position exactly the masked
    result (and lets the attention kernel skip the blocks above the diagonal); only the padded positions'
    outputs differ, and nothing reads them (their labels are ignored; causally they reach no real token).
    """
    total = past + t
    if t == 1:  # decode: no data-dependent branch when compiled, so the step captures one graph
        if attention_mask is None or (not torch.compiler.is_compiling() and bool(attention_mask.all())):
            return None
        allowed = attention_mask.bool()[:, None, None, :total]
        return allowed | ~allowed.any(-1, keepdim=True)  # a row with no real key at all: any keys, not NaN
    padding = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None  # some key pads
    if past == 0 and padding is not None and bool((padding[:, 1:] <= padding[:, :-1]).all()):
        padding = None  # right padding only: see above
    if padding is None and past == 0:
        return None
    q_pos = torch.arange(past, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]  # (1, 1, t, total)
    if padding is not None:
        allowed = allowed & padding.bool()[:, None, None, :total]
        allowed = allowed | (k_pos == q_pos)[None, None]
    return allowed


# torch.nn.init's in-place initializers, which PyTorch's layers call from reset_parameters() while they are built
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")  # fmt: skip


@contextmanager
def _skipped_init() -> Iterator[None]:
    """Within the block, ``torch.nn.init``'s initializers return their tensor untouched (as Hugging Face's
    ``no_init_weights`` does). Only for building modules on the meta device, where they have nothing to fill;
    the functions are module attributes, so another thread initializing weights at that moment would skip too."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS if hasattr(nn.init, name)}

    def untouched(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor

    for name in saved:
        setattr(nn.init, name, untouched)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


class QwenVL(nn.Module):
    """Qwen-VL: ``transformer`` (LM + ``visual``) and an untied ``lm_head``. Parameter names are the official ones."""

    def __init__(self, config: QwenVLConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = QwenModel(config)
        self.lm_head = nn.Linear(config.lm.hidden_size, config.lm.vocab_size, bias=False)
        self.gradient_checkpointing = False

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls, config: QwenVLConfig | str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
        seed: int | None = None,
    ) -> QwenVL:
        """A randomly initialized model (a preset name or a config)."""
        model = cls.on_meta(config)
        model.to_empty(device=device)
        if seed is not None:
            torch.manual_seed(seed)
        model.init_weights()
        if dtype is not None:
            model.to(dtype)
        return model.eval()

    @classmethod
    def on_meta(cls, config: QwenVLConfig | str) -> QwenVL:
        """The model's modules on the meta device (shapes and names, no data), for loading into or inspecting.

        The PyTorch layers' own random init is skipped while they are built (:func:`_skipped_init`): on meta
        tensors it computes nothing, but the first ``normal_`` on one runs a Python reference kernel that
        imports ``torch._dynamo`` (~2.3 s on 2 AVX2 cores), which eager inference never needs: ``qwenvl eval``
        of the demo's model on 4 images took 5.1-7.0 s instead of 6.5-8.2 s (alternating runs)."""
        if isinstance(config, str):
            config = QwenVLConfig.from_preset(config)
        with torch.device("meta"), _skipped_init():
            return cls(config)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
        config: QwenVLConfig | None = None, **transformers_options: Any,
    ) -> QwenVL:
        """Load an official (or our) checkpoint folder strictly; see :func:`qwenvl.checkpoint.load_weights`
        (every key, shape and dtype, no NaN/inf) and :func:`qwenvl.checkpoint.check_config` (the settings the
        shapes do not show).

        ``dtype``: a floating dtype or its name; None or "auto" keeps the stored one. ``device``: cpu, cuda,
        cuda:N, ... or "auto" (cuda when available, else cpu). What transformers (and the official remote code)
        users type is taken where it means the same (:func:`qwenvl.transformers_compat.load_options`: ``torch_dtype``,
        ``device_map`` naming one device, ``bf16=True``, ``trust_remote_code``, ...); other options are errors.
        ``config``: the folder's config already read (``QwenVLConfig.from_pretrained(path)``), so that it is not
        read again; it is checked against the weights all the same."""
        from ..checkpoint import check_config, load_weights
        from ..hardware import pick_device

        dtype, device = load_options(transformers_options, dtype, device)
        dtype = as_dtype(dtype)  # checked before anything is read
        device = pick_device(str(device))  # "auto", and a device this machine lacks is a one-line error
        if not os.path.exists(path):  # (a file given for the folder is named by the config's loader)
            hub = not os.path.isabs(path) and str(path).count("/") == 1  # "Qwen/Qwen-VL-Chat": a Hub id
            raise FileNotFoundError(f"checkpoint folder not found: {path}" + (
                " (qwenvl loads local folders, not Hugging Face Hub ids: download it first, e.g. huggingface-cli "
                f"download {path} --local-dir DIR, and pass DIR)" if hub else ""))
        if config is None:
            config = QwenVLConfig.from_pretrained(path)
        elif not isinstance(config, QwenVLConfig):
            raise TypeError(f"config must be a QwenVLConfig (QwenVLConfig.from_pretrained(path)), got a "
                            f"{type(config).__name__}")
        check_config(config, path)
        model = cls.on_meta(config)
        load_weights(model, path, dtype=dtype, device=device)
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike[str], **kwargs: Any) -> None:
        from ..checkpoint import save_pretrained

        save_pretrained(self, self.config, path, **kwargs)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        for name, module in self.named_modules():
            if name.startswith("transformer.visual"):
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:  # nn.Embedding has none
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        for module in self.transformer.visual.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, nn.Conv2d):
                nn.init.trunc_normal_(module.weight, std=std)
            elif isinstance(module, nn.MultiheadAttention):
                nn.init.trunc_normal_(module.in_proj_weight, std=std)
                module.in_proj_bias.zero_()
        self.transformer.visual.reset_parameters()

    # ---- helpers ----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.transformer.wte.parameters()).device  # the weight (or a swapped-in embedding's first)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the embedding (quantized layers may store their weights otherwise)."""
        return next(self.transformer.wte.parameters()).dtype

    @property
    def generation_config(self) -> GenerationDefaults:
        """The checkpoint's ``generation_config.json`` (``config.generation``), under the name transformers and the
        official remote code give it: changing a field (``model.generation_config.top_p = 0.8``) changes the
        defaults of :meth:`generate` (``do_sample`` excepted: it is greedy unless asked) and :meth:`chat`."""
        return self.config.generation

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled
        self.transformer.visual.transformer.gradient_checkpointing = enabled

    def new_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None) -> KVCache:
        lm = self.config.lm
        return KVCache(lm.num_hidden_layers, batch_size, lm.num_attention_heads, lm.kv_channels, max_length,
                       dtype or self.dtype, self.device)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels (N, 3, H, W) -> features (N, 256, hidden)."""
        self._check_pixels(images)
        return self.transformer.visual(images.to(self.device))

    def _check_pixels(self, images: object) -> None:
        """Refuse anything but the Processor's pixels: float (N, 3, image_size, image_size). Other shapes fail
        deep in the vision tower (or, for another square size, run on resized position embeddings), and
        integer pixels are not normalized."""
        size = self.config.visual.image_size
        if (not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4
                or tuple(images.shape[1:]) != (3, size, size)):
            raise ValueError(f"images must be float pixels (images, 3, {size}, {size}) from the Processor; "
                             f"got {describe_value(images)}")

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features in place of the 256 ids inside each ``<img>..</img>``."""
        h = self.transformer.wte(input_ids)
        if images is None and image_features is None:
            return h
        mask, n = image_span_mask(input_ids)
        if image_features is None:
            assert images is not None  # returned above when both are None
            self._check_pixels(images)
            if images.shape[0] != n:  # before the vision tower runs on them
                raise ValueError(f"the prompt has {n} image span(s) (<img>..</img>) but {images.shape[0]} image(s) "
                                 "were given")
            image_features = self.encode_images(images)
        if tuple(image_features.shape[1:]) != (IMG_TOKEN_SPAN, h.shape[-1]):
            raise ValueError(f"image features must be (images, {IMG_TOKEN_SPAN}, {h.shape[-1]}): one row of the hidden "
                             f"size per position inside <img>..</img>; got {tuple(image_features.shape)}")
        if image_features.shape[0] != n:
            raise ValueError(
                f"the prompt has {n} image span(s) (<img>..</img>) but {image_features.shape[0]} image(s) were given"
            )
        return h.masked_scatter(mask[..., None], image_features.to(h.dtype))

    # ---- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | SlotDecode | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_features: torch.Tensor | None = None,
        rope_alpha: torch.Tensor | None = None,
        **transformers_options: Any,
    ) -> QwenVLOutput:
        """One pass over ``input_ids`` (B, T).

        attention_mask: (B, past + T), 1 for real tokens (left padding for batches). With a KV cache, pass
        the mask for all positions so far. labels: (B, T) aligned with input_ids (-100 = ignored); the model
        shifts them, computes ``lm_head`` only where labels exist and returns the mean loss.
        logits_to_keep: 0 = all positions, k > 0 = the last k, or a 1-D tensor of positions.
        rope_alpha: (B,) dynamic-NTK factors overriding the ones derived from the lengths.
        transformers' keywords are taken where they ask for what is done anyway (:func:`qwenvl.transformers_compat.check_forward_options`);
        any other keyword is a TypeError (a misspelt ``attention_mask`` was ignored).
        """
        if transformers_options:
            check_forward_options(transformers_options)
        lm = self.config.lm
        if (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in _ID_DTYPES
                or input_ids.numel() == 0):
            raise ValueError(f"input_ids must be an integer tensor (batch, tokens) with at least one token; "
                             f"got {describe_value(input_ids)}")
        if not isinstance(logits_to_keep, torch.Tensor) and logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be 0 (all positions), k > 0 (the last k) or a tensor of "
                             f"positions; got {logits_to_keep}")
        b, t = input_ids.shape
        cache = past_key_values
        past = cache.length if cache is not None else 0
        if past == 0:
            # an id outside the embedding is an IndexError on a CPU and a device-side assert (which breaks the
            # process's CUDA context) on a GPU; decode steps feed back the model's own ids and skip this sync
            lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()
            if lo < 0 or hi >= lm.vocab_size:
                raise ValueError(f"input_ids hold {lo if lo < 0 else hi}: the model has ids 0..{lm.vocab_size - 1}")
        if attention_mask is not None and attention_mask.shape != (b, past + t):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, past + t)}")
        if past == 0 and images is None and image_features is None and bool((input_ids == IMG_START_ID).any()):
            raise ValueError("input_ids contain <img> spans but no images were given (the model reads pixels, not paths)")

        x = self.embed(input_ids, images, image_features) if past == 0 else self.transformer.wte(input_ids)

        explicit_positions = position_ids is not None
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + t, device=input_ids.device).expand(b, t)
        inference = not self.training
        if rope_alpha is None and cache is not None and cache.rope_alpha is not None and past > 0:
            rope_alpha = cache.rope_alpha
        if rope_alpha is None:
            if inference and lm.use_dynamic_ntk:
                lengths = attention_mask.sum(-1).tolist() if attention_mask is not None else [past + t] * b
                rope_alpha = torch.tensor([ntk_alpha(int(n), lm.seq_length) for n in lengths], device=x.device)
            else:
                rope_alpha = torch.ones(b, device=x.device)
        inv_freq = None
        if cache is not None and past == 0:
            cache.rope_alpha = rope_alpha
            cache.rope_inv_freq = inv_freq = rope_inv_freq(rope_alpha, lm.kv_channels, lm.rotary_emb_base)
        elif cache is not None and rope_alpha is cache.rope_alpha:  # decode: the factors chosen at prefill
            inv_freq = cache.rope_inv_freq
        cos, sin = rope_cos_sin(position_ids, rope_alpha, lm.kv_channels, lm.rotary_emb_base, inv_freq)
        # LogN scales positions p with p + 1 > seq_length; derived positions never exceed past + t - 1, so
        # shorter sequences skip the per-layer multiply by ones
        logn = inference and lm.use_logn_attn and (explicit_positions or past + t > lm.seq_length)
        q_scale = logn_scale(position_ids, lm.seq_length) if logn else None
        mask = attention_bias(attention_mask, t, past, x.device)

        for i, block in enumerate(self.transformer.h):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, q_scale, mask, cache, i, use_reentrant=False)
            else:
                x = block(x, cos, sin, q_scale, mask, cache, i)
        if cache is not None:
            cache.advance(t)
        x = self.transformer.ln_f(x)

        if labels is not None:
            loss, n = self.loss(x, labels)
            return QwenVLOutput(loss=loss, num_loss_tokens=n, past_key_values=cache)
        if isinstance(logits_to_keep, torch.Tensor):
            x = x[:, logits_to_keep]
        elif logits_to_keep > 0:
            # copied with standard strides: given the slice's strides, torch.matmul (weights without gradients)
            # runs a bmm that copies the whole lm_head weight instead of one (rows, hidden) x (hidden, vocab) mm
            x = x[:, -logits_to_keep:].clone(memory_format=torch.contiguous_format)
        return QwenVLOutput(logits=self.lm_head(x), past_key_values=cache)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, int]:
        """Mean next-token cross-entropy over labelled positions; ``lm_head`` runs only on those positions,
        fused with the loss (:func:`~qwenvl.model.cross_entropy.linear_cross_entropy`), through the head's own
        ``cross_entropy(hidden, target)`` (summed) when a swapped-in head has one, or in chunks for a wrapped
        ``lm_head``, so [B, T, vocab] logits are never kept for the backward pass."""
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        h = hidden[:, :-1][keep]  # (N, hidden)
        y = target[keep]
        n = int(y.numel())
        if n == 0:
            # nothing to learn, but lm_head still takes part (with zero gradients): under data parallelism every
            # rank must produce gradients for the same parameters, or their reduction would not match
            h, y = hidden.reshape(-1, hidden.shape[-1])[:1], target.new_zeros(1)
        weight = _plain_linear_weight(self.lm_head)
        head_loss = getattr(self.lm_head, "cross_entropy", None)  # a swapped-in head with a loss of its own
        if weight is not None:
            total = linear_cross_entropy(h, weight, y)
        elif head_loss is not None:
            total = head_loss(h, y)
        else:  # a wrapped lm_head (LoRA, packed weights) runs its own forward
            total = hidden.new_zeros((), dtype=torch.float32)
            for s in range(0, h.shape[0], chunk):
                logits = self.lm_head(h[s : s + chunk]).float()
                total = total + F.cross_entropy(logits, y[s : s + chunk], reduction="sum")
        return (total / n, n) if n else (total * 0.0, 0)

    # ---- generation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Greedy (default) or sampled continuation; see :func:`qwenvl.generation.generate`. ``inputs=`` (the
        name of transformers' first argument) is taken for ``input_ids``."""
        from ..generation import generate

        if "inputs" in kwargs:
            if input_ids is not None:
                raise TypeError("generate() got input_ids and inputs: give one")
            input_ids = kwargs.pop("inputs")
        if input_ids is None:
            raise TypeError("generate() needs input_ids (the processor's: model.generate(**processor(prompt)))")
        return generate(self, input_ids, **kwargs)

    def chat(self, tokenizer: Any, query: str, history: list[tuple[str, str]] | None = None,
             system: str = "You are a helpful assistant.", **options: Any) -> tuple[str, list[tuple[str, str]]]:
        """``(response, history + [(query, response)])``, as the official remote code's ``model.chat``: a ChatML
        prompt of the history (trimmed to the checkpoint's ``max_window_size``) and ``query`` (text, pictures as
        ``<img>PATH</img>``, e.g. from ``tokenizer.from_list_format``, read under the processor's default media
        policy: files inside the working directory), answered with the checkpoint's sampling defaults
        (:func:`qwenvl.inference.chat_params`; ``options`` override them: ``do_sample=False``, ...)."""
        response = ""  # an answer that stops at once
        for partial in self.chat_stream(tokenizer, query, history, system, **options):
            response = partial
        return response, [*(history or []), (query, response)]

    def chat_stream(self, tokenizer: Any, query: str, history: list[tuple[str, str]] | None = None,
                    system: str = "You are a helpful assistant.", **options: Any) -> Iterator[str]:
        """:meth:`chat`'s response as it grows: each item is the whole response so far, as the official
        ``model.chat_stream`` yields it (:func:`qwenvl.inference.stream_text` yields the new pieces instead)."""
        from ..transformers_compat import chat_stream

        yield from chat_stream(self, tokenizer, query, history, system, **options)


def _plain_linear_weight(layer: nn.Module) -> torch.Tensor | None:
    """The weight of a layer that computes exactly ``x @ weight.T``, for the fused loss; else None.

    That is an ``nn.Linear`` without bias whose forward is ``nn.Linear``'s own: FSDP2's ``fully_shard`` changes
    the class (``FSDPLinear``) but not the forward, LoRA and packed layers bring their own forward. A weight
    still sharded (a DTensor: ``lm_head`` sharded in a group of its own, whose forward never runs here) must
    be gathered by that forward instead; grouped with ``ln_f`` it is whole by the time the loss runs.
    """
    if not isinstance(layer, nn.Linear) or type(layer).forward is not nn.Linear.forward or layer.bias is not None:
        return None
    return None if isinstance(layer.weight, _DTENSOR) else layer.weight


def describe_value(x: object) -> str:
    """What a wrong argument is, for its error message: "a torch.float32 tensor of shape (2, 3)", "a list"."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating dtype from a dtype or its name (fp32/float32, bf16/bfloat16, fp16/float16); None or "auto" is
    None (keep the stored one). The one parser of dtype names for the loaders, the CLI and the layer swaps."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype (float32, bfloat16, float16), got {dtype}; for "
                             f"{QUANTIZATION_ADVICE}")
        return dtype
    if dtype is None:
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16, "auto": None}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]
