"""``qwenvl finetune``: parse flags into a :class:`TrainConfig` and call :func:`qwenvl.train.train`.

The MindFormers-style flags keep working (``--config``, ``--load_checkpoint``, ``--run_mode finetune``,
``--train_data``, ``--use_parallel``, ``--resume_training``); ``--model DIR``, ``--data FILE`` and ``--image_dir
DIR``, the names of the checkpoint, the data file and the image folder in the other commands, are
``--load_checkpoint``, ``--train_data`` and ``--dataset_dir``. Any
other ``--field value`` (or ``--field=value``; a bare ``--flag`` for true/false settings) overrides that field of
the YAML config.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys
import typing
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from ..cli import (
    Once,
    given_twice,
    left_to_local_rank_0,
    said_by_another_process,
    stopped_before_local_rank_0_error,
)
from .config import TrainConfig, TrainConfigError, check_known

__all__ = ["add_parser", "main", "parse_overrides", "run"]

logger = logging.getLogger(__name__)

# settings a bare --flag turns on: the true/false ones, bf16 (auto|true|false) and resume_training (true|false|auto)
_FLAG_FIELDS = frozenset(name for name, tp in typing.get_type_hints(TrainConfig).items()
                         if tp is bool or tp == bool | str or name == "bf16")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``finetune`` on the ``qwenvl`` command's subparsers."""
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune Qwen-VL (full stage 3 or LoRA) on conversation data",
        description="Fine-tune Qwen-VL. Settings come from --config YAML; any other --FIELD VALUE overrides "
                    "that TrainConfig field (e.g. --learning_rate 2e-5 --max_steps 100 --use_lora true).",
        epilog="TrainConfig fields: " + ", ".join(f.name for f in fields(TrainConfig)),
    )
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    def flag(*names: str, **kwargs: Any) -> None:
        p.add_argument(*names, action=Once, **kwargs)

    flag("--config", help="YAML run config (e.g. configs/finetune_qwenvl_9.6b_bf16.yaml)")
    flag("--model", "--load_checkpoint", dest="load_checkpoint", metavar="DIR",
         help="checkpoint folder (official layout) to start from (the load_checkpoint setting)")
    flag("--run_mode", help="must be 'finetune' (kept for MindFormers-style command lines)")
    flag("--data", "--train_data", "--data_path", dest="data_path", metavar="FILE",
         help="conversation JSON/JSONL file (the data_path setting)")
    flag("--image_dir", "--dataset_dir", dest="dataset_dir", metavar="DIR",
         help="folder that relative image paths are resolved against (the dataset_dir setting)")
    flag("--output_dir", help="where checkpoints and the final model go")
    flag("--resume_training", nargs="?", const="true", metavar="true|false|auto|CHECKPOINT_DIR",
         help="continue from the newest checkpoint in output_dir (auto: if there is one), or from the given folder")
    flag("--use_parallel", nargs="?", const="true", metavar="true|false",
         help="accepted for compatibility: launch with torchrun to train on several devices or nodes")


def parse_overrides(tokens: Sequence[str]) -> dict[str, str]:
    """``["--lr", "1e-3", "--bf16", "--seed=3"]`` -> ``{"lr": "1e-3", "bf16": "true", "seed": "3"}``.

    Names may use dashes or underscores. Unknown names raise :class:`TrainConfigError` naming them.
    """
    out: dict[str, str] = {}
    toks = list(tokens)
    i = 0
    while i < len(toks):
        tok = toks[i]
        if not tok.startswith("--") or tok == "--":
            raise TrainConfigError(f"unexpected argument {tok!r}: settings are given as --field value")
        name, eq, value = tok[2:].partition("=")
        name = name.replace("-", "_")
        if not eq:
            if i + 1 < len(toks) and not toks[i + 1].startswith("--"):
                value = toks[i + 1]
                i += 1
            elif name in _FLAG_FIELDS:
                value = "true"
            else:
                check_known({name: None}, "command line", named_flags())
                raise TrainConfigError(f"--{name} needs a value")
        if name in out:
            raise TrainConfigError(f"--{name} is given twice")
        out[name] = value
        i += 1
    check_known(out, "command line", named_flags())
    return out


@functools.cache
def named_flags() -> tuple[str, ...]:
    """The names of ``finetune``'s named flags, without dashes (``model``, ``data``, ``config``, ...): an
    unknown ``--field value`` close to one of them is said with it as the hint."""
    p = argparse.ArgumentParser(add_help=False)
    add_arguments(p)
    return tuple(o[2:] for action in p._actions for o in action.option_strings)


def config_from_args(args: argparse.Namespace, extra: Sequence[str] = ()) -> TrainConfig:
    """The run's TrainConfig: the YAML file, then the named flags, then the ``--field value`` overrides."""
    overrides = parse_overrides(extra)
    twice = given_twice(args)  # qwenvl's main refuses it first; this is for a namespace parsed elsewhere
    if twice is not None:
        raise TrainConfigError(twice)
    if args.run_mode is not None and args.run_mode != "finetune":
        raise TrainConfigError(f"--run_mode {args.run_mode!r} is not supported by 'finetune'; use --run_mode finetune "
                               "(prediction is 'qwenvl predict')")
    named = {name: getattr(args, name) for name in ("load_checkpoint", "data_path", "dataset_dir", "output_dir")}
    for name, value in named.items():
        if value is not None:
            if name in overrides:  # parsed without qwenvl's main (build_parser().parse_known_args): a dashed
                # spelling (--output-dir) was left to the overrides; main spells it --output_dir, which Once refuses
                typed = next(flag for flag, _, _ in (t.partition("=") for t in extra)
                             if flag.startswith("--") and flag[2:].replace("-", "_") == name)
                raise TrainConfigError(f"{typed} is given twice (also as {args.spelled[name]})")
            overrides[name] = value
    if args.resume_training is not None:
        flag = args.resume_training.strip().lower()
        if flag in ("true", "1", "yes", "on", "false", "0", "no", "off", "auto"):
            overrides["resume_training"] = flag
        else:
            overrides.update(resume_training="true", resume_from=args.resume_training)
    if args.use_parallel is not None:
        overrides["use_parallel"] = args.use_parallel
    return TrainConfig.from_yaml(args.config, overrides)


def _say_kept_checkpoint(output_dir: str) -> None:
    """After Ctrl-C or SIGTERM (rank 0 alone): which checkpoint a resume would go on from, as predict and eval say
    where their answers are."""
    from .state import latest_checkpoint

    if os.environ.get("RANK", "0") != "0":
        return
    with contextlib.suppress(OSError, ValueError):  # a terminal gone with SIGHUP: the line is a courtesy
        latest = latest_checkpoint(output_dir)
        if latest is not None:
            print(f"{latest} is kept: add --resume_training to go on from it", file=sys.stderr)


def run(args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
    """Run ``finetune`` with parsed ``args`` and the leftover ``--field value`` tokens; return the exit status."""
    try:
        cfg = config_from_args(args, extra)
        cfg.check_files()
        if cfg.use_lora:
            from .lora import require_peft

            require_peft("LoRA (use_lora)")
    except (ValueError, OSError):
        if said_by_another_process():
            return left_to_local_rank_0(2)
        raise
    except KeyboardInterrupt as e:  # and Terminated: torchrun stopping this rank once local rank 0 said its error
        status = stopped_before_local_rank_0_error(e)
        if status is None:
            raise
        return status
    import torch

    from ..fileio import error_line
    from .distributed import (
        RANK_LOGGER,
        DistributedError,
        ReportedByAnotherRank,
        failed_on,
        said_by_another_rank,
        word_of_another_rank,
    )
    from .trainer import train  # torch: after every check that does not need it

    try:
        result = train(cfg)
    except ReportedByAnotherRank:  # the rank that failed says why: one line per problem, not one per rank
        return 2
    except KeyboardInterrupt:  # torchrun stops the other ranks (SIGTERM) when one fails: that one says why
        if word_of_another_rank() is not None:
            return 2
        _say_kept_checkpoint(cfg.output_dir)
        raise
    except DistributedError as e:  # another rank died or hung: one line naming this rank, not a traceback
        print(f"qwenvl finetune: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError, torch.cuda.OutOfMemoryError) as e:
        if said_by_another_rank(e):  # under torchrun: the same error, which a rank that met it first says
            return 1 if isinstance(e, RuntimeError) else 2
        rank = failed_on(e)  # under torchrun, one that not every rank has learnt of: the one line names the rank
        if rank is None:
            raise
        print(f"qwenvl finetune: error: {rank}: {error_line(e) if isinstance(e, RuntimeError) else e}",
              file=sys.stderr)
        return 1 if isinstance(e, RuntimeError) else 2
    last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    logger.info("finished %d steps: last loss %s, %.0f tokens/s; model saved to %s", result.steps, last,
                result.tokens_per_second, result.final_path)
    if result.bad_samples:  # this rank's own samples (under torchrun every rank says its own)
        logging.getLogger(RANK_LOGGER).warning("%d sample(s) failed to load during the run and were skipped (see the "
                                               "warnings above)", len(result.bad_samples))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qwenvl.train.cli [flags]``: the same as ``qwenvl finetune [flags]`` (and the same one-line
    errors: it is that command)."""
    from ..cli import main as qwenvl_main

    return qwenvl_main(["finetune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
