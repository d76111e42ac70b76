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
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from deeplens_build import locks
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
    def __init__(self, root: Path, *, reuse: bool = True):
        """:param reuse: False (``--no-cache``) rebuilds every stage, and stores the fresh results."""
        self.root = root
        self.reuse = reuse

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
        with locks.owned_folder(folder, _SCRATCH) as scratch:
            result = build(scratch)
            data = _relative(adapter.dump_python(result, mode="json"), f"{scratch}{os.sep}")
            files = {rel: file_sha256(scratch / rel) for rel in _files(scratch)}
            (scratch / _RESULT).write_text(json.dumps({"result": data, "files": files}, indent=1, sort_keys=True),
                                           encoding="utf-8")
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
        return loaded, False


def _load(adapter: TypeAdapter[T], entry: Path) -> T | None:
    """The entry's result, or None when it is missing, unreadable, or a file no longer matches its digest."""
    try:
        recorded = json.loads((entry / _RESULT).read_text(encoding="utf-8"))
        files = recorded["files"]
        if any(file_sha256(entry / rel) != sha256 for rel, sha256 in files.items()):
            return None
        return adapter.validate_python(_absolute(recorded["result"], entry))
    except (OSError, ValueError, KeyError, TypeError, ValidationError):
        return None


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
