"""Content-addressed stage cache: an unchanged input is never rebuilt.

An entry is ``<root>/<stage>/<key>/``: the files the stage wrote plus ``result.json``, its typed result.
The key is the sha256 of everything the stage's output depends on (input digests, settings, tool versions).
Entries are built in a temporary folder and renamed into place, so a crash never leaves a half entry; paths
inside an entry are stored relative to it, so a cache folder can be copied between machines.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import TypeAdapter

from deeplens_build.digest import json_sha256

T = TypeVar("T")

_RESULT = "result.json"
_ENTRY_PREFIX = "@entry/"
CACHE_FORMAT = 1
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
        entry = self.root / stage / self.key(stage, material)
        adapter = TypeAdapter(result_type)
        if self.reuse and (entry / _RESULT).is_file():
            return _load(adapter, entry), True
        (self.root / stage).mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=self.root / stage))
        try:
            result = build(scratch)
            data = _relative(adapter.dump_python(result, mode="json"), f"{scratch}{os.sep}")
            (scratch / _RESULT).write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
            if entry.exists():
                shutil.rmtree(entry)
            os.replace(scratch, entry)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return _load(adapter, entry), False


def _load(adapter: TypeAdapter[T], entry: Path) -> T:
    data = json.loads((entry / _RESULT).read_text(encoding="utf-8"))
    return adapter.validate_python(_absolute(data, entry))


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
