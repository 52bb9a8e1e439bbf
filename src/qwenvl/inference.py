"""High-level inference: batched prediction over many prompts, streaming, and a multi-turn chat session."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from .config import QwenVLConfig
from .fileio import require_folder
from .generation import STOP_IDS, SamplingParams, TextStream, sampling_params, stream_tokens
from .hardware import pick_device  # noqa: F401 (qwenvl.inference.pick_device, as before)
from .images import ImageSource
from .model import QwenVL
from .processor import Processor, image_path_error, prompt_problem

logger = logging.getLogger(__name__)


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """The inference dtype: as given, or (None / "auto") bf16 where ``device`` computes it natively, else fp32
    (logged in one line; an explicit bf16 where it is emulated warns that it will be slow)."""
    from .hardware import resolve_bf16
    from .model.qwenvl import as_dtype

    chosen = as_dtype(dtype)
    if chosen is None:
        return torch.bfloat16 if resolve_bf16(None, device, "inference") else torch.float32
    if chosen == torch.bfloat16:
        resolve_bf16(True, device, "inference")
    return chosen


def load(model_dir: str | os.PathLike, dtype: str | torch.dtype | None = None, device: str | None = None,
         base_dir: str | os.PathLike | None = None, quantize: str | None = None, *,
         allowed_media_dir: str | os.PathLike | None = ".", allow_any_local_path: bool = False,
         config: QwenVLConfig | None = None) -> tuple[QwenVL, Processor]:
    """Model and processor of a checkpoint folder, ready for inference.

    ``config``: the folder's config when the caller has read it already (``QwenVLConfig.from_pretrained``);
    otherwise it is read here, once for the whole load.

    ``allowed_media_dir`` / ``allow_any_local_path`` (``base_dir``: the older name of the first) are the
    processor's media policy: which local files ``<img>PATH</img>`` may name (see :class:`Processor`).

    ``dtype`` None/"auto" picks bf16 where the device computes it natively (CUDA with bf16, CPUs with
    AVX512-BF16 or AMX) and fp32 elsewhere, whatever the stored dtype (:mod:`qwenvl.hardware`).
    ``quantize="int8"`` stores the language model's linear weights as int8 (weight-only, per output
    channel; :mod:`qwenvl.quantize`): 1/4 of the fp32 bytes, and the fastest batch-1 decoding with
    ``compile=True`` in :func:`predict` / :func:`stream_text`. They are quantized from the checkpoint's own
    dtype (read as stored, without a copy), and only the rest is then cast to the compute dtype: computing in
    fp32, Qwen-VL-Chat loads with a peak of about its int8 size (17.3 GB of tensors) instead of its fp32 size
    (38.6 GB). The layers are swapped from outside the model (:func:`qwenvl.quantize.optimize_for_inference`);
    the returned model is for inference only. On a GPU, an int8 model is read on the CPU (mapped from the files,
    no copy) and each linear weight goes to the GPU alone, is quantized there and freed, then the rest follows:
    the GPU's peak is the int8 model (the 9.6B model computing in bf16: 12.2 GB of tensors, not 19.3 GB), so a
    GPU that holds the int8 model can load it. A model whose weights the machine's available memory (on the CPU)
    or the GPU's free memory cannot hold is refused before any is read (:func:`check_memory`: ValueError saying
    what int8 needs). The current CUDA device is left as it is (the caller's: a library function does not change
    it); everything here names its device.
    """
    from .checkpoint import refuse_adapter_folder
    from .quantize import optimize_for_inference

    model_dir = require_folder(model_dir)
    refuse_adapter_folder(model_dir)  # before anything slow: it has no config.json
    device = pick_device(device)
    compute = resolve_dtype(dtype, device)
    if config is None:
        config = QwenVLConfig.from_pretrained(model_dir)
    check_memory(model_dir, compute, quantize, device, config)
    if quantize == "int8" and torch.device(device).type != "cpu":  # read as stored on the CPU, quantized there
        model = QwenVL.from_pretrained(model_dir, device="cpu", config=config)
        optimize_for_inference(model.eval(), quantize, dtype=compute, device=device)
    else:
        model = QwenVL.from_pretrained(model_dir, dtype=None if quantize == "int8" else compute, device=device,
                                       config=config)
        optimize_for_inference(model.eval(), quantize, dtype=compute)
    processor = Processor.from_pretrained(model_dir, config=model.config, base_dir=base_dir,
                                          allowed_media_dir=allowed_media_dir,
                                          allow_any_local_path=allow_any_local_path)
    return model, processor


def check_memory(model_dir: str | os.PathLike, dtype: torch.dtype, quantize: str | None, device: str,
                 config: QwenVLConfig | None = None) -> None:
    """Refuse, before any weight is read, to load a model whose tensors need more memory than there is: on the
    CPU, the machine's available memory (RAM + swap; Linux), or the process would be killed minutes into reading
    the files; on a CUDA device, its free memory (``torch.cuda.mem_get_info``), or the load would stop midway on a
    ``torch.OutOfMemoryError``. Counted from the shapes (:func:`qwenvl.quantize.copied_bytes`): on the CPU,
    tensors read in place from a checkpoint that stores ``dtype`` take none (a GPU holds a copy of every one); the
    message says what would fit (int8 weights). ``config``: the folder's, if already read."""
    from .hardware import available_memory
    from .model.qwenvl import as_dtype
    from .quantize import copied_bytes

    kind = torch.device(device).type
    if kind == "cuda":  # free, and what PyTorch's caching allocator holds but no tensor uses (a model let go)
        available: int | None = (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                                 - torch.cuda.memory_allocated(device))
        memory, where, bigger = "GPU memory", f"{device} has {{}} free", "a GPU with more memory"
    elif kind == "cpu":
        available = available_memory()
        memory, where, bigger = "memory", "this machine has {} available (RAM + swap)", "a machine with more memory"
    else:
        return
    if available is None:
        return
    if config is None:
        config = QwenVLConfig.from_pretrained(model_dir)
    meta = QwenVL.on_meta(config)
    mapped = kind == "cpu" and as_dtype(config.torch_dtype) == dtype
    need = copied_bytes(meta, quantize, dtype, mapped)
    if need <= available:
        return

    def size(n: int) -> str:
        return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"

    how = f"in {str(dtype).removeprefix('torch.')}" + (" with int8 weights" if quantize == "int8" else "")
    if quantize == "int8":
        advice = f"use {bigger}"
    else:
        int8 = copied_bytes(meta, "int8", dtype, mapped)
        advice = (f"with --quantize int8 (quantize='int8') it needs {size(int8)}" if int8 <= available else
                  f"even with --quantize int8 it needs {size(int8)}: use {bigger}")
    raise ValueError(f"loading {model_dir} {how} needs {size(need)} of {memory} for its weights, and "
                     f"{where.format(size(available))}: {advice}")


@dataclass
class Prediction:
    prompt: str  # the prompt as text (image paths shown inside <img>..</img>)
    response: str  # the continuation, without the stop token
    text: str  # prompt + continuation with special tokens, as the reference CLI prints it
    num_tokens: int = 0  # new tokens
    stopped: bool = False  # ended on a stop token (else on max_new_tokens)
    error: str | None = None  # why this prompt was not answered (on_error="record"); response is then ""


def _split_response(processor: Processor, new_ids: list[int], params: SamplingParams) -> tuple[str, int, bool]:
    stops = set(params.stop_token_ids)
    cut = next((k for k, t in enumerate(new_ids) if t in stops), None)
    body = new_ids if cut is None else new_ids[:cut]
    return processor.decode(body), len(new_ids if cut is None else new_ids[: cut + 1]), cut is not None


def predict(
    model: QwenVL,
    processor: Processor,
    prompts: Sequence[Any],
    params: SamplingParams | None = None,
    batch_size: int = 1,
    base_dir: str | os.PathLike | None = None,
    progress: bool = False,
    compile: bool = False,
    on_error: str = "raise",
) -> list[Prediction]:
    """Generate for every prompt (strings, list-format lists or messages), ``batch_size`` at a time.

    A prompt is tokenized as the processor does it: a list-format list as its text, with no ChatML around it
    even for a chat checkpoint (``qwenvl predict`` makes it one ChatML user turn there, as the reference chat:
    pass ``[{"role": "user", "content": LIST}]`` for that prompt).
    Batched greedy results equal the one-by-one results (left padding with per-sequence positions).
    ``params`` None: ``model.generate``'s defaults (greedy; the checkpoint's ``max_new_tokens`` and stop tokens).
    ``compile=True`` decodes with the ``torch.compile``-d step (the first call compiles; int8 weights are fastest so).
    ``on_error``: a prompt the processor or the generation cannot take (a bad or refused image, a malformed
    prompt, one longer than the context) raises its ``ValueError`` (``"raise"``) or gives a
    :class:`Prediction` with ``error`` set while the others are answered (``"record"``).
    """
    return list(iter_predict(model, processor, prompts, params, batch_size, base_dir, progress, compile, on_error))


def iter_predict(
    model: QwenVL,
    processor: Processor,
    prompts: Sequence[Any],
    params: SamplingParams | None = None,
    batch_size: int = 1,
    base_dir: str | os.PathLike | None = None,
    progress: bool = False,
    compile: bool = False,
    on_error: str = "raise",
) -> Generator[Prediction, None, None]:
    """:func:`predict`, one :class:`Prediction` at a time in the prompts' order, each batch's as soon as it is
    answered (so a caller keeps what is done when the run stops early). The arguments are checked at once."""
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and any(isinstance(p, dict) for p in prompts)):
        raise ValueError("prompts must be a list of prompts; a single prompt (a string, messages or a list-format "
                         "list) goes in a list of its own: [prompt]")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if on_error not in ("raise", "record"):
        raise ValueError(f"on_error must be 'raise' or 'record', got {on_error!r}")
    prompts = list(prompts)
    wrong = _type_errors(prompts)
    if on_error == "raise" and wrong:
        raise ValueError(next(iter(wrong.values())))
    params = _params(model, params)
    return _iter_predict(model, processor, prompts, params, batch_size, base_dir, progress, compile, on_error)


def _type_errors(prompts: list[Any], start: int = 0) -> dict[int, str]:
    """The errors of the ``prompts`` (``prompts[start:]`` of the caller's) that are not even of a prompt's form
    (:func:`qwenvl.processor.prompt_problem`: a None, an int, a list of numbers)."""
    return {k: f"prompts[{start + k}] {problem}" for k, p in enumerate(prompts) if (problem := prompt_problem(p))}


def _iter_predict(model: QwenVL, processor: Processor, prompts: list[Any], params: SamplingParams, batch_size: int,
                  base_dir: str | os.PathLike | None, progress: bool, compile: bool,
                  on_error: str) -> Generator[Prediction, None, None]:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc="predict", unit="prompt")
    try:
        for s in range(0, len(prompts), batch_size):
            chunk = prompts[s : s + batch_size]
            inputs, errors = _process(processor, chunk, base_dir, on_error, _type_errors(chunk, s))
            answered = iter(_answer(model, processor, chunk, inputs, errors, params, base_dir, compile, on_error))
            done = [Prediction(_prompt_text(prompt), "", "", error=errors[k]) if k in errors else next(answered)
                    for k, prompt in enumerate(chunk)]
            if bar is not None:
                bar.update(len(chunk))
            yield from done
    finally:
        if bar is not None:
            bar.close()


def _process(processor: Processor, chunk: list[Any], base_dir: str | os.PathLike | None,
             on_error: str, errors: dict[int, str]) -> tuple[dict[str, Any] | None, dict[int, str]]:
    """The processor's inputs for the prompts of ``chunk`` that it takes, and the errors of the others by index
    (``errors``: those of the prompts not even of a prompt's type, with ``on_error="record"``)."""
    if not errors:
        try:
            return processor(chunk, base_dir=base_dir), {}  # a list of prompts is always a batch
        except ValueError:
            if on_error == "raise":
                raise
    good = []
    for k, prompt in enumerate(chunk):  # find the culprits one by one; the others are answered as a batch
        if k in errors:
            continue
        try:
            processor([prompt], base_dir=base_dir)
            good.append(prompt)
        except ValueError as e:
            errors[k] = str(e)
    return (processor(good, base_dir=base_dir) if good else None), errors


def _answer(model: QwenVL, processor: Processor, chunk: list[Any], inputs: dict[str, Any] | None,
            errors: dict[int, str], params: SamplingParams, base_dir: str | os.PathLike | None, compile: bool,
            on_error: str) -> list[Prediction]:
    """The predictions of the prompts of ``chunk`` not in ``errors``; with ``on_error="record"`` a batch that
    generation refuses (a prompt longer than the context) is answered one by one, the culprits added to
    ``errors``."""
    if inputs is None:
        return []
    try:
        return _generate_batch(model, processor, inputs, params, compile)
    except ValueError:
        if on_error == "raise":
            raise
    out = []
    for k, prompt in enumerate(chunk):
        if k in errors:
            continue
        try:
            out += _generate_batch(model, processor, processor([prompt], base_dir=base_dir), params, compile)
        except ValueError as e:
            errors[k] = str(e)
    return out


def _generate_batch(model: QwenVL, processor: Processor, inputs: dict[str, Any], params: SamplingParams,
                    compile: bool) -> list[Prediction]:
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    steps = list(stream_tokens(model, ids, mask, inputs["images"], params, compile=compile))
    new = torch.stack(steps, 1).cpu() if steps else ids.new_zeros((ids.shape[0], 0))
    out = []
    for b in range(ids.shape[0]):
        prompt_ids = ids[b][mask[b].bool()].tolist()
        # a row that reached the context before the others is padded after its last token: the padding
        # (<|endoftext|>) is neither an answer token nor a stop
        room = model.config.lm.max_position_embeddings - len(prompt_ids)
        response, n, stopped = _split_response(processor, new[b, :room].tolist(), params)
        full = prompt_ids + new[b, :n].tolist()
        out.append(Prediction(processor.decode(prompt_ids), response, processor.decode(full), n, stopped))
    return out


def _prompt_text(prompt: Any) -> str:
    """A failed prompt as text for its result row (no tokenizing: that may be what failed)."""
    if isinstance(prompt, str):
        return prompt
    try:
        return json.dumps(prompt, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(prompt)


def _params(model: QwenVL, params: SamplingParams | None) -> SamplingParams:
    """``params``, or ``model.generate``'s defaults when None; anything else is a one-line error (a dict of options
    failed on ``params.stop_token_ids``)."""
    if params is None:
        return sampling_params(model)
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams (qwenvl.generation.SamplingParams(max_new_tokens=..., ...) "
                        f"or sampling_params(model, ...) for the checkpoint's defaults), got a {type(params).__name__}")
    return params


def stream_text(
    model: QwenVL, processor: Processor, prompt: Any, params: SamplingParams | None = None,
    base_dir: str | os.PathLike | None = None,
    compile: bool = False,
    images: Sequence[ImageSource] | None = None,
) -> Iterator[str]:
    """Yield the response text of one prompt as it is decoded (never splitting a UTF-8 character).

    ``images``: as in :meth:`Processor.__call__`, one per ``<img>`` span of the prompt, in order. ``params``
    None: as in :func:`predict`."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise ValueError("stream_text takes one prompt (a string, a list-format list or messages), got a list of "
                         f"{len(prompt)} prompt(s): give the prompt itself, or use predict for several")
    params = _params(model, params)
    inputs = processor([prompt], images=images, base_dir=base_dir)
    stream = TextStream(processor.decode, skip_ids=params.stop_token_ids)
    stops = set(params.stop_token_ids)
    for token in stream_tokens(model, inputs["input_ids"], inputs["attention_mask"], inputs["images"], params,
                               compile=compile):
        t = int(token[0])
        if t in stops:
            break
        delta = stream.push(t)
        if delta:
            yield delta
    tail = stream.flush()
    if tail:
        yield tail


class ConversationTooLong(ValueError):
    """A chat message that fits the context alone but not after the history the processor keeps (its window,
    ``max_window_size``, counts the history only, as the official code): ``advice`` says how to go on."""

    API_ADVICE = "clear() starts afresh, or drop the oldest turns of .history"

    def __init__(self, tokens: int, context: int, advice: str = API_ADVICE):
        self.tokens, self.context = tokens, context
        super().__init__(self.message(advice))

    def message(self, advice: str) -> str:
        return (f"the conversation is too long for the context ({self.tokens} tokens, the model holds "
                f"{self.context}): {advice}")


@dataclass
class ChatSession:
    """A multi-turn ChatML conversation with pictures; history is trimmed oldest-first by the processor.

    A picture is read once, by :meth:`add_image`, and kept (decoded) for the turns that show it: moving or
    deleting the file later does not change the conversation. :meth:`clear` forgets them. ``params`` defaults to
    the checkpoint's chat settings (:func:`chat_params`, as ``qwenvl chat`` uses).

    ``base_dir``: the media folder of this conversation's image paths, as the ``base_dir`` of :func:`stream_text`
    and :func:`predict`: the processor's media policy applies with this folder in place of its
    ``allowed_media_dir``; None (default): the processor's own (set it with ``load(..., allowed_media_dir=...)``).
    """

    model: QwenVL
    processor: Processor
    params: SamplingParams | None = None
    system: str | None = None
    base_dir: str | os.PathLike | None = None
    history: list[tuple[list[dict[str, Any]], str]] = field(default_factory=list)
    pending_images: list[str] = field(default_factory=list)
    last_image: str | None = None  # the latest picture added or shown, while the conversation shows it (a key of images)
    compile: bool = False  # decode with the torch.compile-d step
    images: dict[str, Image.Image] = field(default_factory=dict, repr=False)  # path as added -> its picture

    def __post_init__(self) -> None:
        """A system text that leaves no room for a message is said now: every message failed on it."""
        if self.system is None:
            return
        context = self.model.config.lm.max_position_embeddings
        n = len(self.processor.build_chat_prompt([{"text": ""}], system=self.system)[1])
        if n >= context:
            raise ValueError(f"the system text is too long for the context ({n} tokens with an empty message, the "
                             f"model holds {context}): give a shorter one")

    def add_image(self, image: ImageSource) -> str:
        """Show a picture with the next question; return the name the prompt shows it by (``<img>NAME</img>``).

        A path is read now, under the processor's media policy, and shown as given. A picture given as a PIL
        image, bytes or a ``data:`` URL (which reads no file) is shown as ``<image N>``. Checked and read now:
        a bad picture fails here with a clear message, not at every next question."""
        if isinstance(image, (str, os.PathLike)) and not str(image).startswith("data:"):
            name = os.fspath(image)
            problem = image_path_error(name)  # '</img>' or another special token, too long, not Unicode
            if problem:  # the prompt could not show it: every later question would fail on it
                raise ValueError(problem)
            picture = self.processor.load_image(name, self.base_dir)
        else:
            picture = self.processor.load_image(image)  # bytes, PIL or a data URL (no file read, whatever base_dir)
            name = next(f"<image {n}>" for n in range(1, len(self.images) + 2) if f"<image {n}>" not in self.images)
        self.images[name] = picture
        self.pending_images.append(name)
        self.last_image = name
        return name

    def clear(self) -> None:
        self.history.clear()
        self.pending_images.clear()
        self.images.clear()
        self.last_image = None

    def messages(self, query: list[dict[str, Any]]) -> list[dict[str, Any]]:
        msgs: list[dict[str, Any]] = []
        if self.system is not None:
            msgs.append({"role": "system", "content": self.system})
        for q, r in self.history:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
        msgs.append({"role": "user", "content": query})
        return msgs

    def _check_fits(self, ids: list[int], query: list[dict[str, Any]]) -> None:
        """A prompt the model cannot take: :class:`ConversationTooLong`, or a ValueError when the message alone
        (with the system text) is too long, which no clearing helps."""
        context = self.model.config.lm.max_position_embeddings
        if len(ids) < context:
            return
        alone = len(self.processor.build_chat_prompt(query, system=self.system)[1])
        if alone >= context:
            raise ValueError(f"the message is too long for the context ({alone} tokens with the system text, the "
                             f"model holds {context}): send a shorter one")
        raise ConversationTooLong(len(ids), context)

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        if not isinstance(text, str):
            raise TypeError(f"ask expects the message as a str, got {type(text).__name__}")
        if not text.strip() and not self.pending_images:
            raise ValueError("empty message")
        query = [{"image": p} for p in self.pending_images] + [{"text": text}]
        messages = self.messages(query)
        # the pictures of the turns that fit the window, from memory; a span typed into a message is read now,
        # once, and kept as an added picture is (a file moved or deleted later changes nothing)
        _, ids = self.processor.build_messages_prompt(messages)  # refuses a path that no <img>PATH</img> can hold
        self._check_fits(ids, query)
        shown = self.processor.tokenizer.image_paths(ids)
        typed = {p: self.processor.load_image(p, self.base_dir) for p in dict.fromkeys(shown) if p not in self.images}
        images = [self.images[p] if p in self.images else typed[p] for p in shown]
        pieces = []
        params = chat_params(self.model) if self.params is None else self.params
        for delta in stream_text(self.model, self.processor, messages, params, self.base_dir, self.compile,
                                 images=images):
            pieces.append(delta)
            if on_text is not None:
                on_text(delta)
        answer = "".join(pieces)
        self.history.append((query, answer))
        self.pending_images = []
        # a turn that no longer fits the window never comes back (the newest turns are kept): nor do its pictures
        self.images = {p: im for p, im in {**self.images, **typed}.items() if p in shown}
        # the latest picture the conversation shows (added with :image or typed as <img>PATH</img>), if any
        self.last_image = shown[-1] if shown else None
        return answer


def chat_params(model: QwenVL | QwenVLConfig, **overrides: Any) -> SamplingParams:
    """Sampling defaults of a chat: the checkpoint's generation_config (sampling, top_p, chatml stops), of
    ``model`` or of its config (before the weights load)."""
    g = (model if isinstance(model, QwenVLConfig) else model.config).generation
    base: dict[str, Any] = {"max_new_tokens": g.max_new_tokens, "do_sample": g.do_sample, "top_p": g.top_p, "top_k": g.top_k,
            "temperature": g.temperature, "repetition_penalty": g.repetition_penalty,
            "stop_token_ids": STOP_IDS["chatml"], "pad_token_id": g.pad_token_id}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return SamplingParams(**base)
