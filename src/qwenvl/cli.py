"""The ``qwenvl`` command: a thin layer that parses flags and calls the library.

Subcommands register themselves from their own packages (``train.cli``, ``eval.cli``, ``demo.cli``,
``inference_cli``) so that each lives beside the code it drives. Errors the user can fix (bad input,
missing files, mismatched checkpoints) print one clear line and exit with status 2; nothing else does.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from . import __version__
from .fileio import shown_path

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


def said_by_another_process() -> bool:
    """Under torchrun, whether this process leaves the errors that every process of the node meets alike (the
    command line, the config file, missing files) to the node's LOCAL_RANK 0: one line per node, not one per rank."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    return launched and os.environ.get("LOCAL_RANK", "0").strip() not in ("0", "")


def _under_torchrun_agent() -> bool:
    """Whether torchrun's agent started this process (it stops every other worker as soon as one exits)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def _stopped_status(e: KeyboardInterrupt) -> int:
    """The exit status of a process stopped by ``e``: 128 + its signal's number (:class:`Terminated`'s, else
    SIGINT: a Ctrl-C)."""
    return 128 + getattr(e, "signum", signal.SIGINT)


# how long a process that leaves an error to its node's LOCAL_RANK 0 waits for torchrun to stop it
LEFT_TO_LOCAL_RANK_0_WAIT_S = 60.0


def left_to_local_rank_0(status: int = 2) -> int:
    """The exit status of a process that leaves its error to the node's LOCAL_RANK 0 (:func:`said_by_another_process`),
    returned only after waiting, at most :data:`LEFT_TO_LOCAL_RANK_0_WAIT_S`, for torchrun to stop it. torchrun's agent
    stops every other process (SIGTERM) as soon as one exits: a silent one that exited first stopped local rank 0
    before it printed the line (2 to 4 of 30 launches with a missing data file or a bad flag), and the user saw only
    torchrun's summary. Waiting, it is stopped once local rank 0 has said the error and exited, without a word:
    killed by the SIGTERM (no handler is installed yet while the command line is parsed), or, where finetune's
    run has installed one, status 128 + the signal's number. Only under torchrun's agent (``TORCHELASTIC_RUN_ID``); elsewhere nothing stops
    the others."""
    if not _under_torchrun_agent():
        return status
    try:
        time.sleep(LEFT_TO_LOCAL_RANK_0_WAIT_S)
    except KeyboardInterrupt as e:  # a Ctrl-C of the whole job; Terminated: SIGTERM where a handler is installed
        return _stopped_status(e)
    return status


def stopped_before_local_rank_0_error(e: KeyboardInterrupt) -> int | None:
    """The exit status (128 + the signal's number), said without a word, of a process that leaves the errors every
    process meets alike to its node's LOCAL_RANK 0 (:func:`said_by_another_process`) and was stopped (``e``) under
    torchrun's agent before it could meet one: the agent stops every other process (SIGTERM) as soon as one
    exits, and local rank 0 had said the error and exited while this one still read the config (2 of 20 launches
    with a missing data file printed "terminated (SIGTERM)" after the error). A stop of the whole job (a Ctrl-C,
    a SIGTERM to torchrun) is said by local rank 0. None elsewhere: the stop is said as usual."""
    return _stopped_status(e) if said_by_another_process() and _under_torchrun_agent() else None


class _MissingRequired(Exception):
    """argparse's "the following arguments are required" error, held back by :meth:`_Parser.parse_known_args`."""


# argparse's words for a value not among a positional's choices (a subcommand's name)
_INVALID_CHOICE = re.compile(r"argument (?P<name>[^:]+): invalid choice: '(?P<value>.*)' \(choose from ")


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors under torchrun are printed by one process per node
    (:func:`said_by_another_process`); the others exit with the same status 2, silently, once that one has said it
    (:func:`left_to_local_rank_0`). A flag must be spelled whole (``allow_abbrev=False``, as vLLM's parser):
    ``--dtyp`` was taken as ``--dtype``, so a flag added later with the same prefix would have changed what an old
    command line meant."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}  # the subcommands' parsers (build_parser)
        self.missing_deferred = False  # while parsing: argparse's "arguments are required" raises _MissingRequired
        self.chosen: _Parser | None = None  # the subcommand's parser the last parse went into (_Subcommands)
        self.register("action", "parsers", _Subcommands)  # also for the subcommands' own (eval's tasks)

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        """argparse's, except that a required flag missing is said only when no flag is unknown: a typo in a
        required flag (``--data_pth``) was said as "the following arguments are required: --data/--data_path",
        hiding the typo and the hint :meth:`refuse_unknown` gives. (A parser with required flags takes no
        ``--field value`` overrides.)"""
        self.missing_deferred = True
        try:
            return super().parse_known_args(args, namespace)
        except _MissingRequired as missing:
            required = [action for action in self._actions if action.required and action.option_strings]
            for action in required:
                action.required = False
            try:
                _, extra = super().parse_known_args(args, namespace)
            finally:
                for action in required:
                    action.required = True
            unknown = [a for a in extra if a not in _VERBOSE]  # -v: qwenvl's own flag, after the command
            if unknown:
                self.refuse_unknown(unknown)
            self.error(str(missing))
        finally:
            self.missing_deferred = False

    def innermost(self) -> _Parser:
        """The parser of the (sub)command the last parse ended in: ``qwenvl eval vqa``'s for ``eval vqa ...``."""
        return self if self.chosen is None else self.chosen.innermost()

    def refuse_unknown(self, extra: Sequence[str]) -> NoReturn:
        """Exit with argparse's "unrecognized arguments" under this (sub)command's usage, naming the closest
        flag it has to the first unknown one (never ``--help``: ``--model`` is not a misspelled ``--help``)."""
        known = [o for action in self._actions for o in action.option_strings if o.startswith("--") and o != "--help"]
        flag = next((a.partition("=")[0] for a in extra if a.startswith("--")), "")
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        self.error(f"unrecognized arguments: {' '.join(extra)}{hint}")

    def error(self, message: str) -> NoReturn:
        if self.missing_deferred and message.startswith("the following arguments are required:"):
            self.missing_deferred = False
            raise _MissingRequired(message)  # said by parse_known_args, unless a flag is unknown
        if said_by_another_process():
            sys.exit(left_to_local_rank_0(2))
        super().error(message + self._choice_hint(message))

    def _choice_hint(self, message: str) -> str:
        """For argparse's "invalid choice" of a command or task: the one meant (``qwenvl eval grouding``), else that
        it comes first (``qwenvl eval --model M ...`` took M for the task)."""
        said = _INVALID_CHOICE.match(message)
        if said is None:
            return ""
        names = next((list(a.choices) for a in self._actions if isinstance(a.choices, dict) and a.metavar == said["name"]),
                     None)
        if names is None:
            return ""
        close = difflib.get_close_matches(said["value"], names, n=1, cutoff=0.6)
        if close:
            return f" (did you mean {close[0]}?)"
        if " " not in self.prog:  # qwenvl's COMMAND: no flag comes before it
            return ""
        return f"; {said['name']} comes first: {self.prog} {said['name']} [flags]"


class Once(argparse.Action):
    """Store a flag's value, noting in ``namespace.spelled`` the name it was given under (``--data`` or its
    MindFormers name ``--jsonl``), so that a message about it can say the flag as typed, and in
    ``namespace.given_twice`` a flag given a second time under any of its names (``--model a --load_checkpoint b``),
    which :func:`main` refuses (:func:`given_twice`) instead of argparse's silent "the last one wins". A positional
    argument (noted under its metavar) may share it with a flag (``qwenvl info DIR`` or ``--model DIR``): given
    both, they are said with their values, as typed (``DIR is given twice: --model a and b; give it once``)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        name = option_string or str(self.metavar or self.dest)
        spelled = dict(getattr(namespace, "spelled", None) or {})
        if self.dest in spelled and getattr(namespace, "given_twice", None) is None:
            first = spelled[self.dest]
            if option_string and first.startswith("-"):  # a flag twice, under one name or two
                namespace.given_twice = f"{name} is given twice" + ("" if first == name else f" (first as {first})")
            else:  # the positional argument and its flag, in the order typed
                typed = [f"{flag} {shown_path(value)}" if flag.startswith("-") else shown_path(value)
                         for flag, value in ((first, getattr(namespace, self.dest)), (name, values))]
                positional = name if option_string is None else first
                namespace.given_twice = f"{positional} is given twice: {typed[0]} and {typed[1]}; give it once"
        namespace.spelled = {**spelled, self.dest: name}
        setattr(namespace, self.dest, values)


def given_twice(args: argparse.Namespace) -> str | None:
    """What :class:`Once` noted of a flag given twice in ``args`` (``--data_path is given twice (first as
    --data)``), else None."""
    return getattr(args, "given_twice", None)


class _Subcommands(argparse._SubParsersAction):
    """Subcommands whose own ``--help`` starts with the line ``qwenvl --help`` shows for them, unless they have a
    description: ``qwenvl chat --help`` printed its flags alone, not what the command does (``:image PATH``, ...)."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs.setdefault("description", kwargs.get("help"))
        return super().add_parser(name, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        chosen = self.choices.get(values[0]) if values else None
        if isinstance(parser, _Parser) and isinstance(chosen, _Parser):
            parser.chosen = chosen  # an unknown flag is said under its usage (main)
        super().__call__(parser, namespace, values, option_string)


def build_parser() -> _Parser:
    parser = _Parser(
        prog="qwenvl",
        description="Qwen-VL in PyTorch: load the official checkpoints, predict, chat, serve, fine-tune, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"qwenvl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (before or after COMMAND)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", action=_Subcommands)
    for module_name in dict.fromkeys(SUBCOMMANDS.values()):
        module = importlib.import_module(module_name)
        module.add_parser(sub)
    parser.commands = dict(sub.choices)
    return parser


# commands that train: they ask for huge pages (use_huge_pages); the others keep the allocator's default
HUGE_PAGE_COMMANDS = {"finetune", "demo"}


def use_huge_pages() -> bool:
    """Ask PyTorch's CPU allocator for transparent huge pages (2 MiB) for tensors of 2 MiB or more, through its
    ``THP_MEM_ALLOC_ENABLE`` environment variable (PyTorch's CPU tuning guide recommends it). PyTorch reads it
    once, at its first allocation, so this works only before ``torch`` is imported: :func:`main` calls it
    for the training commands (:data:`HUGE_PAGE_COMMANDS`) before anything loads torch. Returns whether huge
    pages are asked for.

    Why for training: each large tensor of a step (the loss's [tokens, vocab] logits, the gradients of the
    embedding and ``lm_head``) comes fresh from the kernel and is faulted in 4 KiB at a time on first write:
    writing 262 MB of logits took 189 ms into a new tensor and 88 ms into an existing one, and a ``qwenvl
    demo`` step took 1.10 s with huge pages against 1.22 s without (2 cores, oneDNN and ATen capped to
    AVX2). Why not for the others: loading a 2 GB checkpoint (``benchmarks/load.py``) took 1.55 s with huge
    pages against 0.99 s (the kernel prepares each 2 MiB page on first touch), and decoding did not get faster. An operator's own
    setting wins (``THP_MEM_ALLOC_ENABLE=0`` turns it off); a kernel without huge pages ignores the request."""
    name = "THP_MEM_ALLOC_ENABLE"
    if name not in os.environ and "torch" not in sys.modules and sys.platform.startswith("linux"):
        os.environ[name] = "1"
    return os.environ.get(name, "0").strip() not in ("", "0")


_VERBOSE = ("-v", "--verbose")

# a flag spelled with dashes inside it, as vLLM's and torchrun's (--max-model-len), optionally with =VALUE
_DASHED_FLAG = re.compile(r"--[A-Za-z][A-Za-z0-9_]*(?:-[A-Za-z0-9_]+)+")


def underscored(argv: Sequence[str]) -> list[str]:
    """``argv`` with every flag written with dashes inside it (``--max-model-len``, ``--learning-rate=1e-5``)
    spelled as ours (``--max_model_len``), as vLLM accepts both spellings; nothing after a bare ``--``."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        flag, eq, value = arg.partition("=")
        if _DASHED_FLAG.fullmatch(flag):
            out[i] = "--" + flag[2:].replace("-", "_") + eq + value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = underscored(sys.argv[1:] if argv is None else argv)
    if next((a for a in argv if not a.startswith("-")), None) in HUGE_PAGE_COMMANDS:
        use_huge_pages()  # first: nothing may have loaded torch yet
    from .hardware import separate_compile_cache

    separate_compile_cache()  # --compile under ATEN_CPU_CAPABILITY=...: a cache of its own
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if any(a in _VERBOSE for a in extra):  # `qwenvl predict ... -v`: the subcommands' parsers do not know it
        args.verbose = True
        extra = [a for a in extra if a not in _VERBOSE]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 0
    if extra and args.command not in TAKES_OVERRIDES:  # said under the command's usage, not qwenvl's
        parser.innermost().refuse_unknown(extra)
    twice = given_twice(args)
    if twice is not None:  # one line, as finetune's settings given twice
        if said_by_another_process():
            return left_to_local_rank_0(2)
        print(f"{parser.innermost().prog}: error: {twice}", file=sys.stderr)  # under eval's task too
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command])
    try:
        with _terminate_as_interrupt(args.command in TERM_AS_INTERRUPT):
            result = module.run(args, extra)
            sys.stdout.flush()  # now, not at exit: a reader that left is answered below
    except Terminated as e:
        with contextlib.suppress(OSError, ValueError):  # SIGHUP: the terminal it would be said on may be gone
            print(f"terminated ({signal.Signals(e.signum).name})", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError as e:
        if e.filename is not None:  # a file we write (our writers name it): an error like any other
            print(f"qwenvl {args.command}: error: {e}", file=sys.stderr)
            return 2
        # the reader of stdout left (`qwenvl info DIR | head -3`): stop quietly, as a Unix tool killed by SIGPIPE
        # does, instead of "error: [Errno 32] Broken pipe"; what is still buffered goes to /dev/null (else
        # Python's exit flushes it into the closed pipe and reports that too)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + getattr(signal, "SIGPIPE", 13)
    except (ValueError, OSError) as e:
        # ValueError covers our CheckpointError, ConfigError, ImageError and data errors; OSError a missing
        # file, a folder where a file should be, no permission, a full disk ("[Errno 28] No space left on
        # device: 'out/answers.jsonl'": our writers name the file)
        print(f"qwenvl {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(result or 0)


# commands that write outputs: SIGTERM (kill, timeout, a batch scheduler's cancel) and SIGHUP (the terminal or ssh
# session closed) end them as Ctrl-C does, cleaning their temporary files and saving what Ctrl-C saves; chat and
# serve keep their own handling
TERM_AS_INTERRUPT = {"predict", "convert", "data-convert", "finetune", "eval", "demo"}
# the signals raised as Terminated, each ending the command with status 128 + its number (143, 129)
TERMINATING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (``signum``), raised where the process is: every Ctrl-C path (cleanup, partial results)
    runs for it too."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _terminate_as_interrupt(enabled: bool) -> Iterator[None]:
    """While the block runs, the first SIGTERM or SIGHUP raises :class:`Terminated` and later ones are ignored
    (main thread only; the previous handlers are put back after). One ignored when we start stays ignored:
    ``nohup qwenvl finetune ...`` goes on when its terminal closes. A save holds them until it is complete
    (:func:`qwenvl.fileio.signals_held`)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping: list[int] = []
    sigchld = getattr(signal, "SIGCHLD", None)

    def raise_terminated(signum: int, frame: Any) -> None:
        # once: a second one (a launcher forwarding the SIGTERM its whole job got, a hangup after a kill) would
        # cut short the cleanup the first one started (temporary files left behind)
        if stopping:
            return
        stopping.append(signum)
        # a signal to the whole process group (a scheduler's cancel, a closed terminal) ends torch's DataLoader
        # workers too, and torch's SIGCHLD handler then raised "DataLoader worker (pid N) is killed by signal"
        # in the middle of this stop's cleanup, or printed it at exit: their end is part of the stop. Not put
        # back: the loader is freed at exit. (torch still finds a dead worker without it, by polling.)
        if sigchld is not None and callable(signal.getsignal(sigchld)):
            signal.signal(sigchld, signal.SIG_DFL)
        raise Terminated(signum)

    previous = {signum: signal.signal(signum, raise_terminated) for signum in TERMINATING_SIGNALS
                if signal.getsignal(signum) not in (signal.SIG_IGN, None)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
