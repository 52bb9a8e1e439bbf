"""Output folders: where a command may write, one run per folder, and recovery after a killed run.

The rules (README "Safety"):

- **Never delete what we did not write.** An output folder is new, empty, or *ours*: it holds the marker
  file ``.qwenvl-output.json`` (written first thing; it names the command and the files we wrote there).
  A non-empty folder without the marker is refused; ``overwrite=True`` (``--overwrite``) lets a command write
  there anyway, replacing only the files it writes itself. A run that claimed a folder (its marker lists the
  entries it found there) and wrote nothing into it does not make it ours: its marker goes when it fails, and
  one left by a killed run is not counted (nor by :func:`is_ours`, so such a folder is never deleted as ours,
  a ``checkpoint-STEP`` by finetune's pruning). Weight files of an earlier save are deleted only
  when the marker lists them as ours and the new save does not rewrite them (a ``model-card.md`` or a
  ``model.safetensors.md5`` is never touched: names are matched exactly, not by prefix).
- **Inputs stay untouched**: :func:`check_separate` refuses an output folder that is, contains or lies
  inside an input (a checkpoint being read, an adapter); an input path no file can have (a NUL character) matches
  no output.
- **One run per folder**: :func:`claim_output` holds ``.qwenvl-lock`` (``fcntl.flock``; the file names the
  holder's pid, host, command and start time) for the whole run. A second run is refused with a message
  naming the holder. The kernel drops a flock when its process dies, so the lock file of a killed run is
  taken over, with a warning (unless its pid still runs on this host, in a process started before the lock
  was taken: then we refuse and say how to clear it). A run stopped while it takes the lock (an error, Ctrl-C)
  leaves no lock file of its own.
- **Recovery**: after taking the lock, temporary names left by a killed run (``*.qwenvl-tmp-*``,
  ``-old-``, ``-trash-``: see :mod:`qwenvl.fileio`) are cleaned; a run that fails or is interrupted (Ctrl-C)
  cleans them itself before it lets the folder go.
- **Publishing** (:func:`output_files`): files are staged in a unique hidden folder inside the output
  folder, then renamed into place with ``config.json`` last (and removed first), so a folder that has a
  ``config.json`` is complete; a new folder is built whole in a sibling and renamed in. A stop signal (Ctrl-C,
  SIGTERM, SIGHUP) that comes while the files are moved in waits until the last one is in place
  (:func:`qwenvl.fileio.signals_held`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import re
import socket
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from .fileio import (
    atomic_dir,
    atomic_write_text,
    clean_temporary,
    fault_point,
    fsync_dir,
    fsync_tree,
    is_temporary,
    parse_json,
    remove_path,
    same_file,
    shown_path,
    signals_held,
    write_error,
)

__all__ = [
    "LOCK_FILE",
    "MARKER_FILE",
    "OutputDirError",
    "PartialRows",
    "RunLock",
    "acquire_lock",
    "check_output_file",
    "check_separate",
    "claim_output",
    "is_ours",
    "output_files",
    "partial_path",
    "read_marker",
    "record_files",
]

logger = logging.getLogger(__name__)

MARKER_FILE = ".qwenvl-output.json"
LOCK_FILE = ".qwenvl-lock"
# Weight files of the official layout (exact names: a prefix match would hit model-card.md).
WEIGHT_FILE_RE = re.compile(
    r"^(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)$|^(model\.safetensors|pytorch_model\.bin)\.index\.json$"
)
LAST = "config.json"  # published last, removed first: a folder with a config.json is complete


class OutputDirError(ValueError):
    """An output folder may not be used: not ours, in use by another run, or overlapping an input."""


# ---- inputs vs outputs ---------------------------------------------------------------------------------
def _real(path: str | os.PathLike[str]) -> Path | None:
    """``path`` with ``~``, ``..`` and symbolic links resolved, or None when it cannot name a file: a NUL character
    (a config's ``"a\\0b"``: ``os.path.realpath`` raised a bare "embedded null byte"), a lone surrogate, or another
    error resolving it (the current folder deleted). None matches no path: an input named so is not the output
    (its own check says what is wrong with it)."""
    try:
        return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))
    except (OSError, ValueError):
        return None


def _real_output(output: str | os.PathLike[str], what: str) -> Path:
    """:func:`_real` of an output, which must name a file or folder: said in one line naming it when it cannot."""
    out = _real(output)
    if out is None:
        raise OutputDirError(f"the {what} {os.fspath(output)!r} cannot be a file name (it holds a NUL character or a "
                             "lone surrogate, or the current folder is gone); choose another")
    return out


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_separate(
    output: str | os.PathLike[str],
    inputs: Mapping[str, str | os.PathLike[str] | None],
    may_lie_inside: Iterable[str] = (),
    what: str = "output folder",
) -> None:
    """Refuse ``output`` when it is, contains or lies inside one of ``inputs`` (label -> path; None and ""
    are skipped); for the labels in ``may_lie_inside`` only "is" and "contains" are refused.

    Paths are compared after resolving symlinks, ``~`` and ``..``, so another spelling of the same folder
    (the current directory as ``.``, a link to it) is caught too.
    """
    out = _real_output(output, what)
    lenient = set(may_lie_inside)
    for label, path in inputs.items():
        if not path or (src := _real(path)) is None:
            continue
        if out == src:
            raise OutputDirError(f"the {what} {shown_path(output)} is the {label} {shown_path(path)}; write the output "
                                 "somewhere else")
        if _within(src, out):
            raise OutputDirError(f"the {what} {shown_path(output)} contains the {label} {shown_path(path)}; choose a "
                                 "folder outside it")
        if label not in lenient and _within(out, src):
            raise OutputDirError(f"the {what} {shown_path(output)} lies inside the {label} {shown_path(path)}; choose "
                                 "a folder outside it")


def _is_file(out: Path, path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names the file ``out`` (resolved): by its name after resolving, or as a hard link to it;
    False when ``path`` cannot name a file (:func:`_real`) or no such file exists (a name part over 255 bytes,
    ``[Errno 36] File name too long``, or a loop of links, ``[Errno 40]``, can never)."""
    src = _real(path)
    if src is None:
        return False
    if src == out:
        return True
    try:
        return os.path.samefile(out, src)
    except OSError:
        return False


def check_output_file(output: str | os.PathLike[str] | None, inputs: Mapping[str, str | os.PathLike[str] | None],
                      folders: Mapping[str, str | os.PathLike[str] | None] | None = None,
                      overwrite: bool = True, flag: str = "--overwrite") -> None:
    """Refuse an output file that is one of the input files (it would be replaced before being read in full
    by a later run, or lost when this one fails), that lies inside one of the input ``folders`` (label ->
    folder: a checkpoint, whose files are all read), that cannot be written as a file (an existing folder,
    a path under a file), or, unless ``overwrite``, that already exists (a file we may not have written;
    ``flag`` is what the error tells the user to pass): said before the run, not after it."""
    if not output:
        return
    out = _real_output(output, "output file")
    for label, path in inputs.items():  # one that names no file is not the output file (its check says it)
        if path and _is_file(out, path):
            raise OutputDirError(f"the output file {shown_path(output)} is the {label} {shown_path(path)}; write the "
                                 "output somewhere else")
    for label, folder in (folders or {}).items():
        if folder and (src := _real(folder)) is not None and _within(out, src):
            raise OutputDirError(f"the output file {shown_path(output)} lies inside the {label} {shown_path(folder)}; "
                                 "write the output somewhere else")
    if out.is_dir():
        raise OutputDirError(f"the output file {shown_path(output)} is a folder; name a file to write")
    if out.exists() and not out.is_file():  # the atomic write would replace it: not a file we wrote
        raise OutputDirError(f"the output file {shown_path(output)} is not a regular file (a pipe, socket or device); "
                             "name a file to write")
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise OutputDirError(f"the output file {shown_path(output)} cannot be written: {shown_path(above)} is not a "
                             "folder")
    if above is not None and not os.access(above, os.W_OK | os.X_OK):  # else found after the run, at its end
        raise OutputDirError(f"the output file {shown_path(output)} cannot be written: the folder "
                             f"{shown_path(above)} is read-only or not "
                             "yours to write in")
    if not overwrite and out.is_file():
        raise OutputDirError(f"the output file {shown_path(output)} exists; pass {flag} to replace it")


def appeared_during_run(output: str | os.PathLike[str]) -> str:
    """What to say of an output file that a write without replacing found (``atomic_file(replace=False)``): the run
    checked it absent at the start."""
    return f"the output file {shown_path(output)} was created by something else during the run and is left as it is"


@contextlib.contextmanager
def refusing_appeared(output: str | os.PathLike[str], flag: str) -> Iterator[None]:
    """Around a write of ``output`` without replacing (``atomic_file(replace=False)``) that keeps nothing when it
    fails: a file found there is an :class:`OutputDirError` saying so (:func:`appeared_during_run`) and that
    ``flag`` replaces it. Other errors, a FileExistsError of another path included, pass."""
    try:
        yield
    except FileExistsError as e:
        if e.filename is None or Path(e.filename) != Path(output):
            raise
        raise OutputDirError(f"{appeared_during_run(output)}; nothing was written (pass {flag} to replace it)"
                             ) from None


def partial_path(output: str | os.PathLike[str]) -> Path:
    """Where an interrupted run keeps what it has for ``output``: ``OUTPUT.partial``, or ``OUTPUT.partial-2``,
    ... when that exists (an earlier interrupted run's: nothing is replaced)."""
    path, n = Path(f"{os.fspath(output)}.partial"), 1
    while path.exists() or path.is_symlink():
        n += 1
        path = Path(f"{os.fspath(output)}.partial-{n}")
    return path


class PartialRows:
    """Rows of a long run (one JSON line per answer) appended to ``OUTPUT.partial`` (:func:`partial_path`) as
    they are made, so that what was computed outlives the run: a disk that fills up (at a row, or at the final
    write of ``OUTPUT``), Ctrl-C, a crash, ``kill -9``. The file is created at the first row; a row that cannot be
    written whole is cut off again (the file holds whole rows only) and the write error, naming the file, goes
    on. :meth:`discard` removes the file once ``OUTPUT`` holds every row; a file with no row is never left."""

    def __init__(self, output: str | os.PathLike[str]) -> None:
        self.output = output
        self.path: Path | None = None
        self.rows = 0
        self._fd = -1
        self._size = 0  # bytes of whole rows

    def append(self, text: str) -> None:
        raw = text.encode("utf-8")
        data = memoryview(raw)
        try:
            if self._fd < 0:
                Path(self.output).parent.mkdir(parents=True, exist_ok=True)  # as the output's own write does
                self.path = partial_path(self.output)
                # O_EXCL: an earlier run's file of that name appearing meanwhile is never written over
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
            while data:  # a write may be short (the last bytes that fit): the next one says why
                data = data[os.write(self._fd, data):]
            self._size += len(raw)  # here: Ctrl-C before these two lines cuts the row, the count stays true
            self.rows += 1
        except BaseException as e:  # Ctrl-C between two short writes too: no half row is left
            name = str(self.path if self.path is not None else self.output)
            self._cut()
            if isinstance(e, OSError):
                raise OSError(e.errno, e.strerror, name) from e
            raise

    def _cut(self) -> None:
        """After a failed write: truncate to the whole rows (freeing what the broken one took), or remove a file
        that has none."""
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._size)
        if self.rows == 0:
            self.discard()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        """Remove the file (its rows are in the output now, or there are none)."""
        self.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


# ---- the marker ----------------------------------------------------------------------------------------
def read_marker(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The marker of one of our output folders, or None for a folder we did not write."""
    file = Path(folder) / MARKER_FILE
    if not file.is_file():
        return None
    try:
        data = parse_json(file.read_text(encoding="utf-8"), file, ValueError)  # nested too deeply too: a ValueError
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict):  # ours (only we use that name) but damaged: start its list afresh
        return {"written_by": "qwenvl", "command": "unknown", "files": []}
    files = data.get("files")
    data["files"] = [f for f in files if isinstance(f, str)] if isinstance(files, list) else []
    return data


def is_ours(folder: str | os.PathLike[str]) -> bool:
    """Whether we wrote into ``folder`` (its marker says so): not one that a run only claimed, finding there all it
    holds (:func:`_claimed_only`; a run killed before writing leaves such a marker), so it is never deleted as ours."""
    marker = read_marker(folder)
    return marker is not None and not _claimed_only(Path(folder), marker)


def _write_marker(folder: Path, command: str, files: Iterable[str], found: Iterable[str] | None = None) -> None:
    body: dict[str, Any] = {"written_by": "qwenvl", "command": command,
                            "files": sorted(set(files) - {MARKER_FILE, LOCK_FILE})}
    if found is not None:  # a claim: what the folder held then (nothing of ours)
        body["found"] = sorted(found)
    atomic_write_text(folder / MARKER_FILE, json.dumps(body, indent=1) + "\n")


def _claimed_only(folder: Path, marker: Mapping[str, Any]) -> bool:
    """Whether ``marker`` is that of a run that claimed ``folder`` and wrote nothing into it: it lists no file of
    ours and the entries it found there are all the folder holds (besides our marker, lock and temporary names).
    Such a folder is not ours: it is as that run found it (empty, or with files we did not write)."""
    found = marker.get("found")
    if marker["files"] or not isinstance(found, list):  # files recorded, or a marker written another way: ours
        return False
    return set(_foreign_entries(folder)) <= {f for f in found if isinstance(f, str)}


def _lock_held(folder: Path) -> bool:
    """Whether a run (this process's too) holds ``folder``'s lock now: its claim of the folder is live."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # none (or a planted link): no run holds it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # another open of the file: refused while a run holds it
    except OSError:
        return True
    finally:
        os.close(fd)  # drops our shared lock, if we got it
    return False


def _unclaim(folder: Path) -> None:
    """Remove the marker of a run that claimed ``folder`` and wrote nothing into it (:func:`_claimed_only`), so
    that the folder is left as that run found it; one that names what the run wrote stays."""
    try:
        marker = read_marker(folder)
        if marker is not None and _claimed_only(folder, marker):
            (folder / MARKER_FILE).unlink()
    except OSError as e:  # the run's own error goes on; the next claim does not count such a marker anyway
        logger.warning("%s: could not remove %s: %s", folder, MARKER_FILE, e)


def record_files(folder: str | os.PathLike[str], names: Iterable[str], command: str = "qwenvl",
                 replace: bool = False) -> None:
    """Add ``names`` (top-level entries of ``folder`` that we wrote) to its marker, creating the marker;
    ``replace``: the marker lists exactly ``names`` (those it listed before are no longer ours to delete)."""
    root = Path(folder)
    marker = read_marker(root)
    old = marker["files"] if marker and not replace else []
    _write_marker(root, marker["command"] if marker else command, [*old, *names])


def _foreign_entries(folder: Path) -> list[str]:
    """Entries of a folder that are neither our marker, our lock nor our temporary names."""
    return sorted(p.name for p in folder.iterdir() if p.name not in (MARKER_FILE, LOCK_FILE)
                  and not is_temporary(p.name))


def _refuse_foreign(folder: Path, entries: list[str], flag: str) -> None:
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise OutputDirError(
        f"{folder} is not empty and was not written by qwenvl ({shown}); choose a new or empty folder, or pass "
        f"{flag} to write there anyway (only the files this command writes are replaced; nothing else is deleted)"
    )


# ---- the lock ------------------------------------------------------------------------------------------
@dataclass
class RunLock:
    """An exclusive lock on an output folder, held until :meth:`release`."""

    path: Path
    fd: int

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            if same_file(self.fd, self.path):
                self.path.unlink()
        except OSError as e:
            logger.warning("could not remove the lock file %s: %s", self.path, e)
        finally:
            self.close()

    def close(self) -> None:
        """Let the lock go and leave its file (a file naming another run is that run's)."""
        if self.fd >= 0:
            os.close(self.fd)  # drops the flock
            self.fd = -1


def _holder(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        data = parse_json(raw.decode("utf-8"), LOCK_FILE, ValueError) if raw.strip() else {}  # too deep: ValueError
    except (OSError, ValueError):
        data = {}
    return data if isinstance(data, dict) else {}


def _describe(holder: Mapping[str, Any]) -> str:
    if not holder:
        return "holder unknown"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"qwenvl {holder.get('command', '?')} started {holder.get('started', '?')}")


def _pid_alive(pid: object) -> TypeGuard[int]:  # True only for an int pid (not a bool: true would be pid 1)
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _started_after(pid: int, started: Any) -> bool:
    """Whether process ``pid`` started after ``started`` (a lock file's ISO time): then it is not the run that
    wrote the lock but a later process that got the dead run's pid (containers start their processes at the
    same few pids). False when that cannot be told (no ``/proc``, a malformed time)."""
    try:
        locked_at = datetime.datetime.fromisoformat(started).timestamp()
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime: clock ticks after boot
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text(encoding="utf-8").splitlines()
                    if line.startswith("btime "))
        process_start = boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, TypeError, IndexError, StopIteration):
        return False
    return process_start > locked_at + 2  # the lock's time and the boot time are whole seconds


def acquire_lock(folder: str | os.PathLike[str], command: str) -> RunLock:
    """Take ``folder``'s run lock or raise :class:`OutputDirError` naming the run that holds it. Stopped on the way
    (an error, Ctrl-C), it leaves no lock file of its own and no open one (:func:`_let_go`)."""
    path = Path(folder) / LOCK_FILE
    host = socket.gethostname()
    lock, taken = None, False  # taken: the lock file is ours (we hold its flock and take it over)
    try:
        for _attempt in range(20):
            try:  # O_NOFOLLOW: a planted symlink must not make us truncate its target
                lock = RunLock(path, os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644))
            except OSError as e:
                raise OutputDirError(f"cannot create the lock file {path}: {e.strerror}") from None
            try:
                fcntl.flock(lock.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # ENOLCK: NFS without locks
                    raise OutputDirError(f"cannot lock {path}: {e.strerror} (the filesystem of {folder} does not "
                                         "support file locks?); choose an output folder on a local disk") from None
                raise OutputDirError(f"{folder} is in use by another qwenvl run ({_describe(_holder(lock.fd))}); wait "
                                     "for it to finish or choose another output folder") from None
            if not same_file(lock.fd, path):  # the previous holder removed the file between our open and flock
                lock.close()
                continue
            previous = _holder(lock.fd)
            pid = previous.get("pid")
            if previous and pid != os.getpid():
                if previous.get("host") == host and _pid_alive(pid) and not _started_after(pid, previous.get("started")):
                    raise OutputDirError(
                        f"{folder} is locked by {_describe(previous)}, which is still running (this filesystem may not "
                        f"support locks); if no qwenvl run uses the folder, delete {path}")
                logger.warning("%s: taking over the lock of a run that is no longer running (%s)", folder,
                               _describe(previous))
            taken = True
            me = {"pid": os.getpid(), "host": host, "command": command,
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
            data = (json.dumps(me) + "\n").encode("utf-8")
            try:
                os.ftruncate(lock.fd, 0)
                if os.pwrite(lock.fd, data, 0) != len(data):  # the bytes that fit: the disk is full
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                os.fsync(lock.fd)
            except OSError as e:  # a full disk: said naming the lock file, which goes (the flock is ours)
                raise OSError(e.errno, e.strerror, str(path)) from None
            return lock
    except BaseException:
        _let_go(lock, taken, path)
        raise
    raise OutputDirError(f"could not lock {folder}: its lock file keeps changing; is another run starting there?")


def _let_go(lock: RunLock | None, taken: bool, path: Path) -> None:
    """On the way out of a failed or interrupted :func:`acquire_lock`: remove the lock file when it is ours
    (``taken``) or nobody's (empty, and no run holds it: one this run made, maybe before ``lock`` had it); a lock
    file naming a run is that run's (the next run takes it over if the run is gone)."""
    if lock is not None and taken:
        lock.release()
        return
    if lock is not None:
        lock.close()
    try:
        found = RunLock(path, os.open(path, os.O_RDWR | os.O_NOFOLLOW))
    except OSError:  # none there (or a planted link, not ours)
        return
    try:
        fcntl.flock(found.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # refused while a run holds it
        if not _holder(found.fd):
            found.release()
    except OSError:
        pass
    finally:
        found.close()


@contextlib.contextmanager
def claim_output(folder: str | os.PathLike[str], command: str, overwrite: bool = False,
                 flag: str = "--overwrite") -> Iterator[Path]:
    """Hold ``folder`` for one run of ``command``: create it (or accept it empty or ours; a foreign non-empty
    folder needs ``overwrite``), take its lock, mark it ours and clean what a killed run left there.
    A run that fails (an error, Ctrl-C) before writing anything into the folder leaves it as it found it: one this
    call created is removed, one that was empty is left empty, one with files we did not write keeps just those
    (our marker and lock go). A run that did write there (files its marker records, or entries the folder did not
    hold before) keeps the marker. The marker of a killed run that wrote nothing (:func:`_claimed_only`) does not
    make the folder ours."""
    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise OutputDirError(f"the output folder {root} exists and is not a folder")
    if root.is_symlink() and not root.exists():  # mkdir would fail on the link's name; its target is not ours
        raise OutputDirError(f"the output folder {root} is a symbolic link to {os.readlink(root)}, which does not "
                             "exist; create that folder or choose another")
    above = next((p for p in root.parents if p.exists()), None)
    if above is not None and not above.is_dir():  # mkdir: "[Errno 20] Not a directory"
        raise OutputDirError(f"the output folder {root} cannot be created: {above} is a file, not a folder")
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    try:
        lock = acquire_lock(root, command)
    except BaseException:  # no room for the lock file, Ctrl-C: a folder made for this run goes again (acquire_lock
        if created:  # left nothing there; rmdir keeps it when another run, which may have made it too, holds it)
            with contextlib.suppress(OSError):
                root.rmdir()
        raise
    failed, claimed, marking = True, False, False
    try:
        marker = read_marker(root)
        if marker is not None and _claimed_only(root, marker):  # a killed run's claim: the folder is not ours
            marker = None
        if marker is None:
            marking = True  # from here a failure removes our marker (a killed run's too) unless a file is recorded
            entries = _foreign_entries(root)
            if entries and not overwrite:
                _refuse_foreign(root, entries, flag)
            _write_marker(root, command, [], found=entries)
        claimed = True
        cleaned = clean_temporary(root)
        if cleaned:
            logger.warning("%s: cleaned %d temporary entr%s left by an interrupted run", root, len(cleaned),
                           "y" if len(cleaned) == 1 else "ies")
        yield root
        failed = False
    finally:
        try:
            if failed and claimed:  # Ctrl-C or an error while a write, a swap or a delete was under way: finish it
                _clean_quietly(root)
            if failed and marking:  # before the lock goes: after it, the marker may be another run's
                _unclaim(root)
        finally:
            lock.release()
            if failed and created:
                _remove_if_unused(root)


def _clean_quietly(root: Path) -> None:
    """:func:`clean_temporary` on the way out of a failed run: a failure here must not hide the run's own error
    (the next run in the folder cleans what is left)."""
    if not root.is_dir():  # removed during the run (the run's error says so): nothing of ours is left to clean
        return
    try:
        clean_temporary(root)
    except Exception as e:  # noqa: BLE001 - logged, and the run's own error goes on
        logger.warning("%s: could not clean temporary entries: %s", root, e)


def _remove_if_unused(root: Path) -> None:
    """Remove a folder made for a run that failed before any output: it holds nothing but our marker and lock."""
    own = {MARKER_FILE, LOCK_FILE}
    try:
        if all(p.name in own for p in root.iterdir()):
            (root / MARKER_FILE).unlink(missing_ok=True)
            (root / LOCK_FILE).unlink(missing_ok=True)
            root.rmdir()
    except OSError:
        pass


# ---- publishing files ----------------------------------------------------------------------------------
@contextlib.contextmanager
def output_files(folder: str | os.PathLike[str], command: str = "save_pretrained", overwrite: bool = False,
                 fsync: bool = True) -> Iterator[Path]:
    """Yield a staging folder; when the block succeeds its entries replace their namesakes in ``folder``.

    - ``folder`` missing: built whole in a hidden sibling and renamed in (complete or absent).
    - ``folder`` empty or ours: entries are renamed in one by one, ``config.json`` removed first and put last;
      weight files the marker lists as ours that this save does not rewrite are deleted afterwards (so the
      folder never mixes two layouts). Nothing else in the folder is touched.
    - ``folder`` not ours and not empty: refused unless ``overwrite``; then, if it holds weight files this
      save would not replace, refused too (the result would mix two checkpoints).
    A failure inside the block leaves ``folder`` exactly as it was.
    """
    root = Path(folder)
    if not root.exists():
        with atomic_dir(root, fsync=fsync) as tmp:
            yield tmp
            _write_marker(tmp, command, [p.name for p in tmp.iterdir()])
        return
    if not root.is_dir():
        raise OutputDirError(f"the output folder {root} exists and is not a folder")
    marker = read_marker(root)
    if marker is not None and _claimed_only(root, marker) and not _lock_held(root):  # a killed run's claim
        marker = None
    entries = _foreign_entries(root)
    if marker is None and entries and not overwrite:
        _refuse_foreign(root, entries, "overwrite=True")
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".publish.qwenvl-tmp-"))
    try:
        yield staging
        _publish(root, staging, marker, command, fsync)
    except (OSError, RuntimeError) as e:  # a full disk: said as one line naming the folder
        named = write_error(e, root, staging)
        if named is None:
            raise
        raise named from e
    finally:
        remove_path(staging)


def _publish(root: Path, staging: Path, marker: dict[str, Any] | None, command: str, fsync: bool) -> None:
    new = sorted((p.name for p in staging.iterdir()), key=lambda n: (n == LAST, n))
    ours = set(marker["files"]) if marker else set()
    stale = [n for n in sorted(ours - set(new)) if WEIGHT_FILE_RE.match(n) and (root / n).exists()]
    foreign = [p.name for p in root.iterdir() if WEIGHT_FILE_RE.match(p.name) and p.name not in ours
               and p.name not in new]
    if foreign:
        raise OutputDirError(f"{root} holds weight files this save would not replace ({', '.join(sorted(foreign))}); "
                             "the folder would mix two checkpoints: remove them or choose another folder")
    if fsync:
        fsync_tree(staging)
    kept_command = marker["command"] if marker else command
    # Ctrl-C, SIGTERM, SIGHUP wait until every file is in place: stopped mid-move, the folder had no config.json
    with signals_held(str(root)):
        _write_marker(root, kept_command, ours | set(new))  # a crash from here on leaves only recorded files
        if LAST in new:
            (root / LAST).unlink(missing_ok=True)
        for i, name in enumerate(new):
            target = root / name
            if (staging / name).is_dir() and target.is_dir():
                remove_path(target)
            os.replace(staging / name, target)
            if i == 0:
                fault_point("publish.moving")
        for name in stale:
            remove_path(root / name)
        try:  # the save is complete: a marker still naming the removed files (a full disk here) is harmless
            _write_marker(root, kept_command, (ours - set(stale)) | set(new))
        except OSError as e:
            logger.warning("%s is saved, but its list of files in %s could not be updated: %s", root, MARKER_FILE, e)
    if fsync:
        fsync_dir(root)
