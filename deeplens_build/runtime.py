"""Runtime stage: match the artifact to a runtime definition from ``runtimes/<name>/runtime.toml``.

A runtime matches when its ``formats`` include the artifact's format and its ``platforms`` include the
target platform; a plugin may name the runtime for its native format through ``deeplens_build_runtime``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from deeplens_build.digest import file_sha256
from deeplens_build.errors import BundleError, ConfigError
from deeplens_build.types import Runtime

DEFINITION = "runtime.toml"


class _Definition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    summary: str
    formats: tuple[str, ...]
    python: str
    platforms: tuple[str, ...]
    requirements: dict[str, tuple[str, ...]]


def runtimes_dir() -> Path:
    """Where the runtime definitions are: packaged in the wheel, or ``runtimes/`` of a source checkout."""
    packaged = Path(__file__).parent / "runtimes"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "runtimes"


def load_runtimes(root: Path | None = None) -> tuple[Runtime, ...]:
    root = root or runtimes_dir()
    found = []
    for path in sorted(root.glob(f"*/{DEFINITION}")):
        try:
            spec = _Definition.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
        except (tomllib.TOMLDecodeError, ValidationError) as exc:
            raise BundleError(f"runtime definition {path} is invalid: {exc}") from exc
        if spec.name != path.parent.name:
            raise BundleError(f"runtime definition {path} names itself {spec.name!r}; it must match its folder")
        missing = [p for p in spec.platforms if p not in spec.requirements]
        if missing:
            raise BundleError(f"runtime definition {path} has no requirements for {', '.join(missing)}")
        found.append(Runtime(name=spec.name, summary=spec.summary, formats=spec.formats, python=spec.python,
                             platforms=spec.platforms, requirements=spec.requirements,
                             definition_sha256=file_sha256(path)))
    return tuple(found)


def select_runtime(fmt: str, platform: str, *, wanted: str, suggested: str | None,
                   available: tuple[Runtime, ...]) -> Runtime:
    """Pick the runtime for an artifact of format ``fmt`` on ``platform``.

    :param wanted: ``runtime.name`` from config (``"auto"`` to match).
    :param suggested: the owning plugin's answer to ``deeplens_build_runtime``.
    """
    fits = [r for r in available if fmt in r.formats and platform in r.platforms]
    name = wanted if wanted != "auto" else suggested
    if name is not None:
        chosen = next((r for r in fits if r.name == name), None)
        if chosen is None:
            raise ConfigError(f"runtime {name!r} cannot run a {fmt} artifact on {platform}; runtimes that can: "
                              f"{_names(fits)}")
        return chosen
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise BundleError(f"no runtime runs a {fmt} artifact on {platform}; known runtimes: "
                          + "; ".join(f"{r.name} ({', '.join(r.formats)} on {', '.join(r.platforms)})"
                                      for r in available))
    raise ConfigError(f"several runtimes can run a {fmt} artifact on {platform} ({_names(fits)}); "
                      "choose one with `runtime.name`")


def _names(runtimes: list[Runtime]) -> str:
    return ", ".join(r.name for r in runtimes) or "none"
