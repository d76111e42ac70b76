"""The values the pipeline's stages pass among themselves, and what the plugin manager knows of each plugin.

Frozen dataclasses like the plugin contract's (:mod:`deeplens_build.types`), but no plugin receives one: they can
change shape with the pipeline (``cache.CACHE_FORMAT`` says when a cached one no longer reads).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from deeplens_build.errors import ConfigError
from deeplens_build.records import CalibrationReport, ParityReport
from deeplens_build.types import Artifact, Framework, ModelFiles, SourceKind, TargetBackend

if TYPE_CHECKING:
    from deeplens_build.manifest import Manifest


@dataclass(frozen=True)
class TargetInfo:
    """A target backend and the plugin that declared it, as ``deeplens-build plugins`` lists it."""

    backend: TargetBackend
    plugin: str
    distribution: str | None
    version: str | None
    builtin: bool
    tool_versions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PluginInfo:
    """A loaded framework plugin, as ``deeplens-build plugins`` lists it."""

    name: str
    framework: Framework
    distribution: str | None
    version: str | None
    builtin: bool
    tool_versions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceInfo:
    """A source kind and the plugin that declared it, as ``deeplens-build plugins`` lists it."""

    kind: SourceKind
    plugin: str
    distribution: str | None
    version: str | None
    builtin: bool


@dataclass(frozen=True)
class Detection:
    """The detect stage's answer: which plugin owns the training output, and which files."""

    plugin: PluginInfo
    model: ModelFiles


@dataclass(frozen=True)
class Optimized:
    """The optimize stage's result: the artifact, and what was done to it.

    :param fp32_nodes: at ``precision = "fp16"`` or ``"int8"``, the nodes kept in float32 so parity (or INT8's
        gate) passes (mixed precision).
    :param calibration: at ``precision = "int8"``, what it was calibrated and gated on.
    """

    artifact: Artifact
    precision: str
    passes: tuple[str, ...]
    size_before: int
    opset: int | None
    fp32_nodes: tuple[str, ...] = ()
    calibration: CalibrationReport | None = None


@dataclass(frozen=True)
class ReferenceRun:
    """The original model's outputs on the parity samples (``.npz``: ``in/I/NAME`` and ``out/I/NAME``)."""

    path: Path
    samples: int


@dataclass(frozen=True)
class RuntimePins:
    """What a runtime installs on a device with one Python version.

    :param requirements: exact requirements per device platform.
    :param onnx_opset: the highest ONNX opset that runtime loads, when the definition states it.
    """

    requirements: Mapping[str, tuple[str, ...]]
    onnx_opset: int | None = None


@dataclass(frozen=True)
class Runtime:
    """A runtime definition from ``runtimes/<name>/runtime.toml``: what a device needs to run an artifact.

    ``python``, ``requirements`` and ``onnx_opset`` are for the default device Python; ``pythons`` holds the pins
    for the other Pythons the definition supports (:meth:`for_python` picks one).
    """

    name: str
    summary: str
    formats: tuple[str, ...]
    accelerator: str
    python: str
    platforms: tuple[str, ...]
    requirements: Mapping[str, tuple[str, ...]]
    definition: Path
    definition_sha256: str
    onnx_opset: int | None = None
    pythons: Mapping[str, RuntimePins] = field(default_factory=dict)

    @property
    def supported_pythons(self) -> tuple[str, ...]:
        return tuple(sorted({self.python, *self.pythons}, key=lambda v: tuple(int(p) for p in v.split("."))))

    def for_python(self, python: str) -> Runtime:
        """This runtime as installed on a device with ``python``.

        :raises ConfigError: when the definition has no pins for that Python.
        """
        if python == self.python:
            return self
        pins = self.pythons.get(python)
        if pins is None:
            raise ConfigError(f"Field `target.python` is {python!r}, but runtime {self.name} has wheels pinned for "
                              f"Python {', '.join(self.supported_pythons)}; choose one of them, or add pins for "
                              f"{python} to {self.definition}")
        return dataclasses.replace(self, python=python, requirements=pins.requirements, onnx_opset=pins.onnx_opset,
                                   pythons={})


@dataclass(frozen=True)
class Wheelhouse:
    """A runtime's wheels, downloaded for the device's platform and Python (``runtime.vendor = true``)."""

    wheels: tuple[Path, ...]


@dataclass(frozen=True)
class LambdaPackage:
    """The inference Lambda's deployment zip, versioned by its content."""

    path: Path
    name: str
    handler: str
    version: str
    sha256: str


@dataclass(frozen=True)
class PublishedLambda:
    """A published Lambda version; Greengrass references ``arn`` (``...:function:NAME:N``), never ``$LATEST``."""

    name: str
    version: str
    arn: str
    alias: str
    alias_arn: str


@dataclass(frozen=True)
class GreengrassDocuments:
    """The Greengrass documents (and the v1 model archive) written for a bundle: bundle path → file."""

    files: Mapping[str, Path]


@dataclass(frozen=True)
class BundleSizes:
    source: int
    artifact: int
    bundle: int


@dataclass(frozen=True)
class BuildResult:
    """What ``deeplens-build package`` built: the bundle and the figures worth reporting."""

    bundle: Path
    sha256: str
    name: str
    version: str
    framework: str
    parity: ParityReport | None
    sizes: BundleSizes
    cached_stages: tuple[str, ...]
    notes: tuple[str, ...]
    manifest: Manifest
    stages: tuple[str, ...]
    """Every cached stage the build went through, reused or built, in order."""
    local_inputs: bool
    """Everything the build read was a local file (no source fetched over the network, no KMS key, nothing
    published): a later ``package`` can tell it is up to date from those files alone."""

