"""Runtime stage: match the artifact to a runtime definition, and vendor its wheels for offline devices.

A runtime is a folder with ``runtime.toml``: the artifact formats it runs, the accelerator it uses, the Python
version and device platforms it supports, and exact requirements per platform. Built-in definitions live in
``runtimes/``; a project may add its own (``runtime.definitions``), which win over built-ins of the same name.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from deeplens_build import names
from deeplens_build.cache import Cache
from deeplens_build.config import RuntimeConfig
from deeplens_build.digest import file_sha256
from deeplens_build.errors import BundleError, ConfigError
from deeplens_build.report import Reporter
from deeplens_build.types import Artifact
from deeplens_build.values import Detection, Runtime, RuntimePins, Wheelhouse

if TYPE_CHECKING:
    from deeplens_build.build import Build

DEFINITION = "runtime.toml"
PIP_PLATFORMS = {
    "linux-x86_64": ("manylinux_2_28_x86_64", "manylinux2014_x86_64"),
    "linux-aarch64": ("manylinux_2_28_aarch64", "manylinux2014_aarch64"),
}
"""pip's platform tags for each device platform, newest glibc first."""


class _Pins(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    requirements: dict[str, tuple[str, ...]]
    onnx_opset: int | None = None


class _Definition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    summary: str
    formats: tuple[str, ...]
    accelerator: Literal["cpu", "gpu"]
    python: Annotated[str, StringConstraints(pattern=names.PYTHON_VERSION)]
    platforms: tuple[Literal["linux-x86_64", "linux-aarch64"], ...]
    requirements: dict[str, tuple[str, ...]]
    onnx_opset: int | None = None
    pythons: dict[Annotated[str, StringConstraints(pattern=names.PYTHON_VERSION)], _Pins] = {}
    """Other device Pythons, each with its own pins (``[pythons."3.10".requirements]``)."""


def runtimes_dir() -> Path:
    """The built-in definitions: packaged in the wheel, or ``runtimes/`` of a source checkout."""
    package = Path(__file__).parents[1]
    packaged = package / "runtimes"
    return packaged if packaged.is_dir() else package.parent / "runtimes"


def load_runtimes(project: Path | None = None, *, extra: tuple[Path, ...] = ()) -> tuple[Runtime, ...]:
    """Every runtime definition: built-in ones, those a target backend brings (``extra``), then the project's,
    which replace any of the same name."""
    if project is not None and not project.is_dir():
        raise ConfigError(f"Field `runtime.definitions` points to {project}, which is not a folder")
    paths = [*sorted(runtimes_dir().glob(f"*/{DEFINITION}")), *extra,
             *(sorted(project.glob(f"*/{DEFINITION}")) if project is not None else [])]
    found: dict[str, Runtime] = {}
    for path in paths:
        runtime = _load(path)
        found[runtime.name] = runtime
    return tuple(found.values())


def _load(path: Path) -> Runtime:
    try:
        spec = _Definition.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise BundleError(f"runtime definition {path} is invalid: {exc}") from exc
    if spec.name != path.parent.name:
        raise BundleError(f"runtime definition {path} names itself {spec.name!r}; it must match its folder")
    for python, requirements in ((spec.python, spec.requirements),
                                 *((v, pins.requirements) for v, pins in spec.pythons.items())):
        missing = [p for p in spec.platforms if p not in requirements]
        if missing:
            raise BundleError(f"runtime definition {path} has no requirements for {', '.join(missing)} on "
                              f"Python {python}")
    return Runtime(name=spec.name, summary=spec.summary, formats=spec.formats, accelerator=spec.accelerator,
                   python=spec.python, platforms=spec.platforms, requirements=spec.requirements,
                   definition=path, definition_sha256=file_sha256(path), onnx_opset=spec.onnx_opset,
                   pythons={v: RuntimePins(requirements=pins.requirements, onnx_opset=pins.onnx_opset)
                            for v, pins in spec.pythons.items()})


def select_runtime(fmt: str, platform: str, accelerator: str, *, wanted: str, suggested: str | None,
                   available: tuple[Runtime, ...]) -> Runtime:
    """Pick the runtime for an artifact of format ``fmt`` on a ``platform`` device with ``accelerator``.

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
    # a GPU device also runs CPU runtimes; a CPU device cannot run a GPU one
    matching = [r for r in fits if r.accelerator == accelerator] or [r for r in fits if r.accelerator == "cpu"]
    if len(matching) == 1:
        return matching[0]
    if not matching:
        raise BundleError(f"no runtime runs a {fmt} artifact on a {platform} {accelerator} device; known runtimes: "
                          + "; ".join(f"{r.name} ({', '.join(r.formats)}, {r.accelerator}, "
                                      f"{', '.join(r.platforms)})" for r in available))
    raise ConfigError(f"several runtimes can run a {fmt} artifact on {platform} ({_names(matching)}); "
                      "choose one with `runtime.name`")


def vendor_wheels(runtime: Runtime, platform: str, *, config: RuntimeConfig, cache: Cache,
                  reporter: Reporter) -> Wheelhouse:
    """Download the runtime's pinned wheels, with their dependencies, for the *device's* platform and Python.

    Runs ``pip download --only-binary=:all: --platform ... --python-version ...``, so an x86_64 build machine
    vendors an aarch64 device's runtime. Cached by the requirements, platform, Python and package sources.
    """
    requirements = list(runtime.requirements[platform])
    sources = {"index": config.index, "find_links": [str(p) for p in config.find_links]}

    def download(scratch: Path) -> Wheelhouse:
        command = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version",
                   runtime.python, "--implementation", "cp", "--dest", str(scratch), "--no-cache-dir",
                   "--disable-pip-version-check", "--progress-bar", "off"]
        for tag in PIP_PLATFORMS[platform]:
            command += ["--platform", tag]
        for link in config.find_links:
            command += ["--find-links", str(link)]
        if not config.index:
            command.append("--no-index")
        reporter.step(f"runtime: downloading {', '.join(requirements)} for {platform}, Python {runtime.python}")
        lines = []
        with subprocess.Popen([*command, *requirements], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as pip:
            for line in pip.stdout:  # pip's progress, one line per package collected and saved
                lines.append(line.rstrip())
                if line.startswith(("Collecting", "Saved")):
                    reporter.step(f"  {line.strip()}")
        if pip.returncode != 0:
            missing = next((m["package"] for line in lines
                            if (m := re.search(r"No matching distribution found for (?P<package>\S+)", line))), None)
            if missing:
                raise BundleError(f"cannot vendor runtime {runtime.name}: no wheel of {missing} for {platform} and "
                                  f"Python {runtime.python} (pin a version that has one for this Python in "
                                  f"{runtime.definition.name}, or choose another `target.python`)")
            reason = [line for line in lines if line.startswith("ERROR")] or lines[-1:] or ["no output"]
            raise BundleError(f"cannot vendor runtime {runtime.name} for {platform}, Python {runtime.python}: "
                              f"{reason[0]} (check `runtime.find_links`, `runtime.index` and the pins in its "
                              "runtime.toml)")
        wheels = tuple(sorted(scratch.glob("*.whl")))
        if not wheels:
            raise BundleError(f"pip downloaded no wheels for runtime {runtime.name}")
        return Wheelhouse(wheels=wheels)

    # a wheel replaced in a find_links folder under the same name is another wheel: the folders' files by content
    local = {str(folder): {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}
             if folder.is_dir() else file_sha256(folder) if folder.is_file() else None for folder in config.find_links}
    wheelhouse, cached = cache.stage("wheels", {"requirements": requirements, "platform": platform,
                                                "python": runtime.python, "sources": sources, "local": local},
                                     Wheelhouse, download)
    if cached:
        reporter.step(f"runtime: {len(wheelhouse.wheels)} wheels for {platform} reused from the cache")
    return wheelhouse


def _names(runtimes: list[Runtime]) -> str:
    return ", ".join(r.name for r in runtimes) or "none"


def device_runtimes(b: Build, runtime: Runtime) -> list[Runtime]:
    """``runtime`` as installed on each device Python ``target.python`` lists, the preferred one first (the
    definition's default Python when it lists none)."""
    definition = next((r for r in b.runtimes if r.name == runtime.name), runtime)
    return [definition.for_python(python) for python in b.config.target.pythons(definition.python)]


def run(b: Build, detection: Detection, converted: Artifact, compiled: Artifact,
        opset: int | None) -> tuple[Runtime, Wheelhouse]:
    """The runtime the device installs for ``compiled`` (the convert stage's match, for an ONNX artifact no plugin
    asks otherwise of), and its wheels when ``runtime.vendor``."""
    target, backend = b.config.target, b.target.backend
    suggested = backend.runtime or b.manager.runtime(detection, converted, target.platform)
    if compiled.format == "onnx" and b.onnx_runtime is not None and suggested == backend.runtime:
        runtime = b.onnx_runtime
    else:
        runtime = select_runtime(compiled.format, target.platform, target.accelerator, wanted=b.config.runtime.name,
                                 suggested=suggested, available=b.runtimes)
    each = device_runtimes(b, runtime)
    runtime = each[0]
    for other in each:
        if compiled.format == "onnx" and other.onnx_opset and opset and opset > other.onnx_opset:
            raise BundleError(f"the artifact is ONNX opset {opset}, but runtime {other.name} on Python "
                              f"{other.python} ({', '.join(other.requirements[target.platform])}) loads opset "
                              f"{other.onnx_opset} at most; choose a newer `target.python`")
    b.reporter.step(f"runtime: {runtime.name} for {target.platform} ({target.accelerator}), Python "
                    f"{', '.join(r.python for r in each)}")
    if not b.config.runtime.vendor:
        return runtime, Wheelhouse(wheels=())
    # one wheelhouse for every device Python: a pure-Python wheel serves them all, a binary one has its Python's tag
    wheels = {wheel.name: wheel for other in each for wheel in vendor_wheels(
        other, target.platform, config=b.config.runtime, cache=b.cache, reporter=b.reporter).wheels}
    return runtime, Wheelhouse(wheels=tuple(wheels[name] for name in sorted(wheels)))
