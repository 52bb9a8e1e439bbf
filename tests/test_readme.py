"""The README's commands, run in order on the demo's output, do what the README's text says.

Every ``qwenvl`` command of the README's ``bash`` blocks is read from README.md and either run here (in README
order, each once, in one scratch folder) or listed in :data:`NOT_RUN` with the reason; a README command that is
neither fails :func:`test_every_readme_command_is_run_or_excused`, so the README and this file stay together.

What is changed to run on a CPU in seconds: ``qwenvl demo`` runs ``--steps 3`` (a model + data in
``demo_out/``); the 9.6B checkpoints ``/models/Qwen-VL`` and ``/models/Qwen-VL-Chat`` are the demo's model, other
``/models/X`` outputs are local folders; the input files a command names (``demo.jpeg``, ``prompts.jsonl``,
``detail_23k.json``, ``coco/``, the eval sets) are written first; predict and chat get ``--max_new_tokens 8``.
The rest of each command line is the README's.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# subcommands this file answers for; a README command of another one (serve, ...) is its own tests' business
IN_SCOPE = ("info", "predict", "chat", "convert", "data-convert", "finetune", "eval", "demo")


def readme_commands() -> list[str]:
    """The README's shell commands in order, continuation lines joined, comments and ``&&`` split off."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            for part in line.split("&&"):
                part = re.sub(r"\s+#.*$", "", part).strip()
                commands.append(" ".join(part.split()))
    return list(dict.fromkeys(commands))


def _in_scope(command: str) -> bool:
    words = command.split()
    return len(words) > 1 and words[0] == "qwenvl" and words[1] in IN_SCOPE


# README commands that are not run here, and why
NOT_RUN = {
    "qwenvl predict --model /models/Qwen-VL-Chat --data prompts.jsonl --output answers.jsonl --compile":
        "torch.compile takes 20-60 s on this machine; tests/test_cli.py runs predict --compile (and checks the log)",
    "qwenvl predict --model /models/Qwen-VL-Chat --quantize int8 --data prompts.jsonl --output answers.jsonl "
    "--compile": "as above; tests/test_quantize.py checks compiled int8 decoding against eager",
    "qwenvl eval grounding --model /models/Qwen-VL --data refcoco_val.jsonl --image_dir coco/ --output refcoco.json "
    "--resume_from refcoco.json.partial": "needs an interrupted run: tests/eval/test_runners.py interrupts one "
    "(test_cli_resume_from_the_partial_file_generates_only_the_rest) and resumes it with these flags",
}


@dataclass
class Step:
    check: Callable[[Path, str, str, str], None]  # (folder, stdout, stderr, log) -> asserts
    extra: list[str] = field(default_factory=list)  # appended to the README's arguments
    subs: dict[str, str] = field(default_factory=dict)  # replacements for this command only
    defer: bool = False  # needs the output of a later README command: run after the others


def _load(folder: Path) -> dict[str, torch.Tensor]:
    from qwenvl.checkpoint import load_state_dict

    return load_state_dict(folder)


# ---- the checks, one per README command ---------------------------------------------------------------------
def check_demo(d: Path, out: str, err: str, log: str) -> None:
    # "a report folder (loss_curve.png ..., predictions.png, metrics.json, report.md, the trained model)"
    for name in ("loss_curve.png", "predictions.png", "metrics.json", "report.md", "eval_prompt.txt",
                 "model/config.json", "data/train.json", "data/eval.jsonl"):
        assert (d / "demo_out" / name).is_file(), name
    assert "held-out Acc@0.5" in out and "measure it again: qwenvl eval grounding --model demo_out/model" in out


def check_info(d: Path, out: str, err: str, log: str) -> None:
    # "what is in a checkpoint: config, parameters by part, dtype"
    assert "checkpoint: demo_out/model" in out and "dtype: float32" in out
    assert "parameters:" in out and "config:" in out and "visual.image_size: 224" in out


def check_info_preset(d: Path, out: str, err: str, log: str) -> None:
    assert "9.657 B" in out


def check_predict_seed_flags(d: Path, out: str, err: str, log: str) -> None:
    # "output is the prompt followed by the answer" (the demo model is a ChatML one: the prompt is a chat turn)
    assert out.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nPicture 1: "
                          "<img>demo.jpeg</img>\nDescribe the image in English:<|im_end|>\n<|im_start|>assistant\n")


def check_predict_jsonl(d: Path, out: str, err: str, log: str) -> None:
    rows = [json.loads(line) for line in (d / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == len(PROMPTS) and all(0 < r["num_tokens"] <= 8 for r in rows)
    assert rows[0]["prompt"].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                                        "Picture 1: <img>demo.jpeg</img>\nWhat is in the picture?")
    assert rows[1]["prompt"] == "Hello"
    assert "Be brief." in rows[2]["prompt"] and "A shape." in rows[2]["prompt"]  # the demo model is ChatML


def check_chat(d: Path, out: str, err: str, log: str) -> None:
    # "answers stream; boxes in answers are drawn into --draw (an answer without a box ... says so in one line)"
    assert "(picture added: street.jpg)" in err and out.count("assistant> ") == 1
    drawn = sorted(p.name for p in (d / "boxes").glob("*.png")) if (d / "boxes").exists() else []
    assert ("(boxes drawn: boxes/turn-001.png)" in err and drawn == ["turn-001.png"]) or \
        ("(nothing drawn: the answer" in err and drawn == [])


def check_convert_fp16(d: Path, out: str, err: str, log: str) -> None:
    out_dir = d / "models" / "Qwen-VL-fp16"
    state, src = _load(out_dir), _load(d / "demo_out" / "model")
    assert state.keys() == src.keys() and all(t.dtype == torch.float16 for t in state.values() if t.is_floating_point())
    assert torch.equal(state["lm_head.weight"], src["lm_head.weight"].half())
    assert [p.name for p in out_dir.glob("*.safetensors")] == ["model.safetensors"]  # 81 MB < 2GB: one shard
    config, source = (json.loads((f / "config.json").read_text()) for f in (out_dir, d / "demo_out" / "model"))
    dtype_keys = ("torch_dtype", "fp16", "fp32")
    assert [config.pop(k) for k in dtype_keys] + [source.pop(k) for k in dtype_keys] == [
        "float16", True, False, "float32", False, True]
    assert config == source  # every other key as it was (tests/test_checkpoint.py: auto_map of an official one)


def check_merge_lora(d: Path, out: str, err: str, log: str) -> None:
    merged, base = _load(d / "merged"), _load(d / "demo_out" / "model")
    assert merged.keys() == base.keys()
    changed = [k for k in base if not torch.equal(merged[k], base[k])]
    assert changed and all(k.startswith("transformer.h.") for k in changed), changed  # LoRA on the LM's layers


def check_ckpt_export(d: Path, out: str, err: str, log: str) -> None:
    from qwenvl.mindspore_ckpt import scan

    names = {t.name for t in scan(d / "qwenvl_9.6b.ckpt")}
    assert "llm_model.transformer.wte.embedding_weight" in names and "vision_encoder.conv1.weight" in names


def check_ckpt_import(dtype: torch.dtype, folder: str) -> Callable[[Path, str, str, str], None]:
    def check(d: Path, out: str, err: str, log: str) -> None:
        state, src = _load(d / "models" / folder), _load(d / "demo_out" / "model")
        assert state.keys() == src.keys()
        for k in ("lm_head.weight", "transformer.h.0.attn.c_attn.weight", "transformer.visual.attn_pool.query"):
            assert state[k].dtype == dtype and torch.equal(state[k], src[k].half().to(dtype)), k  # fp16 .ckpt

    return check


def check_data_convert(d: Path, out: str, err: str, log: str) -> None:
    # "missing images dropped and counted"; the picture line starts its turn, also for a trailing <image>
    converted = json.loads((d / "detail_23k_qwenvl.json").read_text())
    pic = "Picture 1: <img>train2014/COCO_train2014_{}</img>\n"
    assert [c["conversations"][0]["value"] for c in converted] == [
        pic.format("000000000001.jpg") + "What is in the picture?",
        pic.format("000000000002.jpg") + "Describe the image in detail.",
    ]
    assert out.count("3 records read, 2 written (0 text-only, 0 with an untagged image), 1 dropped for a missing "
                     "image, 0 malformed skipped") == 1


def check_finetune_stage3(d: Path, out: str, err: str, log: str) -> None:
    # "stage 3: ViT frozen, resampler + LM trained"
    state = json.loads((d / "runs" / "ft" / "trainer_state.json").read_text())
    assert state["progress"]["step"] == 1  # 5 epochs of 2 samples, 16 micro-batches of 1 per step
    trained, start = _load(d / "runs" / "ft"), _load(d / "demo_out" / "model")
    assert torch.equal(trained["transformer.visual.conv1.weight"], start["transformer.visual.conv1.weight"])
    assert not torch.equal(trained["transformer.h.0.mlp.w1.weight"], start["transformer.h.0.mlp.w1.weight"])
    assert not torch.equal(trained["transformer.visual.attn_pool.attn.out_proj.weight"],
                           start["transformer.visual.attn_pool.attn.out_proj.weight"])


def check_finetune_tiny(d: Path, out: str, err: str, log: str) -> None:
    run = d / "runs" / "tiny"
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert json.loads((run / "trainer_state.json").read_text())["progress"]["step"] == 4


def check_resume(d: Path, out: str, err: str, log: str) -> None:
    # "exact resume (of a finished run: says that it is complete and trains nothing)"
    assert f"the run in runs/tiny is complete (4 steps; final adapter in {Path('runs/tiny/adapter')})" in log
    assert "step 1/4" not in log


def check_eval_official(task: str, line: str) -> Callable[[Path, str, str, str], None]:
    def check(d: Path, out: str, err: str, log: str) -> None:
        # "the prompt and format used are printed before the run and saved in the output's settings"
        assert re.search(rf"eval {task}: prompt '<img>\{{image\}}</img>.*' \(official\), chat_format raw", log)
        assert "note: the official protocol prompts every checkpoint in the raw format" in log  # a ChatML model
        assert out.startswith(line)
        if task == "grounding":
            settings = json.loads((d / "refcoco.json").read_text())["settings"]
            assert (settings["prompt"], settings["chat_format"], settings["protocol"]) == (
                "<img>{image}</img><ref>{expression}</ref><box>", "raw", "official")

    return check


def check_eval_demo(d: Path, out: str, err: str, log: str) -> None:
    # "this measures it again as the demo did": the demo's own held-out answers and score
    demo = json.loads((d / "demo_out" / "eval_after.json").read_text())
    again = json.loads((d / "readme_eval.json").read_text())
    assert [p["answer"] for p in again["predictions"]] == [p["answer"] for p in demo["predictions"]]
    assert again["accuracy"] == demo["accuracy"] == json.loads((d / "demo_out" / "metrics.json").read_text())[
        "accuracy_after"]
    assert f"({demo['num_correct']}/8)" in out
    assert (d / "demo_out" / "eval_prompt.txt").read_text() in again["settings"]["prompt"]


TINY_RUN = ("--config configs/finetune_qwenvl_tiny.yaml --model demo_out/model --data demo_out/data/train.json "
            "--dataset_dir demo_out/data --output_dir runs/tiny --use_lora true")
STEPS: dict[str, Step] = {
    "qwenvl demo --output_dir demo_out": Step(check_demo, ["--steps", "3"]),
    "qwenvl info /models/Qwen-VL": Step(check_info),
    "qwenvl info --preset qwen-vl-9.6b": Step(check_info_preset),
    "qwenvl predict --config configs/predict_qwenvl_9.6b.yaml --load_checkpoint /models/Qwen-VL --predict_data "
    "demo.jpeg \"Describe the image in English:\" --modal_type image text --predict_batch_size 1":
        Step(check_predict_seed_flags, ["--max_new_tokens", "8"]),
    "qwenvl predict --model /models/Qwen-VL-Chat --data prompts.jsonl --output answers.jsonl --batch_size 8":
        Step(check_predict_jsonl, ["--max_new_tokens", "8"]),
    "qwenvl chat --model /models/Qwen-VL-Chat --draw boxes/": Step(check_chat, ["--max_new_tokens", "8"]),
    "qwenvl convert /models/Qwen-VL /models/Qwen-VL-fp16 --dtype float16 --max_shard_size 2GB":
        Step(check_convert_fp16),
    # the adapter is the README's own LoRA run (runs/tiny, on the demo's model), merged into that model
    "qwenvl convert --merge_lora --load_checkpoint /models/Qwen-VL-Chat --adapter runs/lora/adapter --output_dir "
    "merged/": Step(check_merge_lora, subs={"runs/lora": "runs/tiny"}, defer=True),
    # the .ckpt the README imports is the one its export line writes (from the demo model), sized by its folder
    "qwenvl convert qwenvl_base_fp16.ckpt /models/Qwen-VL-from-ms --config predict_qwenvl_9.6b.yaml":
        Step(check_ckpt_import(torch.float16, "Qwen-VL-from-ms"),
             subs={"qwenvl_base_fp16.ckpt": "qwenvl_9.6b.ckpt", "predict_qwenvl_9.6b.yaml": "demo_out/model"},
             defer=True),
    "qwenvl convert /models/Qwen-VL qwenvl_9.6b.ckpt --dtype float16 [--use_qkv_concat] [--emb_strategy N] "
    "[--crc_check]":
        Step(check_ckpt_export),
    "qwenvl convert output/checkpoint/rank_0/my_finetune.ckpt /models/my-finetune --config /models/Qwen-VL-Chat "
    "--dtype bfloat16": Step(check_ckpt_import(torch.bfloat16, "my-finetune"),
                             subs={"output/checkpoint/rank_0/my_finetune.ckpt": "qwenvl_9.6b.ckpt"}, defer=True),
    "qwenvl data-convert --data detail_23k.json --image_dir coco/ --output detail_23k_qwenvl.json "
    "--user_role_name user --assistant_role_name assistant": Step(check_data_convert),
    "qwenvl finetune --config configs/finetune_qwenvl_9.6b_bf16.yaml --model /models/Qwen-VL-Chat "
    "--data detail_23k_qwenvl.json --dataset_dir coco/ --output_dir runs/ft":
        Step(check_finetune_stage3),
    f"qwenvl finetune {TINY_RUN}": Step(check_finetune_tiny),
    "qwenvl finetune --config configs/finetune_qwenvl_tiny.yaml ... --resume_training":
        Step(check_resume, subs={"--config configs/finetune_qwenvl_tiny.yaml ...": TINY_RUN}),
    "qwenvl eval grounding --model /models/Qwen-VL --data refcoco_val.jsonl --image_dir coco/ --output refcoco.json":
        Step(check_eval_official("grounding", "Acc@0.5: ")),
    "qwenvl eval vqa --model /models/Qwen-VL --data vqav2_val.jsonl --image_dir coco/":
        Step(check_eval_official("vqa", "VQA accuracy (vqa): ")),
    "qwenvl eval caption --model /models/Qwen-VL --data coco_karpathy_test.jsonl --image_dir coco/":
        Step(check_eval_official("caption", "CIDEr: ")),
    "qwenvl eval grounding --model demo_out/model --data demo_out/data/eval.jsonl --image_dir demo_out/data "
    "--chat_format chatml --prompt_file demo_out/eval_prompt.txt --dtype float32":
        Step(check_eval_demo, ["--output", "readme_eval.json"]),
}


def argv_of(command: str, step: Step) -> list[str]:
    """The README command as it runs here (see the module docstring)."""
    command = re.sub(r"\s*\[[^\]]*\]", "", command)  # [--optional flags]: the plain form
    command = re.sub(r"/models/Qwen-VL(-Chat)?(?=\s|$)", "demo_out/model", command).replace("/models/", "models/")
    for old, new in step.subs.items():
        command = command.replace(old, new)
    return shlex.split(command)[1:] + step.extra


def test_every_readme_command_is_run_or_excused() -> None:
    commands = [c for c in readme_commands() if _in_scope(c)]
    unknown = [c for c in commands if c not in STEPS and c not in NOT_RUN]
    assert not unknown, f"README commands neither run nor excused in tests/test_readme.py: {unknown}"
    stale = [c for c in [*STEPS, *NOT_RUN] if c not in commands]
    assert not stale, f"tests/test_readme.py runs commands the README no longer has: {stale}"


# ---- the inputs the README's commands name ------------------------------------------------------------------
PROMPTS = [  # one of each form the README lists for --data
    {"image": "demo.jpeg", "text": "What is in the picture?"},
    {"prompt": "Hello"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is it?"},
                  {"role": "assistant", "content": "A shape."}, {"role": "user", "content": "Which colour?"}]},
]


def _write_inputs(d: Path) -> None:
    shutil.copytree(ROOT / "configs", d / "configs")
    demo = d / "demo_out" / "data"
    records = [json.loads(line) for line in (demo / "eval.jsonl").read_text().splitlines()][:4]
    Image.open(demo / records[0]["image"]).convert("RGB").save(d / "demo.jpeg", format="JPEG")
    shutil.copy(demo / records[1]["image"], d / "street.jpg")
    (d / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    coco = d / "coco"
    (coco / "train2014").mkdir(parents=True)
    for k, r in enumerate(records):
        (coco / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo / r["image"], coco / r["image"])
        if k < 2:
            shutil.copy(demo / r["image"], coco / "train2014" / f"COCO_train2014_00000000000{k + 1}.jpg")
    (d / "detail_23k.json").write_text(json.dumps([
        {"id": "1", "image": "000000000001.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "Shapes."}]},
        {"id": "2", "image": "000000000002.jpg", "conversations": [
            {"from": "human", "value": "Describe the image in detail.\n<image>"}, {"from": "gpt", "value": "Two shapes."}]},
        {"id": "3", "image": "000000000003.jpg", "conversations": [
            {"from": "human", "value": "<image>\nAnd this?"}, {"from": "gpt", "value": "Gone."}]},
    ]))  # fmt: skip
    (d / "refcoco_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (d / "vqav2_val.jsonl").write_text("".join(json.dumps(
        {"image": r["image"], "question": "What colour is it?", "answers": ["red"] * 9 + ["blue"]}) + "\n"
        for r in records[:2]))  # fmt: skip
    (d / "coco_karpathy_test.jsonl").write_text("".join(json.dumps(
        {"image": r["image"], "captions": [r["sent"], "two shapes"], "id": k}) + "\n" for k, r in enumerate(records[:2])))


def test_readme_commands_do_what_the_readme_says(tmp_path: Path, monkeypatch, capsys, caplog) -> None:
    from qwenvl.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO(":image street.jpg\nWhere is the red shape?\n:quit\n"))
    commands = [c for c in readme_commands() if _in_scope(c) and c in STEPS]
    ordered = [c for c in commands if not STEPS[c].defer] + [c for c in commands if STEPS[c].defer]
    assert ordered[0] == "qwenvl demo --output_dir demo_out"  # the README's first command: everything runs on it
    for n, command in enumerate(ordered):
        step = STEPS[command]
        caplog.clear()
        with caplog.at_level("INFO"):
            rc = main(argv_of(command, step))
        out, err = capsys.readouterr()
        assert rc == 0, f"{command}\n{err}"
        step.check(tmp_path, out, err, caplog.text)
        if n == 0:
            _write_inputs(tmp_path)


@pytest.mark.parametrize("command", list(NOT_RUN))
def test_commands_not_run_say_why(command: str) -> None:
    assert NOT_RUN[command].strip()
