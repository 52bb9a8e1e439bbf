"""Serving throughput and latency: concurrent streaming clients against ``qwenvl serve``'s app, in one run.

    python benchmarks/serve.py                              # mid-size random model, 1 client then 64
    python benchmarks/serve.py --preset tiny --clients 8    # quick check

The server runs in this process (uvicorn on 127.0.0.1, a free port) around a random model of ``--preset``;
clients stream ``/v1/chat/completions`` over HTTP with greedy decoding and a fixed ``max_tokens`` (half of
them with a picture). The server has as many slots as ``qwenvl serve`` would choose (``auto_batch_size``:
what 4 GiB of KV cache holds, at most 32) unless ``--max_batch_size`` says. For each client count it prints:
requests completed, errors (any status >= 500 is one), aggregate generated tokens/s, that over one client's
rate (the issue's target: >= 4x at 64 clients), and time to first token and inter-token latency (p50, p99)
as clients see them (a random model's text often holds back a few tokens' bytes until they form whole
characters, so the inter-token p99 of a client includes such waits). One client's rate is the best of
``--base_rounds`` rounds, which makes the ratio conservative on a machine whose speed drifts. Speed is never
asserted; compare numbers from one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import socket
import threading
import time

import httpx
import torch
import uvicorn
from PIL import Image

from qwenvl import Processor, QwenVL
from qwenvl.hardware import cpu_summary, separate_compile_cache
from qwenvl.inference import resolve_dtype
from qwenvl.quantize import QUANTIZE_CHOICES, optimize_for_inference
from qwenvl.serve.app import ServeSettings, create_app
from qwenvl.serve.engine import Engine, EngineConfig, auto_batch_size


def picture_url(seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(224, 224, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def one_client(c: httpx.AsyncClient, url: str, k: int, max_tokens: int, image: str) -> dict:
    content: list[dict] = [{"type": "text", "text": f"Question {k}: describe what you see in detail."}]
    if k % 2:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    body = {"model": "bench", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, tokens = [], 0
    async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"status": 200, "ttft": times[0] - start if times else float("nan"), "gaps": gaps, "tokens": tokens}


async def round_of(url: str, clients: int, max_tokens: int, image: str) -> dict:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_client(c, url, k, max_tokens, image) for k in range(clients)))
        wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "completed": len(ok), "errors_5xx": sum(r["status"] >= 500 for r in results),
            "other_status": sorted({r["status"] for r in results} - {200}), "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50": quantile([r["ttft"] for r in ok], 0.5),
            "ttft_p99": quantile([r["ttft"] for r in ok], 0.99),
            "itl_p50": quantile([g for r in ok for g in r["gaps"]], 0.5),
            "itl_p99": quantile([g for r in ok for g in r["gaps"]], 0.99)}


def main() -> None:
    separate_compile_cache()  # --compile under ATEN_CPU_CAPABILITY: a cache of its own
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="compute dtype (auto: as qwenvl serve picks it on this machine)")
    ap.add_argument("--clients", type=int, nargs="+", default=[64])
    ap.add_argument("--max_batch_size", type=int, help="decode slots (default: as qwenvl serve chooses)")
    ap.add_argument("--base_rounds", type=int, default=3, help="rounds of one client; the best is the base")
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, "cpu")  # as qwenvl.inference.load picks it
    # the layer swaps `qwenvl serve` gets from qwenvl.inference.load
    model = optimize_for_inference(QwenVL.from_config(args.preset, seed=0, dtype=dtype).eval(),
                                   args.quantize)
    processor = Processor(image_size=model.config.visual.image_size)
    max_model_len = 1024
    slots = args.max_batch_size or auto_batch_size(model, max_model_len)
    config = EngineConfig(max_batch_size=slots, max_model_len=max_model_len, max_queue=1024, compile=args.compile)
    app = create_app(Engine(model, processor.decode, config), processor, ServeSettings(model_name="bench"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    image = picture_url(0)
    print(f"cpu: {cpu_summary()}")
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, preset {args.preset} {str(dtype).removeprefix('torch.')}, "
          f"quantize {args.quantize}, {slots} slots of {max_model_len} positions, max_tokens {args.max_tokens}")
    asyncio.run(round_of(url, 2, 4, image))  # warm-up: first-call costs out of the numbers
    singles = [asyncio.run(round_of(url, 1, args.max_tokens, image)) for _ in range(args.base_rounds)]
    base = max(r["tokens_per_s"] for r in singles)
    print(f"one client alone, {args.base_rounds} rounds: " + ", ".join(f"{r['tokens_per_s']:.1f}" for r in singles)
          + f" tokens/s; the base is the best, {base:.1f}")
    rows = [asyncio.run(round_of(url, n, args.max_tokens, image)) for n in args.clients]
    print(f"{'clients':>7} {'done':>5} {'5xx':>4} {'tok/s':>8} {'x one':>6} {'ttft p50':>9} {'ttft p99':>9} "
          f"{'itl p50':>8} {'itl p99':>8}")
    for r in rows:
        print(f"{r['clients']:>7} {r['completed']:>5} {r['errors_5xx']:>4} {r['tokens_per_s']:>8.1f} "
              f"{r['tokens_per_s'] / base:>6.2f} {r['ttft_p50']:>8.2f}s {r['ttft_p99']:>8.2f}s "
              f"{r['itl_p50'] * 1e3:>6.1f}ms {r['itl_p99'] * 1e3:>6.1f}ms")
    server.should_exit = True
    thread.join(30)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "slots": slots, "one_client": singles, "rounds": rows}, f, indent=2)


if __name__ == "__main__":
    main()
