"""``qwenvl serve``: load a checkpoint and serve it over OpenAI's HTTP API (see :mod:`qwenvl.serve.app`)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
from pathlib import Path
from typing import Any

from ..cli import Once
from ..fileio import require_folder
from ..inference_cli import add_runtime_flags, require_compiler

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve", help="serve a checkpoint over OpenAI's chat/completions HTTP API (with a chat page at /)",
        description="An OpenAI-compatible server for Qwen-VL: /v1/chat/completions (text and image_url parts, "
                    "streaming), /v1/completions, /v1/models, /health, /metrics, and a chat page at /. "
                    "Requests are decoded together with continuous batching.",
    )
    p.add_argument("--model", "--load_checkpoint", dest="model", required=True, metavar="DIR", action=Once,
                   help="checkpoint folder in the official layout (Qwen/Qwen-VL-Chat, Qwen/Qwen-VL or ours)")
    p.add_argument("--served_model_name", help="the model name clients send (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one, the log says which)")
    add_runtime_flags(p)  # --dtype, --device, --quantize, as predict and chat have them
    p.add_argument("--max_batch_size", type=int,
                   help="decode slots: sequences generated together (default: as many as --kv_cache_memory holds, "
                        "up to 32)")
    p.add_argument("--kv_cache_memory", type=float, metavar="GIB",
                   help="GiB of KV cache for the default --max_batch_size (default: on a GPU half its free memory "
                        "after loading, on the CPU a quarter of the available RAM, at most 4)")
    p.add_argument("--max_model_len", type=int,
                   help="positions per slot, prompt and answer together (default: the model's seq_length); "
                        "the KV cache holds max_batch_size x max_model_len positions")
    p.add_argument("--max_queue", type=int, default=64,
                   help="requests that may wait for a slot; more are answered 429 (default 64)")
    p.add_argument("--compile", action="store_true",
                   help="decode with torch.compile: compiled before serving, once per batch size that takes another "
                        "path through the layers (1, 2, 3, 5, 9, 13, 33 slots, up to --max_batch_size); seconds to "
                        "minutes")
    p.add_argument("--api_key", help="require 'Authorization: Bearer KEY' on /v1/* (default: no key)")
    p.add_argument("--allowed_hosts", metavar="NAMES",
                   help="comma-separated Host header names answered besides localhost, *.localhost and loopback IPs "
                        "('*.example.com': its subdomains; '*': any). Default: on a loopback --host (127.0.0.1, "
                        "::1) only those, so that a web page cannot reach the server through a DNS name of its own "
                        "(DNS rebinding); on any other --host (e.g. 0.0.0.0) any Host")
    p.add_argument("--allow_remote_images", action="store_true",
                   help="fetch http(s) image URLs (size and time limited); default: only data: URLs")
    p.add_argument("--remote_image_timeout", type=float, default=10.0, metavar="SECONDS",
                   help="seconds one image download may take in all, however slowly the host sends (default 10)")
    p.add_argument("--allowed_local_media_path", metavar="DIR",
                   help="let requests name image files (file:// URLs) under DIR; default: no local files")
    p.add_argument("--max_request_bytes", type=int, default=20 * 2**20, help="largest request body (default 20 MiB)")
    p.add_argument("--max_request_bytes_in_flight", type=int, metavar="BYTES",
                   help="bytes of request bodies held at once, from their arrival until their requests are "
                        "prepared; a body that would go over is answered 503 (default: 4 x --max_request_bytes, "
                        "as many largest bodies as are decoded at once)")
    p.add_argument("--request_body_timeout", type=float, default=60.0, metavar="SECONDS",
                   help="time a request's head (request line and headers) may take to arrive, and then its body; "
                        "a connection with a late head is closed, a late body is answered 408 and its connection "
                        "closed (default 60)")
    p.add_argument("--max_connections", type=int, metavar="N",
                   help="connections kept open at once; one more closes the oldest one waiting for a request (else "
                        "itself), so that idle connections cannot use up the process's open files and stop it "
                        "accepting any (default: half the open-files limit, whose soft limit is first raised as far as the hard "
                        "one allows, up to 65535)")
    p.add_argument("--max_image_bytes", type=int, default=10 * 2**20,
                   help="largest image in bytes: a data: URL's, a download's or a file's (default 10 MiB)")
    p.add_argument("--max_image_pixels", type=int, default=40_000_000,
                   help="largest image in pixels, checked before decoding (default 40M)")
    p.add_argument("--max_images_per_request", type=int, default=4,
                   help="pictures one prompt may hold: the last message's, and the history's as far as it is kept "
                        "(older turns give way; default 4; 0: text only)")
    p.add_argument("--max_tokens_cap", type=int, default=2048,
                   help="largest max_tokens a request may ask for (default 2048)")
    return p


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.listen(2048)
    return sock


def allowed_hosts(flag: str | None, address: str) -> tuple[str, ...] | None:
    """ServeSettings.allowed_hosts for ``--allowed_hosts`` ``flag`` on a server bound to ``address`` (an IP):
    None (any Host) for ``*``, or by default when it is not a loopback address."""
    if flag is None:
        return () if ipaddress.ip_address(address.split("%")[0]).is_loopback else None
    names = tuple(n.strip() for n in flag.split(",") if n.strip())
    for name in names:  # a Host header's port is not compared: "name:8000" would never match
        if "/" in name or (":" in name and not name.startswith("[") and name.count(":") == 1):
            raise ValueError(f"--allowed_hosts: {name!r} is not a host name; give names without scheme, port or path "
                             "(e.g. example.com,*.example.com)")
    return None if "*" in names else names


def run(args: argparse.Namespace, extra: list[str] | None = None) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ValueError(f"qwenvl serve needs FastAPI and uvicorn ({e.name} is missing): "
                         "pip install 'qwenvl[serve]'") from e

    for name in ("max_batch_size", "max_request_bytes", "max_image_bytes", "max_image_pixels", "max_tokens_cap",
                 "max_connections"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_request_bytes_in_flight is not None and args.max_request_bytes_in_flight < args.max_request_bytes:
        raise ValueError(f"--max_request_bytes_in_flight must be >= --max_request_bytes ({args.max_request_bytes}), "
                         f"got {args.max_request_bytes_in_flight}")
    if args.max_model_len is not None and args.max_model_len < 2:  # 0 read as "not given" took the default
        raise ValueError(f"--max_model_len must be >= 2 (a prompt token and an answer token), got {args.max_model_len}")
    if args.kv_cache_memory is not None and not args.kv_cache_memory > 0:
        raise ValueError(f"--kv_cache_memory must be > 0 GiB, got {args.kv_cache_memory}")
    for name in ("request_body_timeout", "remote_image_timeout"):
        if not getattr(args, name) > 0:  # nan too
            raise ValueError(f"--{name} must be > 0 seconds, got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:  # else bind() raised OverflowError after the weights had loaded
        raise ValueError(f"--port must be 0-65535 (0: any free port), got {args.port}")
    if args.max_images_per_request < 0 or args.max_queue < 0:
        raise ValueError("--max_images_per_request and --max_queue must be >= 0")
    root = None
    if args.allowed_local_media_path is not None:
        root = Path(args.allowed_local_media_path)
        if not root.is_dir():
            raise NotADirectoryError(f"--allowed_local_media_path {root}: not a folder")
    require_folder(args.model)
    if args.max_model_len is not None:  # more positions than the model has: said now, not after the weights load
        from ..config import QwenVLConfig

        limit = QwenVLConfig.from_pretrained(args.model).lm.max_position_embeddings
        if args.max_model_len > limit:
            raise ValueError(f"--max_model_len {args.max_model_len} is more than the model's {limit} positions "
                             "(max_position_embeddings in its config.json)")
    if args.compile:  # no C++ compiler: said before the weights load
        require_compiler(args.device)
    # torch and the model code load only now (seconds): a mistyped flag or folder is said at once
    from ..inference import load
    from .app import Server, ServeSettings, create_app
    from .connection import open_files_limit, server_config
    from .engine import Engine, EngineConfig, auto_batch_size, slot_bytes
    from .media import MediaLimits

    sock = _listen(args.host, args.port)
    try:
        hosts = allowed_hosts(args.allowed_hosts, sock.getsockname()[0])  # the bound IP: "localhost" resolved
    except ValueError:
        sock.close()
        raise
    # the one media policy: file:// image URLs only under --allowed_local_media_path, else no local file
    model, processor = load(args.model, args.dtype, args.device, quantize=args.quantize, allowed_media_dir=root)
    lm = model.config.lm
    max_model_len = args.max_model_len if args.max_model_len is not None else min(lm.seq_length,
                                                                                  lm.max_position_embeddings)
    slots = args.max_batch_size
    if slots is None:
        budget = None if args.kv_cache_memory is None else int(args.kv_cache_memory * 2**30)
        slots = auto_batch_size(model, max_model_len, budget)
    config = EngineConfig(max_batch_size=slots, max_queue=args.max_queue, compile=args.compile,
                          max_model_len=max_model_len)
    # chat history is trimmed oldest-first to what the slots hold, not to the checkpoint's longer window
    processor.max_window_size = min(processor.max_window_size, config.max_model_len)
    settings = ServeSettings(
        model_name=args.served_model_name or Path(args.model).resolve().name, api_key=args.api_key,
        max_request_bytes=args.max_request_bytes, max_request_bytes_in_flight=args.max_request_bytes_in_flight,
        request_body_timeout=args.request_body_timeout,
        max_images_per_request=args.max_images_per_request,
        max_tokens_cap=args.max_tokens_cap, allowed_hosts=hosts,
        media=MediaLimits(max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                          allow_remote=args.allow_remote_images, remote_timeout=args.remote_image_timeout),
    )
    engine = Engine(model, processor.decode, config)
    app = create_app(engine, processor, settings)
    host, port = sock.getsockname()[:2]
    kv_gib = config.max_batch_size * slot_bytes(model, config.max_model_len) / 2**30
    logger.info("serving %s on http://%s:%d (%d slots of %d positions, KV cache %.2f GiB; chat page at /)",
                settings.model_name, host, port, config.max_batch_size, config.max_model_len, kv_gib)
    # asyncio accepts up to `backlog` connections per turn of the loop, a few turns before the first is counted (and
    # closed past --max_connections): half the open files for connections, an eighth per turn keeps them all within
    files = open_files_limit()
    connections = args.max_connections if args.max_connections is not None else files // 2
    if connections > files:
        logger.warning("--max_connections %d is more than the %d files this process may open: idle connections "
                       "can stop it accepting any", connections, files)
    http = server_config(app, settings.request_body_timeout, connections, backlog=min(2048, max(files // 8, 1)),
                         log_level="info", timeout_graceful_shutdown=5)
    Server(http, engine).run(sockets=[sock])
    return 0
