"""Text, chat messages and images -> model tensors; training conversations -> ids and labels.

Everything here reproduces an official rule exactly (DESIGN.md section 1, "Prompts and generation" and
"Fine-tuning"): prompts are tokenized as by the official tokenizer, chat prompts as by ``make_context`` in
``qwen_generation_utils.py`` (role, newline and content tokenized *separately*), training samples as by
``preprocess`` in Qwen-VL's ``finetune.py``. The model only ever gets tensors: images are loaded here from
the ``<img>PATH</img>`` spans (or supplied by the caller) and passed as pixels.

This is the one place where paths in text become file reads, under the processor's media policy
(:class:`qwenvl.images.MediaPolicy`): relative paths resolve against ``allowed_media_dir`` and nothing outside
it is read unless ``allow_any_local_path=True``; ``allowed_media_dir=None`` reads no local file at all. In a
chat, an assistant turn never carries a picture: ``<img>``/``</img>`` in an assistant's content (for example
the model's own earlier answer) are plain text, so nothing is read because of them.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from .config import ENDOFTEXT_ID, IM_END_ID, IM_START_ID, GenerationDefaults, QwenVLConfig
from .images import ImageSource, MediaPolicy, load_image, pixel_values, shown
from .tokenizer import IMAGE_SPECIAL_TOKENS, QwenTokenizer, image_path_problem

if TYPE_CHECKING:  # torch loads where tensors are made: checking prompts (the CLI, before the weights) does not need it
    import torch

__all__ = ["DEFAULT_SYSTEM", "IGNORE_INDEX", "PROMPT_KINDS", "ModelInputs", "Processor", "image_path_error",
           "prompt_image_path_error", "prompt_image_paths", "prompt_problem"]

DEFAULT_SYSTEM = "You are a helpful assistant."
IGNORE_INDEX = -100  # label of positions that do not contribute to the loss (PyTorch cross_entropy default)

logger = logging.getLogger(__name__)

_TRAIN_ROLES = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}

# What an assistant's content may hold as tags in a chat prompt: refs, boxes and quads, but not pictures.
_ASSISTANT_SPECIAL_TOKENS = tuple(t for t in IMAGE_SPECIAL_TOKENS if t not in ("<img>", "</img>", "<imgpad>"))

# One prompt: raw text, a list-format list ([{"image": ...}, {"text": ...}]) or OpenAI-style messages.
# (list[Any], not list[dict[str, Any]]: type checkers infer a literal of mixed dicts as list[object])
Prompt = str | list[Any]


PROMPT_KINDS = "a prompt is a string, a list-format list or a list of messages"
_ITEM_KEYS = ("role", "image", "text", "box")  # what marks a message, or a list-format item


def prompt_problem(prompt: object) -> str | None:
    """Why ``prompt`` is no prompt at all (checked before anything is tokenized: the words of a predicate, to
    follow the prompt's name), or None. A prompt is a string, or a list of dicts each of which is a message
    (``role``) or a list-format item (``image``, ``text``, ``box``); what those hold is checked where it is read."""
    if isinstance(prompt, str):
        return None
    if not isinstance(prompt, list):
        return f"is of type {type(prompt).__name__}, not a prompt: {PROMPT_KINDS}"
    for k, item in enumerate(prompt):
        if not isinstance(item, dict):
            wrong = f"{item!r:.60}, not a dict"
        elif not any(key in item for key in _ITEM_KEYS):
            wrong = f"{item!r:.60}, with none of the keys 'role', 'image', 'text' or 'box'"
        else:
            continue
        return (f"is a list, but its item {k} is {wrong}: {PROMPT_KINDS} (list format: [{{'image': PATH}}, "
                "{'text': TEXT}], messages: [{'role': 'user', 'content': TEXT or list format}])")
    return None


def _is_messages(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(m, dict) for m in items) and any("role" in m for m in items)


_IMG_SPAN = re.compile(r"<img>(.*?)</img>", re.S)


def prompt_image_paths(prompt: object, chat_format: str | None = None) -> list[str]:
    """The image paths a prompt names: ``<img>`` spans in text, list-format ``{"image": P}`` items, and both
    inside messages, assistant turns excepted (their pictures are never read). With ``chat_format="raw"`` a list
    of messages is prompted with its last message alone (:meth:`Processor.build_chat_prompt`): only its paths
    count; None (not known yet) counts every turn's."""
    if isinstance(prompt, str):
        return _IMG_SPAN.findall(prompt)
    if not isinstance(prompt, list):
        return []
    if chat_format == "raw" and _is_messages(prompt):
        prompt = prompt[-1:]
    paths: list[str] = []
    for item in prompt:
        if not isinstance(item, dict):
            continue
        if "role" in item:
            if item.get("role") != "assistant":
                paths += prompt_image_paths(item.get("content"))
        elif isinstance(item.get("image"), str):
            paths.append(item["image"])
        elif isinstance(item.get("text"), str):
            paths += _IMG_SPAN.findall(item["text"])
    return paths


def prompt_image_path_error(prompt: object) -> str | None:
    """:func:`image_path_error` of the first image path of ``prompt`` (:func:`prompt_image_paths`) that no span
    can hold, or None: said before tokenizing, which would read a lone surrogate as U+FFFD ("image not found" of
    another name)."""
    return next(filter(None, map(image_path_error, prompt_image_paths(prompt))), None)


def image_path_error(path: str) -> str | None:
    """The one-line error for an image path that no ``<img>PATH</img>`` span can hold
    (:func:`qwenvl.tokenizer.image_path_problem`: ``</img>`` or another special token in it, a lone surrogate,
    more than 256 bytes), or None."""
    problem = image_path_problem(path)
    return None if problem is None else f"image path {shown(path)} {problem}: a prompt cannot show it (<img>PATH</img>)"


class ModelInputs(dict[str, Any]):  # Any so that model(**inputs) type-checks
    """The processor's tensors (``input_ids``, ``attention_mask``, ``images``: None without pictures): a dict, so
    ``model(**inputs)`` works, with transformers' ``inputs.to(device)`` (or ``.to(dtype)``, which casts the
    pixels only: ids and mask stay integers, as transformers' ``BatchFeature.to`` does)."""

    def to(self, device: str | torch.device | torch.dtype | None = None, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> ModelInputs:
        import torch

        if isinstance(device, torch.dtype):
            device, dtype = None, device
        return ModelInputs({k: v.to(device=device, dtype=dtype if v.is_floating_point() else None,
                                    non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
                            for k, v in self.items()})


class Processor:
    """Turns prompts (and images) into the tensors the model takes, and conversations into labels.

    ``chat_format`` is what the checkpoint's ``generation_config.json`` says: ``"chatml"`` for Qwen-VL-Chat,
    ``"raw"`` for the base Qwen-VL. It only affects messages and :meth:`build_chat_prompt`; a plain string
    prompt is always tokenized as is (it may already hold the ChatML tags).

    Media policy (which local files ``<img>PATH</img>`` may name; see :class:`qwenvl.images.MediaPolicy`):

    - ``allowed_media_dir`` (default ``"."``, the working directory at each call): relative paths resolve
      against it and only files inside it are read; absolute paths outside it, ``~``, ``..`` leading out of
      it and symbolic links pointing out of it are refused (:class:`qwenvl.images.MediaAccessError`, the
      same message whether the file exists or not). ``None``: no local file is read at all.
    - ``allow_any_local_path=True``: any path the process can read (relative ones against
      ``allowed_media_dir``, or the working directory when it is None). For the user's own prompts only.
    - ``base_dir``: the older name of ``allowed_media_dir`` (give one of them).

    Images passed with ``images=`` as pixels, bytes or ``data:`` URLs are never file reads; paths passed there
    follow the same policy.
    """

    def __init__(
        self,
        tokenizer: QwenTokenizer | None = None,
        image_size: int = 448,
        chat_format: str = "chatml",
        base_dir: str | os.PathLike | None = None,
        max_window_size: int = 6144,
        system: str = DEFAULT_SYSTEM,
        *,
        allowed_media_dir: str | os.PathLike | None = ".",
        allow_any_local_path: bool = False,
    ) -> None:
        if chat_format not in ("chatml", "raw"):
            raise ValueError(f"chat_format must be 'chatml' or 'raw', got {chat_format!r}")
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if base_dir is not None:
            if allowed_media_dir != ".":
                raise ValueError("give allowed_media_dir or its older name base_dir, not both")
            allowed_media_dir = base_dir
        self.tokenizer = tokenizer if tokenizer is not None else QwenTokenizer.from_pretrained()
        self.image_size = int(image_size)
        self.chat_format = chat_format
        self.allowed_media_dir = allowed_media_dir
        self.allow_any_local_path = bool(allow_any_local_path)
        self.max_window_size = int(max_window_size)
        self.system = system

    @property
    def base_dir(self) -> str | os.PathLike | None:
        """The older name of :attr:`allowed_media_dir`."""
        return self.allowed_media_dir

    @base_dir.setter
    def base_dir(self, value: str | os.PathLike | None) -> None:
        self.allowed_media_dir = value

    def media_policy(self, base_dir: str | os.PathLike | None = None) -> MediaPolicy:
        """The policy image paths are read under (``base_dir``, when given, as the media folder of one call)."""
        root = base_dir if base_dir is not None else self.allowed_media_dir
        return MediaPolicy(root, self.allow_any_local_path)

    def load_image(self, src: ImageSource, base_dir: str | os.PathLike | None = None) -> Image.Image:
        """One image as RGB, a path read under :meth:`media_policy` (errors: :class:`qwenvl.images.ImageError`)."""
        return load_image(src, policy=self.media_policy(base_dir))

    @classmethod
    def from_pretrained(
        cls,
        ckpt_dir: str | os.PathLike | None = None,
        config: QwenVLConfig | None = None,
        base_dir: str | os.PathLike | None = None,
        *,
        allowed_media_dir: str | os.PathLike | None = ".",
        allow_any_local_path: bool = False,
        trust_remote_code: bool | None = None,
    ) -> Processor:
        """The processor of a checkpoint folder (or the defaults of Qwen-VL-Chat when there is none).
        ``trust_remote_code`` (transformers' habit) changes nothing: no code from the folder runs.

        The vocabulary is the folder's ``qwen.tiktoken`` or else the bundled one; ``image_size`` comes from
        ``config.json`` (``visual.image_size``), ``chat_format`` and ``max_window_size`` from
        ``generation_config.json``. An explicit ``config`` wins over the folder's files. The media policy
        keywords are the constructor's.
        """
        tokenizer = QwenTokenizer.from_pretrained(ckpt_dir)
        gen = GenerationDefaults()
        image_size = 448
        if config is None and ckpt_dir is not None:
            folder = Path(ckpt_dir)
            if (folder / "config.json").is_file():
                config = QwenVLConfig.from_pretrained(folder)
            elif (folder / "generation_config.json").is_file():
                gen = GenerationDefaults.from_file(folder / "generation_config.json")
        if config is not None:
            gen = config.generation
            image_size = config.visual.image_size
        return cls(
            tokenizer,
            image_size=image_size,
            chat_format=gen.chat_format,
            base_dir=base_dir,
            max_window_size=gen.max_window_size,
            allowed_media_dir=allowed_media_dir,
            allow_any_local_path=allow_any_local_path,
        )

    # ---- prompts -> tensors ----------------------------------------------------------------------
    def __call__(
        self,
        text: Prompt | Sequence[Prompt],
        images: Sequence[ImageSource] | None = None,
        base_dir: str | os.PathLike | None = None,
        return_tensors: str = "pt",
        padding: bool | str = True,
        truncation: bool | None = None,
    ) -> ModelInputs:
        """Prompt(s) -> ``input_ids`` [B, T], ``attention_mask`` [B, T], ``images`` [N, 3, S, S] or None.

        ``text`` is one prompt or a list of prompts; a prompt is a string (tokenized as is), a list-format
        list (see ``QwenTokenizer.from_list_format``) or a list of ``{"role", "content"}`` messages (turned
        into a chat prompt by :meth:`build_messages_prompt`). Prompts of different lengths are padded on the
        LEFT with ``<|endoftext|>`` (mask 0), so every row ends at its last real token, as generation needs.

        Images: by default the path inside each ``<img>PATH</img>`` is loaded under the media policy (see the
        class; ``base_dir`` replaces ``allowed_media_dir`` for this call). With ``images=``, the k-th supplied
        image (a PIL image, bytes, a data URL, or a path read under the same policy) is the pixels of the k-th
        ``<img>`` span counted over the whole batch in order (prompt 0's spans first); the span's text is then
        only a name. ``images`` [N, 3, S, S] lists the images in that same order; it is None when there are none.

        ``padding`` and ``truncation`` are transformers' keywords, taken where they mean what is done anyway:
        padding True or "longest" (always, on the left); False or "do_not_pad" only when the prompts have one
        length (a tensor needs it); truncation False or None (a prompt is never cut: its image spans would break).
        """
        import torch

        if return_tensors != "pt":
            raise ValueError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        if not (isinstance(padding, bool) or padding in ("longest", "do_not_pad")):
            raise ValueError(f"padding={padding!r} is not supported: prompts are padded on the left to the longest "
                             "(padding=True, the default)")
        if truncation is not None and truncation is not False:
            raise ValueError(f"truncation={truncation!r} is not supported: prompts are never cut (an image span "
                             "would break); shorten the text instead")
        prompts = self._split_batch(text)
        rows = []
        for k, prompt in enumerate(prompts):
            where = f" (prompt {k + 1} of the {len(prompts)} in the batch)" if len(prompts) > 1 else ""
            problem = prompt_problem(prompt)
            if problem:  # else the tokenizer's words about one list-format element ("expected a dict: 1")
                raise ValueError(f"the prompt{where} {problem}")
            try:
                ids = self._prompt_ids(prompt)
            except ValueError as e:  # an image path, a tag or a message at fault: in which prompt of the batch
                if not where:
                    raise
                raise ValueError(f"{e}{where}") from e
            if not ids:
                raise ValueError(f"empty prompt{where}: there is nothing to condition on")
            rows.append(ids)
        spans = [path for ids in rows for path in self.tokenizer.image_paths(ids)]
        if images is not None:
            if isinstance(images, (str, bytes, bytearray, os.PathLike, Image.Image, torch.Tensor)):
                raise ValueError(f"images= takes a list, one image per <img>...</img> span, got a {type(images).__name__}"
                                 " (wrap a single image: images=[image])")
            images = list(images)
            if len(images) != len(spans):
                raise ValueError(
                    f"got {len(images)} images for {len(spans)} <img> spans in the prompt(s): supply exactly "
                    "one image per <img>...</img>, in order"
                )
            sources: list[ImageSource] = images
        else:
            sources = list(spans)
        pixels = self.pixel_values_for(sources, base_dir) if sources else None

        width = max(len(r) for r in rows)
        if padding in (False, "do_not_pad") and any(len(r) != width for r in rows):
            raise ValueError(f"padding={padding!r}, but the prompts are {min(len(r) for r in rows)} to {width} tokens "
                             "long: a batch tensor needs padding=True")
        input_ids = torch.full((len(rows), width), ENDOFTEXT_ID, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, ids in enumerate(rows):
            input_ids[b, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, width - len(ids) :] = 1
        return ModelInputs(input_ids=input_ids, attention_mask=attention_mask, images=pixels)

    @staticmethod
    def _split_batch(text: Prompt | Sequence[Prompt]) -> list[Prompt]:
        if isinstance(text, str):
            return [text]
        if not isinstance(text, Sequence):
            raise TypeError(f"prompt must be a str, a list-format list, messages or a list of those, got {type(text).__name__}")
        items = list(text)
        if not items:
            raise ValueError("empty prompt: got an empty list")
        if all(isinstance(t, dict) for t in items):
            return [items]  # one prompt: messages or list format
        if all(isinstance(t, (str, list)) for t in items):
            return items
        raise TypeError("a batch must be a list of prompts (str, list-format lists or message lists)")

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if not isinstance(prompt, str) and _is_messages(prompt):
            return self.build_messages_prompt(prompt)[1]
        return self.tokenizer.encode(self._content_text(prompt, "prompt"))  # a string or a list-format list

    # ---- chat ------------------------------------------------------------------------------------
    def _content_text(self, content: Any, where: str, pictures: bool = True) -> str:
        """The text of a prompt or of one message's content (a str or a list-format list), as it is tokenized.
        Where it may show pictures (``pictures``: not an assistant's), an image path no ``<img>PATH</img>`` span can
        hold is refused first (:func:`prompt_image_path_error`): tokenizing would read a lone surrogate as U+FFFD,
        and fail on "image not found" of another name."""
        bad = prompt_image_path_error(content) if pictures else None
        if bad:
            raise ValueError(bad)
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return self.tokenizer.from_list_format(content)
        raise ValueError(f"{where}: content must be a str or a list-format list, got {type(content).__name__}")

    def build_chat_prompt(
        self,
        query: str | list[dict[str, Any]],
        history: Sequence[tuple[Any, Any]] | None = None,
        system: str | None = None,
        max_window_size: int | None = None,
    ) -> tuple[str, list[int]]:
        """``(raw_text, input_ids)`` of a chat prompt, exactly as the official ``make_context``.

        ChatML: ``<|im_start|>system\\n{system}<|im_end|>``, then each past ``(query, response)`` turn as
        ``\\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{r}<|im_end|>`` (a None response leaves
        the turn open), then ``\\n<|im_start|>user\\n{query}<|im_end|>\\n<|im_start|>assistant\\n``. Roles,
        newlines and contents are tokenized separately, contents with only the Qwen-VL tags (``<img>``,
        ``<ref>``, ``<box>``, ...) as special tokens, so ``<|im_end|>`` typed by a user stays plain text.
        Unlike the official code, an assistant's content (a past response) gets ``<ref>``/``<box>``/``<quad>``
        but not ``<img>``: an image path in an answer is plain text, never a file to read.
        History is walked newest first and a turn is kept while the total stays below ``max_window_size``
        (default: the checkpoint's, 6144); the first turn that does not fit ends the walk.
        With chat_format "raw" the prompt is the query text alone, as in the official code; a given system text
        or history is then dropped with a warning naming it (once per processor; set ``chat_format="chatml"``
        to keep them).
        """
        enc = self.tokenizer.encode
        query = self._content_text(query, "query")
        if self.chat_format == "raw":
            self._warn_raw_drops(system, len(history or []))
            return query, enc(query)
        system = self.system if system is None else system
        window = self.max_window_size if max_window_size is None else max_window_size
        nl = enc("\n")
        im_start, im_end = [IM_START_ID], [IM_END_ID]

        def part(role: str, content: str) -> list[int]:
            tags = _ASSISTANT_SPECIAL_TOKENS if role == "assistant" else IMAGE_SPECIAL_TOKENS
            return enc(role, allowed_special=IMAGE_SPECIAL_TOKENS) + nl + enc(content, allowed_special=tags)

        turns = []  # every turn checked, also those the window leaves out
        for turn in history or []:
            if len(turn) != 2:
                raise ValueError(f"each history turn must be a (query, response) pair, got {turn!r}")
            turns.append((self._content_text(turn[0], "history query"),
                          None if turn[1] is None else self._content_text(turn[1], "history response", pictures=False)))
        system_ids = im_start + part("system", system) + im_end
        context: list[int] = []
        raw = ""
        for q, r in reversed(turns):
            nxt = nl + im_start + part("user", q) + im_end + nl
            text = f"\n<|im_start|>user\n{q}<|im_end|>\n"
            if r is not None:
                nxt += im_start + part("assistant", r) + im_end
                text += f"<|im_start|>assistant\n{r}<|im_end|>"
            if len(system_ids) + len(nxt) + len(context) < window:
                context = nxt + context
                raw = text + raw
            else:
                break
        ids = system_ids + context
        ids += nl + im_start + part("user", query) + im_end + nl + im_start + enc("assistant") + nl
        raw = f"<|im_start|>system\n{system}<|im_end|>" + raw + f"\n<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"
        return raw, ids

    def _warn_raw_drops(self, system: str | None, turns: int) -> None:
        dropped = ([f"the system text {system[:40] + '...' if len(system) > 40 else system!r}"]
                   if system is not None else []) + ([f"{turns} history turn(s)"] if turns else [])
        if not dropped or getattr(self, "_warned_raw_drops", False):
            return
        self._warned_raw_drops = True
        logger.warning("chat_format raw (a base checkpoint) prompts with the last user message alone: dropped %s; "
                       "chat_format chatml (--chat_format chatml) keeps them (said once)", " and ".join(dropped))

    def build_messages_prompt(
        self, messages: Sequence[dict[str, Any]], max_window_size: int | None = None
    ) -> tuple[str, list[int]]:
        """OpenAI-style ``[{"role": "system"|"user"|"assistant", "content": ...}]`` -> :meth:`build_chat_prompt`.

        An optional system message comes first; then user and assistant alternate and the last message is
        the user's query. Contents are strings or list-format lists.
        """
        msgs = list(messages)
        if not msgs:
            raise ValueError("empty prompt: no messages")
        for k, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {k} must be a dict with 'role' and 'content', got {m!r}")
            if m["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"message {k} has unknown role {m['role']!r}; expected system, user or assistant")
        system = None
        if msgs[0]["role"] == "system":
            # (a raw prompt drops it: its pictures are never read)
            system = self._content_text(msgs[0]["content"], "system message", pictures=self.chat_format != "raw")
            msgs = msgs[1:]
        if not msgs or msgs[-1]["role"] != "user":
            raise ValueError("the last message must be the user's (the model answers it)")
        if len(msgs) % 2 == 0:  # user/assistant pairs, then the query
            raise ValueError("messages must alternate user, assistant, ... and end with a user message")
        history = []
        for k in range(0, len(msgs) - 1, 2):
            if msgs[k]["role"] != "user" or msgs[k + 1]["role"] != "assistant":
                raise ValueError(
                    f"messages must alternate user, assistant, ... after the system message; "
                    f"got {msgs[k]['role']!r} then {msgs[k + 1]['role']!r}"
                )
            history.append((msgs[k]["content"], msgs[k + 1]["content"]))
        return self.build_chat_prompt(msgs[-1]["content"], history, system, max_window_size)

    # ---- fine-tuning samples ---------------------------------------------------------------------
    def encode_conversation(
        self,
        conversations: Sequence[dict[str, Any]],
        system_message: str = DEFAULT_SYSTEM,
        max_length: int | None = None,
    ) -> dict[str, list[Any]]:
        """One training sample -> ``input_ids``, ``labels`` (aligned; the model shifts) and ``image_paths``.

        Exactly the official ``finetune.py`` rule: a first turn that is not the user's is dropped; the system
        block and user turns contribute only ``<|im_start|>``, ``<|im_end|>`` and ``\\n`` as labels; in assistant
        turns ``assistant\\n`` is masked and ``<|im_start|>``, the content, ``<|im_end|>`` and ``\\n`` are learned.
        Masked positions hold ``IGNORE_INDEX`` (-100). No truncation or padding here (the dataset decides);
        with ``max_length`` a longer sample raises ``ValueError``.
        """
        turns = list(conversations)
        if not turns:
            raise ValueError("empty conversation: no turns")
        for j, t in enumerate(turns):
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                raise ValueError(f"turn {j} must be a dict with 'from' and 'value', got {t!r}")
            if not isinstance(t["from"], str) or t["from"] not in _TRAIN_ROLES:  # a list or dict is unhashable
                hint = (": the system prompt is no turn; give it as system_message (qwenvl finetune: the "
                        "system_message setting, --system_message)" if t["from"] == "system" else "")
                raise ValueError(f"turn {j} has unknown role {t['from']!r}; expected 'user' or 'assistant'{hint}")
            if not isinstance(t["value"], str):
                raise ValueError(f"turn {j}: value must be a str, got {type(t['value']).__name__}")
        if turns[0]["from"] != "user":
            turns = turns[1:]  # as official: a leading non-user turn has no question to answer
        if not any(t["from"] == "assistant" for t in turns):
            raise ValueError("conversation has no assistant turn to learn from (a leading assistant turn is dropped)")

        enc = self.tokenizer.encode
        nl = enc("\n")
        input_ids = [IM_START_ID] + enc("system") + nl + enc(system_message) + [IM_END_ID] + nl
        labels = [IM_START_ID] + [IGNORE_INDEX] * (len(input_ids) - 3) + [IM_END_ID] + nl
        for t in turns:
            role = enc(_TRAIN_ROLES[t["from"]])
            ids = role + nl + enc(t["value"]) + [IM_END_ID] + nl
            if t["from"] == "user":
                lab = [IM_START_ID] + [IGNORE_INDEX] * (len(ids) - 3) + [IM_END_ID] + nl
            else:
                lab = [IM_START_ID] + [IGNORE_INDEX] * len(role) + ids[len(role) + 1 : -2] + [IM_END_ID] + nl
            input_ids += ids
            labels += lab
        if len(input_ids) != len(labels):  # only if "\n" stopped being one token: a broken vocabulary
            raise ValueError(f"internal error: {len(input_ids)} ids but {len(labels)} labels")
        if max_length is not None and len(input_ids) > max_length:
            raise ValueError(f"conversation is {len(input_ids)} tokens long, more than max_length={max_length}")
        return {"input_ids": input_ids, "labels": labels, "image_paths": self.tokenizer.image_paths(input_ids)}

    # ---- helpers ---------------------------------------------------------------------------------
    def pixel_values_for(
        self, paths_or_images: Sequence[ImageSource], base_dir: str | os.PathLike | None = None
    ) -> torch.Tensor:
        """Load and transform images -> float32 [N, 3, S, S]; paths under :meth:`media_policy` (``base_dir``)."""
        return pixel_values(list(paths_or_images), self.image_size, policy=self.media_policy(base_dir))

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch: Any, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(batch, skip_special_tokens=skip_special_tokens)
