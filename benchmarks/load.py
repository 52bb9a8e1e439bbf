"""Checkpoint loading: wall time and peak host memory of ``QwenVL.from_pretrained`` per weight format.

Writes one random checkpoint of at least ``--size-gb`` in the official layout (safetensors shards and
``.bin`` shards from the same tensors), then loads each in a fresh Python process with the stored dtype and
reports wall time and peak RSS, raw and net of the process's RSS just before loading, divided by the weight
bytes (target: net <= 1.3x). Loading maps the files lazily, so the script also reads every parameter once
("+ touch") to count the pages a forward pass would fault in, then quantizes the language model to int8
("+ int8", what ``qwenvl.inference.load(..., quantize="int8")`` does when it computes in the stored dtype;
RssAnon shows the int8 copies, RssFile the mapped file pages the kernel may drop once nothing references them).
Last, ``qwenvl.inference.load(..., quantize="int8")`` itself with ``--compute`` (default float32, the dtype of
CPUs without native bf16): the int8 weights come from the stored ones and only the rest is cast, so its peak
stays near the int8 model's bytes, not the compute-dtype model's.

    python benchmarks/load.py                       # 2 GB, bf16, temp dir removed afterwards
    python benchmarks/load.py --size-gb 4 --cold    # evict the files from the page cache before each load
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qwenvl.checkpoint import find_weights, save_pretrained
from qwenvl.config import GenerationDefaults, LMConfig, QwenVLConfig, VisionConfig
from qwenvl.hardware import cpu_summary
from qwenvl.model import QwenVL
from qwenvl.quantize import Int8Linear, optimize_for_inference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
GB = 1e9


def _config(layers: int, dtype: str) -> QwenVLConfig:
    """An LM of hidden 2048 with ``layers`` blocks (real vocabulary) and a small vision tower."""
    return QwenVLConfig(
        lm=LMConfig(hidden_size=2048, num_hidden_layers=layers, num_attention_heads=16, kv_channels=128,
                    intermediate_size=11008),
        visual=VisionConfig(width=256, layers=2, heads=4, mlp_ratio=4.0, output_dim=2048),
        generation=GenerationDefaults(),
        torch_dtype=DTYPE_NAMES[dtype],
    )


def _shapes(config: QwenVLConfig) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in QwenVL.on_meta(config).state_dict().items()}


def _nbytes(shapes: dict[str, torch.Size], dtype: torch.dtype) -> int:
    return sum(math.prod(s) for s in shapes.values()) * dtype.itemsize


def sized_config(size_bytes: float, dtype: str) -> QwenVLConfig:
    """The fewest LM layers that bring the weights to at least ``size_bytes``."""
    one, two = (_nbytes(_shapes(_config(n, dtype)), DTYPES[dtype]) for n in (1, 2))
    per_layer = two - one
    return _config(max(1, 1 + math.ceil((size_bytes - one) / per_layer)), dtype)


def random_state(config: QwenVLConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random weights (std 0.02, seed 0) generated tensor by tensor, without building a model."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in _shapes(config).items():
        t = torch.empty(shape, dtype=dtype)
        t.normal_(std=0.02, generator=g)
        state[key] = t
    return state


def work_dir(path: Path | None, prefix: str) -> Path:
    """The folder a run writes into: a new temporary folder, or ``path`` when it is new or empty (a run writes
    and removes only its own files there, so a folder that holds anything is refused)."""
    if path is None:
        return Path(tempfile.mkdtemp(prefix=prefix))
    path.mkdir(parents=True, exist_ok=True)
    if any(path.iterdir()):
        raise SystemExit(f"{Path(sys.argv[0]).name}: error: {path} is not empty: give a new or empty folder")
    return path


def write_checkpoints(workdir: Path, config: QwenVLConfig, dtype: torch.dtype, shard: str) -> dict[str, Path]:
    """Random weights generated tensor by tensor (no model object), saved once per format."""
    state = random_state(config, dtype)
    out = {}
    for fmt, safe in (("safetensors", True), ("bin", False)):
        t0 = time.perf_counter()
        out[fmt] = save_pretrained(state, config, workdir / fmt, max_shard_size=shard, safe_serialization=safe)
        print(f"wrote {fmt:<11} {len(find_weights(out[fmt]))} shard(s) in {time.perf_counter() - t0:.1f} s",
              flush=True)
    return out


def _evict(folder: Path) -> None:
    """Drop the folder's files from the page cache (a per-file hint; no privileges needed)."""
    for file in folder.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _peak_rss() -> int:
    """Peak RSS of this process in bytes.

    Linux's VmHWM belongs to the address space, which exec() replaces; ru_maxrss would instead carry over the
    parent's RSS at fork time (here: the parent that just generated the weights), so it is only the fallback.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _rss_parts() -> tuple[int, int]:
    """(RssAnon, RssFile) of this process in bytes."""
    parts = dict.fromkeys(("RssAnon:", "RssFile:"), 0)
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(maxsplit=1)[0] if line else ""
        if key in parts:
            parts[key] = int(line.split()[1]) * 1024
    return parts["RssAnon:"], parts["RssFile:"]


def child(folder: Path, dtype: str) -> None:
    """Runs in a fresh process: load, then read every parameter; print one JSON line."""
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    t0 = time.perf_counter()
    model = QwenVL.from_pretrained(folder, dtype=DTYPES[dtype])
    t_load = time.perf_counter() - t0
    rss_load, peak_load = proc.memory_info().rss, _peak_rss()
    with torch.no_grad():
        for p in model.parameters():
            p.sum()  # faults in every page of the mapped weights
    del p  # the loop variable would keep the last weight (and its mapped file) alive
    t_touch = time.perf_counter() - t0
    rss_touch, peak_touch = proc.memory_info().rss, _peak_rss()
    optimize_for_inference(model, "int8")
    packed = sum(isinstance(m, Int8Linear) for m in model.modules())
    t_pack = time.perf_counter() - t0
    anon, file = _rss_parts()
    print(json.dumps({
        "base": base, "load_s": t_load, "rss_load": rss_load, "peak_load": peak_load,
        "touch_s": t_touch, "rss_touch": rss_touch, "peak_touch": peak_touch,
        "int8_s": t_pack, "rss_int8": proc.memory_info().rss, "peak_int8": _peak_rss(),
        "int8_layers": packed, "anon_int8": anon, "file_int8": file,
    }))


def child_load(folder: Path, compute: str) -> None:
    """Runs in a fresh process: ``qwenvl.inference.load`` with int8 in ``compute``; print one JSON line."""
    import psutil

    from qwenvl.inference import load

    proc = psutil.Process()
    base = proc.memory_info().rss
    t0 = time.perf_counter()
    model, _ = load(folder, dtype=compute, quantize="int8", device="cpu")
    seconds = time.perf_counter() - t0
    anon, file = _rss_parts()
    final = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    print(json.dumps({"base": base, "load_int8_s": seconds, "peak": _peak_rss(), "rss": proc.memory_info().rss,
                      "anon": anon, "file": file, "model_bytes": final}))


def measure(folder: Path, dtype: str, cold: bool, compute: str | None = None) -> dict[str, float]:
    if cold:
        _evict(folder)
    cmd = [sys.executable, __file__, "--child", str(folder), "--dtype", dtype]
    if compute is not None:
        cmd += ["--child-compute", compute]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"child failed ({res.returncode}):\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.0, help="minimum weight size (10^9 bytes)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="stored dtype, loaded as is")
    ap.add_argument("--max-shard-size", default="1GB", help="shard size of both formats")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write: a new or empty folder (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    ap.add_argument("--cold", action="store_true", help="evict the weight files from the page cache before loading")
    ap.add_argument("--compute", choices=sorted(DTYPE_NAMES), default="fp32",
                    help="compute dtype of the last row, inference.load with int8")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-compute", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        if args.child_compute is not None:
            child_load(args.child, args.child_compute)
        else:
            child(args.child, args.dtype)
        return

    config = sized_config(args.size_gb * GB, args.dtype)
    weight_bytes = _nbytes(_shapes(config), DTYPES[args.dtype])
    workdir = work_dir(args.workdir, "qwenvl-load-bench-")
    print(f"cpu: {cpu_summary()}")
    print(f"model: hidden {config.lm.hidden_size}, {config.lm.num_hidden_layers} LM layers, vision width "
          f"{config.visual.width} x {config.visual.layers}; weights {weight_bytes / GB:.3f} GB {args.dtype}; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs; page cache {'cold' if args.cold else 'warm'}; "
          f"workdir {workdir}")
    try:
        folders = write_checkpoints(workdir, config, DTYPES[args.dtype], args.max_shard_size)
        rows, notes = [], []
        for fmt, folder in folders.items():
            r = measure(folder, args.dtype, args.cold)
            stages = ("load", "touch", "int8")
            for stage in stages:
                net = r[f"peak_{stage}"] - r["base"]
                rows.append((fmt, "load" if stage == "load" else f"+ {stage}", r[f"{stage}_s"],
                             r[f"rss_{stage}"] / GB, r[f"peak_{stage}"] / GB, net / GB, net / weight_bytes,
                             r["base"] / GB))
            notes.append(f"{fmt}: after quantizing {r['int8_layers']} layers to int8, RssAnon "
                         f"{r['anon_int8'] / GB:.3f} GB, RssFile {r['file_int8'] / GB:.3f} GB")
        r = measure(folders["safetensors"], args.dtype, args.cold, DTYPE_NAMES[args.compute])
        net = r["peak"] - r["base"]
        rows.append(("safetensors", f"load() int8, {args.compute}", r["load_int8_s"], r["rss"] / GB, r["peak"] / GB,
                     net / GB, net / weight_bytes, r["base"] / GB))
        notes.append(f"load(..., dtype={DTYPE_NAMES[args.compute]!r}, quantize='int8'): the model holds "
                     f"{r['model_bytes'] / GB:.3f} GB; peak net / model bytes {net / r['model_bytes']:.2f}; RssAnon "
                     f"{r['anon'] / GB:.3f} GB, RssFile {r['file'] / GB:.3f} GB")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not args.keep:
            for fmt in ("safetensors", "bin"):
                shutil.rmtree(workdir / fmt, ignore_errors=True)

    head = ("format", "stage", "time s", "RSS GB", "peak GB", "net GB", "net/weights", "base GB")
    print(f"{head[0]:<12}{head[1]:<20}" + "".join(f"{h:>12}" for h in head[2:]))
    for fmt, stage, secs, rss, peak, net, ratio, base in rows:
        print(f"{fmt:<12}{stage:<20}{secs:>12.2f}{rss:>12.3f}{peak:>12.3f}{net:>12.3f}{ratio:>12.2f}{base:>12.3f}")
    print("net = peak RSS (VmHWM) - RSS just before from_pretrained; target net/weights <= 1.3")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
