"""sha256 of files, trees and JSON values: the identities the cache, the manifest and verify rely on."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


_KNOWN: dict[tuple[int, int, int, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """The file's sha256, read once per build: the cache keys, the recipe and the manifest all ask for the same
    files, which may be hundreds of MB. Keyed by device, inode, size and change times (not by path, so a cache
    entry renamed into place is not read again); a changed file gets a new change time and is read again."""
    stat = os.stat(path)
    identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if (known := _KNOWN.get(identity)) is None:
        known = _KNOWN[identity] = _read_sha256(path)
    return known


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


def canonical_json(value: Any) -> bytes:
    """One byte sequence per JSON value: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def json_sha256(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()
