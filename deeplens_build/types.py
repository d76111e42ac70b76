"""The plugin contract's values: what plugins declare (frameworks, source kinds, target backends) and what they
receive and answer (training outputs, model files, artifacts, settings).

Every value is a frozen dataclass: a plugin never receives a loose dict, and nothing downstream can change what
an upstream stage decided. Paths are absolute on this machine; the manifest records them relative to the bundle.
The values the stages pass among themselves live in :mod:`deeplens_build.values`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from deeplens_build.errors import ConversionError
from deeplens_build.records import SageMakerJob, TensorSpec

__all__ = ["LABEL_FILES", "Artifact", "Framework", "ModelFiles", "PluginSettings", "Runner", "SageMakerJob",
           "SourceKind", "TargetBackend", "TensorSpec", "TrainingOutput", "choose_one"]

LABEL_FILES = ("labels.txt", "synset.txt", "classes.txt")
"""Names a class-labels file goes by in training outputs (``synset.txt`` is MXNet's and DeepLens's)."""


@dataclass(frozen=True)
class TrainingOutput:
    """A training output, fetched and safely extracted into a read-only folder.

    :param root: the folder holding the files; plugins read it and never write to it.
    :param files: every regular file under ``root``, as sorted POSIX paths relative to it.
    :param sha256: digest of the source as given (the archive's bytes, or the folder's file tree).
    :param size: bytes of the source as given.
    :param kind: ``"directory"``, ``"archive"``, ``"file"``, ``"s3"`` or ``"sagemaker-job"``.
    :param origin: how to name the source in messages and the manifest (never an absolute local path).
    :param sagemaker: the training job, when the source was ``sagemaker-job:NAME``.
    """

    root: Path
    files: tuple[str, ...]
    sha256: str
    size: int
    kind: str
    origin: str
    sagemaker: SageMakerJob | None = None

    def path(self, relative: str) -> Path:
        return self.root / relative

    def copy_labels(self, workdir: Path) -> Path | None:
        """Copy the class-labels file (``labels.txt``, ``synset.txt``, ...), if any, to ``workdir/labels.txt``."""
        found = next((f for f in self.files if f.rsplit("/", 1)[-1].lower() in LABEL_FILES), None)
        if found is None:
            return None
        target = workdir / "labels.txt"
        target.write_bytes(self.path(found).read_bytes())
        return target

    def matching(self, *suffixes: str) -> tuple[str, ...]:
        """The files whose names end with one of ``suffixes`` (case-insensitive), in sorted order."""
        lowered = tuple(s.lower() for s in suffixes)
        return tuple(f for f in self.files if f.lower().endswith(lowered))


def choose_one(candidates: Sequence[str], wanted: str | None, *, setting: str, what: str) -> str:
    """The candidate the user named with ``setting``, else the only one; otherwise say how to choose.

    :param candidates: what the training output offers, e.g. its ``.onnx`` files.
    :param wanted: the setting's value, or None when it is not set.
    :param setting: the key path of the setting, e.g. ``"plugins.onnx.file"``.
    :param what: what the candidates are, for the message, e.g. ``"ONNX models"``.
    :raises ConversionError: when ``wanted`` is not a candidate, or there are none or several and no choice.
    """
    table, key = setting.rsplit(".", 1)
    if wanted is not None:
        if wanted not in candidates:
            raise ConversionError(f"`{setting}` is {wanted!r}, not one of the {what}: "
                                  f"{', '.join(candidates) or 'none'}")
        return wanted
    if len(candidates) == 1:
        return candidates[0]
    found = f"several {what} ({', '.join(candidates)})" if candidates else f"no {what}"
    raise ConversionError(f"found {found}; choose one with [{table}] {key} = \"...\" in deeplens.toml")


class PluginSettings(BaseModel):
    """A plugin's settings, ``[plugins.<framework>]`` in ``deeplens.toml``: subclass it with typed fields.

    The core validates the table against the class before any work starts: a missing or mistyped value, or
    an unknown key, fails with the key path quoted (``Field `plugins.onnx.fiel` is not a known setting``), as
    for every core setting. Hooks receive the validated instance.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


@dataclass(frozen=True)
class Framework:
    """A plugin's declaration of the framework it handles (answer of ``deeplens_build_framework``).

    :param name: short unique name used in ``model.framework`` and messages, e.g. ``"onnx"``.
    :param summary: one line shown by ``deeplens-build plugins``.
    :param requires: distributions whose installed versions are recorded in the manifest and the cache key.
    :param install: the command that installs what the plugin imports; when a hook raises ``ImportError``,
        the core's error quotes it.
    :param settings: the plugin's settings class (a :class:`PluginSettings` subclass); the default takes none.
    :param device_module: a Python file shipped in the bundle's model folder as ``deeplens_model.py`` when the
        plugin's artifact is in a native format of its own (run by its own runtime): ``load(model_dir)`` returns an
        object with ``inputs`` (``[(name, shape)]``), ``outputs`` (names), ``device`` and ``run(feeds)`` (one array
        per output), as a target backend's does. A native artifact without one is refused: neither the Lambda nor
        ``awscam.Model`` could load it.
    """

    name: str
    summary: str
    requires: tuple[str, ...] = ()
    install: str = ""
    settings: type[PluginSettings] = PluginSettings
    device_module: Path | None = None


@dataclass(frozen=True)
class SourceKind:
    """A kind of source a plugin fetches (one answer of ``deeplens_build_sources``).

    :param name: short unique name shown by ``deeplens-build plugins``, e.g. ``"s3"``.
    :param prefixes: the source strings it claims, by prefix, e.g. ``("s3://",)``; the longest matching prefix
        wins. Empty only for the one fallback kind that takes everything else (the built-in local paths).
    :param summary: one line shown by ``deeplens-build plugins``, e.g. ``"s3://BUCKET/KEY"``.
    :param fetch: ``fetch(source, context) -> TrainingOutput``: acquire ``source`` through ``context`` (a
        :class:`deeplens_build.SourceContext`), which caches downloads and extracts archives safely.
    """

    name: str
    prefixes: tuple[str, ...]
    summary: str
    fetch: Callable[[str, Any], TrainingOutput] = field(compare=False, repr=False)


Runner = Callable[[Mapping[str, Any]], Mapping[str, Any]]
"""Runs a model once: one array per input name in, one array per output name out."""


@dataclass(frozen=True)
class TargetBackend:
    """A target backend: how an ONNX artifact becomes what a device executes (one answer of
    ``deeplens_build_targets``). ``[target] backend = "<name>"`` picks it.

    :param name: short unique name, e.g. ``"openvino"``.
    :param summary: one line shown by ``deeplens-build plugins``.
    :param accelerators: the ``target.accelerator`` values it serves (``"cpu"``, ``"gpu"``).
    :param platforms: the device platforms it serves (``"linux-x86_64"``, ``"linux-aarch64"``).
    :param device_module: a Python file shipped in the bundle's model folder as ``deeplens_model.py``: the
        device side of the backend. It defines ``load(model_dir)`` returning an object with ``device`` (a string
        naming where the model runs), ``inputs`` (``[(name, shape)]``), ``outputs`` (``[name]``) and
        ``run(feeds) -> [array per output]``; the inference Lambda (and DeepLens's ``awscam.Model``) imports it
        instead of a runtime, so it works with any backend. It runs on the device's Python, 3.8 and up.
    :param max_opset: the highest ONNX opset its runtime accepts; framework plugins export at most that, and a
        higher artifact is lowered or refused. None: no limit beyond the runtime definition's.
    :param domains: the operator domains its runtime accepts; ``""`` is standard ONNX.
    :param operators: the standard operator types its runtime accepts, when it documents a list (TensorRT's
        ONNX parser does); an artifact with others is refused on the build machine. None: every one.
    :param runtime: the runtime definition (a folder name) that installs it on a device; None matches by the
        compiled format and ``target.accelerator``, as for the plain ONNX artifact.
    :param runtimes: runtime definitions (``runtime.toml`` files) the backend brings with it.
    :param compile: ``compile(artifact, workdir, precision) -> Artifact``: compile the optimized ONNX artifact on
        the build machine into files under ``workdir``. None: the ONNX artifact is what ships.
    :param load: ``load(artifact) -> Runner``: run the compiled artifact on this build machine, so parity and
        profiling measure what the device executes. None: the backend's runtime cannot run here (its parity
        runs the ONNX artifact in onnxruntime, and the manifest says so).
    :param device_build: a Python file shipped in the model folder as ``deeplens_compile.py`` and run by the
        Greengrass recipe's Install phase as ``python deeplens_compile.py MODEL_DIR WORK_DIR TOLERANCE``, for
        artifacts that must be compiled on the device itself (a TensorRT engine is specific to its GPU). It must
        keep what it builds in ``WORK_DIR``, which survives redeployments, skip work whose inputs are unchanged,
        and check what it built against ``MODEL_DIR/deeplens_reference.npz`` (the parity samples and the original
        model's outputs on them, ``in/I/NAME`` and ``out/I/NAME``) within ``TOLERANCE``, exiting non-zero when
        it fails: the parity the build machine could not measure is measured on the device.
    :param requires: distributions the backend imports on the build machine: their versions are recorded in
        the manifest and the cache key.
    :param install: the command that installs what it imports; an ``ImportError`` in a callable quotes it.
    :param symmetric_int8: its runtime takes INT8 activations only with zero point 0 (TensorRT's explicit
        quantization): ``precision = "int8"`` then quantizes them symmetrically.
    """

    name: str
    summary: str
    accelerators: tuple[str, ...]
    platforms: tuple[str, ...]
    device_module: Path
    max_opset: int | None = None
    domains: tuple[str, ...] = ("",)
    operators: frozenset[str] | None = None
    runtime: str | None = None
    runtimes: tuple[Path, ...] = ()
    compile: Callable[[Artifact, Path, str], Artifact] | None = field(default=None, compare=False, repr=False)
    load: Callable[[Artifact], Runner] | None = field(default=None, compare=False, repr=False)
    device_build: Path | None = None
    requires: tuple[str, ...] = ()
    install: str = ""
    symmetric_int8: bool = False


@dataclass(frozen=True)
class ModelFiles:
    """A plugin's claim on a training output (answer of ``deeplens_build_detect``).

    :param files: the files, relative to the training output's root, that make up the model to package.
    :param notes: what the user should know about the choice, e.g. which of several checkpoints was taken.
    """

    files: tuple[str, ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Artifact:
    """A model artifact: what a plugin's ``deeplens_build_convert`` answers, what the optimize stage rewrites and
    what a target backend compiles. The one type that flows from convert to the bundle.

    :param format: ``"onnx"`` for ONNX (optimized and parity-checked by the core), the name of a native
        format (e.g. ``"mxnet-symbol"``) that a runtime declares it can run, or a backend's compiled format
        (``"openvino-ir"``).
    :param path: the main artifact file, inside the work folder the plugin was given.
    :param inputs: the model's inputs, in the order the model takes them.
    :param outputs: the model's outputs.
    :param extra_files: further artifact files (e.g. weights of a native format), inside the work folder.
    :param labels: a class-labels file, one label per line, if the training output had one.
    """

    format: str
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    extra_files: tuple[Path, ...] = ()
    labels: Path | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.path, *self.extra_files)
