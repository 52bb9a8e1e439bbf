"""How close int8 weight-only logits stay to full precision: max abs difference and top-1 agreement.

    python benchmarks/int8_quality.py                          # the golden checkpoint + the random mid model
    python benchmarks/int8_quality.py --demo-dir demo_out      # + the model `qwenvl demo` trained

For each model, fp32 and ``load(..., quantize="int8")``-style int8 (``optimize_for_inference``) run the same
inputs; printed: positions compared, top-1 (next-token) agreement, the largest logit difference, the logits'
standard deviation, and the share of positions whose fp32 top-2 margin is below 0.01 (near-ties, where any
rounding may flip the choice). Also with ``lm_head`` kept in fp32 (only the blocks quantized), and, for scale,
the same weights rounded to bf16 instead of int8 (what 16 bits per weight would keep).

* golden: the project's tiny random checkpoint (``tests/fixtures/qwenvl-tiny``), every position of its prompts;
* mid: the random ``mid`` preset (hidden 1024, 8 layers), 200 positions of random text (seed 0);
* demo: a trained ``qwenvl demo`` output folder, every position that predicts an answer token (the box's
  digits and brackets, ``</box>``, ``<|im_end|>``) for held-out prompts with their true answers, up to 200.

Random models put near-ties everywhere (151,936 logits of std ~0.1-0.6), so their agreement measures rounding
against chance margins; a trained model's answers are what int8 has to keep.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from qwenvl import Processor, QwenVL
from qwenvl.grounding import format_box, normalize_box
from qwenvl.hardware import cpu_summary
from qwenvl.quantize import lm_linears, optimize_for_inference

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "fixtures" / "qwenvl-tiny"
GOLDEN_IMAGES = {"{0}": "images/cat.png", "{1}": "images/street.jpg"}


def bf16_rounded(model: QwenVL) -> QwenVL:
    """The same layers int8 quantizes, their weights rounded to bf16 (computed in fp32): 16-bit storage's error."""
    for _, _, layer in lm_linears(model):
        layer.weight.data = layer.weight.data.bfloat16().float()
    return model


def variants(load) -> dict[str, QwenVL]:
    """fp32, int8 (blocks + lm_head, the default), int8 blocks with an fp32 lm_head, and for scale the same
    weights rounded to bf16 instead (int8's per-channel steps are ~5x bf16's rounding error on such weights)."""
    blocks_only = optimize_for_inference(load(), "int8")
    blocks_only.lm_head = load().lm_head  # the fp32 head back
    return {"fp32": load(), "int8": optimize_for_inference(load(), "int8"), "int8, fp32 lm_head": blocks_only,
            "for scale: weights rounded to bf16, no int8": bf16_rounded(load())}


def compare(logits: dict[str, torch.Tensor]) -> list[str]:
    ref = logits["fp32"]
    top2 = ref.topk(2, dim=-1).values
    near = float(((top2[:, 0] - top2[:, 1]) < 0.01).float().mean())
    lines = []
    for name, got in logits.items():
        if name == "fp32":
            continue
        agree = (got.argmax(-1) == ref.argmax(-1)).float().mean()
        lines.append(f"  {name}: top-1 agreement {100 * float(agree):.1f}% of {ref.shape[0]} positions, max abs "
                     f"logit diff {float((got - ref).abs().max()):.4f} (fp32 logits' std {float(ref.std()):.3f}; "
                     f"{100 * near:.1f}% of positions have an fp32 top-2 margin < 0.01)")
    return lines


@torch.no_grad()
def golden() -> list[str]:
    processor = Processor.from_pretrained(GOLDEN, base_dir=GOLDEN)
    prompts = json.loads((GOLDEN / "expected.json").read_text())["prompts"]
    texts = [p.replace("{0}", GOLDEN_IMAGES["{0}"]).replace("{1}", GOLDEN_IMAGES["{1}"]) for p in prompts]
    models = variants(lambda: QwenVL.from_pretrained(GOLDEN, dtype=torch.float32).eval())
    logits = {k: torch.cat([m(**processor(t)).logits[0] for t in texts]) for k, m in models.items()}
    return ["golden (tests/fixtures/qwenvl-tiny, every position of its prompts):", *compare(logits)]


@torch.no_grad()
def mid(positions: int = 200) -> list[str]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 100000, (1, positions), generator=g)
    models = variants(lambda: QwenVL.from_config("mid", seed=0, dtype=torch.float32).eval())
    logits = {k: m(ids).logits[0] for k, m in models.items()}
    return [f"mid (random preset, {positions} positions of random text):", *compare(logits)]


@torch.no_grad()
def demo(folder: Path, positions: int = 200) -> list[str]:
    template = (folder / "eval_prompt.txt").read_text()
    items = [json.loads(line) for line in (folder / "data" / "eval.jsonl").read_text().splitlines() if line]
    processor = Processor.from_pretrained(folder / "model", allowed_media_dir=folder / "data")
    models = variants(lambda: QwenVL.from_pretrained(folder / "model", dtype=torch.float32).eval())
    logits: dict[str, list[torch.Tensor]] = {k: [] for k in models}
    n = 0
    for it in items:
        if n >= positions:
            break
        # the answer as the demo trained it (the prompt already ends with <box>)
        box = format_box(normalize_box(it["bbox"], it["width"], it["height"])).removeprefix("<box>")
        answer = box + "<|im_end|>"
        prompt = template.format(image=it["image"], expression=it["sent"])  # as the grounding eval fills it
        start = processor(prompt)["input_ids"].shape[1] - 1  # the first position that predicts an answer token
        inputs = processor(prompt + answer)
        for k, m in models.items():
            logits[k].append(m(**inputs).logits[0, start:-1])
        n += logits["fp32"][-1].shape[0]
    cat = {k: torch.cat(v)[:positions] for k, v in logits.items()}
    return [f"demo ({folder}, answer positions of held-out prompts):", *compare(cat)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo-dir", type=Path, help="a `qwenvl demo` output folder to measure as well")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"cpu: {cpu_summary()}", flush=True)
    lines = golden() + mid()
    if args.demo_dir:
        lines += demo(args.demo_dir)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
