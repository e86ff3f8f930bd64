"""Write an output folder all at once: fill a hidden sibling folder, then rename it into place.

A crash or an exception mid-write leaves the destination as it was (absent, or the previous
output when overwriting) and removes the partial sibling, so no reader ever sees half a model.

A process killed outright (SIGKILL, a power cut) cannot remove its siblings. Every hidden sibling
this module names, ``.NAME.KIND-HOST-PID-RANDOM``, says which process on which machine made it,
so the next run on the same destination removes those whose process is gone
(:func:`remove_stale`), and puts back an earlier output a killed run had moved aside.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from compressor.errors import CompressError, OutOfResourcesError, UsageError

log = logging.getLogger(__name__)

# errno values that mean the disk (or the user's share of it) is full
DISK_FULL = frozenset(n for n in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG) if n is not None)
# errno values that mean the output path cannot be written there, whatever the disk holds
NOT_WRITABLE = frozenset((errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EEXIST))
SCRATCH_KINDS = ("partial", "old", "spill", "gptq")  # the hidden siblings this package writes beside an output


def output_error(e: OSError, where: str | os.PathLike[str]) -> CompressError | None:
    """What an OSError met while writing ``where`` means to a user: a full disk or quota is
    :class:`OutOfResourcesError` (exit 5), a path that cannot be written (permissions, a read-only
    file system, a file where a folder should be) :class:`UsageError` (exit 2). None for anything
    else (an input/output error is no full disk): the caller lets the OSError go on as it is."""
    reason = e.strerror or str(e)
    if e.errno in DISK_FULL:
        return OutOfResourcesError(f"out of disk space writing {where}: {reason}")
    if e.errno in NOT_WRITABLE:
        return UsageError(f"cannot write {where}: {reason}")
    return None


def raise_output_error(e: OSError, where: str | os.PathLike[str]) -> NoReturn:
    """In an ``except OSError`` block: raise what :func:`output_error` makes of ``e``, else ``e``."""
    error = output_error(e, where)
    if error is None:
        raise e
    raise error from e


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def scratch_prefix(dest: str | os.PathLike[str], kind: str) -> str:
    """The name, up to its random end, of a hidden sibling of ``dest`` that this process writes:
    ``.NAME.KIND-HOST-PID-`` (``kind`` one of :data:`SCRATCH_KINDS`)."""
    if kind not in SCRATCH_KINDS:
        raise ValueError(f"unknown kind of scratch folder {kind!r}")
    return f".{Path(dest).name}.{kind}-{_host_tag()}-{os.getpid()}-"


def _process_gone(pid: int) -> bool:
    """True only when no process ``pid`` exists on this machine. Where that cannot be told
    (Windows, where os.kill would end the process), False: the sibling is left alone."""
    if os.name == "nt" or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: another user's process, alive
        return False
    return False


def remove_stale(dest: str | os.PathLike[str]) -> list[Path]:
    """Remove the hidden siblings of ``dest`` left by processes of this machine that are gone,
    and return them. An earlier output that such a run had moved aside (``old``) is put back
    when ``dest`` is absent. Siblings of live processes, of other machines, or named otherwise
    are left as they are; a sibling that cannot be removed is left too (this is tidying, not a
    precondition of the run)."""
    path = Path(dest).expanduser().absolute()
    pattern = re.compile(rf"\.{re.escape(path.name)}\.({'|'.join(SCRATCH_KINDS)})-([0-9a-f]{{8}})-([0-9]+)-.+")
    host = _host_tag()
    try:
        siblings = sorted(path.parent.iterdir())
    except OSError:
        return []
    removed = []
    for sibling in siblings:
        match = pattern.fullmatch(sibling.name)
        if match is None or match[2] != host or not _process_gone(int(match[3])):
            continue
        try:
            if match[1] == "old" and not (path.exists() or path.is_symlink()):
                sibling.rename(path)
                log.warning("put back %s, which a run that was killed (pid %s) had moved aside", path, match[3])
                continue
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling)
            else:
                sibling.unlink()
        except OSError as e:
            if sibling.exists() or sibling.is_symlink():  # else another run removed it first
                log.warning("cannot remove %s, left by a run that was killed: %s", sibling, e)
            continue
        log.info("removed %s, left by a run that was killed (pid %s)", sibling.name, match[3])
        removed.append(sibling)
    return removed


def refuse_overlap(dest: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None]) -> None:
    """UsageError when the output ``dest`` is one of ``inputs``, lies inside one, or holds one:
    writing it would replace or delete what the run reads."""
    out = Path(dest).expanduser().resolve()
    for source in inputs:
        if source is None:
            continue
        src = Path(source).expanduser().resolve()
        if out == src:
            raise UsageError(f"the output {dest} is the input {source}; choose another output folder")
        if src in out.parents:
            raise UsageError(f"the output {dest} lies inside the input {source}; choose a folder outside it")
        if out in src.parents:
            raise UsageError(f"the output {dest} holds the input {source}; choose a folder that does not")


def check_destination(dest: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """The destination as an absolute path, after refusing what must not be replaced.

    An absent or empty folder is always fine; a non-empty folder only with ``overwrite``;
    a file never. What killed runs left beside it is removed first (:func:`remove_stale`): their
    space is free before this run needs it, and an output they had moved aside is back.
    """
    path = Path(dest).expanduser().absolute()
    remove_stale(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise UsageError(f"output {path} exists and is not a folder")
        if not overwrite and any(path.iterdir()):
            raise UsageError(f"output folder {path} exists and is not empty; choose another or pass --overwrite")
    # The folder that will hold it (or the nearest one there is, which will hold what is made):
    # a file there, or a folder this user cannot write, fails now rather than after the run.
    holder = path.parent
    while not (holder.exists() or holder.is_symlink()) and holder != holder.parent:
        holder = holder.parent
    if not holder.is_dir():
        raise UsageError(f"cannot write {path}: {holder} is not a folder")
    if not os.access(holder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {path}: {holder} is not writable")
    return path


@contextmanager
def atomic_dir(dest: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``dest``; on success it becomes ``dest``.

    The temporary folder is in the same parent so that the final step is a rename on one
    file system. When ``dest`` already exists (empty, or non-empty with ``overwrite``) it is
    moved aside first and deleted only after the new folder is in place.
    On any exception (KeyboardInterrupt included) the temporary folder is removed and the
    exception propagates; an OSError of a full disk as :class:`OutOfResourcesError`, and one met
    creating the folder as :func:`output_error` says.
    """
    path = check_destination(dest, overwrite)
    # mkdir (not mkdtemp) so the folder gets the user's umask rather than mode 0700.
    tmp = path.parent / f"{scratch_prefix(path, 'partial')}{uuid.uuid4().hex[:12]}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise_output_error(e, path)
    try:
        yield tmp
        # Checked again: something may have appeared while the folder was being written.
        check_destination(path, overwrite)
        _move_into_place(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            raise OutOfResourcesError(f"out of disk space writing {path}: {e.strerror or e}") from e
        raise


@contextmanager
def scratch_dir(dest: str | os.PathLike[str], kind: str) -> Iterator[Path]:
    """A hidden working folder beside ``dest`` (on its disk), removed on the way out whatever
    happens, and by a later run if this process is killed (:func:`remove_stale`). A full disk
    met inside (in this folder or elsewhere) comes out as :class:`OutOfResourcesError`."""
    path = Path(dest).expanduser().absolute()
    folder = path.parent / f"{scratch_prefix(path, kind)}{uuid.uuid4().hex[:12]}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=0o700)
    except OSError as e:
        raise_output_error(e, path)
    try:
        yield folder
    except OSError as e:
        if e.errno in DISK_FULL:
            raise OutOfResourcesError(f"out of disk space writing beside {path}: {e.strerror or e}") from e
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _move_into_place(tmp: Path, dest: Path) -> None:
    if not (dest.exists() or dest.is_symlink()):
        tmp.rename(dest)
        return
    old = dest.parent / f"{scratch_prefix(dest, 'old')}{uuid.uuid4().hex[:12]}"
    dest.rename(old)
    try:
        tmp.rename(dest)
    except BaseException:
        old.rename(dest)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()
