"""CLI subcommands ``info``, ``predict``, ``chat``, ``convert`` and ``data-convert``.

``predict`` keeps the reference tool's flags (``--predict_data IMAGE TEXT --modal_type image text
--load_checkpoint DIR --config YAML --predict_batch_size N``) and prints what it printed: the prompt
followed by the answer and its stop token.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import itertools
import json
import sys
from pathlib import Path
from typing import Any

from .cli import Once
from .config import QwenVLConfig
from .fileio import shown_path

PREDICT_KEYS: dict[str, type[Any]] = {  # YAML key -> type (a predict config holds these; command-line flags win)
    "load_checkpoint": str, "dtype": str, "device": str, "predict_batch_size": int, "modal_type": list,
    "max_new_tokens": int, "min_new_tokens": int, "do_sample": bool, "temperature": float, "top_p": float,
    "top_k": int, "repetition_penalty": float, "seed": int, "chat_format": str, "image_dir": str, "run_mode": str,
    "use_parallel": bool, "auto_trans_ckpt": bool, "quantize": str, "allow_any_local_path": bool,
}

# flags whose YAML key is the MindFormers name (the predict YAML's keys are MindFormers' predict config keys)
_KEY_OF_FLAG = {"batch_size": "predict_batch_size", "model": "load_checkpoint"}

MEDIA_HELP = ("which image files your prompts may name: true (default) reads any file you can read (absolute "
              "paths, ~, ..; relative ones against --image_dir); false reads only files inside --image_dir "
              "(default: the working directory) and refuses absolute paths, ~, .. and links leading out of it. "
              "Image paths in the model's own answers are never read")


def str2bool(v: str) -> bool:
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {v!r}")


def _flag(args: argparse.Namespace, dest: str, names: str) -> str:
    """The name the flag of ``dest`` was typed under (noted by :class:`qwenvl.cli.Once`), else ``names`` (all of
    them, as argparse: --data/--jsonl)."""
    return (getattr(args, "spelled", None) or {}).get(dest) or names


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    """--dtype, --device and --quantize: how a checkpoint is loaded for inference (predict, chat, eval)."""
    p.add_argument("--dtype", choices=["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"],
                   help="compute dtype (default auto: bfloat16 where the device computes it natively - CUDA with "
                        "bf16, CPUs with AVX512-BF16, AMX or Arm BF16 - else float32; the choice is logged)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--quantize", choices=["none", "int8"],
                   help="int8: weight-only int8 for the language model's linear layers (1/4 of the fp32 bytes; "
                        "fastest with --compile)")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--load_checkpoint", dest="load_checkpoint", metavar="DIR", action=Once,
                   help="checkpoint folder in the official layout (Qwen/Qwen-VL, Qwen/Qwen-VL-Chat or ours)")
    add_runtime_flags(p)
    p.add_argument("--compile", action="store_true",
                   help="decode with torch.compile (compiling takes a while - about 20-60 s on a CPU, logged - "
                        "then each token is faster: worth it for long answers or many prompts)")
    p.add_argument("--image_dir", help="folder that relative image paths are resolved against (default: cwd)")
    p.add_argument("--allow_any_local_path", type=str2bool, metavar="BOOL", help=MEDIA_HELP)


def _add_sampling_flags(p: argparse.ArgumentParser, chat_format: bool = True) -> None:
    p.add_argument("--max_new_tokens", type=int)
    p.add_argument("--min_new_tokens", type=int)
    p.add_argument("--do_sample", type=str2bool, help="true to sample, false for greedy (default: greedy for predict, "
                                                      "the checkpoint's generation_config.json for chat)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top_p", type=float, help="default: the checkpoint's generation_config.json")
    p.add_argument("--top_k", type=int, help="0 = off (default: the checkpoint's)")
    p.add_argument("--repetition_penalty", type=float)
    p.add_argument("--seed", type=int, help="seed for sampling: each prompt samples from its own generator seeded "
                                            "with it, so its answer is the same whatever it is batched with")
    if chat_format:  # not for chat, which is ChatML whatever the checkpoint
        p.add_argument("--chat_format", choices=["raw", "chatml"], help="default: the checkpoint's")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a checkpoint's config, parameter counts by part and dtype")
    p.add_argument("checkpoint", nargs="?", default=argparse.SUPPRESS, action=Once, metavar="DIR",
                   help="checkpoint folder")
    p.add_argument("--model", dest="checkpoint", metavar="DIR", action=Once,
                   help="the checkpoint folder, as a flag (as the other commands and vLLM's serve)")
    p.add_argument("--preset", help="describe a preset instead (tiny, mid, qwen-vl-9.6b, qwen-vl-chat-9.6b)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--verify", action="store_true", help="also read every weight, one shard at a time: report tensors "
                   "holding NaN or infinite values and files that cannot be read (exit status 2 if any)")

    p = sub.add_parser("predict", help="answer prompts with images (the reference tool's flags work)")
    p.add_argument("--config", help="predict YAML (e.g. configs/predict_qwenvl_9.6b.yaml); flags override it")
    p.add_argument("--run_mode", help="only 'predict' is meaningful here")
    _add_model_flags(p)
    p.add_argument("--predict_data", nargs="+", metavar="ITEM",
                   help="items grouped by --modal_type, e.g. demo.jpeg 'Describe the image in English:'")
    p.add_argument("--modal_type", nargs="+", choices=["image", "text"], help="kinds of the items of one prompt")
    p.add_argument("--batch_size", "--predict_batch_size", dest="predict_batch_size", type=int, metavar="N",
                   action=Once, help="prompts per batch (default 1)")
    p.add_argument("--data", "--jsonl", dest="jsonl", metavar="FILE", action=Once,
                   help="a JSONL file of prompts: {'image': P | [P..], 'text': T} | {'prompt': RAW} | {'query': Q} | {'messages': [...]}; "
                        "a row's other keys (an 'id') are copied into its answer row")
    p.add_argument("--output", metavar="FILE", help="with --data: where to write the answers (JSONL; default: stdout)")
    p.add_argument("--no_progress", action="store_true", help="with --data: no progress bar (as eval's)")
    p.add_argument("--output_only", action="store_true",
                   help="with --predict_data: print only the answers, not the prompts")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--use_parallel", type=str2bool, help="accepted for compatibility; use torchrun for parallel runs")
    p.add_argument("--auto_trans_ckpt", type=str2bool, help="accepted for compatibility (checkpoints load on any layout)")
    _add_sampling_flags(p)

    p = sub.add_parser("chat", help="multi-turn chat in the terminal (:image PATH, :clear, :quit)")
    _add_model_flags(p)
    p.add_argument("--system", help="system prompt (default: You are a helpful assistant.)")
    p.add_argument("--draw", metavar="DIR", help="write the latest picture with the answer's boxes drawn into DIR")
    _add_sampling_flags(p, chat_format=False)

    p = sub.add_parser("convert", help="re-save a checkpoint (dtype, shards, format), merge a LoRA adapter, "
                                       "convert from/to a MindFormers .ckpt, or consolidate a sharded training "
                                       "checkpoint (RUN/checkpoint-STEP) into the official layout")
    p.add_argument("source", nargs="?", default=argparse.SUPPRESS, action=Once, metavar="SOURCE",
                   help="checkpoint folder to convert, or a MindFormers .ckpt (or --model)")
    p.add_argument("output", nargs="?", default=argparse.SUPPRESS, action=Once, metavar="OUTPUT",
                   help="output folder, or OUT.ckpt for MindFormers (or --output_dir)")
    p.add_argument("--model", "--load_checkpoint", dest="source", metavar="DIR", action=Once, help="same as SOURCE")
    p.add_argument("--output_dir", dest="output", metavar="OUTPUT", action=Once, help="same as OUTPUT")
    p.add_argument("--dtype", choices=["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"],
                   help="dtype written (default: the source's; a sharded training checkpoint: float32, its master "
                        "weights; exporting a .ckpt: float16; importing one: the dtype holding most of its weights)")
    p.add_argument("--max_shard_size", help="largest weight file of a checkpoint folder (default 5GB; 10^9 bytes, "
                                            "as Hugging Face; GiB for 2^30)")
    p.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    p.add_argument("--merge_lora", action="store_true", help="merge --adapter into the base checkpoint")
    p.add_argument("--adapter", help="LoRA adapter folder (from qwenvl finetune with lora)")
    p.add_argument("--ignore_mismatched_base", action="store_true",
                   help="merge --adapter even into a base other than the one it was trained on")
    p.add_argument("--overwrite", action="store_true",
                   help="write into OUTPUT even if it is a non-empty folder qwenvl did not write (only the files "
                        "of the checkpoint are replaced; nothing else is deleted)")
    p.add_argument("--config", help="importing a .ckpt: folder with config.json, a config.json, a preset or a "
                                    "MindFormers YAML (predict_qwenvl_9.6b.yaml)")
    p.add_argument("--use_qkv_concat", action="store_true", help="exporting a .ckpt: keep the LM's qkv fused")
    p.add_argument("--emb_strategy", type=int, metavar="N",
                   help="exporting a .ckpt: pad wte/lm_head rows to a multiple of 512 x N (MindFormers enable_emb_opt)")
    p.add_argument("--crc_check", action="store_true",
                   help="exporting a .ckpt: end it with a CRC32 trailer, as MindSpore's save_checkpoint(crc_check=True) "
                        "(an import checks a trailer whenever the file has one)")
    p.add_argument("--chat_format", choices=["raw", "chatml"],
                   help="importing a .ckpt: the generation_config.json written: raw (a base model, as Qwen/Qwen-VL) "
                        "or chatml (a chat model, as Qwen/Qwen-VL-Chat); default: --config's when it has one, else raw")

    p = sub.add_parser("data-convert", help="LLaVA instruction data -> Qwen-VL conversations")
    p.add_argument("--data", "--data_path", dest="data_path", required=True, metavar="FILE", action=Once,
                   help="LLaVA JSON (e.g. detail_23k.json)")
    p.add_argument("--image_dir", "--image_location", dest="image_location", required=True, metavar="DIR", action=Once,
                   help="folder that the images' paths are resolved against (holding train2014/COCO_train2014_*.jpg)")
    p.add_argument("--output", "--output_path", dest="output_path", required=True, metavar="FILE", action=Once,
                   help="a JSON list, or JSON Lines when it ends in .jsonl")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--user_role_name", default="user", help="role of the human turns (qwenvl finetune reads only "
                                                             "user/assistant)")
    p.add_argument("--assistant_role_name", default="assistant", help="role of the model's turns")
    p.add_argument("--image_prefix", default="train2014/COCO_train2014_",
                   help="put before each record's image name: the picture is IMAGE_LOCATION/PREFIX+NAME and the "
                        "prompt shows PREFIX+NAME (default train2014/COCO_train2014_, LLaVA's COCO names)")
    p.add_argument("--strict", action="store_true", help="fail on the first malformed record instead of skipping it")
    p.add_argument("--tag_in_place", action="store_true",
                   help="put the picture line where <image> stood, as MindFormers' data_convert.py (a trailing "
                        "'\\n<image>' then follows the question with no separator); default: it starts the turn, "
                        "as LLaVA's own training puts it")
    p.add_argument("--allow_any_local_path", type=str2bool, default=False, metavar="BOOL",
                   help="image paths may lead out of --image_dir (absolute, '..', a link leading out, e.g. "
                        "train2014 -> /mnt/coco), as finetune's allow_any_local_path; default false: such a record "
                        "is malformed, whether or not the file exists")
    p.add_argument("--check_images", action="store_true", help="decode every image in full (about 3 ms of CPU for a "
                   "640x480 JPEG) and drop records whose image does not decode, as missing ones (--strict: an error)")


def run(args: argparse.Namespace, extra: list[str] | None = None) -> int:
    return {"info": run_info, "predict": run_predict, "chat": run_chat, "convert": run_convert,
            "data-convert": run_data_convert}[args.command](args)


# ---- info --------------------------------------------------------------------------------------------
def run_info(args: argparse.Namespace) -> int:
    from .fileio import require_folder

    if bool(args.checkpoint) == bool(args.preset):
        raise ValueError("give a checkpoint folder (DIR or --model DIR) or --preset NAME (one of them)")
    if args.checkpoint:
        require_folder(args.checkpoint)
    from .checkpoint import refuse_adapter_folder
    from .model.summary import describe  # torch: after the checks

    if args.checkpoint:
        refuse_adapter_folder(args.checkpoint)
    if args.verify and not args.checkpoint:
        raise ValueError("--verify reads a checkpoint's weights: give a checkpoint folder, not --preset")
    if not args.verify:
        info = describe(args.checkpoint or QwenVLConfig.from_preset(args.preset))
        if args.preset:  # which one ("source" says only "preset")
            info = {"source": info["source"], "preset": args.preset} | info
        print(json.dumps(info, indent=2) if args.json else format_info(info))
        return 0
    from .checkpoint import CheckpointError, verify_weights

    try:
        info, error = describe(args.checkpoint), None
    except CheckpointError as e:  # a file that cannot be opened (the report names each), or weights unlike config.json
        info, error = {"source": args.checkpoint}, e
    report = verify_weights(args.checkpoint)
    if args.json:
        print(json.dumps(info | {"verify": report.to_dict()}, indent=2))
    else:
        print("\n".join([format_info(info) if error is None else f"checkpoint: {shown_path(args.checkpoint)}", "",
                          *report.lines()]))
    if error is not None and not report.unreadable:  # not about the files: said as without --verify
        raise error
    return 0 if report.ok else 2


def format_info(info: dict[str, Any]) -> str:
    lines = [f"preset: {info['preset']}" if "preset" in info else f"checkpoint: {shown_path(info['source'])}",
             f"dtype: {info['dtype']}"]
    lines += [f"loads as: {info['loads_as']}"] if "loads_as" in info else []
    lines += ["", "parameters:"]
    for part, n in info["parameters"].items():
        lines.append(f"  {part:<28} {n:>15,}  ({n / 1e9:.3f} B)")
    lines += ["", "config:"]
    lines += [f"  {k}: {v}" for k, v in info["config"].items() if k != "visual"]
    lines += [f"  visual.{k}: {v}" for k, v in info["config"]["visual"].items()]
    lines += ["", "generation:"] + [f"  {k}: {v}" for k, v in info["generation"].items()]
    return "\n".join(lines)


# ---- predict -------------------------------------------------------------------------------------------
def _merged_predict_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if args.config:
        from .fileio import read_yaml

        path = Path(args.config)
        loaded = read_yaml(path, what="predict config")
        unknown = sorted(set(loaded) - set(PREDICT_KEYS))
        if unknown:
            said = ", ".join(f"{k} (the key of --{k} is {_KEY_OF_FLAG[k]})" if k in _KEY_OF_FLAG else k for k in unknown)
            raise ValueError(f"{shown_path(path)}: unknown option(s) {said}; known: {', '.join(sorted(PREDICT_KEYS))}")
        for key, value in loaded.items():
            if value is not None:
                opts[key] = _checked_option(key, value, shown_path(path))
    for key in PREDICT_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            opts[key] = value
    if opts.get("run_mode", "predict") != "predict":
        raise ValueError(f"--run_mode {opts['run_mode']!r}: this command predicts; use 'qwenvl finetune' to train")
    if opts.get("predict_batch_size", 1) < 1:  # said now, not after the weights load
        where = (_flag(args, "predict_batch_size", "--batch_size/--predict_batch_size")
                 if getattr(args, "predict_batch_size", None) is not None else f"{shown_path(args.config)}: predict_batch_size")
        raise ValueError(f"{where} must be >= 1, got {opts['predict_batch_size']}")
    return opts


_SAID = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}


def _checked_option(key: str, value: Any, where: str) -> Any:
    """``value`` of the predict YAML's ``key`` if it has the type of :data:`PREDICT_KEYS` (the flags' own types),
    else a ValueError naming it: ``do_sample: "false"`` sampled and ``modal_type: text`` was four kinds, t e x t."""
    want = PREDICT_KEYS[key]
    takes: type[Any] | tuple[type[Any], ...] = (int, float) if want is float else want
    if not isinstance(value, takes) or (isinstance(value, bool) and want is not bool):
        raise ValueError(f"{where}: {key} must be {_SAID[want]}, got {value!r}")
    if key == "modal_type" and (not value or any(m not in ("image", "text") for m in value)):
        raise ValueError(f"{where}: modal_type must be a list of image and text, got {value!r}")
    return value


def _prompts_from_predict_data(items: list[str], modal_types: list[str]) -> list[list[dict[str, str]]]:
    if len(items) % len(modal_types):
        raise ValueError(
            f"--predict_data has {len(items)} item(s), not a multiple of --modal_type's {len(modal_types)} "
            f"({' '.join(modal_types)})"
        )
    prompts = []
    for s in range(0, len(items), len(modal_types)):
        prompt = [{m: item} for m, item in zip(modal_types, items[s : s + len(modal_types)])]
        prompts.append(prompt)
    return prompts


def _prompts_from_jsonl(path: str) -> tuple[list[Any], list[dict[str, Any]]]:
    """The prompts of the JSONL file ``path``, and for each its row's keys that no prompt reads (an "id", notes of
    the user's), which its output row carries (as vLLM's run_batch carries custom_id). Any bad row is said now,
    naming its line, before the weights load."""
    from .fileio import iter_jsonl

    prompts, carried, other_keys = [], [], {}
    for n, rec in iter_jsonl(path, what="prompt file"):
        where = f"{shown_path(path)}:{n}"
        prompts.append(_prompt_of_record(rec, where))
        carried.append({k: v for k, v in rec.items() if k not in _ROW_KEYS})
        for key in carried[-1]:
            if key in _RESULT_FIELDS:  # carried, it would overwrite our field of that name (or ours it)
                raise ValueError(f"{where}: key {key!r} is a field of the output rows ({', '.join(_RESULT_FIELDS)}): "
                                 "rename it to have it carried into its row")
        other_keys.update(dict.fromkeys(carried[-1]))
    if not prompts:
        raise ValueError(f"{shown_path(path)}: no prompts")
    if other_keys:  # said, so that a key meant for the prompt ("question") is not taken for a note unseen
        print(f"note: {shown_path(path)}: no prompt reads the key(s) {', '.join(map(repr, other_keys))}; they are "
              "copied into the output rows", file=sys.stderr)
    return prompts, carried


_WHOLE_PROMPT_KEYS = ("messages", "prompt", "query")
_ROW_KEYS = (*_WHOLE_PROMPT_KEYS, "image", "text")


def _prompt_of_record(rec: Any, where: str) -> Any:
    for key in rec:  # {"images": [...], "text": T} was answered without its pictures; other keys ("id") are carried
        close = difflib.get_close_matches(key, _ROW_KEYS, n=1) if key not in _ROW_KEYS else None
        if close:
            raise ValueError(f"{where}: unknown key {key!r} (did you mean {close[0]!r}?): a row has 'messages', "
                             "'prompt', 'query' or 'image'/'text'")
    kind = next((k for k in _WHOLE_PROMPT_KEYS if k in rec), None)
    ignored = [k for k in _ROW_KEYS if k != kind and rec.get(k) is not None]
    if kind and ignored:  # a row is one prompt: another field beside a whole prompt was silently dropped
        raise ValueError(f"{where}: a row with {kind!r} is the whole prompt: {', '.join(map(repr, ignored))} would be "
                         "ignored (a row has one of 'messages', 'prompt', 'query' or 'image'/'text')")
    from .processor import prompt_problem  # torch-free: said before the weights load

    if "messages" in rec:
        if not isinstance(rec["messages"], list):
            raise ValueError(f"{where}: 'messages' must be a list of {{'role', 'content'}} messages")
        if problem := prompt_problem(rec["messages"]):  # [1, 2] failed in the processor, on "list-format element 1"
            raise ValueError(f"{where}: 'messages' {problem}")
        return rec["messages"]
    if "prompt" in rec:
        if not isinstance(rec["prompt"], str):
            raise ValueError(f"{where}: 'prompt' must be a string")
        return rec["prompt"]
    if "query" in rec:
        if not isinstance(rec["query"], (str, list)):
            raise ValueError(f"{where}: 'query' must be a string or a list-format list, got {rec['query']!r:.80}")
        if problem := prompt_problem(rec["query"]):
            raise ValueError(f"{where}: 'query' {problem}")
        # the official model.chat's query (tokenizer.from_list_format's string, say): a list-format prompt of that
        # text, so that a chat checkpoint asks it as a ChatML user turn as chat(query) does (it was sent raw, as
        # "prompt" is); to a raw-format checkpoint the same string as before
        return [{"text": rec["query"]}] if isinstance(rec["query"], str) else rec["query"]
    if "text" not in rec and "image" not in rec:
        training = " ('conversations' is a training record, for qwenvl finetune)" if "conversations" in rec else ""
        raise ValueError(f"{where}: needs 'text' (and optionally 'image'), 'prompt', 'query' or 'messages'{training}")
    images = [] if rec.get("image") is None else rec["image"]
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ValueError(f"{where}: 'image' must be a path or a list of paths, got {rec['image']!r:.80}")
    if "" in images:
        raise ValueError(f"{where}: 'image' is an empty path")
    text = rec.get("text", "")
    if not isinstance(text, str):  # None and lists were written into the prompt as the words None and ['a']
        raise ValueError(f"{where}: 'text' must be a string, got {text!r:.80}")
    return [{"image": p} for p in images] + [{"text": text}]


def prompt_images(prompts: list[Any], policy: Any) -> dict[str, Path]:
    """The local image files the prompts name, by label ("image of prompt 2", "image 2 of prompt 3"), resolved
    under ``policy`` (:class:`qwenvl.images.MediaPolicy`); refused paths (a prompt cannot even show some) and URLs
    are left out (never read)."""
    from .images import ImageError
    from .processor import image_path_error, prompt_image_paths

    files: dict[str, Path] = {}
    for k, prompt in enumerate(prompts, 1):
        for j, ref in enumerate(prompt_image_paths(prompt), 1):
            if ref.lower().startswith(("data:", "http://", "https://")) or image_path_error(ref):
                continue
            try:
                files[f"image {j} of prompt {k}" if j > 1 else f"image of prompt {k}"] = policy.resolve(ref)
            except ImageError:
                continue
    return files


def bad_prompt_images(prompts: list[Any], policy: Any, chat_format: str | None = None) -> list[tuple[int, str]]:
    """(prompt number from 1, problem) for every prompt naming an image that its answer would fail on: a path no
    ``<img>`` span can hold, or one that :func:`qwenvl.images.check_image` refuses under ``policy``
    (:class:`qwenvl.images.MediaPolicy`) with the header only (seconds for thousands of images), with the message
    the prompt's own error then gives. ``chat_format`` "raw": of messages, only the last one is read (None: not
    known, every turn). Meant for before the weights load."""
    from .images import ImageError, check_image
    from .processor import image_path_error, prompt_image_paths

    bad: list[tuple[int, str]] = []
    for k, prompt in enumerate(prompts, 1):
        for ref in prompt_image_paths(prompt, chat_format):
            problem = image_path_error(ref)  # what the processor refuses first: '</img>', too long, not Unicode
            if problem:
                bad.append((k, problem))
                break
            try:
                check_image(ref, policy=policy, decode=False)
            except ImageError as e:
                bad.append((k, str(e)))
                break
    return bad


def _sampling(config: Any, opts: dict[str, Any], greedy_default: bool) -> Any:
    """The predict options as SamplingParams over the checkpoint's ``config`` (read before the weights load),
    validated: a bad value is said before the minutes of loading."""
    from .generation import sampling_params

    kw: dict[str, Any] = {k: opts[k] for k in ("max_new_tokens", "top_p", "top_k", "chat_format") if k in opts}
    for k in ("min_new_tokens", "temperature", "repetition_penalty", "seed"):
        if k in opts:
            kw[k] = opts[k]
    kw["do_sample"] = opts.get("do_sample", False if greedy_default else config.generation.do_sample)
    params = sampling_params(config, **kw)
    params.validate()
    return params


# the flags that only change sampled answers, each with its value that asks for nothing (None: every value asks)
SAMPLING_ONLY_FLAGS: dict[str, float | None] = {"temperature": 0, "top_p": 1, "top_k": 0, "seed": None}


def refuse_unused_sampling_flags(args: argparse.Namespace, params: Any) -> None:
    """A ValueError when the command line gives sampling flags (:data:`SAMPLING_ONLY_FLAGS`) to a run that
    decodes greedily (``params``, a :class:`qwenvl.generation.SamplingParams`): ``predict --seed 3 --temperature
    0.8`` answered greedily, as if they were not there. Values that ask for nothing (``--temperature 0``,
    ``--top_p 1``, ``--top_k 0``) and values from a ``--config`` YAML are taken as they are."""
    if params.do_sample:
        return
    given = [f"--{k}" for k, off in SAMPLING_ONLY_FLAGS.items() if getattr(args, k, None) not in (None, off)]
    if given:
        raise ValueError(f"{', '.join(given)} only change{'s' if len(given) == 1 else ''} sampled answers, and this "
                         "run decodes greedily: add --do_sample true (or leave "
                         f"{'it' if len(given) == 1 else 'them'} out)")


def require_compiler(device: str | None) -> None:
    """For ``--compile``: a one-line error, before the weights load, when ``device`` (a ``--device`` value) needs a
    compiler for ``torch.compile`` and none works (:func:`qwenvl.generation.require_compiler_for`)."""
    from .generation import require_compiler_for
    from .hardware import pick_device

    require_compiler_for(pick_device(device).split(":")[0])


def _as_chat(prompt: Any, chat_format: str) -> Any:
    """For a chat checkpoint, a list-format query becomes a one-turn conversation (as the reference chat)."""
    if chat_format == "chatml" and isinstance(prompt, list) and prompt and "role" not in prompt[0]:
        return [{"role": "user", "content": prompt}]
    return prompt


def run_predict(args: argparse.Namespace) -> int:
    from .fileio import atomic_write_text, require_folder

    opts = _merged_predict_options(args)
    if not opts.get("load_checkpoint"):
        raise ValueError("no checkpoint: pass --model DIR (or --load_checkpoint DIR, or load_checkpoint in --config)")
    data = _flag(args, "jsonl", "--data/--jsonl")  # as typed
    if bool(args.predict_data) == bool(args.jsonl):
        raise ValueError(f"give --predict_data ITEMS... or {data} FILE (one of them)")
    if args.output and not args.jsonl:  # --predict_data prints its answers: the file would never be written
        raise ValueError(f"--output writes the answers of {data}; --predict_data prints them (redirect stdout)")
    if args.output_only and args.jsonl:  # was accepted and did nothing
        raise ValueError(f"--output_only prints the answers of --predict_data alone; the rows of {data} hold each "
                         "answer in their 'response' field")
    if opts.get("image_dir"):  # else every image would be "not found" under it
        require_folder(opts["image_dir"], "--image_dir folder")
    if args.predict_data:
        prompts: list[Any] = _prompts_from_predict_data(args.predict_data, opts.get("modal_type", ["image", "text"]))
    else:
        prompts, carried = _prompts_from_jsonl(args.jsonl)
    if opts.get("use_parallel"):
        print("note: --use_parallel is not needed for prediction; running in one process", file=sys.stderr)
    from .images import MediaPolicy
    from .outputs import check_output_file

    any_path = opts.get("allow_any_local_path", True)
    policy = MediaPolicy(opts.get("image_dir") or ".", any_path)
    check_output_file(args.output, {f"{data} file": args.jsonl, "--config file": args.config,
                                    **prompt_images(prompts, policy)},
                      folders={"checkpoint folder": opts["load_checkpoint"]}, overwrite=args.overwrite)
    _check_images_first(prompts, policy, per_row=bool(args.jsonl), chat_format=_known_chat_format(opts))
    require_folder(opts["load_checkpoint"])
    # torch and the model code load only now, after the input checks (which need neither): bad input is said at once
    from .checkpoint import refuse_adapter_folder
    from .config import QwenVLConfig
    from .inference import iter_predict, load

    refuse_adapter_folder(opts["load_checkpoint"])  # else "no config.json in DIR"
    config = QwenVLConfig.from_pretrained(opts["load_checkpoint"])
    params = _sampling(config, opts, greedy_default=True)  # before the weights: a bad value is said at once
    refuse_unused_sampling_flags(args, params)
    if args.compile:
        require_compiler(opts.get("device"))
    model, processor = load(opts["load_checkpoint"], opts.get("dtype"), opts.get("device"), opts.get("image_dir"),
                            quantize=opts.get("quantize"), allow_any_local_path=any_path, config=config)
    check_output_file(args.output, {}, overwrite=args.overwrite)  # one created while the weights loaded: said now
    fmt = opts.get("chat_format", model.config.generation.chat_format)
    processor.chat_format = fmt  # messages are built in the format asked for, not only stopped by it
    prompts = [_as_chat(p, fmt) for p in prompts]
    answers = iter_predict(model, processor, prompts, params, batch_size=opts.get("predict_batch_size", 1),
                           base_dir=opts.get("image_dir"), progress=bool(args.jsonl) and not args.no_progress, compile=args.compile,
                           on_error="record" if args.jsonl else "raise")
    if args.jsonl:
        from .fileio import jsonl_line
        from .outputs import PartialRows, appeared_during_run

        rows, failed = [], 0
        # each row as soon as its batch is answered: printed, or kept in OUTPUT.partial until OUTPUT is written, so
        # that a full disk (there or at the end), Ctrl-C, a crash or kill -9 loses none of the answers made
        kept = PartialRows(args.output) if args.output else None
        said = False  # where the answers are: in the error itself
        try:
            for p, keys in zip(answers, carried):  # one answer per prompt, in the prompts' order
                rows.append(jsonl_line({**keys, **_result_row(p)}))  # a lone surrogate: in ASCII escapes
                failed += p.error is not None
                if kept is None:
                    _print_row(rows[-1])
                else:
                    kept.append(rows[-1])
            if args.output:
                try:  # without --overwrite, a file that appeared at OUTPUT during the run (checked absent at the start)
                    atomic_write_text(args.output, "".join(rows), replace=args.overwrite)  # is not replaced
                except FileExistsError as e:
                    if kept is None or e.filename is None or Path(e.filename) != Path(args.output):
                        raise
                    said = bool(kept.rows)
                    kept.close()
                    where = f"; {_kept_note(kept, len(prompts))}" if said else ""
                    raise FileExistsError(appeared_during_run(args.output) + where) from None
        except BaseException:
            answers.close()  # its progress bar ends now, not after the lines below
            if kept is not None:
                kept.close()
                if kept.rows and not said:
                    print(_kept_note(kept, len(prompts)), file=sys.stderr)
            raise
        if kept is not None:
            kept.discard()
        if failed:  # every other answer is written: a bad row costs only itself
            raise ValueError(f"{failed} of {len(rows)} prompt(s) failed: see the rows with an 'error' field "
                             f"in {shown_path(args.output or 'the output')}")
        return 0
    for p in answers:
        print(p.response if args.output_only else p.text)
    return 0


def _print_row(text: str) -> None:
    """A row on stdout, now. A full disk under `> answers.jsonl` is said naming stdout (the OS error names no
    file); a reader that left (BrokenPipeError) is the CLI's to handle quietly."""
    try:
        print(text, end="", flush=True)
    except BrokenPipeError:
        raise
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, "<stdout>") from e


def _kept_note(kept: Any, total: int) -> str:
    """Where the answers of a run that stopped early (Ctrl-C, a full disk, an error) are: one line for stderr."""
    if kept.rows < total:
        head = f"the answers to the first {kept.rows} of {total} prompts are"
    else:
        head = "the answer is" if total == 1 else f"the answers to all {total} prompts are"
    return f"{head} in {shown_path(kept.path)} (JSONL, in the prompts' order)"


def _check_images_first(prompts: list[Any], policy: Any, per_row: bool, chat_format: str | None) -> None:
    """Bad images are said before minutes of loading weights: an error (one line) when every prompt has one or
    without ``per_row``; else a one-line note, and those prompts become rows with an 'error' field. The images of
    turns a ``chat_format`` "raw" prompt drops are never read: not checked."""
    from .images import ImageError

    bad = bad_prompt_images(prompts, policy, chat_format)
    if not bad:
        return
    k, problem = bad[0]
    where = f"prompt {k} of {len(prompts)}: " if len(prompts) > 1 else ""
    more = f" ({len(bad)} prompts have a bad image)" if len(bad) > 1 else ""
    if not per_row or len(bad) == len(prompts):
        raise ImageError(f"{where}{problem}{more}")
    print(f"note: {where}{problem}{more}; answering the others (the bad ones become rows with an 'error' field)",
          file=sys.stderr)


def _known_chat_format(opts: dict[str, Any]) -> str | None:
    """The chat format the prompts will be built in, where it is known before the checkpoint loads: --chat_format,
    else its folder's generation_config.json; None (every turn checked) when there is none or it cannot be read yet
    (a missing folder, a bad file: said in its turn)."""
    if opts.get("chat_format"):
        return str(opts["chat_format"])
    from .config import ConfigError, GenerationDefaults

    file = Path(opts["load_checkpoint"]) / "generation_config.json"
    try:
        return GenerationDefaults.from_file(file).chat_format if file.is_file() else None
    except (ConfigError, OSError):
        return None


_RESULT_FIELDS = ("prompt", "response", "num_tokens", "stopped", "error")  # of _result_row: no input key may carry these


def _result_row(p: Any) -> dict[str, Any]:
    """The fields of :data:`_RESULT_FIELDS` of a :class:`qwenvl.inference.Prediction`, as predict --data writes
    them ("error" only in the row of a prompt that failed)."""
    row = {"prompt": p.prompt, "response": p.response, "num_tokens": p.num_tokens, "stopped": p.stopped}
    if p.error is not None:
        row["error"] = p.error
    return row


# ---- chat ----------------------------------------------------------------------------------------------
CHAT_HELP = ":image PATH  add a picture to your next message\n:clear       forget the conversation\n:quit        leave"


def run_chat(args: argparse.Namespace) -> int:
    from .fileio import require_folder

    if not args.load_checkpoint:
        raise ValueError("no checkpoint: pass --model DIR")
    if args.draw and Path(args.draw).exists() and not Path(args.draw).is_dir():
        raise NotADirectoryError(f"--draw {shown_path(args.draw)} is not a folder")  # said now, not at the first box
    require_folder(args.load_checkpoint)
    if args.image_dir:  # else every :image would be "not found" under it
        require_folder(args.image_dir, "--image_dir folder")
    from .checkpoint import refuse_adapter_folder
    from .config import QwenVLConfig
    from .inference import ChatSession, ConversationTooLong, chat_params, load  # torch: after the checks

    refuse_adapter_folder(args.load_checkpoint)
    opts = {k: getattr(args, k) for k in ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p",
                                          "top_k", "repetition_penalty", "seed")}
    config = QwenVLConfig.from_pretrained(args.load_checkpoint)
    params = chat_params(config, **opts)
    params.validate()  # before the weights load: a bad value is said at once
    refuse_unused_sampling_flags(args, params)
    if args.compile:
        require_compiler(args.device)
    model, processor = load(args.load_checkpoint, args.dtype, args.device, args.image_dir,
                            quantize=args.quantize, config=config,
                            allow_any_local_path=True if args.allow_any_local_path is None else args.allow_any_local_path)
    processor.chat_format = "chatml"
    session = ChatSession(model, processor, params, system=args.system, base_dir=args.image_dir,
                          compile=args.compile)
    print(f"qwenvl chat: {shown_path(args.load_checkpoint)}\n{CHAT_HELP}", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = _read_line()
        except UnicodeDecodeError as e:  # typed in another encoding (a Latin-1 terminal): said, and the chat goes on
            print(f"error: the line is not {e.encoding} text ({e.reason} at byte {e.start + 1}); it was not sent",
                  file=sys.stderr)
            continue
        except KeyboardInterrupt:
            if not sys.stdin.isatty():  # piped: Ctrl-C stops the whole script
                raise
            # at a terminal, as Python's own prompt: the line typed so far is dropped, the chat goes on
            print("\n(Ctrl-C: :quit or Ctrl-D leaves the chat)", file=sys.stderr)
            continue
        if line is None:
            break
        if not line.strip():
            continue
        if line.startswith(":"):
            cmd, _, rest = line.partition(" ")
            if cmd in (":quit", ":exit", ":q"):
                break
            if cmd == ":clear":
                session.clear()
                print("(conversation cleared)", file=sys.stderr)
            elif cmd == ":image":
                path = _unquoted(rest.strip())
                try:
                    session.add_image(path)
                    print(f"(picture added: {shown_path(path)})", file=sys.stderr)
                except ValueError as e:
                    print(f"error: {e}", file=sys.stderr)
            else:
                print(f"unknown command {cmd!r}\n{CHAT_HELP}", file=sys.stderr)
            continue
        print("assistant> ", end="", flush=True)
        try:
            answer = session.ask(line, on_text=lambda d: print(d, end="", flush=True))
        except ConversationTooLong as e:  # the history the window keeps leaves no room for this message
            print(f"\nerror: {e.message(':clear starts afresh')}", file=sys.stderr)
            continue
        except ValueError as e:  # e.g. the message alone is too long: keep the session alive
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat (its pictures wait for the next message)
            print()
            print("(answer stopped; it is left out of the conversation)", file=sys.stderr)
            continue
        print()
        turn += 1
        if args.draw and session.last_image:
            # the picture was read (under the media policy) when it was added, and is kept by the session while
            # the conversation shows it (never read again from a file that may have changed or gone since)
            try:
                drawn = _draw_answer(answer, session.images[session.last_image], args.image_dir, Path(args.draw), turn)
            except OSError as e:  # e.g. --draw under a file, or a full disk: said, and the chat goes on
                print(f"(nothing drawn: cannot write into --draw {shown_path(args.draw)}: {e.strerror or e})",
                      file=sys.stderr)
                continue
            print(f"(boxes drawn: {shown_path(drawn)})" if drawn else _no_box_note(answer), file=sys.stderr)
    return 0


def _read_line() -> str | None:
    """The next line of the chat without its newline, None at the end. At a terminal: ``input()`` with line
    editing and history (``readline``); else (piped) the prompt goes to stderr, so stdout holds only answers."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        with contextlib.suppress(ImportError):  # not on every platform: input() then works without editing
            import readline  # noqa: F401 (importing it gives input() line editing and history)
        try:
            line = input("user> ")
        except EOFError:  # Ctrl-D: the shell's prompt goes on a line of its own
            print(file=sys.stderr)
            return None
        # under C.UTF-8 (Docker, CI) Python reads the terminal with surrogateescape: bytes that are not UTF-8 came
        # as lone surrogates and went to the model; their bytes decoded strictly raise the error the chat says
        encoding = sys.stdin.encoding or "utf-8"
        return line.encode(encoding, "surrogateescape").decode(encoding)
    if sys.stdin.isatty():
        print("user> ", end="", flush=True, file=sys.stderr)
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # a text stream with no bytes under it
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None
    # a line at a time from the bytes: one that is not UTF-8 (UnicodeDecodeError) costs only itself, where the text
    # layer's decoder failed on its whole read-ahead and then read nothing more (the chat ended)
    data = raw.readline()  # strict whatever stdin's errors (surrogateescape under C.UTF-8 sent them on unseen)
    return data.decode(sys.stdin.encoding or "utf-8").rstrip("\r\n") if data else None


def _unquoted(path: str) -> str:
    """``:image "my pic.png"`` as the shell would read it: one pair of surrounding quotes removed."""
    return path[1:-1] if len(path) >= 2 and path[0] == path[-1] and path[0] in "'\"" else path


def _no_box_note(answer: str) -> str:
    """Why ``--draw`` drew nothing for ``answer``: no box at all, or boxes that do not parse."""
    if "<box>" in answer or "<quad>" in answer:
        return "(nothing drawn: the answer's <box> is malformed; a box is <box>(x1,y1),(x2,y2)</box>)"
    return "(nothing drawn: the answer has no <box>)"


def _draw_answer(answer: str, image: Any, base_dir: str | None, out_dir: Path, turn: int) -> Path | None:
    """Draw the boxes of ``answer`` over ``image`` (a picture or its path) into ``out_dir`` as ``turn-NNN.png`` (or
    ``turn-NNN-2.png``, ... where that name is taken); None when it has none."""
    from .fileio import atomic_write_bytes
    from .grounding import denormalize_objects, draw_boxes, parse_grounding
    from .images import load_image

    objects = parse_grounding(answer)
    if not any(o.boxes for o in objects):
        return None
    image = load_image(image, base_dir)
    drawn = draw_boxes(image, denormalize_objects(objects, image.width, image.height))
    import io

    buf = io.BytesIO()
    drawn.save(buf, format="PNG")
    for n in itertools.count(1):  # never over a file already there (the user's, an earlier chat's): the next name
        out = out_dir / (f"turn-{turn:03d}.png" if n == 1 else f"turn-{turn:03d}-{n}.png")
        try:
            return atomic_write_bytes(out, buf.getvalue(), replace=False)
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


# ---- convert -------------------------------------------------------------------------------------------
def run_convert(args: argparse.Namespace) -> int:
    source, output = args.source, args.output  # each given once, as SOURCE or as its flag (cli.Once)
    if not source or not output:
        raise ValueError("give SOURCE and OUTPUT folders (or --model and --output_dir)")
    if args.merge_lora and not args.adapter:
        raise ValueError("--merge_lora needs --adapter DIR")
    if args.adapter and not args.merge_lora:  # OUTPUT would be SOURCE re-saved, the adapter silently left out
        raise ValueError("--adapter is merged only with --merge_lora: add it (or leave --adapter out to re-save SOURCE)")
    if args.ignore_mismatched_base and not args.merge_lora:
        raise ValueError("--ignore_mismatched_base is for --merge_lora")
    if args.merge_lora:
        from .train.lora import require_peft

        require_peft("--merge_lora")
    if not Path(source).exists():  # said before torch loads (seconds)
        raise FileNotFoundError(f"checkpoint not found: {shown_path(source)}")
    from .checkpoint import parse_size, refuse_adapter_folder
    from .mindformers import convert as convert_mindspore
    from .mindformers import is_mindspore_path
    from .outputs import check_output_file, check_separate, claim_output

    refuse_adapter_folder(source)  # `convert ADAPTER OUT`: the adapter goes with --adapter, SOURCE is its base

    if args.max_shard_size is not None and is_mindspore_path(output):
        raise ValueError("--max_shard_size does not apply: a MindSpore .ckpt is written as one file")
    args.max_shard_size = args.max_shard_size or "5GB"
    try:
        parse_size(args.max_shard_size)  # a bad size is said now, not after the weights load
    except ValueError as e:
        raise ValueError(f"--max_shard_size: {e}") from None
    if is_mindspore_path(source) or is_mindspore_path(output):
        if args.merge_lora:
            raise ValueError("--merge_lora works on checkpoint folders, not MindSpore .ckpt files")
        if args.format != "safetensors":
            raise ValueError(f"--format {args.format}: a MindSpore .ckpt is imported into safetensors and exported as "
                             "one .ckpt")
        kw = {"config": args.config, "dtype": args.dtype, "use_qkv_concat": args.use_qkv_concat,
              "emb_strategy": args.emb_strategy, "max_shard_size": args.max_shard_size,
              "chat_format": args.chat_format, "crc_check": args.crc_check}
        # --config (a folder, config.json or YAML; not a preset name) is read too
        config = args.config if args.config and Path(args.config).exists() else None
        if is_mindspore_path(output):  # export: one file, written atomically
            check_output_file(output, {"SOURCE": source, "--config": config},
                              folders={"SOURCE": source if Path(source).is_dir() else None},
                              overwrite=args.overwrite)
            print(convert_mindspore(source, output, overwrite=args.overwrite, **kw))
            return 0
        check_separate(output, {"SOURCE": source, "--config": config}, what="OUTPUT folder")
        with claim_output(output, "convert", overwrite=args.overwrite):
            print(convert_mindspore(source, output, **kw))
        return 0

    ckpt_only = [f"--{k}" for k in ("config", "use_qkv_concat", "emb_strategy", "crc_check", "chat_format")
                 if getattr(args, k) not in (None, False)]
    if ckpt_only:  # else silently ignored
        raise ValueError(f"{', '.join(ckpt_only)}: for converting to or from a MindSpore .ckpt (SOURCE and OUTPUT "
                         "are checkpoint folders here)")
    # the sources are read while the output is written: never the same folder, nor one inside the other
    check_separate(output, {"SOURCE": source, "--adapter": args.adapter if args.merge_lora else None},
                   what="OUTPUT folder")
    with claim_output(output, "convert", overwrite=args.overwrite):
        if args.merge_lora:
            from .train.lora import merge_lora

            merge_lora(source, args.adapter, output, dtype=args.dtype, max_shard_size=args.max_shard_size,
                       safe_serialization=args.format == "safetensors",
                       ignore_mismatched_base=args.ignore_mismatched_base)
        elif Path(source, ".metadata").is_file():  # a sharded training checkpoint (finetune's checkpoint-STEP)
            from .model.qwenvl import as_dtype
            from .train.sharded_checkpoint import consolidate

            if args.format != "safetensors":
                raise ValueError("a sharded training checkpoint is consolidated into safetensors only")
            consolidate(source, output, dtype=as_dtype(args.dtype), max_shard_size=args.max_shard_size)
        else:
            from .model import QwenVL

            model = QwenVL.from_pretrained(source, dtype=args.dtype)
            if args.dtype:
                model.config.torch_dtype = str(model.dtype).removeprefix("torch.")
            model.save_pretrained(output, max_shard_size=args.max_shard_size,
                                  safe_serialization=args.format == "safetensors")
    print(f"wrote {shown_path(output)}")
    return 0


# ---- data-convert --------------------------------------------------------------------------------------
def run_data_convert(args: argparse.Namespace) -> int:
    from .data.convert import convert_llava
    from .outputs import check_output_file

    check_output_file(args.output_path, {f"{_flag(args, 'data_path', '--data/--data_path')} file": args.data_path})
    summary = convert_llava(args.data_path, args.image_location, args.output_path,
                            user_role_name=args.user_role_name, assistant_role_name=args.assistant_role_name,
                            image_prefix=args.image_prefix, strict=args.strict, tag_in_place=args.tag_in_place,
                            overwrite=args.overwrite, allow_any_local_path=args.allow_any_local_path,
                            check_images=args.check_images, flag="--overwrite",
                            image_flag=_flag(args, "image_location", "--image_dir"))
    print(summary)  # once: the library only logs it at DEBUG level
    return 0
