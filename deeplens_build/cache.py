"""Content-addressed stage cache: an unchanged input is never rebuilt.

An entry is ``<root>/<stage>/<key>/``: the files the stage wrote plus ``result.json``, its typed result and the
sha256 of every file it holds. The key is the sha256 of everything the stage's output depends on (input
digests, settings, tool versions). Paths inside an entry are stored relative to it, so a cache folder can be
copied between machines.

Builds sharing a work folder run concurrently, so a published entry is immutable: it is built in a scratch
folder and renamed into place only if no valid entry is there yet (the loser of that race uses the winner's
entry, under a lock per stage); an entry whose files no longer match their digests (edited, truncated) is
rebuilt, never reused; scratch folders of a killed build are removed by the next one.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from deeplens_build import locks
from deeplens_build.archive import Extractor, UnsafeMember, member_parts, open_tar
from deeplens_build.digest import file_sha256, json_sha256

T = TypeVar("T")

_RESULT = "result.json"
_ENTRY_PREFIX = "@entry/"
_SCRATCH = ".build-"
_TRASH = ".trash-"
_PUBLISH_LOCK = ".publish.lock"
CACHE_FORMAT = 2
"""Bump when a stage's result type changes shape, so old entries are ignored instead of misread."""


TOOL_CACHE_VARIABLES = ("XDG_CACHE_HOME", "KERAS_HOME")
"""Where the tools we drive write on their own: onnxruntime's telemetry keeps a device id under
$XDG_CACHE_HOME (else ~/.cache) at import, and Keras writes $KERAS_HOME/keras.json (else ~/.keras)."""


def tool_cache_environment(work_dir: Path) -> dict[str, str]:
    """Point the tools' own caches into the work folder, unless the user already chose where they go."""
    return {name: os.environ.get(name) or str(work_dir / "tool-cache" / name.lower()) for name in TOOL_CACHE_VARIABLES}


class Cache:
    def __init__(self, root: Path, *, reuse: bool = True, shared: SharedCache | None = None):
        """:param reuse: False (``--no-cache``) rebuilds every stage, and stores the fresh results.
        :param shared: a cache other machines fill too (CI), asked after this one and before building."""
        self.root = root
        self.reuse = reuse
        self.shared = shared

    def key(self, stage: str, material: Mapping[str, Any]) -> str:
        return json_sha256({"stage": stage, "format": CACHE_FORMAT, "material": material})

    def stage(self, stage: str, material: Mapping[str, Any], result_type: type[T],
              build: Callable[[Path], T]) -> tuple[T, bool]:
        """Return the cached result of ``stage`` for ``material``, or ``build`` it into a fresh folder.

        :return: the result, and whether it came from the cache.
        """
        folder = self.root / stage
        entry = folder / self.key(stage, material)
        adapter = TypeAdapter(result_type)
        if self.reuse and (cached := _load(adapter, entry)) is not None:
            return cached, True
        folder.mkdir(parents=True, exist_ok=True)
        locks.remove_abandoned_folders(folder, _SCRATCH)
        for trash in folder.glob(f"{_TRASH}*"):  # only ever left by a build killed while discarding an entry
            shutil.rmtree(trash, ignore_errors=True)
        key = entry.name
        with locks.owned_folder(folder, _SCRATCH) as scratch:
            # a shared entry counts only once every file matches the digests its result.json records
            shared = (self.reuse and self.shared is not None and self.shared.fetch(stage, key, scratch)
                      and _load(adapter, scratch) is not None)
            if not shared:
                result = build(_emptied(scratch))
                data = _relative(adapter.dump_python(result, mode="json"), f"{scratch}{os.sep}")
                files = {rel: file_sha256(scratch / rel) for rel in _files(scratch)}
                (scratch / _RESULT).write_text(json.dumps({"result": data, "files": files}, indent=1,
                                                          sort_keys=True), encoding="utf-8")
            with locks.held(folder / _PUBLISH_LOCK):
                if (winner := _load(adapter, entry)) is not None:
                    return winner, False  # a concurrent build published the same entry first
                if entry.exists():  # damaged: move it aside in one step, so no reader sees half of it
                    trash = Path(tempfile.mkdtemp(prefix=_TRASH, dir=folder))
                    os.replace(entry, trash / "entry")
                    shutil.rmtree(trash, ignore_errors=True)
                os.replace(scratch, entry)
        loaded = _load(adapter, entry)
        assert loaded is not None, f"cache entry {entry} vanished after publishing"
        if not shared and self.shared is not None:
            self.shared.store(stage, key, entry)
        return loaded, bool(shared)


def _emptied(scratch: Path) -> Path:
    """``scratch`` without what a rejected shared entry left in it (its owner file stays)."""
    for path in scratch.iterdir():
        if path.name != locks.OWNER:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return scratch


class SharedCache:
    """Stage entries shared between machines in S3 (``[build] cache = "s3://BUCKET/PREFIX"`` or ``--cache``).

    An entry is uploaded as one tar object, after it was published here complete; a download is extracted with
    the same checks as any archive and used only when every file matches the digests its ``result.json``
    records, so a corrupt or truncated object is discarded and the stage rebuilt. Trust: whoever can write the
    prefix can write entries whose files and digests agree — give the prefix the same trust as the build.
    A shared cache never fails a build: an unreachable bucket is a warning and a local build.
    """

    def __init__(self, uri: str, warn: Callable[[str], None], client: Any = None):
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        self.uri, self.bucket, self.prefix, self.warn = uri, bucket, prefix.strip("/"), warn
        self.unreachable = False  # said once, then the rest of the build does without it
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": 5}))
        self.client = client

    def _object(self, stage: str, key: str) -> str:
        return "/".join(part for part in (self.prefix, f"v{CACHE_FORMAT}", stage, f"{key}.tar") if part)

    def fetch(self, stage: str, key: str, scratch: Path) -> bool:
        """Download the entry into ``scratch``; whether there was one that extracted cleanly."""
        from botocore.exceptions import BotoCoreError, ClientError

        if self.unreachable:
            return False
        name = self._object(stage, key)
        download = scratch / ".shared.tar"
        try:
            self.client.download_file(self.bucket, name, str(download))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey"):
                self.warn(f"shared cache {self.uri}: cannot read {name} ({exc}); building {stage} here")
            return False
        except BotoCoreError as exc:
            self.unreachable = True
            self.warn(f"shared cache {self.uri}: cannot reach it ({exc}); building without it")
            return False
        try:
            with open_tar(download, mode="r:") as tar, Extractor(scratch / ".shared") as out:
                for member in tar:
                    out.add(tar, member, member_parts(member))
        except (UnsafeMember, tarfile.TarError, OSError, EOFError) as exc:
            self.warn(f"shared cache {self.uri}: {name} is damaged ({exc}); building {stage} here")
            return False
        finally:
            download.unlink(missing_ok=True)
        for path in (scratch / ".shared").iterdir():
            os.replace(path, scratch / path.name)
        (scratch / ".shared").rmdir()
        return True

    def store(self, stage: str, key: str, entry: Path) -> None:
        """Upload a complete entry (never a half one: ``entry`` was published here first)."""
        from botocore.exceptions import BotoCoreError, ClientError

        if self.unreachable:
            return
        name = self._object(stage, key)
        with tempfile.TemporaryDirectory(prefix=".upload-", dir=entry.parent) as scratch:
            packed = Path(scratch) / "entry.tar"
            with tarfile.open(packed, "w", format=tarfile.PAX_FORMAT) as tar:
                for rel in _files(entry):
                    tar.add(entry / rel, arcname=rel, recursive=False)
            try:
                self.client.upload_file(str(packed), self.bucket, name)  # checked by its files' digests on download
            except (ClientError, BotoCoreError) as exc:
                self.warn(f"shared cache {self.uri}: cannot store {name} ({exc}); other machines will build it")


def _load(adapter: TypeAdapter[T], entry: Path) -> T | None:
    """The entry's result, or None when it is missing, unreadable, or a file no longer matches its digest.
    A loaded entry's ``result.json`` gets a new modification time: ``prune`` removes the least recently used."""
    try:
        recorded = json.loads((entry / _RESULT).read_text(encoding="utf-8"))
        files = recorded["files"]
        if any(file_sha256(entry / rel) != sha256 for rel, sha256 in files.items()):
            return None
        result = adapter.validate_python(_absolute(recorded["result"], entry))
        os.utime(entry / _RESULT)
        return result
    except (OSError, ValueError, KeyError, TypeError, ValidationError):
        return None


@dataclass(frozen=True)
class EntryInfo:
    stage: str
    path: Path
    size: int
    used: float
    """When it was last built or reused (seconds since the epoch)."""


def entries(root: Path) -> list[EntryInfo]:
    """Every published entry of the cache at ``root``, least recently used first."""
    found = []
    for result in root.glob(f"*/*/{_RESULT}"):
        entry = result.parent
        if entry.name.startswith("."):
            continue
        size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
        found.append(EntryInfo(stage=entry.parent.name, path=entry, size=size, used=result.stat().st_mtime))
    return sorted(found, key=lambda e: e.used)


def prune(root: Path, max_size: int) -> list[EntryInfo]:
    """Remove the least recently used entries until the cache holds at most ``max_size`` bytes.

    Each removal is a rename out of sight under the stage's publish lock, so a build never sees half an entry;
    a build that was about to reuse a removed entry builds it again. :return: what was removed.
    """
    found = entries(root)
    total = sum(e.size for e in found)
    removed = []
    for entry in found:
        if total <= max_size:
            break
        with locks.held(entry.path.parent / _PUBLISH_LOCK):
            trash = Path(tempfile.mkdtemp(prefix=_TRASH, dir=entry.path.parent))
            os.replace(entry.path, trash / "entry")
            shutil.rmtree(trash, ignore_errors=True)
        total -= entry.size
        removed.append(entry)
    return removed


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != locks.OWNER)


def _relative(value: Any, prefix: str) -> Any:
    if isinstance(value, str) and value.startswith(prefix):
        return _ENTRY_PREFIX + value[len(prefix):]
    if isinstance(value, dict):
        return {k: _relative(v, prefix) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v, prefix) for v in value]
    return value


def _absolute(value: Any, entry: Path) -> Any:
    if isinstance(value, str) and value.startswith(_ENTRY_PREFIX):
        return str(entry / value[len(_ENTRY_PREFIX):])
    if isinstance(value, dict):
        return {k: _absolute(v, entry) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolute(v, entry) for v in value]
    return value
