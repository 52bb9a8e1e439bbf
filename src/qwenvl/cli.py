"""The ``qwenvl`` command: a thin layer that parses flags and calls the library.

Subcommands register themselves from their own packages (``train.cli``, ``eval.cli``, ``demo.cli``,
``inference_cli``) so that each lives beside the code it drives. Errors the user can fix (bad input,
missing files, mismatched checkpoints) print one clear line and exit with status 2; nothing else does.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from . import __version__

# name -> module providing add_parser(subparsers) and run(args, extra)
SUBCOMMANDS = {
    "info": "qwenvl.inference_cli",
    "predict": "qwenvl.inference_cli",
    "chat": "qwenvl.inference_cli",
    "convert": "qwenvl.inference_cli",
    "data-convert": "qwenvl.inference_cli",
    "serve": "qwenvl.serve.cli",
    "finetune": "qwenvl.train.cli",
    "eval": "qwenvl.eval.cli",
    "demo": "qwenvl.demo.cli",
}
# subcommands that accept extra "--field value" overrides
TAKES_OVERRIDES = {"finetune"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwenvl",
        description="Qwen-VL in PyTorch: load the official checkpoints, predict, chat, serve, fine-tune, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"qwenvl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in dict.fromkeys(SUBCOMMANDS.values()):
        module = importlib.import_module(module_name)
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 0
    if extra and args.command not in TAKES_OVERRIDES:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    module = importlib.import_module(SUBCOMMANDS[args.command])
    try:
        result = module.run(args, extra)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        # ValueError covers our CheckpointError, ConfigError, ImageError and data errors.
        print(f"qwenvl {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
