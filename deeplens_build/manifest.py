"""The bundle's manifest as typed, frozen classes, and the layout and device contract it describes.

The pipeline builds a :class:`BuildRecord`; :mod:`bundle` adds the file list and the signer and writes the
:class:`Manifest`; every reader (``verify``, ``inspect``, ``deploy``, ``run``) gets it back validated. A bundle is
input from someone else: its names become folder names and its handler a module to import, so every field is
checked on read as strictly as ``deeplens.toml`` is, and a malformed manifest is a verification error that
names the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from deeplens_build import names
from deeplens_build.errors import VerificationError
from deeplens_build.records import CalibrationReport, Latency, ParityReport, SageMakerJob, TensorSpec

SCHEMA = "deeplens-build/bundle@1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MAX_MANIFEST = 16 << 20
"""Bytes a manifest may hold: a few KiB in practice; read whole, so bounded."""
MAX_SIGNATURE = 1024
"""Bytes a signature may hold: a DER ECDSA P-256 signature is at most 72."""

MODEL_DIR = "model"
MODEL_SIGNATURE = "model.sig"
"""The model folder's OpenSSF model signature (``model_signing verify``), beside the manifest's."""
PROVENANCE = "provenance.intoto.json"
"""The bundle's SLSA v1 provenance, a DSSE envelope."""
LABELS = f"{MODEL_DIR}/labels.txt"
LAMBDA_DIR = "lambda"
RUNTIME_DIR = "runtime"
WHEELS_DIR = f"{RUNTIME_DIR}/wheels"
GREENGRASS_DIR = "greengrass"
RECIPE = f"{GREENGRASS_DIR}/recipe.json"
V1_DIR = f"{GREENGRASS_DIR}/v1"
V1_MODEL_ARCHIVE = f"{V1_DIR}/model.zip"
V1_DEFINITIONS = ("function-definition", "resource-definition", "subscription-definition")

DEVICE_MODULE = f"{MODEL_DIR}/deeplens_model.py"
"""The target backend's device side: ``load(model_dir)`` gives the Lambda a model to run, whatever the backend."""
DEVICE_BUILD = f"{MODEL_DIR}/deeplens_compile.py"
"""A backend's step that compiles on the device (``python deeplens_compile.py MODEL_DIR WORK_DIR TOLERANCE``)."""
DEVICE_REFERENCE = f"{MODEL_DIR}/deeplens_reference.npz"
"""Beside a step that compiles on the device: the parity samples and the original model's outputs on them
(``in/I/NAME``, ``out/I/NAME``), so the step checks what it built against the original, on the device."""

MODEL_DIR_VARIABLE = "DEEPLENS_MODEL_DIR"
"""The device contract: the Lambda finds the bundle's model folder in this environment variable."""
PREPROCESS_VARIABLE = "DEEPLENS_PREPROCESS"
"""``[calibration.preprocess]`` as JSON, read by ``deeplens_preprocess.to_tensor`` on the device."""
WORK_DIR_VARIABLE = "DEEPLENS_WORK_DIR"
"""A folder the component may write and that survives redeployments (``{work:path}``): engines built on the
device, and their timing caches, live there."""
THING_VARIABLE = "AWS_IOT_THING_NAME"
"""Set by every Greengrass core: the thing the Lambda runs on."""


def infer_topic(thing: str) -> str:
    """The MQTT topic a device's results go to (``{iot:thingName}`` in a recipe, ``+`` for a thing group)."""
    return f"$aws/things/{thing}/infer"


def v1_definition(name: str) -> str:
    return f"{V1_DIR}/{name}.json"


def _plain_path(value: str) -> str:
    names.check_bundle_path(value)
    return value


BundlePath = Annotated[str, AfterValidator(_plain_path)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
ShortText = Annotated[str, StringConstraints(max_length=4096)]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SourceRecord(_Record):
    kind: ShortText
    origin: ShortText
    sha256: Sha256
    size: Annotated[int, Field(ge=0)]
    model_files: tuple[ShortText, ...]
    notes: tuple[ShortText, ...] = ()
    sagemaker: SageMakerJob | None = None


class ModelRecord(_Record):
    format: ShortText
    file: BundlePath
    files: tuple[BundlePath, ...]
    labels: BundlePath | None
    precision: ShortText
    task: ShortText
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


class OptimizationRecord(_Record):
    passes: tuple[ShortText, ...]
    opset: int | None
    size_before: int
    size_after: int
    fp32_nodes: tuple[ShortText, ...] = ()
    """At ``precision = "fp16"`` or ``"int8"``: the nodes kept in FP32 so parity (INT8's gate) passes."""
    calibration: CalibrationReport | None = None
    """At ``precision = "int8"``: the samples' digest and counts, the calibration method."""


class TargetRecord(_Record):
    backend: Annotated[str, StringConstraints(pattern=names.PLUGIN_NAME)]
    plugin: ShortText
    distribution: ShortText | None
    version: ShortText | None
    tools: dict[str, ShortText]
    max_opset: int | None
    compiled_on: Literal["build", "device", "nothing"]
    """Where the artifact becomes what the device executes: on the build machine, on the device at install, or
    nowhere (the ONNX artifact runs as it is)."""


class WheelRecord(_Record):
    file: BundlePath
    sha256: Sha256


class RuntimeRecord(_Record):
    name: Annotated[str, AfterValidator(names.check_runtime_name)]
    summary: ShortText
    accelerator: ShortText
    python: ShortText
    platform: ShortText
    requirements: tuple[ShortText, ...]
    definition: BundlePath
    wheels: tuple[WheelRecord, ...]

    image: dict[str, ShortText] | None = Field(default=None, exclude=True)
    """Read, never written: bundles built while ``runtime.image`` existed record their image (or null) here."""


class LambdaRecord(_Record):
    name: Annotated[str, AfterValidator(names.check_lambda_name)]
    handler: Annotated[str, AfterValidator(names.check_handler)]
    version: ShortText
    file: BundlePath
    sha256: Sha256
    environment: dict[Annotated[str, AfterValidator(names.check_variable)], ShortText] = Field(default_factory=dict)
    """What ``[lambda] environment`` declares: all of the build machine's environment a Lambda ever gets."""
    published_version: ShortText | None = None
    arn: ShortText | None = None
    alias: ShortText | None = None

    @property
    def module(self) -> str:
        """The module a core imports: the handler without its function."""
        return self.handler.rsplit(".", 1)[0]


class GreengrassRecord(_Record):
    format: Literal["v2", "v1", "both"]
    component: ShortText
    documents: tuple[BundlePath, ...]


class KinesisRecord(_Record):
    """The Kinesis Video stream the device streams to (``[device] kinesis_video_stream``)."""

    stream: Annotated[str, StringConstraints(pattern=names.KVS_STREAM)]
    retention_hours: Annotated[int, Field(ge=0)]


class PluginRecord(_Record):
    name: ShortText
    distribution: ShortText | None
    version: ShortText | None
    tools: dict[str, ShortText]


class ProvenanceRecord(_Record):
    plugin: PluginRecord
    tools: dict[str, ShortText]


class BuildRecord(_Record):
    """What the pipeline knows of a build: everything in the manifest but the file list and the signer."""

    name: Annotated[str, AfterValidator(names.check_model_name)]
    version: Annotated[str, AfterValidator(names.check_version)]
    framework: ShortText
    source: SourceRecord
    model: ModelRecord
    optimization: OptimizationRecord
    parity: ParityReport | None
    target: TargetRecord | None = None
    profile: tuple[Latency, ...] = ()
    """Latency at batch 1 on each runtime of the build machine (``[profile] runs``), the original's included."""
    runtime: RuntimeRecord
    lambda_: LambdaRecord = Field(alias="lambda")
    greengrass: GreengrassRecord
    provenance: ProvenanceRecord
    kinesis: KinesisRecord | None = None


class FileEntry(_Record):
    path: BundlePath
    size: Annotated[int, Field(ge=0)]
    sha256: Sha256


class SigningRecord(_Record):
    algorithm: Literal["ECDSA_P256_SHA256"]
    public_key: Annotated[str, StringConstraints(max_length=4096)]
    fingerprint: Sha256


class Manifest(BuildRecord):
    """The signed manifest: the build record, every payload file's size and sha256, and who signed it."""

    schema_: Literal["deeplens-build/bundle@1"] = Field(alias="schema")
    files: tuple[FileEntry, ...]
    signing: SigningRecord

    def to_json(self) -> bytes:
        import json

        return (json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def parse_manifest(data: bytes, where: str) -> Manifest:
    """Validate a manifest read from a bundle.

    :raises VerificationError: naming the first field that is missing, of the wrong type or unsafe.
    """
    import json

    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise VerificationError(f"{where}: {MANIFEST} is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        raise VerificationError(f"{where}: {MANIFEST} is not a {SCHEMA} manifest")
    try:
        # strict: a number written as a string, or a string as a number, is not what deeplens-build wrote
        return Manifest.model_validate_json(data, strict=True)
    except ValidationError as exc:
        raise VerificationError(f"{where}: {MANIFEST} is malformed: {names.first_problem(exc)}") from exc


def build_manifest(record: BuildRecord, files: tuple[FileEntry, ...], signing: SigningRecord) -> Manifest:
    return Manifest.model_validate({**record.model_dump(by_alias=True), "schema": SCHEMA, "files": files,
                                    "signing": signing})

