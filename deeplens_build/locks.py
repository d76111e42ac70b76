"""Advisory locks (``flock``): they serialize the few steps that must not interleave between concurrent builds
sharing a work folder, and they tell a live build's scratch files from those a killed build left behind.

The kernel drops a process's locks when it dies, however it dies, so "nobody holds the lock" is exactly
"its writer is gone" — no pid files, no timeouts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

OWNER = ".owner"
"""The file inside a scratch folder whose lock its builder holds."""


@contextlib.contextmanager
def held(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the duration of the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def hold(fd: int) -> None:
    """Lock an open file for as long as it stays open: it is in use."""
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def abandoned(path: Path) -> bool:
    """Whether nobody holds ``path``'s lock: the build that wrote it is gone. A missing file is not abandoned."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


@contextlib.contextmanager
def owned_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """A fresh scratch folder under ``parent``, marked as in use until the block ends, then removed
    (unless the block moved it away)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    # locked before it takes its name: nobody may find an owner file that is not yet locked
    fd, locking = tempfile.mkstemp(dir=folder)
    try:
        hold(fd)
        os.rename(locking, folder / OWNER)
        yield folder
    finally:
        os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)


def remove_abandoned_folders(parent: Path, prefix: str) -> None:
    """Remove the scratch folders under ``parent`` whose builder is gone (killed mid-build)."""
    for folder in parent.glob(f"{prefix}*"):
        if folder.is_dir() and (abandoned(folder / OWNER) or not (folder / OWNER).exists() and _old(folder)):
            shutil.rmtree(folder, ignore_errors=True)


def remove_abandoned_files(parent: Path, pattern: str) -> None:
    """Remove the files under ``parent`` matching ``pattern`` whose writer (who locks them) is gone."""
    for path in parent.glob(pattern):
        if path.is_file() and abandoned(path):
            path.unlink(missing_ok=True)


def _old(folder: Path) -> bool:
    # a folder made a moment ago may not have its owner file yet: only an old one without it was abandoned
    try:
        return time.time() - folder.stat().st_mtime > 60
    except FileNotFoundError:
        return False

