"""Loading a full checkpoint onto N ranks: peak memory per rank, and the way back to one folder bit for bit.

Writes the mid benchmark checkpoint of ``benchmarks/load.py`` (random bf16 weights, at least ``--size-gb``,
official layout in 1 GB safetensors shards), then starts ``torchrun --nproc_per_node N`` (gloo, CPU) on this
script. Each rank builds the model on the meta device in the stored dtype, shards it with
:func:`qwenvl.train.parallelize.parallelize`, and fills its rows with
:func:`qwenvl.train.load_sharded.load_sharded_weights`; it reports its peak RSS (VmHWM) net of its RSS just
before loading, divided by the full weight bytes (target: <= 0.7 at N = 2). Then the sharded model is written
back two ways: ``save_pretrained`` gathering one output file at a time (rank 0 writes), and a DCP checkpoint
(every rank its shards) consolidated by ``qwenvl.train.sharded_checkpoint.consolidate`` in one process. Both
must be byte-identical to the checkpoint written by a single-process ``save_pretrained`` at the start.

    python benchmarks/load_distributed.py                   # 2 GB, 2 ranks
    python benchmarks/load_distributed.py --size-gb 4 --nproc 4
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import GB, _nbytes, _peak_rss, _shapes, random_state, sized_config, work_dir  # noqa: E402 (a sibling script)

from qwenvl.checkpoint import find_weights, save_pretrained  # noqa: E402
from qwenvl.config import QwenVLConfig  # noqa: E402
from qwenvl.hardware import cpu_summary  # noqa: E402

DTYPES_BY_NAME = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def write_checkpoint(folder: Path, config: QwenVLConfig, dtype: torch.dtype) -> Path:
    return save_pretrained(random_state(config, dtype), config, folder, max_shard_size="1GB")


def rank_main(source: Path, workdir: Path) -> None:
    """One rank: sharded load (measured), then the gathered save and the DCP save."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    from qwenvl.model import QwenVL
    from qwenvl.train.config import TrainConfig
    from qwenvl.train.load_sharded import load_sharded_weights
    from qwenvl.train.parallelize import parallelize

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    config = QwenVLConfig.from_pretrained(source)
    model = QwenVL.on_meta(config).to(DTYPES_BY_NAME[config.torch_dtype])
    parallelize(model, mesh, TrainConfig(bf16=False, gradient_checkpointing=False))
    base = _rss()
    t0 = time.perf_counter()
    model.to_empty(device="cpu")
    load_sharded_weights(model, source)
    load_s = time.perf_counter() - t0
    peak = _peak_rss()
    dist.barrier()
    t0 = time.perf_counter()
    save_pretrained(model.state_dict(), config, workdir / "gathered", max_shard_size="1GB")
    gather_s = time.perf_counter() - t0
    dist.barrier()
    t0 = time.perf_counter()
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(workdir / "dcp"))
    dcp_s = time.perf_counter() - t0
    if rank == 0:
        config.save_pretrained(workdir / "dcp")
    print("RESULT " + json.dumps({"rank": rank, "base": base, "peak": peak, "load_s": load_s, "gather_s": gather_s,
                                  "dcp_s": dcp_s}), flush=True)
    dist.destroy_process_group()


def _same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.0, help="minimum weight size (10^9 bytes)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write: a new or empty folder (default: a temp dir, removed)")
    ap.add_argument("--rank-main", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_main:
        rank_main(*args.rank_main)
        return

    config = sized_config(args.size_gb * GB, "bf16")
    weight_bytes = _nbytes(_shapes(config), torch.bfloat16)
    workdir = work_dir(args.workdir, "qwenvl-load-dist-")
    print(f"cpu: {cpu_summary()}")
    print(f"model: hidden {config.lm.hidden_size}, {config.lm.num_hidden_layers} LM layers; weights "
          f"{weight_bytes / GB:.3f} GB bf16; {args.nproc} ranks (gloo, CPU); torch {torch.__version__}", flush=True)
    try:
        source = write_checkpoint(workdir / "source", config, torch.bfloat16)
        print(f"wrote {len(find_weights(source))} shard(s)", flush=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               __file__, "--rank-main", str(source), str(workdir)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"torchrun failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
        rows = sorted((json.loads(line[7:]) for line in res.stdout.splitlines() if line.startswith("RESULT ")),
                      key=lambda r: r["rank"])
        from qwenvl.train.sharded_checkpoint import consolidate

        t0 = time.perf_counter()
        consolidate(workdir / "dcp", workdir / "consolidated", max_shard_size="1GB")
        consolidate_s = time.perf_counter() - t0
        gathered_same = _same_files(workdir / "gathered", source)
        consolidated_same = _same_files(workdir / "consolidated", source)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"{'rank':<6}{'load s':>8}{'base GB':>10}{'peak GB':>10}{'net GB':>10}{'net/weights':>13}"
          f"{'gather-save s':>15}{'DCP save s':>12}")
    for r in rows:
        net = r["peak"] - r["base"]
        print(f"{r['rank']:<6}{r['load_s']:>8.2f}{r['base'] / GB:>10.3f}{r['peak'] / GB:>10.3f}{net / GB:>10.3f}"
              f"{net / weight_bytes:>13.2f}{r['gather_s']:>15.2f}{r['dcp_s']:>12.2f}")
    worst = max((r["peak"] - r["base"]) / weight_bytes for r in rows)
    print(f"worst rank net peak / weight bytes: {worst:.2f} (target <= 0.7 at 2 ranks)")
    print(f"gathered save_pretrained == single-process save: {'bit-identical' if gathered_same else 'DIFFERENT'}")
    print(f"DCP checkpoint consolidated ({consolidate_s:.1f} s) == single-process save: "
          f"{'bit-identical' if consolidated_same else 'DIFFERENT'}")
    if worst > 0.7 or not (gathered_same and consolidated_same):
        sys.exit(1)


if __name__ == "__main__":
    main()
