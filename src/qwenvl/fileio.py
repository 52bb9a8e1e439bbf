"""Crash-safe writes: a file or a whole folder appears complete at its final path, or not at all.

Everything is staged in a hidden sibling of the target (same folder, hence same filesystem) and moved into
place with ``os.replace``/``os.rename``, which are atomic on POSIX. Readers never see a half-written file,
and a failure leaves the previous version (if any) untouched and no temporary files behind.

Not meant for several writers racing on the same path: the last one to finish wins, as with plain writes
(``qwenvl.outputs`` gives a run its output folder to itself); unless a file is written with ``replace=False``
(:func:`atomic_file`, published with ``os.link``, which never replaces): then the first one wins, and a later one
fails without replacing it.

Every temporary name contains ``.qwenvl-tmp-`` (staging), ``.qwenvl-old-`` (a replaced folder waiting to be
deleted) or ``.qwenvl-trash-`` (a folder being deleted): :func:`clean_temporary` recognises them, so the next
run in a folder removes what a killed one left (and puts back an ``old`` folder whose replacement never
arrived). ``QWENVL_FAULT_POINT`` makes the process kill itself at a named point (:func:`fault_point`): the
tests use it to check that every such crash is recovered. A stop signal (Ctrl-C, SIGTERM, SIGHUP) can be held
while a few steps that must not be cut run (:func:`signals_held`): the removal of a failed write's temporary
file or folder and the replacement of a folder here, the moves of a re-save into an output folder, the saves of
a training run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "STOP_SIGNALS",
    "TEMP_TAG",
    "atomic_dir",
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_text",
    "clean_temporary",
    "error_line",
    "fault_point",
    "fsync_dir",
    "fsync_tree",
    "write_error",
    "is_temporary",
    "iter_jsonl",
    "json_text",
    "parse_json",
    "read_json_records",
    "read_yaml",
    "remove_path",
    "remove_tree",
    "same_file",
    "require_folder",
    "signals_held",
    "temp_name",
]

logger = logging.getLogger(__name__)

TEMP_TAG = ".qwenvl-"  # in every temporary name we create, and in no name we publish
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.qwenvl-(?P<kind>tmp|old|trash)-[A-Za-z0-9_]+$")
FAULT_ENV = "QWENVL_FAULT_POINT"
_fault_hits: dict[str, int] = {}


def error_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one line of a message: its first non-blank line (with the next when the first only
    introduces it, ending in ":", as torch's "Error(s) in loading state_dict for X:"), cut to ``limit``
    characters; its type's name when it has no text (torch's TypeErrors list every overload on later lines)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    text = f"{lines[0]} {lines[1]}" if len(lines) > 1 and lines[0].endswith(":") else lines[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


NO_SPACE_BYTES = 1 << 20  # a filesystem with less free is full: what a failed write of ours has left there


def _no_space(path: Path) -> bool:
    """Whether the filesystem of ``path`` (or of its nearest existing parent) is full."""
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free < NO_SPACE_BYTES
        except OSError:
            continue
    return False


# a write that found no room: the disk or the user's quota is full, the file over `ulimit -f`, the disk read-only
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _inside(name: Any, folder: str | os.PathLike[str] | None) -> bool:
    """Whether ``name`` (an OSError's file name: str, bytes or None) is ``folder`` or a path inside it."""
    if folder is None or not isinstance(name, (str, bytes, os.PathLike)):
        return False
    path, root = Path(os.path.abspath(os.fsdecode(name))), Path(os.path.abspath(folder))
    return path == root or root in path.parents


def write_error(e: BaseException, target: str | os.PathLike[str], staging: str | os.PathLike[str] | None = None
                ) -> OSError | None:
    """``e``, raised while ``target`` was written (through ``staging``, a temporary file or folder), as an OSError
    that names ``target`` (one line: "[Errno 28] No space left on device: 'out/answers.jsonl'"); None when
    ``e`` is not a failed write of ours (a read of an input named in its message, a bug).

    A write error of the OS (``f.write``, ``close``: no file name, or one inside ``staging``) keeps its errno;
    the RuntimeError of ``torch.save``'s writer, which hides its errno ("unexpected pos 704 vs 598"), becomes
    ENOSPC when the disk is full. DCP's wrapper (``failures``: rank -> (error, traceback)) is looked into."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        e = next(iter(failures.values()))[0]
    target, where = Path(target), Path(staging) if staging is not None else Path(target)
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno is not None:
            name = cause.filename
            # shutil's copies name the source first ("[Errno 28] ...: 'vocab/qwen.tiktoken' -> 'tmp/qwen.tiktoken'"):
            # a full disk there is the write of the copy into the staging area, not a fault of the source
            copied_in = cause.errno in _FULL_ERRNOS and _inside(cause.filename2, staging)
            if name is None or _inside(name, staging) or copied_in:
                return OSError(cause.errno, cause.strerror or os.strerror(cause.errno), str(target))
            return None
        cause = cause.__cause__ or cause.__context__
    if isinstance(e, RuntimeError) and _no_space(where if where.exists() else target.parent):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
    return None


def fault_point(name: str) -> None:
    """Test hook: SIGKILL this process here when ``$QWENVL_FAULT_POINT`` is ``name`` (or ``name@N``: at the
    N-th time this point is reached). Costs one environment lookup otherwise."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, nth = spec.partition("@")
    if point != name:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == int(nth or 1):
        logger.warning("fault injection: killing the process at %s", spec)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


# what stops a run from outside: Ctrl-C, SIGTERM (kill, timeout, a scheduler's cancel), SIGHUP (the terminal closed)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
# held too where a Python handler has it: torch's DataLoader raises from SIGCHLD when a worker died
_CHILD_SIGNALS = tuple(getattr(signal, name) for name in ("SIGCHLD",) if hasattr(signal, name))


@contextlib.contextmanager
def signals_held(what: str) -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP while the block (a save, ``what``: named in the log) runs, then act on the
    first that came as it would have been acted on: by the handler in force before (the ``qwenvl`` CLI's and
    Python's raise, and the run stops as interrupted, exit status 130, 143 or 129) or by the default action (the
    process ends by that signal). A signal ignored before stays ignored; a block inside another is held by it.
    SIGCHLD is held too when a Python handler has it (torch's DataLoader: it raises when a worker died); it is
    acted on after the block unless a stop signal came as well (a signal to the whole process group, as a
    scheduler's cancel or a closed terminal sends, kills the workers too: that is the same stop).

    Why: a Python handler raises wherever the main thread is, and inside a save that may be a callback from C++:
    DCP's writer (``torch.save`` into a Python stream) interrupted there left a writer whose destructor wrote to
    the closed file, and the process died by SIGABRT (``terminate called after throwing an instance of
    'pybind11::error_already_set'``): 3 of about 500 saves interrupted at random moments; or the writer's zip
    failed (``unexpected pos 704 vs 598``) and the checkpoint was lost. The staging folder made a crash
    harmless; waiting for the save makes it impossible, and the stop lands on a checkpoint just written.
    Only the main thread can set handlers (Python runs them there): in another the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: Any) -> None:  # nothing else here: a handler that writes may reenter a write
        held.append(signum)

    previous = {}
    for signum in (*STOP_SIGNALS, *_CHILD_SIGNALS):
        handler = signal.getsignal(signum)
        if callable(handler) or (signum in STOP_SIGNALS and handler == signal.SIG_DFL):  # not SIG_IGN, nor None
            previous[signum] = signal.signal(signum, hold)  # (None: set outside Python, which could not put it back)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if held:
            stops = [s for s in held if s in STOP_SIGNALS]
            signum = (stops or held)[0]
            handler = previous[signum]
            if stops:
                logger.warning("%s came while %s was being saved: acted on now that the save has ended",
                               signal.Signals(signum).name, what)
            if callable(handler):
                handler(signum, None)
            else:  # SIG_DFL: the process ends by the signal, as it would have, only after the save
                signal.raise_signal(signum)


def temp_name(name: str, kind: str = "tmp") -> str:
    """A hidden, unique, recognisable sibling name for ``name`` (``kind``: tmp, old or trash)."""
    return f".{name}{TEMP_TAG}{kind}-{uuid.uuid4().hex}"


def is_temporary(name: str) -> bool:
    """True for the names :func:`temp_name`, :func:`atomic_dir` and :func:`atomic_write_bytes` create."""
    return _TEMP_RE.match(name) is not None


# characters that would break a message's one line (str.splitlines breaks at \n, \r, \x0b, \x0c, \x1c-\x1e, \x85,
# U+2028, U+2029) or reach the terminal as a command (ESC): the C0 and C1 controls, DEL and the two separators
_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def shown_path(path: str | os.PathLike[str]) -> str:
    """``path`` as a message names it: as it is, or, when it holds a control character (a newline, NUL, ESC, ...),
    quoted with them escaped as Python writes them (``'runs/a\\nb'``), so that the message stays one line."""
    text = os.fspath(path)
    return repr(text) if _CONTROL_CHARACTERS.search(text) else text


def require_folder(path: str | os.PathLike[str], what: str = "checkpoint folder") -> Path:
    """``path`` as a Path, or FileNotFoundError ("<what> not found: <path>") when nothing is there, or
    NotADirectoryError when something else is (a file given for a folder). Needs no torch: the CLI checks its
    folders with it before loading torch and the model code, which takes seconds."""
    path = Path(path)
    if not path.is_dir():
        if path.exists():
            hint = (f"; a MindSpore .ckpt is converted first: qwenvl convert {path} OUT --config ..."
                    if path.suffix == ".ckpt" else "")
            raise NotADirectoryError(f"{what} {shown_path(path)} is not a folder{hint}")
        raise FileNotFoundError(f"{what} not found: {shown_path(path)}")
    return path


def remove_tree(path: Path) -> None:
    """Delete a folder by renaming it to a hidden trash name first, so that an interrupted delete leaves
    something :func:`clean_temporary` finishes instead of a half-deleted folder under its real name."""
    trash = path.parent / temp_name(path.name, "trash")
    os.rename(path, trash)
    fault_point("remove_tree.renamed")
    shutil.rmtree(trash)


def clean_temporary(folder: str | os.PathLike[str]) -> list[str]:
    """Remove what interrupted writes left in ``folder`` (its top level); return the names handled.

    Only our own temporary names (:func:`is_temporary`) are touched. A ``.NAME.qwenvl-old-*`` folder whose
    ``NAME`` is missing is a replacement that crashed between its two renames: it is renamed back to ``NAME``.
    Call it only while no other writer uses ``folder`` (``qwenvl.outputs`` holds the folder's lock).
    """
    root = Path(folder)
    handled = []
    for entry in sorted(root.iterdir()):
        m = _TEMP_RE.match(entry.name)
        if not m:
            continue
        original = root / m.group("name")
        if m.group("kind") == "old" and not (original.exists() or original.is_symlink()):
            os.rename(entry, original)
            logger.warning("restored %s from an interrupted replacement", original)
        else:
            remove_path(entry)
            logger.info("removed %s left by an interrupted run", entry)
        handled.append(entry.name)
    if handled:
        fsync_dir(root)
    return handled


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    # The umask can only be read by setting it; do it once (at first use) to keep the race window tiny.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_default_mode(path: str | os.PathLike[str]) -> None:
    """Give the file ``path`` the mode a plain ``open`` gives a new file (0o666 less the umask): safetensors'
    ``save_file`` creates 0o600 files, which others on a shared machine cannot read."""
    os.chmod(path, 0o666 & ~_umask())


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable. Best effort: not every platform can open a folder."""
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_path(path: Path) -> None:
    """Delete a file, a symlink or a folder tree; a missing path is fine."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path)


def _discard_staging(e: BaseException, target: Path, staging: Path) -> OSError | None:
    """After ``e`` stopped a write of ``target``: delete its temporary file or folder ``staging`` (a second Ctrl-C
    or SIGTERM meanwhile waits until it is gone: cut, it left gigabytes in a hidden sibling) and return ``e`` as
    :func:`write_error` names it (None: not a failed write of ours)."""
    with signals_held(str(target)):
        named = write_error(e, target, staging) if isinstance(e, (OSError, RuntimeError)) else None
        remove_path(staging)
    return named


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], *, fsync: bool = True, replace: bool = True) -> Iterator[BinaryIO]:
    """Write a file through the yielded binary stream; it appears at ``path`` when the ``with`` block succeeds.

    For data too large to hold in memory (streamed piece by piece). Parent folders are created. A file being
    replaced keeps its permission bits; a new file gets the usual ``0o666 & ~umask``. On any exception the
    temporary file is deleted (a stop signal that comes meanwhile waits for it: :func:`signals_held`) and
    ``path`` is left as it was. With ``fsync`` the data (and the rename) are
    flushed to disk before the block exits, so a power loss leaves either the old or the new file.

    ``replace=False``: a file at ``path`` (or a link to one) stays, whether it was there at the start or appeared
    while the block ran (a file of the user's, another run writing the same output): FileExistsError naming
    ``path`` (errno EEXIST), and the temporary file is deleted as on any other failure (:func:`_put_new`). A
    dangling link is replaced, as ``qwenvl.outputs.check_output_file`` lets it be (nothing there to lose).
    """
    target = Path(path)
    if not replace and target.exists():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    try:
        st = target.stat()  # follows a link: what a reader of ``path`` would get
    except FileNotFoundError:  # nothing there (or a dangling link, which is replaced)
        mode = 0o666 & ~_umask()
    else:
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(f"cannot write a file over the folder {target}")
        if not stat.S_ISREG(st.st_mode):
            # os.replace would put our file in place of a named pipe or a device (/dev/null; /dev/stdout, a link
            # to a terminal or a pipe): not a file we wrote, nor one whose readers expect a regular file
            raise FileExistsError(f"cannot write {target}: it is not a regular file (a pipe, socket or device)")
        mode = stat.S_IMODE(st.st_mode)
    target.parent.mkdir(parents=True, exist_ok=True)

    fd, tmp, lock_fd = _locked_temp(target)
    try:
        _remove_dead_temps(target, tmp)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0o600
        if replace:
            os.replace(tmp, target)
        else:
            _put_new(tmp, target)
    except BaseException as e:
        named = _discard_staging(e, target, tmp)
        if named is not None:
            raise named from e
        raise
    finally:
        os.close(lock_fd)
    if fsync:
        fsync_dir(target.parent)


# link(2) refused by a filesystem without hard links: EPERM (FAT, exFAT, Linux's vfat), EOPNOTSUPP (some FUSE and
# network filesystems), ENOSYS; EMLINK (no more links to the file) cannot happen to a new file but means the same
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}


def _put_new(tmp: Path, target: Path) -> None:
    """Move the finished temporary file ``tmp`` to ``target`` unless a file is there (FileExistsError naming
    ``target``; ``tmp`` stays, for the caller to delete). A hard link does it in one step, as ``os.replace`` does
    for a replacing write: ``link`` never replaces (EEXIST), and the file appears whole. A dangling link at
    ``target`` (nothing to lose) and a filesystem without hard links take a check and a rename, two steps:
    something appearing between them (a few microseconds, not the length of a run) is replaced, as without
    ``replace=False``; copying into a file opened with ``O_EXCL`` instead would never replace, but a crash could
    leave half a file under the final name."""
    try:
        os.link(tmp, target)
    except OSError as e:
        if not isinstance(e, FileExistsError) and e.errno not in _NO_HARD_LINKS:
            raise
        if target.exists():  # a file, or a link to something (a dangling one is replaced)
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        os.replace(tmp, target)
        return
    with contextlib.suppress(OSError):  # the file is at target: a second name left here goes at the next write
        tmp.unlink()


def _flock(fd: int) -> bool | None:
    """Try to lock ``fd`` (``flock``, not waiting): True when locked, False when another process holds it, None
    when the filesystem cannot lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        return False if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
    return True


def _locked_temp(target: Path) -> tuple[int, Path, int]:
    """A new temporary file for ``target``: (its descriptor, its path, a second descriptor that holds its flock
    until closed). The lock tells the next writer of ``target`` that this file's writer is alive: one whose
    writer was killed (SIGKILL, a power loss) is deleted by :func:`_remove_dead_temps`."""
    for _attempt in range(20):
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{TEMP_TAG}tmp-")
        locked = _flock(fd)
        if locked is None or (locked and same_file(fd, Path(name))):
            return fd, Path(name), os.dup(fd)  # a dup shares the lock: it stays held after the stream closes
        os.close(fd)  # another writer's cleanup took this brand-new file for a dead one (and may remove it)
    raise OSError(errno.EAGAIN, "could not create a temporary file: other writers keep removing them",
                  str(target))


def same_file(fd: int, path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is, itself, the file open as ``fd`` (not a link to it; False when nothing is there):
    whether a file we opened is still the one under that name."""
    try:
        a, b = os.fstat(fd), os.lstat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _remove_dead_temps(target: Path, mine: Path) -> None:
    """Delete the temporary files of earlier writes of ``target`` whose writer is gone (killed before it could
    clean up: its flock went with it); a live writer's file is locked and stays."""
    prefix = f".{target.name}{TEMP_TAG}tmp-"
    try:
        with os.scandir(target.parent) as listing:
            entries = [e for e in listing if e.name.startswith(prefix) and is_temporary(e.name)
                       and e.name != mine.name and e.is_file(follow_symlinks=False)]
    except OSError:
        return
    for entry in entries:
        path = Path(entry.path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if _flock(fd) and same_file(fd, path):
                path.unlink()
                logger.warning("removed %s, left by an interrupted write of %s", path, target)
        except OSError:
            pass
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True, replace: bool = True
                       ) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`, and its ``replace``); return the path."""
    with atomic_file(path, fsync=fsync, replace=replace) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(
    path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8", fsync: bool = True, replace: bool = True
) -> Path:
    """Write ``text`` to ``path`` atomically (no newline translation; ``replace``: see :func:`atomic_file`); return
    the path."""
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync, replace=replace)


def fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            file = Path(dirpath) / name
            if file.is_symlink() or not file.is_file():
                continue
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[Path]:
    """Build a folder in a temporary sibling and move it to ``path`` when the ``with`` block succeeds.

    ::

        with atomic_dir("runs/ckpt/step-100") as tmp:
            save_weights(tmp / "model.safetensors")
            atomic_write_text(tmp / "config.json", text)   # plain writes are fine inside tmp too

    - On success an existing folder at ``path`` is replaced: it is renamed away, the new folder is renamed
      in, then the old one is deleted. If the rename-in fails the old folder is put back.
    - On any exception (including KeyboardInterrupt) the temporary folder is deleted and ``path`` is left
      exactly as it was.
    - With ``fsync`` every file in the new folder is flushed to disk before it becomes visible.

    A stop signal (Ctrl-C, SIGTERM, SIGHUP) that comes while the temporary folder is deleted, or while an existing
    folder is replaced (its two renames and the deletion of the old copy), waits until that is done
    (:func:`signals_held`): cut, it left ``path`` missing, or gigabytes of a checkpoint in a hidden sibling
    (deleting 2 GB in 4 files takes about 0.6 s on ext4; ``kill -9`` does not wait). A crash (SIGKILL, a power
    loss) between the two renames leaves ``path`` missing and the previous version in a hidden sibling named
    ``.<name>.qwenvl-old-<hex>``; a crash at any other time leaves either the old or the new folder at ``path``,
    plus possibly a hidden ``.<name>.qwenvl-tmp-*`` / ``-old-`` sibling: :func:`clean_temporary` repairs both.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"cannot replace {target} with a folder: it exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}{TEMP_TAG}tmp-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0o700
        yield tmp
        if fsync:
            fsync_tree(tmp)
        fault_point("atomic_dir.staged")
        _swap_in(tmp, target)
    except BaseException as e:
        named = _discard_staging(e, target, tmp)
        if named is not None:
            raise named from e
        raise
    if fsync:
        fsync_dir(target.parent)


def _swap_in(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``, replacing an existing ``target`` (a folder or a link to one)."""
    if not (target.exists() or target.is_symlink()):
        os.rename(new, target)
        return
    if not target.is_dir():
        raise NotADirectoryError(f"cannot replace {target} with a folder: it exists and is not a folder")
    old = target.parent / temp_name(target.name, "old")
    with signals_held(str(target)):  # stopped between the renames, ``target`` was missing
        os.rename(target, old)
        fault_point("atomic_dir.swapped_out")
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old, target)
            raise
        try:
            remove_path(old)
        except OSError as e:  # the new folder is in place; a leftover old copy is only wasted space
            logger.warning("replaced %s but could not delete the previous version %s: %s", target, old, e)


def json_text(value: Any, indent: int | None = None) -> str:
    """``value`` as JSON text that UTF-8 can write: other characters as they are (``ensure_ascii=False``), but all
    of it in ASCII escapes when it holds a lone surrogate (a data file's JSON "\\ud800", which UTF-8 cannot
    encode): written as it came, where writing it as UTF-8 failed at the end of a long run."""
    text = json.dumps(value, ensure_ascii=False, indent=indent)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value, indent=indent)
    return text


def jsonl_line(value: Any) -> str:
    """``value`` as one line of JSON Lines (:func:`json_text`, then a newline). ``ensure_ascii=False`` leaves
    U+2028, U+2029 and U+0085 in strings as they are, and ``str.splitlines`` (and some JavaScript readers) split
    lines at them: they are escaped, which JSON allows anywhere in a string (outside strings the encoder writes
    none of them)."""
    text = json_text(value)
    for char in ("\u2028", "\u2029", "\x85"):
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text + "\n"


def iter_jsonl(
    path: str | os.PathLike[str], error: type[ValueError] = ValueError, what: str = "data"
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSON-lines file.

    A missing file raises ``FileNotFoundError``; a line that is not UTF-8 or not a JSON object raises ``error``
    with a message naming the file and the line, so the user can go straight to it.
    """
    file = _regular_file(path, error, what)
    with file.open("rb") as f:
        for lineno, obj in _json_lines(_utf8_lines(f, file, error), file, error):
            if not isinstance(obj, dict):
                raise error(f"{shown_path(file)}:{lineno}: expected a JSON object, got {_json_kind(obj)}")
            yield lineno, obj


def _regular_file(path: str | os.PathLike[str], error: type[ValueError], what: str) -> Path:
    """``path`` as a Path when it is a regular file (or a link to one). Missing: ``FileNotFoundError`` ("<what> not
    found"); anything else (a folder, a named pipe that would block the read forever, ``/dev/zero`` that would
    fill the memory): ``error`` naming it."""
    file = Path(path)
    try:
        mode = file.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {shown_path(file)}") from None
    if not stat.S_ISREG(mode):
        raise error(f"{what} {shown_path(file)} is not a regular file")
    return file


def _utf8_lines(lines: Iterable[bytes], file: Path, error: type[ValueError]) -> Iterator[str]:
    """Every line decoded; one that is not UTF-8 raises ``error`` naming it (in text mode the error would
    name neither the file nor the line). A byte-order mark starting the file (Windows editors write one) is
    dropped: json refused it ("Unexpected UTF-8 BOM")."""
    for lineno, line in enumerate(lines, start=1):
        try:
            yield line.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{shown_path(file)}:{lineno}: not UTF-8 text ({e})") from None


def _json_kind(value: Any) -> str:
    """The kind of a parsed JSON value in JSON's words (``null``, not NoneType), for messages. Arrays are called
    lists, as in this project's other messages ("a JSON list of records")."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    kinds = {dict: "object", list: "list", str: "string", int: "number", float: "number"}
    return next((word for kind, word in kinds.items() if isinstance(value, kind)), type(value).__name__)


class _DuplicateKey(Exception):
    """A key that a JSON object holds twice (raised inside json.loads, turned into the caller's error)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for json.loads: the object, or :class:`_DuplicateKey` where a key repeats (json keeps
    the last one silently, so ``{"image": "a.png", ..., "image": "b.png"}`` would lose an image unseen)."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _json_lines(lines: Iterable[str], file: Path, error: type[ValueError]) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of every non-blank line; a line that is not JSON, or an object holding a key
    twice, raises ``error`` naming it. A file whose first line opens a list that goes on (an indented JSON
    list, a ``.json`` file given for JSON Lines) is said to be one."""
    first = True
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            # without its line ending: a line cut short is said at its end, not at "column 1" of the next line
            value = json.loads(line.rstrip("\r\n"), object_pairs_hook=_unique_keys)
        except _DuplicateKey as e:
            raise error(f"{shown_path(file)}:{lineno}: the key {json.dumps(e.args[0])[:80]} appears twice in one object") from None
        except json.JSONDecodeError as e:
            if first and line.lstrip().startswith("["):
                raise error(f"{shown_path(file)}:{lineno}: the file is a JSON list (it starts with '['), not JSON Lines "
                            "(one JSON object per line)") from e
            raise error(f"{shown_path(file)}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from e
        except (ValueError, RecursionError) as e:
            raise error(f"{shown_path(file)}:{lineno}: {_unparsable(e)}") from None
        first = False
        yield lineno, value


def read_json(path: str | os.PathLike[str], error: type[ValueError] = ValueError, what: str = "JSON file") -> Any:
    """The JSON value in the file ``path``; a missing file raises ``FileNotFoundError``, anything but a regular
    file or text that is not UTF-8 or not JSON raises ``error`` naming the file (and the line and column where
    parsing stopped)."""
    file = _regular_file(path, error, what)
    try:
        raw = file.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not JSON's
    except UnicodeDecodeError as e:
        raise error(f"{shown_path(file)}: not UTF-8 text ({e})") from None
    return parse_json(raw, file, error)


def parse_json(raw: str, file: str | os.PathLike[str], error: type[ValueError]) -> Any:
    """The JSON value of the text ``raw`` read from ``file``; anything Python cannot parse (invalid JSON, nesting
    too deep, a number of thousands of digits) raises ``error`` naming ``file``."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise error(f"{shown_path(file)}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno} (char {e.pos})") from e
    except (ValueError, RecursionError) as e:
        raise error(f"{shown_path(file)}: {_unparsable(e)}") from None


def _unparsable(e: BaseException) -> str:
    """Valid JSON that Python's parser refuses: nesting deeper than its recursion limit, or an integer of more
    digits than ``int()`` converts (CPython's 4300)."""
    if isinstance(e, RecursionError):
        return "JSON nested too deeply to parse"
    return f"a JSON number Python cannot read: {str(e).split(';')[0]}"


def read_json_records(
    path: str | os.PathLike[str], error: type[ValueError] = ValueError, what: str = "data file",
    items: str = "records",
) -> list[Any]:
    """The records of a JSON file holding one list (or, for ``.jsonl``, one value per non-blank line).

    A missing file raises ``FileNotFoundError`` (``"{what} not found: ..."``); anything but a regular file, and
    text that is not UTF-8, not JSON or not a list raise ``error`` with the file, and the line and column where
    parsing stopped.
    """
    file = _regular_file(path, error, what)
    try:
        raw = file.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not JSON's
    except UnicodeDecodeError as e:
        raise error(f"{shown_path(file)}: not UTF-8 text ({e})") from e
    if file.suffix == ".jsonl":
        # Lines end at "\n" only, as in iter_jsonl: str.splitlines() also splits at U+2028, U+0085, ..., which a
        # JSON string may hold unescaped ("\r\n" leaves a "\r", which JSON reads as whitespace).
        return [value for _lineno, value in _json_lines(raw.split("\n"), file, error)]
    data = parse_json(raw, file, error)
    if not isinstance(data, list):
        raise error(f"{shown_path(file)}: expected a JSON list of {items} at the top level, got {type(data).__name__}")
    return data


# ---- YAML --------------------------------------------------------------------------------------------------
MAX_YAML_BYTES = 1 << 20  # run configs are a few KB
MAX_YAML_DEPTH = 32
MAX_YAML_VALUES = 100_000  # values a YAML document may hold once its aliases are expanded (MindFormers': ~300)


def _bounded_loader(file: Path, error: type[ValueError]) -> type:
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """SafeLoader with bounded cost: a nesting limit (the composer recurses once per level), and a limit on
        the values a document holds once its aliases are expanded. Aliases are fine (MindFormers' YAMLs
        alias whole sections: ``dataset_config: *train_dataset``), but a 1 KB file of aliases of aliases expands
        to gigabytes ("billion laughs") in whatever walks the result, so the expanded size is counted first,
        on the composed nodes (an aliased node is counted once per use, each node's count once)."""

        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            self.depth += 1
            if self.depth > MAX_YAML_DEPTH:
                raise error(f"{shown_path(file)}:{event.start_mark.line + 1}: YAML nested deeper than {MAX_YAML_DEPTH} levels")
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def compose_document(self) -> Any:
            node = super().compose_document()
            sizes: dict[int, int] = {}  # id(node) -> values under it, expanded; -1 while it is being counted

            def expanded(n: Any) -> int:
                if sizes.get(id(n)) == -1:
                    raise error(f"{shown_path(file)}:{n.start_mark.line + 1}: a YAML alias refers to a value that contains it")
                if id(n) not in sizes:
                    sizes[id(n)] = -1
                    children = ([c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else
                                n.value if isinstance(n, yaml.SequenceNode) else [])
                    sizes[id(n)] = 1 + sum(expanded(c) for c in children)
                    if sizes[id(n)] > MAX_YAML_VALUES:
                        raise error(f"{shown_path(file)}: YAML aliases expand to more than {MAX_YAML_VALUES:,} values "
                                    "(aliases of aliases?); write the values out")
                return sizes[id(n)]

            try:
                if node is not None:
                    expanded(node)
            except RecursionError:  # a long chain of aliases of sections that alias the next
                raise error(f"{shown_path(file)}: YAML aliases nested too deep; write the values out") from None
            return node

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            # a key written twice: YAML says keys are unique, PyYAML keeps the last one without a word
            seen: set[str] = set()
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        raise error(f"{shown_path(file)}:{key.start_mark.line + 1}: {key.value!r} is set twice in one mapping")
                    seen.add(key.value)
            return super().construct_mapping(node, deep)

        def construct_object(self, node: Any, deep: bool = False) -> Any:
            if not isinstance(node, yaml.ScalarNode):
                return super().construct_object(node, deep)
            try:  # Python's own errors of a scalar (an integer of 5,000 digits, the date 2001-02-30) name no file
                return super().construct_object(node, deep)
            except (ValueError, OverflowError) as e:
                raise error(f"{shown_path(file)}:{node.start_mark.line + 1}: cannot read {node.value[:40]!r}: {error_line(e)}"
                            ) from None

    return BoundedLoader


def read_yaml(
    path: str | os.PathLike[str], error: type[ValueError] = ValueError, what: str = "config",
    max_bytes: int = MAX_YAML_BYTES,
) -> dict[str, Any]:
    """The mapping in a YAML file (an empty file gives ``{}``), parsed with bounded cost.

    Aliases expanding to more than ``MAX_YAML_VALUES`` values, nesting deeper than ``MAX_YAML_DEPTH``, a key set
    twice in one mapping and files over ``max_bytes`` raise ``error`` with a one-line message naming the file; so
    do invalid YAML and a top level that is not a mapping.
    """
    import yaml

    file = Path(path)
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {shown_path(file)}") from None
    if not file.is_file():
        raise error(f"{what} {shown_path(file)} is not a file")
    if size > max_bytes:
        raise error(f"{shown_path(file)}: {size} bytes is too large for a {what} (at most {max_bytes})")
    with file.open("rb") as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise error(f"{shown_path(file)}: too large for a {what} (at most {max_bytes} bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{shown_path(file)}: not UTF-8 text ({e})") from None
    try:
        data = yaml.load(text, Loader=_bounded_loader(file, error))  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise error(f"{shown_path(file)}: invalid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{shown_path(file)}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data
