"""Write an output folder all at once: fill a hidden sibling folder, then rename it into place.

A crash or an exception mid-write leaves the destination as it was (absent, or the previous
output when overwriting) and removes the partial sibling, so no reader ever sees half a model.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compressor.errors import UsageError


def check_destination(dest: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """The destination as an absolute path, after refusing what must not be replaced.

    An absent or empty folder is always fine; a non-empty folder only with ``overwrite``;
    a file never.
    """
    path = Path(dest).expanduser().absolute()
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise UsageError(f"output {path} exists and is not a folder")
        if not overwrite and any(path.iterdir()):
            raise UsageError(f"output folder {path} exists and is not empty; choose another or pass --overwrite")
    return path


@contextmanager
def atomic_dir(dest: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``dest``; on success it becomes ``dest``.

    The temporary folder is in the same parent so that the final step is a rename on one
    file system. When ``dest`` already exists (empty, or non-empty with ``overwrite``) it is
    moved aside first and deleted only after the new folder is in place.
    On any exception (KeyboardInterrupt included) the temporary folder is removed and the
    exception propagates.
    """
    path = check_destination(dest, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp) so the folder gets the user's umask rather than mode 0700.
    tmp = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        # Checked again: something may have appeared while the folder was being written.
        check_destination(path, overwrite)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, dest: Path) -> None:
    if not (dest.exists() or dest.is_symlink()):
        tmp.rename(dest)
        return
    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:12]}"
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
