"""MindFormers ``.ckpt`` conversion: peak host memory (and wall time) of ``qwenvl convert`` on a >= 2 GB checkpoint.

Writes a random MindFormers checkpoint (the layout of ``convert_weight.py``, float32) of a mid-size Qwen-VL
(hidden 1536, 8 layers, real vocabulary: about 2.5 GB; the largest tensors are wte and lm_head, 0.93 GB each),
then runs, each in a fresh process, ``qwenvl convert`` for: the import to an official folder, the export back
to a float32 ``.ckpt`` (which must equal the original byte for byte), and an export with a cast to bfloat16.
For each it prints wall time and peak RSS against the bound 1.3 x largest tensor + 0.5 GB (the 0.5 GB is the
runtime: Python, torch and the meta model; the baseline line shows what importing them costs).

    python benchmarks/convert_mindformers.py             # temp dir under $TMPDIR, removed afterwards
    python benchmarks/convert_mindformers.py --keep DIR  # write into DIR (new or empty) and keep the files
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import work_dir  # noqa: E402 (a sibling script)

from qwenvl.config import GenerationDefaults, LMConfig, QwenVLConfig, VisionConfig
from qwenvl.hardware import cpu_summary
from qwenvl.mindformers import ms_shapes, official_shapes, rules
from qwenvl.mindspore_ckpt import CkptWriter

GB = 1e9


def _config() -> QwenVLConfig:
    return QwenVLConfig(
        lm=LMConfig(hidden_size=1536, num_hidden_layers=8, num_attention_heads=12, kv_channels=128,
                    intermediate_size=8192),
        visual=VisionConfig(width=256, layers=4, heads=4, mlp_ratio=4.0, output_dim=1536),
        generation=GenerationDefaults(), torch_dtype="float32",
    )


def _write_random_ckpt(path: Path, config: QwenVLConfig) -> tuple[int, int]:
    """A random float32 MindFormers checkpoint; returns (total bytes, largest tensor bytes)."""
    g = torch.Generator().manual_seed(0)
    shapes = official_shapes(config)
    total = largest = 0
    with open(path, "wb") as f:
        w = CkptWriter(f)
        for r in rules(config):
            for name, shape in zip(r.ms_names, ms_shapes(r, shapes[r.official])):
                t = torch.randn(shape, generator=g)
                w.write(name, t)
                total += t.nbytes
                largest = max(largest, t.nbytes)
                del t
    return total, largest


# Runs in the child: the command, then the peak RSS of the child's own address space (VmHWM). getrusage's
# ru_maxrss would not do: Linux carries the pre-exec high-water mark over exec, so a child forked from this
# (large) process would report this process's size.
_RUNNER = """
import sys
if sys.argv[1] == "convert":
    from qwenvl.cli import main
    rc = main(sys.argv[1:])
else:
    from qwenvl.config import QwenVLConfig
    from qwenvl.mindformers import official_shapes
    official_shapes(QwenVLConfig.from_pretrained(sys.argv[2]))
    rc = 0
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print("VmHWM", int(hwm.split()[1]) * 1024)
sys.exit(rc)
"""


def _run(args: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS bytes and last output line of ``qwenvl ARGS`` in a fresh Python process."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RUNNER, *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("VmHWM"):
        raise SystemExit(f"qwenvl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return wall, int(lines[-1].split()[1]), lines[-2] if len(lines) > 1 else ""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(64 * 2**20):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep the files")
    args = parser.parse_args()
    work = work_dir(Path(args.keep) if args.keep else None, "qwenvl-mf-bench-")
    try:
        print(cpu_summary())
        config = _config()
        config_dir = work / "config"
        config.save_pretrained(config_dir)
        src = work / "random.ckpt"
        t0 = time.perf_counter()
        total, largest = _write_random_ckpt(src, config)
        bound = 1.3 * largest + 0.5 * GB
        print(f"random MindFormers checkpoint: {total / GB:.2f} GB float32, {math.ceil(time.perf_counter() - t0)} s "
              f"to write; largest tensor {largest / GB:.2f} GB -> bound 1.3 x {largest / GB:.2f} + 0.5 = "
              f"{bound / GB:.2f} GB")
        cli = ["convert"]
        steps = [
            ("baseline (import torch, qwenvl, meta model)", ["baseline", str(config_dir)]),
            ("import .ckpt -> official (float32)", [*cli, str(src), str(work / "official"), "--config", str(config_dir)]),
            ("export official -> .ckpt (float32)", [*cli, str(work / "official"), str(work / "back.ckpt"),
                                                    "--dtype", "float32"]),
            ("export official -> .ckpt (cast to bfloat16)", [*cli, str(work / "official"), str(work / "bf16.ckpt"),
                                                             "--dtype", "bfloat16"]),
        ]
        print(f"{'step':46s} {'wall s':>7s} {'peak RSS GB':>12s} {'/ bound':>8s}")
        worst = 0.0
        for label, argv in steps:
            wall, rss, line = _run(argv)
            if not label.startswith("baseline"):
                worst = max(worst, rss / bound)
            print(f"{label:46s} {wall:7.1f} {rss / GB:12.2f} {rss / bound:8.2f}   {line}")
        same = _sha256(src) == _sha256(work / "back.ckpt")
        print(f"round trip .ckpt -> official -> .ckpt byte-identical: {same}")
        print(f"worst peak RSS / bound: {worst:.2f} ({'PASS' if worst < 1 and same else 'FAIL'})")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
