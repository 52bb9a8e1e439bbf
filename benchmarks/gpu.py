"""What only a GPU shows, measured in one run on one CUDA device.

    python benchmarks/gpu.py --json gpu.json      # the full-size model (random weights), on a CUDA GPU
    python benchmarks/gpu.py --device cpu --preset tiny --parity-preset tiny --train-layers 1 --seq 512 \
        --train-batch 2 --train-steps 1 --matmul-n 512 --read-gib 0.2 --layer-shape 1024 256 --new-tokens 4
        # a dry run of every section on a CPU (~4 min on 2 cores)

On one H200 its sections but ``golden`` and ``layer`` took 505 s (``--budget 380``; compiling the decode step
~74 s per configuration): ``--budget`` (default 420 s) keeps a run inside a lease of the device.

Prints the device (name, compute capability, memory; torch and CUDA versions) and, section by section, as soon
as each is measured:

* ``golden``: the golden checkpoint (``tests/fixtures/qwenvl-tiny``) on the device: fp32 logits against the
  official implementation's, its 10 greedy tokens, and bf16 against fp32 (largest difference, top-1 agreement);
* ``parity``: a random model (``--parity-preset``) in fp32 on the device against the same model on the CPU
  (largest logit difference, top-1 agreement, greedy tokens);
* ``limits``: the device's bf16 matmul peak (8192^3 products) and read bandwidth (a sum over 4 GiB), measured here;
* ``bf16``: the full-size model (``--preset``) in bf16 against itself in fp32 over a 270-token one-image prompt
  (largest logit difference, top-1 agreement over its last 200 positions), and the prefill with attention held
  to the flash kernel (``sdpa_kernel(FLASH_ATTENTION)``) against PyTorch's own choice;
* ``prefill``: that prompt's prefill in bf16: ms and achieved FLOP/s over the measured peak;
* ``layer``: one LM matrix's product at 1 and 8 rows, bf16 and int8, eager and compiled, timed with CUDA graphs
  (no launch overhead): the kernels alone against the weight-read floor;
* ``decode``: batch 1 and batch 8, eager and ``compile=True``, bf16 and int8: ms per step, tokens/s, and batch 1
  over the weight-read floor (bytes of the LM matrices / the measured bandwidth; the design's aim is >= 70% of the
  bandwidth bound, a ratio <= 1.43);
* ``graphs``: an experiment: the serve engine's decode step, every shape fixed, compiled with CUDA graphs
  (``mode="reduce-overhead"``) against the default mode, 1 and 8 slots: ms a step, batch 1 over the floor, the
  logits' difference, graphs skipped (see the function);
* ``train``: fine-tuning steps as ``qwenvl finetune`` takes them (``_train_step``: fp32 master weights, bf16
  autocast, fused AdamW, stage-3 trainability) on the full-size model's dimensions with ``--train-layers`` LM layers
  (all 32 with their AdamW state do not fit one GPU: a full fine-tune is sharded over several), with and without
  activation recompute, and LoRA on the whole model: tokens/s and MFU. MFU counts the FLOPs that
  ``benchmarks/finetune.py`` counts (6 x LM matrix params x tokens + the labelled positions' ``lm_head`` + the
  resampler; LoRA: 4 x the frozen matrices, no weight gradients) over the measured peak and over the datasheet's
  dense bf16 peak (``--datasheet-tflops``, 989 for H100/H200 SXM).

A section that fails prints its error and the others go on; ``--budget`` seconds stops starting new sections.
Speed is never asserted; this is a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from qwenvl import QwenVL
from qwenvl.config import IMG_START_ID, QwenVLConfig
from qwenvl.fileio import atomic_write_text
from qwenvl.generation import SamplingParams, stream_tokens
from qwenvl.quantize import optimize_for_inference

sys.path.insert(0, str(Path(__file__).parent))
import finetune as FT  # noqa: E402 - benchmarks/finetune.py: the synthetic samples and FLOP count
import generate as G  # noqa: E402 - benchmarks/generate.py: prompts, weight bytes and prefill FLOPs

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "qwenvl-tiny"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeat: int = 3) -> float:
    """Best seconds of ``repeat`` calls after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def device_line(device: torch.device) -> str:
    if device.type != "cuda":
        from qwenvl.hardware import cpu_summary

        return f"cpu: {cpu_summary()}"
    p = torch.cuda.get_device_properties(device)
    return (f"{p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
            f"{p.multi_processor_count} SMs; torch {torch.__version__}, CUDA {torch.version.cuda}")


def rate(flop_per_s: float) -> str:
    """FLOP/s in the unit that shows it (a CPU dry run's GFLOP/s printed as "0 TFLOP/s" said nothing)."""
    return f"{flop_per_s / 1e12:.0f} TFLOP/s" if flop_per_s >= 1e12 else f"{flop_per_s / 1e9:.1f} GFLOP/s"


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    got, ref = got.float(), ref.float()
    return {"max_abs_diff": float((got - ref).abs().max()), "top1": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
            "positions": ref.shape[0], "ref_max_abs": float(ref.abs().max())}


# ---- sections ----------------------------------------------------------------------------------------------
def golden(device: torch.device, _: argparse.Namespace) -> dict[str, Any]:
    from safetensors.torch import load_file

    expected = json.loads((GOLDEN / "expected.json").read_text())
    tensors = load_file(GOLDEN / "expected.safetensors")
    model = QwenVL.from_pretrained(GOLDEN, dtype=torch.float32, device=str(device))
    out: dict[str, Any] = {"fp32_vs_official": [], "greedy_equal": [], "bf16_vs_fp32": []}
    rows_fp32, rows_bf16 = [], []
    for k, case in enumerate(expected["cases"]):
        ids = torch.tensor([case["input_ids"]], device=device)
        n = sum(1 for i in case["input_ids"] if i == IMG_START_ID)
        images = tensors["pixels"][:n].to(device) if n else None
        with torch.no_grad():
            logits = model(ids, images=images).logits[0]
        got = logits[case["logit_positions"]]
        out["fp32_vs_official"].append(compare(got.cpu(), tensors[f"logits_{k}"])["max_abs_diff"])
        new = model.generate(ids, images=images, max_new_tokens=10, min_new_tokens=10)[0, ids.shape[1]:].tolist()
        out["greedy_equal"].append(new == case["greedy_10"])
        rows_fp32.append((ids, images, logits))
    model.to(torch.bfloat16)
    for ids, images, ref in rows_fp32:
        with torch.no_grad():
            logits = model(ids, images=None if images is None else images.bfloat16()).logits[0]
        rows_bf16.append(compare(logits, ref))
    out["bf16_vs_fp32"] = rows_bf16
    out["summary"] = (f"fp32 vs official: largest logit difference {max(out['fp32_vs_official']):.2e} (tests allow "
                      f"2e-3); greedy 10 tokens equal: {out['greedy_equal']}; bf16 vs fp32: largest "
                      f"{max(r['max_abs_diff'] for r in rows_bf16):.3f}, top-1 "
                      + ", ".join(f"{r['top1']:.1%} of {r['positions']}" for r in rows_bf16))
    return out


def parity(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """The same random model (``--parity-preset``) on the CPU and on the device, fp32: the CPU path is the one the
    golden checkpoint holds to the official implementation."""
    cpu = QwenVL.from_config(args.parity_preset, dtype=torch.float32, device="cpu", seed=0)
    ids, images = _image_prompt(cpu, torch.device("cpu"))
    with torch.no_grad():
        ref = cpu(ids, images=images).logits[0]
    greedy = cpu.generate(ids, images=images, max_new_tokens=10, min_new_tokens=10)[0, ids.shape[1]:].tolist()
    model = cpu.to(device)
    with torch.no_grad():
        got = model(ids.to(device), images=images.to(device)).logits[0].cpu()
    on_device = model.generate(ids.to(device), images=images.to(device), max_new_tokens=10,
                               min_new_tokens=10)[0, ids.shape[1]:].tolist()
    out: dict[str, Any] = {"fp32_vs_cpu": compare(got, ref), "greedy_equal": on_device == greedy}
    out["summary"] = (f"{args.parity_preset} fp32 on {device.type} vs cpu, 270-token image prompt: largest logit "
                      f"difference {out['fp32_vs_cpu']['max_abs_diff']:.2e} (logits up to "
                      f"{out['fp32_vs_cpu']['ref_max_abs']:.2f}), top-1 {out['fp32_vs_cpu']['top1']:.1%} of "
                      f"{ids.shape[1]}; greedy 10 tokens equal: {out['greedy_equal']}")
    return out


def limits(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    n = args.matmul_n
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=device) for _ in range(2))
    peak = 2 * n**3 / timed(lambda: a @ b, device, repeat=10)
    x = torch.ones(int(args.read_gib * 2**30) // 4, device=device)
    bandwidth = x.numel() * 4 / timed(x.sum, device, repeat=10)
    return {"bf16_peak_tflops": peak / 1e12, "read_gbs": bandwidth / 1e9,
            "summary": f"bf16 matmul peak {rate(peak)} ({n}^3); read bandwidth {bandwidth / 1e9:.0f} GB/s"}


def _image_prompt(model: QwenVL, device: torch.device, tokens: int = 270) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([G.prompt(tokens, True, seed=7)], device=device)
    size = model.config.visual.image_size
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    return ids, images


def bf16(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    model = QwenVL.from_config(args.preset, dtype=torch.float32, device=device, seed=0)
    ids, images = _image_prompt(model, device)
    keep = torch.arange(ids.shape[1] - 200, ids.shape[1], device=device)
    with torch.no_grad():
        ref = model(ids, images=images, logits_to_keep=keep).logits[0]
        model.to(torch.bfloat16)
        got = model(ids, images=images.bfloat16(), logits_to_keep=keep).logits[0]
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if device.type == "cuda" else nullcontext():
            flash = model(ids, images=images.bfloat16(), logits_to_keep=keep).logits[0]
    out: dict[str, Any] = {"bf16_vs_fp32": compare(got, ref), "flash_vs_default": compare(flash, got)}
    out["summary"] = (f"{args.preset} bf16 vs fp32, 270-token image prompt: largest logit difference "
                      f"{out['bf16_vs_fp32']['max_abs_diff']:.3f} (logits up to {out['bf16_vs_fp32']['ref_max_abs']:.2f}), "
                      f"top-1 {out['bf16_vs_fp32']['top1']:.1%} of 200; attention held to flash vs default: "
                      f"largest difference {out['flash_vs_default']['max_abs_diff']:.2e}")
    return out


def _bf16_model(args: argparse.Namespace, device: torch.device, quantize: str | None = None) -> QwenVL:
    return optimize_for_inference(QwenVL.from_config(args.preset, dtype=torch.bfloat16, device=device, seed=0),
                                  quantize, dtype=torch.bfloat16)


def prefill(device: torch.device, args: argparse.Namespace, peak_tflops: float | None) -> dict[str, Any]:
    model = _bf16_model(args, device)
    ids, images = _image_prompt(model, device)
    images = images.bfloat16()

    def run() -> None:
        with torch.no_grad():
            model(ids, images=images, logits_to_keep=1)

    s = timed(run, device, repeat=5)
    flops = G.prefill_flops(model, ids.shape[1], 1)
    out: dict[str, Any] = {"ms": s * 1e3, "tflops": flops / s / 1e12}
    of_peak = f" = {flops / s / 1e12 / peak_tflops:.2f} of the measured peak" if peak_tflops else ""
    out["summary"] = f"prefill, 270-token one-image prompt: {s * 1e3:.1f} ms, {rate(flops / s)}{of_peak}"
    return out


def _decode_s(model: QwenVL, device: torch.device, batch: int, new_tokens: int, compile: bool
              ) -> tuple[float, list[list[int]]]:
    """Seconds per greedy decode step after a 64-token prompt (prefill and first token excluded), best of 3,
    and the tokens (one list per sequence)."""
    ids = torch.tensor([G.prompt(64, False, seed=b) for b in range(batch)])
    params = SamplingParams(max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1)
    best = float("inf")
    for _ in range(4):  # the first compiles (with compile=True) and warms up
        it = stream_tokens(model, ids, params=params, compile=compile)
        tokens = [next(it)]
        sync(device)
        t = time.perf_counter()
        tokens += list(it)
        sync(device)
        best = min(best, (time.perf_counter() - t) / (len(tokens) - 1))
    return best, torch.stack(tokens, 1).tolist()


def decode(device: torch.device, args: argparse.Namespace, read_gbs: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    lines = []
    eager_tokens: dict[tuple[str, int], list[list[int]]] = {}
    for quantize in ("none", "int8"):
        model = _bf16_model(args, device, quantize)
        name = "bf16" if quantize == "none" else "int8"
        wb = G.lm_weight_bytes(model)
        floor = wb / (read_gbs * 1e9) if read_gbs else None
        out[f"{name}_weight_gb"] = wb / 1e9
        for compile in (False, True):
            mode = "compiled" if compile else "eager"
            for batch in (1, 8):
                if time.perf_counter() > args.deadline:
                    lines.append(f"{name} batch {batch} {mode}: not started (--budget spent)")
                    continue
                try:
                    s, tokens = _decode_s(model, device, batch, args.new_tokens, compile)
                except Exception as e:  # noqa: BLE001 - report and go on
                    lines.append(f"{name} batch {batch} {mode}: failed: {type(e).__name__}: {str(e)[:300]}")
                    print("  " + lines[-1], flush=True)
                    continue
                out[f"{name}_b{batch}_{mode}_ms"] = s * 1e3
                ratio = f", {s / floor:.2f}x the weight-read floor ({floor * 1e3:.2f} ms)" if floor and batch == 1 else ""
                same = ""
                if compile and (name, batch) in eager_tokens:
                    ref = eager_tokens[name, batch]
                    equal = sum(a == b for r, g in zip(ref, tokens) for a, b in zip(r, g))
                    same = f"; tokens equal to eager's: {equal} of {sum(map(len, ref))}"
                    out[f"{name}_b{batch}_compiled_tokens_equal"] = [equal, sum(map(len, ref))]
                else:
                    eager_tokens[name, batch] = tokens
                lines.append(f"{name} batch {batch} {mode}: {s * 1e3:.2f} ms a step, {batch / s:.0f} tokens/s{ratio}{same}")
                print("  " + lines[-1], flush=True)
        del model
        _free(device)
    out["summary"] = "; ".join(lines)
    return out


def graphs(device: torch.device, args: argparse.Namespace, read_gbs: float | None) -> dict[str, Any]:
    """An experiment for what ``decode`` found (on one H200 a compiled batch-1 step took 12.1 ms, of which the GPU
    worked 4.65: the rest was the host launching ~160 products): the serve engine's decode step
    (:func:`qwenvl.serve.engine.decode_slots`: slot cache, positions as a tensor, a fixed attention window, so every
    shape is fixed) compiled with ``mode="reduce-overhead"`` (CUDA graphs: one replay launches the whole step)
    against inductor's default mode, bf16, 1 and 8 slots after a prefill of 64 tokens each (half the window if smaller): ms a step, batch 1 over the
    weight-read floor, the largest logit difference between the two modes, and how many graphs inductor skipped
    (its ``cudagraph_skips`` counter; the reason is in its log). The KV buffers are mutated in place by every step,
    so they are marked as static addresses (as gpt-fast's module buffers are), else the graphs would be skipped.
    Not a path of the package yet: this measures whether it is worth making one."""
    from torch._dynamo.utils import counters

    from qwenvl.model.kv_cache import SlotKVCache
    from qwenvl.serve.engine import decode_slots

    model = _bf16_model(args, device)
    lm = model.config.lm
    window, slots = args.graph_window, 8
    prompt = min(64, window // 2)  # the step writes at position `prompt`, inside the window
    cache = SlotKVCache(lm.num_hidden_layers, slots, lm.num_attention_heads, lm.kv_channels, window, model.dtype,
                        device)
    with torch.no_grad():
        for i in range(slots):  # as the engine fills a slot: a batch-1 prefill into its rows
            kv = cache.slot(i)
            model(torch.tensor([G.prompt(prompt, False, seed=i)], device=device), past_key_values=kv, logits_to_keep=1)
            cache.keep_rope(i, kv)
    for t in (*cache.k, *cache.v, cache.rope_alpha, cache.rope_inv_freq):
        torch._dynamo.mark_static_address(t)
    tokens = torch.randint(0, lm.vocab_size, (slots,), device=device)
    positions = torch.full((slots,), prompt, device=device)
    key_positions = torch.arange(window, device=device)
    floor = G.lm_weight_bytes(model) / (read_gbs * 1e9) if read_gbs else None
    out: dict[str, Any] = {"window": window}
    lines, logits = [], {}
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        skipped = counters["inductor"]["cudagraph_skips"]
        step = torch.compile(decode_slots, mode=mode, dynamic=False, fullgraph=True)
        for n in (1, 8):
            if time.perf_counter() > args.deadline:
                lines.append(f"{mode} {n} slot(s): not started (--budget spent)")
                continue
            run = functools.partial(step, model, cache, tokens[:n], positions[:n], key_positions)
            with torch.no_grad():
                t = time.perf_counter()
                logits[mode, n] = run().clone()  # compiles (a replay's output is overwritten by the next)
                compile_s = time.perf_counter() - t
                s = timed(run, device, repeat=20)
            out[f"{mode}_n{n}_ms"], out[f"{mode}_n{n}_compile_s"] = s * 1e3, compile_s
            ratio = f", {s / floor:.2f}x the weight-read floor ({floor * 1e3:.2f} ms)" if floor and n == 1 else ""
            diff = ""
            if mode != "default" and ("default", n) in logits:
                d = float((logits[mode, n] - logits["default", n]).abs().max())
                out[f"{mode}_n{n}_max_abs_diff"] = d
                diff = f", logits within {d:.3g} of the default mode's"
            lines.append(f"{mode} {n} slot(s): {s * 1e3:.2f} ms a step, {n / s:.0f} tokens/s{ratio}{diff} "
                         f"(compiled in {compile_s:.0f} s)")
            print("  " + lines[-1], flush=True)
        out[f"{mode}_cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skipped
    lines.append(f"graphs skipped by inductor: {out.get('reduce-overhead_cudagraph_skips', 'n/a')}")
    out["summary"] = f"window {window}: " + "; ".join(lines)
    return out


def layer(device: torch.device, args: argparse.Namespace, read_gbs: float | None) -> dict[str, Any]:
    """One LM matrix's product (``--layer-shape``, the MLP's 11008 x 4096) at 1 and 8 rows, timed with CUDA graphs
    (``triton.testing.do_bench_cudagraph``: no launch overhead) where there is a GPU: how close the kernels alone
    come to the weight-read floor, bf16 against int8 (:class:`qwenvl.quantize.Int8Linear`), eager and compiled."""
    from qwenvl.quantize import Int8Linear

    n, k = args.layer_shape
    linear = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
    int8 = Int8Linear.from_linear(linear, torch.bfloat16)
    if device.type == "cuda":
        from triton.testing import do_bench_cudagraph

        def bench(fn: Callable[[], Any]) -> float:
            return do_bench_cudagraph(fn) / 1e3
    else:
        def bench(fn: Callable[[], Any]) -> float:
            return timed(fn, device, repeat=20)
    out: dict[str, Any] = {}
    lines = []
    for rows in (1, 8):
        x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
        variants = {"bf16": lambda x=x: linear(x), "int8": lambda x=x: int8(x)}
        for name, fn in list(variants.items()):
            variants[f"{name} compiled"] = torch.compile(fn, dynamic=False)
        for name, fn in variants.items():
            with torch.no_grad():
                s = bench(fn)
            floor = n * k * (2 if name.startswith("bf16") else 1) / (read_gbs * 1e9) if read_gbs else None
            out[f"{name}_rows{rows}_us"] = s * 1e6
            lines.append(f"{rows} row(s) {name}: {s * 1e6:.1f} us" + (f" ({s / floor:.2f}x floor)" if floor else ""))
    out["summary"] = f"{n} x {k} product: " + "; ".join(lines)
    return out


def _train_config(args: argparse.Namespace) -> QwenVLConfig:
    cfg = QwenVLConfig.from_preset(args.preset)
    return dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, num_hidden_layers=args.train_layers))


def _train_one(device: torch.device, args: argparse.Namespace, config: QwenVLConfig, lora: bool, recompute: bool,
               peak_tflops: float | None) -> dict[str, Any]:
    from qwenvl.train import TrainConfig
    from qwenvl.train import trainer as T

    steps = args.train_steps
    labelled = min(args.seq // 2, args.seq - 278)  # the answer after the image span (tokens 20-277)
    cfg = TrainConfig(batch_size=args.train_batch, max_steps=steps + 1, gradient_checkpointing=recompute, bf16="auto",
                      warmup_steps=0, device=device.type, use_lora=lora, num_workers=0)
    model = QwenVL.from_config(config, dtype=torch.float32, device=device, seed=0)
    samples = FT.synthetic_samples(model.config, args.train_batch * (steps + 1), seq=args.seq, labelled=labelled)
    model = T._prepare_model(cfg, model, device)
    run = T._setup_run(cfg, model, samples, device)
    times = []
    for _ in range(steps + 1):
        sync(device)
        t = time.perf_counter()
        loss = T._train_step(run, T._next_micro_batches(run))[0]
        sync(device)
        times.append(time.perf_counter() - t)
    best = min(times[1:])
    tokens = args.train_batch * args.seq
    flops = FT.step_flops(config, tokens, args.train_batch * labelled, args.train_batch)
    if lora:
        flops = flops * 4 / 6  # forward and the activations' gradients: the frozen weights get none
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    r = {"lora": lora, "recompute": recompute, "layers": config.lm.num_hidden_layers, "step_s": best,
         "tokens_per_s": tokens / best, "tflops": flops / best / 1e12, "trainable_params": trainable,
         "mfu_datasheet": flops / best / (args.datasheet_tflops * 1e12), "loss": loss, "step_times": times,
         "peak_gib": mem}
    if peak_tflops:
        r["mfu_measured_peak"] = flops / best / (peak_tflops * 1e12)
    del run, model
    return r


def train(device: torch.device, args: argparse.Namespace, peak_tflops: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": []}
    lines = []
    specs = [(_train_config(args), False, True), (_train_config(args), False, False),
             (QwenVLConfig.from_preset(args.preset), True, True)]
    for config, lora, recompute in specs:
        what = (f"{'LoRA' if lora else 'full'} {config.lm.num_hidden_layers} layers, recompute "
                f"{'on' if recompute else 'off'}")
        try:
            r = _train_one(device, args, config, lora, recompute, peak_tflops)
        except Exception as e:  # noqa: BLE001 - report and go on
            lines.append(f"{what}: failed: {type(e).__name__}: {str(e)[:300]}")
            print("  " + lines[-1], flush=True)
            _free(device)
            continue
        _free(device)
        out["runs"].append(r)
        of_peak = f", {r['mfu_measured_peak']:.1%} of the measured peak" if "mfu_measured_peak" in r else ""
        memory = f"{r['peak_gib']:.1f} GiB" if device.type == "cuda" else "n/a"
        lines.append(f"{what}: {r['step_s'] * 1e3:.0f} ms a step, {r['tokens_per_s']:.0f} tokens/s, "
                     f"{rate(r['tflops'] * 1e12)}, MFU {r['mfu_datasheet']:.1%} of {args.datasheet_tflops:.0f}{of_peak}; "
                     f"peak {memory}; {r['trainable_params'] / 1e9:.2f}B trainable")
        print("  " + lines[-1], flush=True)
    out["summary"] = "; ".join(lines)
    return out


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="qwen-vl-9.6b", help="the model measured in bf16, decode and LoRA")
    sections = ["golden", "parity", "limits", "bf16", "prefill", "layer", "train", "decode", "graphs"]
    ap.add_argument("--sections", nargs="+", choices=sections, default=sections, metavar="SECTION",
                    help=f"the sections to run, in this order (default: all: {' '.join(sections)})")
    ap.add_argument("--parity-preset", default="mid", help="the model compared with the CPU in fp32")
    ap.add_argument("--layer-shape", type=int, nargs=2, default=[11008, 4096], metavar=("OUT", "IN"))
    ap.add_argument("--new-tokens", type=int, default=64, help="decode steps timed per run")
    ap.add_argument("--graph-window", type=int, default=256, help="attention window (positions) of the graphs section")
    ap.add_argument("--train-layers", type=int, default=16, help="LM layers of the fully fine-tuned model")
    ap.add_argument("--train-batch", type=int, default=4, help="samples per step")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sample (one image each)")
    ap.add_argument("--train-steps", type=int, default=3, help="timed steps (after one warm-up)")
    ap.add_argument("--matmul-n", type=int, default=8192)
    ap.add_argument("--read-gib", type=float, default=4.0)
    ap.add_argument("--datasheet-tflops", type=float, default=989.0, help="dense bf16 peak of the device's datasheet")
    ap.add_argument("--budget", type=float, default=420,
                    help="seconds after which no new section (or decode measurement) starts")
    ap.add_argument("--json", help="write the numbers here (rewritten after every section)")
    args = ap.parse_args()
    if args.seq < 300:
        ap.error(f"--seq {args.seq}: a sample holds a 258-token image span from token 20 and an answer after it: "
                 "give at least 300")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"no CUDA device here (torch {torch.__version__}): --device cpu runs the script as a dry run")
    if args.json:  # checked before anything runs: a typo found after the first section lost a GPU's time
        folder = Path(args.json).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            ap.error(f"--json {args.json}: {folder} is not a folder this process can write to")
    torch.manual_seed(0)
    res: dict[str, Any] = {"device": device_line(device), "args": vars(args)}
    print(res["device"], flush=True)
    start = time.perf_counter()
    args.deadline = start + args.budget

    def measured(key: str) -> float | None:
        return res.get("limits", {}).get(key)

    calls = {"golden": lambda: golden(device, args), "parity": lambda: parity(device, args), "limits": lambda: limits(device, args),
             "bf16": lambda: bf16(device, args), "prefill": lambda: prefill(device, args, measured("bf16_peak_tflops")),
             "decode": lambda: decode(device, args, measured("read_gbs")),
             "layer": lambda: layer(device, args, measured("read_gbs")),
             "graphs": lambda: graphs(device, args, measured("read_gbs")),
             "train": lambda: train(device, args, measured("bf16_peak_tflops"))}
    for name in args.sections:
        if time.perf_counter() > args.deadline:
            print(f"{name}: not started (--budget {args.budget:.0f} s spent)", flush=True)
            continue
        t = time.perf_counter()
        try:
            res[name] = calls[name]()
            print(f"{name} ({time.perf_counter() - t:.0f} s): {res[name]['summary']}", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on
            res[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name}: failed: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
        _free(device)
        if args.json:
            atomic_write_text(args.json, json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
