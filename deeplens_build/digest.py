"""sha256 of files, trees and JSON values: the identities the cache, the manifest and verify rely on."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from deeplens_build.files import write_atomic

_CHUNK = 1 << 20


_Identity = tuple[int, int, int, int, int]
_KNOWN: dict[_Identity, str] = {}
_USED: set[_Identity] = set()
IDENTIFIED = "deeplens_build.file_sha256"
"""The audit event (PEP 578) :func:`file_sha256` raises with each path it identifies: a file known from the stat
index is never opened, yet the build depends on it (``uptodate`` listens)."""
RACY_SECONDS = 2.0
"""A file changed this recently, on a file system with whole-second times, may change again without its times
changing: not remembered across builds (git's "racily clean" entries)."""
RACY_SECONDS_FINE = 0.01
"""The same for file systems with sub-second times (their times say so: not a whole second)."""


def file_sha256(path: Path) -> str:
    """The file's sha256, read once: the cache keys, the recipe and the manifest all ask for the same files,
    which may be hundreds of MB. Keyed by device, inode, size and change times (not by path, so a cache entry
    renamed into place is not read again); a changed file gets a new change time and is read again. With
    :func:`remembered`, what was read in earlier builds is known too (a stat index, like git's and ninja's)."""
    sys.audit(IDENTIFIED, path)
    identity = stat_identity(os.stat(path))
    if (known := _KNOWN.get(identity)) is None:
        known = _KNOWN[identity] = _read_sha256(path)
    _USED.add(identity)
    return known


def written(path: Path, sha256: str) -> None:
    """Record the digest of a file this process just wrote and hashed as it went, so nothing reads it again."""
    identity = stat_identity(os.stat(path))
    _KNOWN[identity] = sha256
    _USED.add(identity)


def linked(before: _Identity, after: _Identity) -> None:
    """The file ``before`` identified gained or lost a name and is now ``after``: what is known of its bytes is
    known still. A link changes the inode's change time and nothing else; if more changed (a write meanwhile),
    the file is read again."""
    if (known := _KNOWN.get(before)) is not None and after[:4] == before[:4]:
        _KNOWN[after] = known
        if before in _USED:  # the build depends on the file still: remember it as it is now
            _USED.add(after)


class BackgroundSha256:
    """sha256 on a second thread: hashlib releases the GIL on large blocks, so hashing overlaps the reading,
    decompressing or compressing that produces them (verify and the bundle stage run at the speed of the
    slower of the two, not of their sum). Blocks must be ``bytes`` nobody modifies afterwards."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._blocks: queue.Queue[bytes | None] = queue.Queue(maxsize=8)  # at most 8 blocks in flight
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (block := self._blocks.get()) is not None:
            self._digest.update(block)

    def update(self, block: bytes) -> None:
        self._blocks.put(block)

    def hexdigest(self) -> str:
        """The digest of every block given; call once, at the end."""
        self._blocks.put(None)
        self._thread.join()
        return self._digest.hexdigest()


def stat_identity(stat: os.stat_result) -> _Identity:
    """What says a file is unchanged without reading it: device, inode, size, modification and change times."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


@contextlib.contextmanager
def remembered(index: Path, *, trust: bool = True) -> Iterator[None]:
    """Know the digests an earlier build stored in ``index`` (unless not ``trust``), and store this build's.

    Only the files this build asked about are stored, so the index stays the size of one build.
    """
    if trust:
        try:
            stored = json.loads(index.read_text())
            _KNOWN.update({tuple(int(part) for part in key.split(":")): value for key, value in stored.items()})
        except (OSError, ValueError):
            pass  # no index yet, or a damaged one: everything is read once
    _USED.clear()
    try:
        yield
    finally:
        if _USED:  # a build that stopped before reading anything leaves no trace
            _store(index)


def settled(identity: Sequence[int], now: int) -> bool:
    """Whether a file of this :func:`stat_identity` last changed long enough before ``now`` (ns) for the same
    identity to mean the same bytes later on (git's "racily clean" rule)."""
    def old(stamp: int) -> bool:
        margin = RACY_SECONDS if stamp % 1_000_000_000 == 0 else min(RACY_SECONDS, RACY_SECONDS_FINE)
        return stamp < now - int(margin * 1e9)

    return old(identity[3]) and old(identity[4])


def _store(index: Path) -> None:
    now = time.time_ns()
    entries = {":".join(map(str, identity)): _KNOWN[identity] for identity in _USED if settled(identity, now)}
    write_atomic(index, json.dumps(entries, sort_keys=True))


def _read_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_sha256(root: Path, files: Iterable[str]) -> str:
    """Digest of a file tree: each relative path with its content digest, in sorted order."""
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(f"{rel}\0{file_sha256(root / rel)}\n".encode())
    return digest.hexdigest()


_NOT_CODE = ("__pycache__", ".pyc", ".pyo")


def code_sha256(code: object) -> str:
    """Digest of the code ``code`` runs, so a cache key follows an edit that leaves the version as it was (a
    plugin under development): a package's files (every one under its folder but bytecode), a module's file, or
    for any other object (a plugin registered as an instance) the file of the module defining its class."""
    import inspect

    module = code if inspect.ismodule(code) else inspect.getmodule(code if inspect.isclass(code) else type(code))
    source = getattr(module, "__file__", None)
    if source is None:  # defined at the interactive prompt or in C: nothing on disk to follow
        return json_sha256({"module": getattr(module, "__name__", repr(code))})
    path = Path(source)
    if path.name != "__init__.py":
        return file_sha256(path)
    root = path.parent
    files = [p.relative_to(root).as_posix() for p in root.rglob("*")
             if p.is_file() and not any(part.endswith(_NOT_CODE) for part in p.relative_to(root).parts)]
    return tree_sha256(root, files)


def canonical_json(value: Any) -> bytes:
    """One byte sequence per JSON value: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def json_sha256(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()
