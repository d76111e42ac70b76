"""``deeplens.toml``: frozen, validated settings that forbid unknown keys.

Relative paths are resolved against the folder holding the config file, so a project builds the same from
any working directory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from deeplens_build import names
from deeplens_build.digest import json_sha256
from deeplens_build.errors import ConfigError
from deeplens_build.layout import CONFIG_NAME, WORK_DIR, config_file, read_document

V1_LAMBDA_RUNTIME = "python3.8"
"""The newest Lambda runtime a Greengrass v1 core runs (DeepLens's software included)."""
MAX_RANDOM_SAMPLES = 1000
"""Each sample is a full input tensor held in memory: 1000 camera frames is already a generous check."""


def _resolve(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base")
    return (base / value).resolve() if base is not None and not value.is_absolute() else value


def _folder_or_absent(value: Path) -> Path:
    if value.exists() and not value.is_dir():
        raise ValueError(f"points to {value}, which is a file; point it at a folder (it is created if missing)")
    return value


def _existing_file(value: Path) -> Path:
    if not value.is_file():
        raise ValueError(f"points to {value}, which is not a file")
    return value


ProjectPath = Annotated[Path, AfterValidator(_resolve)]
ProjectFile = Annotated[Path, AfterValidator(_resolve), AfterValidator(_existing_file)]
ProjectFolder = Annotated[Path, AfterValidator(_resolve), AfterValidator(_folder_or_absent)]
# TOML has real numbers: a number written as a string ("8") is a mistake to report, not to coerce
Count = Annotated[int, Strict(), Field(ge=1)]
Finite = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]
MIN_CALIBRATION = 32
"""Samples INT8 needs at least: enough to calibrate ranges and to leave a validation set that means something."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, defer_build=True)


class InputConfig(_Strict):
    shape: tuple[Count, ...] | None = None
    layout: Literal["NCHW", "NHWC"] | None = None


class ModelConfig(_Strict):
    name: Annotated[str, AfterValidator(names.check_model_name)]
    version: Annotated[str, AfterValidator(names.check_version)] = "1.0.0"
    framework: str = "auto"
    source: str | None = None
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    task: Literal["classification", "detection", "other"] = "classification"
    labels: ProjectFile | None = None
    inputs: dict[str, InputConfig] = Field(default_factory=dict)


class OutputTolerance(_Strict):
    """``[parity.outputs.NAME]``: one output's own bounds (a detector's pixel boxes beside its scores)."""

    tolerance: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    rtol: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None


@dataclass(frozen=True)
class Bounds:
    """An element passes when ``|original - artifact| <= tolerance + rtol * |original|`` (numpy's ``isclose``)."""

    tolerance: float
    rtol: float


class PreprocessConfig(_Strict):
    """``[calibration.preprocess]``: how an image becomes the model's input, here and on the device alike
    (``deeplens_preprocess.to_tensor``); the defaults are its own."""

    scale: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0 / 255.0
    mean: tuple[Annotated[float, Field(allow_inf_nan=False)], ...] = (0.0,)
    std: tuple[Annotated[float, Field(gt=0, allow_inf_nan=False)], ...] = (1.0,)
    rgb: bool = False
    """Reorder the frame's channels (BGR, as OpenCV and awscam give them) to RGB first."""


class CalibrationConfig(_Strict):
    """``[calibration]``: the inputs INT8 is calibrated on and gated by."""

    samples: ProjectPath | None = None
    """A folder of ``.npy`` (one input) or ``.npz`` (keyed by input name) tensors, or JPEG/PNG images."""
    max_samples: Annotated[int, Strict(), Field(ge=MIN_CALIBRATION, le=1000)] = 300
    validation: Annotated[float, Field(gt=0, lt=1)] = 0.25
    """The share of the samples, drawn seeded, that the gate compares on and calibration never sees."""
    seed: Annotated[int, Strict(), Field(ge=0, le=2**32 - 1)] = 0
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    """onnxruntime's calibration method for the activations' ranges."""
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)


class DetectionMatch(_Strict):
    """``[parity.detection]``: a detector's outputs compared as what a user sees. Per sample, the original's and the
    artifact's detections scoring at least ``score`` are matched by class, box overlap (IoU) at least ``iou`` and
    score within the output's bounds; the agreement is matched / the larger count (1 when both have none)."""

    score: Annotated[float, Field(ge=0, le=1)] = 0.5
    iou: Annotated[float, Field(gt=0, le=1)] = 0.5
    agreement: Annotated[float, Field(gt=0, le=1)] = 0.95
    """The least agreement over the samples that passes."""


class ParityConfig(_Strict):
    tolerance: Finite | None = None
    top1_agreement: Annotated[float, Field(gt=0, le=1)] = 0.99
    """At ``precision = "int8"``: the share of validation samples whose top class the artifact must keep."""
    detection: DetectionMatch = Field(default_factory=lambda: DetectionMatch())
    """At ``task = "detection"``: how detections (``[class, score, xmin, ymin, xmax, ymax]`` rows) are matched."""
    rtol: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    """Relative tolerance: what float reordering changes grows with the value (a box at pixel 320)."""
    outputs: dict[str, OutputTolerance] = Field(default_factory=dict)
    seed: Annotated[int, Strict(), Field(ge=0, le=2**32 - 1)] = 0
    random_samples: Annotated[int, Strict(), Field(ge=1, le=MAX_RANDOM_SAMPLES)] = 4
    samples: tuple[ProjectPath, ...] = ()
    max_bytes: Count = 1 << 30
    """Bytes the parity inputs may hold in memory: every sample of every input together."""

    def check_input_size(self, shapes: Mapping[str, tuple[int, ...]], *, itemsizes: Mapping[str, int] | None = None,
                         where: str) -> None:
        """Refuse input shapes whose parity samples would not fit in ``max_bytes``, before anything is allocated.

        :param itemsizes: bytes per element by input name (4, float32, for an input not named).
        :param where: what declared the shapes, for the message (``model.inputs``, or the model itself).
        :raises ConfigError: naming the largest input, its shape and the setting.
        """
        if not shapes:
            return
        count = self.random_samples + len(self.samples)
        sizes = {name: math.prod(shape) * (itemsizes or {}).get(name, 4) for name, shape in shapes.items()}
        if sum(sizes.values()) * count > self.max_bytes:
            largest = max(sizes, key=lambda name: sizes[name])
            raise ConfigError(f"{where}: input {largest!r} of shape {list(shapes[largest])} is {sizes[largest]} bytes "
                              f"per sample, and parity holds {count} samples: more than `parity.max_bytes` "
                              f"({self.max_bytes}); give the batch dimension 1 (a device infers one frame at a time), "
                              "or raise `parity.max_bytes` if this machine has the memory")

    def tolerance_for(self, precision: str) -> float:
        """The configured tolerance, else one that FP16 rounding (about 1e-3 relative) stays within."""
        if self.tolerance is not None:
            return self.tolerance
        return {"fp16": 1e-2, "int8": 5e-2}.get(precision, 1e-4)

    def bounds_for(self, precision: str) -> dict[str | None, Bounds]:
        """Each output's bounds by name, and under None those of every other output. The default relative
        tolerance is what reordering float sums changes (FP32) or half precision's rounding (FP16)."""
        default = Bounds(self.tolerance_for(precision),
                         self.rtol if self.rtol is not None else {"fp16": 1e-3, "int8": 5e-2}.get(precision, 1e-5))
        bounds: dict[str | None, Bounds] = {None: default}
        for name, own in self.outputs.items():
            bounds[name] = Bounds(own.tolerance if own.tolerance is not None else default.tolerance,
                                  own.rtol if own.rtol is not None else default.rtol)
        return bounds


class LambdaConfig(_Strict):
    source: ProjectPath
    handler: Annotated[str, AfterValidator(names.check_handler)] = "inference.handler"
    name: Annotated[str, AfterValidator(names.check_lambda_name)] | None = None
    version: Annotated[str, AfterValidator(names.check_version)] = "1.0.0"
    role: str | None = None
    runtime: str = "python3.11"
    """The Lambda's runtime when it is published: a v1 core (DeepLens included) runs Python 3.7 and 3.8 Lambdas,
    so a v1 format defaults to ``python3.8``."""
    memory_size: Annotated[int, Strict(), Field(ge=128, le=10240)] = 1536
    timeout: Annotated[int, Strict(), Field(ge=1, le=900)] = 900
    alias: Annotated[str, AfterValidator(names.check_lambda_name)] = "live"
    environment: dict[Annotated[str, AfterValidator(names.check_variable)], str] = Field(default_factory=dict)
    deeplens_compat: bool = False
    """Ship the DeepLens device modules (awscam, mo, greengrasssdk) so a DeepLens-era Lambda runs unchanged."""


class FetchConfig(_Strict):
    max_bytes: Count = 8 * 1024**3
    max_members: Count = 10_000


class TargetConfig(_Strict):
    platform: Literal["linux-x86_64", "linux-aarch64"] = "linux-x86_64"
    accelerator: Literal["cpu", "gpu"] = "cpu"
    python: tuple[Annotated[str, StringConstraints(pattern=names.PYTHON_VERSION)], ...] | None = None
    """The device's Python (``"3.10"``), or several (``["3.11", "3.13"]``: a vendored bundle then carries wheels
    for each, and the device installs those of the Python it has); the runtime definition's default when unset."""

    @field_validator("python", mode="before")
    @classmethod
    def _one_or_several(cls, value: object) -> object:
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list | tuple) and (not value or len(set(value)) != len(value)):
            raise ValueError("lists each device Python once, at least one")
        return value

    def pythons(self, default: str) -> tuple[str, ...]:
        """The device Pythons the bundle is for, the first one preferred."""
        return self.python or (default,)
    backend: Annotated[str, StringConstraints(pattern=names.PLUGIN_NAME)] = "onnxruntime"
    """The target backend (``deeplens-build plugins`` lists them): ``onnxruntime``, ``openvino``, ``tensorrt``."""
    opset: Annotated[int, Strict(), Field(ge=7, le=40)] | None = None
    """The highest ONNX opset the device's runtime loads, when lower than the backend's and runtime's own."""


class RuntimeConfig(_Strict):
    name: str = "auto"
    definitions: ProjectPath | None = None
    vendor: bool = False
    find_links: tuple[ProjectPath, ...] = ()
    index: bool = True

    @model_validator(mode="before")
    @classmethod
    def _no_image(cls, data: object) -> object:
        # runtime.image shipped a data-only image that nothing ran; it went rather than stay half-built
        if isinstance(data, dict) and "image" in data:
            raise ValueError("`runtime.image` is gone: the image it built held data only and no device ran it; "
                             "remove it (the recipe installs the runtime in a virtual environment on the device)")
        return data


class GreengrassConfig(_Strict):
    format: Literal["v2", "v1", "both"] = "v2"
    bucket: str = "deeplens-greengrass-artifacts"
    prefix: str = "components"
    component: Annotated[str, StringConstraints(pattern=names.COMPONENT_NAME)] | None = None
    thing_name: str | None = None
    model_path: str = "/greengrass-machine-learning/model"

    @model_validator(mode="after")
    def _v1_names_the_device(self) -> GreengrassConfig:
        if self.format in ("v1", "both") and not self.thing_name:
            raise ValueError("includes v1, whose subscriptions name the device: set `greengrass.thing_name` (the "
                             "AWS IoT thing of the DeepLens core)")
        return self


class DeviceConfig(_Strict):
    kinesis_video_stream: Annotated[str, StringConstraints(pattern=names.KVS_STREAM)] | None = None
    """The Kinesis Video stream DeepLens_Kinesis_Video streams to; `deploy` creates it when missing."""
    retention_hours: Annotated[int, Strict(), Field(ge=0, le=87600)] = 2


class ProfileConfig(_Strict):
    runs: Annotated[int, Strict(), Field(ge=0, le=10000)] = 0
    """Timed runs per runtime on the build machine (batch 1), recorded in the manifest; 0 turns profiling off.
    Off by default: latencies differ from run to run, so a profiled bundle is not byte-for-byte reproducible."""


class BuildConfig(_Strict):
    work_dir: ProjectFolder = Path(WORK_DIR)
    output: ProjectFolder = Path("dist")
    cache: Annotated[str, AfterValidator(names.check_shared_cache)] | None = None
    """A cache shared between machines (CI): ``s3://BUCKET/PREFIX``, asked after the local one."""
    cache_key: str | None = None
    """What signs the entries this build uploads to ``cache``: a PEM private key or ``kms:KEY_ID``; default the
    signing key."""
    cache_trust: tuple[Annotated[Path, AfterValidator(_resolve), AfterValidator(_existing_file)], ...] = ()
    """The PEM public keys whose ``cache`` entries this build takes; default the public half of ``cache_key``."""


class ProjectConfig(_Strict):
    model: ModelConfig
    lambda_: LambdaConfig = Field(alias="lambda")
    parity: ParityConfig
    calibration: CalibrationConfig
    fetch: FetchConfig
    target: TargetConfig
    runtime: RuntimeConfig
    build: BuildConfig
    greengrass: GreengrassConfig
    device: DeviceConfig
    profile: ProfileConfig
    plugins: dict[str, dict[str, Any]] = Field(default_factory=dict)
    root: Path = Field(default=Path("."), exclude=True)
    """The folder holding ``deeplens.toml``."""

    @model_validator(mode="before")
    @classmethod
    def _sections_default_to_empty(cls, data: Any) -> Any:
        # validated from {} rather than given as instances, so their relative paths resolve against the project
        if isinstance(data, dict):
            data = {section: {} for section in _OPTIONAL_SECTIONS} | data
            lambda_, greengrass = data.get("lambda"), data.get("greengrass")
            if isinstance(lambda_, dict) and "runtime" not in lambda_ and isinstance(greengrass, dict) and \
                    greengrass.get("format") in ("v1", "both"):
                data["lambda"] = {**lambda_, "runtime": V1_LAMBDA_RUNTIME}
        return data

    @model_validator(mode="after")
    def _int8_needs_calibration(self) -> ProjectConfig:
        if self.model.precision == "int8" and self.calibration.samples is None:
            raise ValueError('Field `calibration.samples` is required at model.precision = "int8": a folder of the '
                             "inputs INT8 is calibrated and gated on (.npy/.npz tensors or JPEG/PNG images)")
        return self


def settings_sha256(config: ProjectConfig) -> str:
    """Digest of the project's settings but ``[build]`` (defaults included), each path relative to the project, or
    by its name when outside it (as the manifest names a local source): the same wherever the project and its
    training output are checked out, so it can stand in a reproducible bundle's provenance."""
    root = config.root.resolve()

    def portable(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: portable(item) for key, item in value.items()}
        if isinstance(value, list):
            return [portable(item) for item in value]
        if isinstance(value, str) and Path(value).is_absolute():
            path = Path(value)
            return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        return value

    # [build] (work and output folders, the shared cache and its keys) changes where a bundle is made, not what
    return json_sha256(portable(config.model_dump(mode="json", by_alias=True, exclude={"build"})))


_OPTIONAL_SECTIONS = ("parity", "calibration", "fetch", "target", "runtime", "build", "greengrass", "device", "profile")


def load_config(path: Path | None, document: dict[str, Any] | None = None) -> ProjectConfig:
    """Read and validate ``deeplens.toml``; every problem is a ``ConfigError`` quoting the key path.

    :param document: the file's TOML, when the caller has parsed it already (:func:`layout.read_document`)."""
    path = config_file(path)
    data = read_document(path) if document is None else document
    if "root" in data:
        raise ConfigError(f"{path}: `root` is not a setting")
    return parse_config(data, root=path.parent, where=str(path))


def parse_config(data: dict[str, Any], *, root: Path, where: str = CONFIG_NAME) -> ProjectConfig:
    try:
        return ProjectConfig.model_validate({**data, "root": root}, context={"base": root})
    except ValidationError as exc:
        raise ConfigError(f"{where}: {names.first_problem(exc)}") from exc
