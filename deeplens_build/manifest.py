"""The bundle's manifest as typed, frozen dataclasses, and the layout and device contract it describes.

The pipeline builds a :class:`BuildRecord`; :mod:`bundle` adds the file list and the signer and writes the
:class:`Manifest`; every reader (``verify``, ``inspect``, ``deploy``, ``run``) gets it back validated. A bundle is
input from someone else: its names become folder names and its handler a module to import, so every field is
checked on read as strictly as ``deeplens.toml`` is, and a malformed manifest is a verification error that
names the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Annotated, Any, Literal

from deeplens_build import names, strict
from deeplens_build.errors import BundleError, VerificationError
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


BundlePath = Annotated[str, names.check_bundle_path]
Sha256 = Annotated[str, strict.pattern(r"[0-9a-f]{64}")]
ShortText = Annotated[str, strict.at_most(4096)]
Size = Annotated[int, strict.at_least(0)]
_record = dataclass(frozen=True, kw_only=True)


@_record
class SourceRecord:
    kind: ShortText
    origin: ShortText
    sha256: Sha256
    size: Size
    model_files: tuple[ShortText, ...]
    notes: tuple[ShortText, ...] = ()
    sagemaker: SageMakerJob | None = None


@_record
class ModelRecord:
    format: ShortText
    file: BundlePath
    files: tuple[BundlePath, ...]
    labels: BundlePath | None
    precision: ShortText
    task: ShortText
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@_record
class OptimizationRecord:
    passes: tuple[ShortText, ...]
    opset: int | None
    size_before: int
    size_after: int
    fp32_nodes: tuple[ShortText, ...] = ()
    """At ``precision = "fp16"`` or ``"int8"``: the nodes kept in FP32 so parity (INT8's gate) passes."""
    calibration: CalibrationReport | None = None
    """At ``precision = "int8"``: the samples' digest and counts, the calibration method."""


@_record
class TargetRecord:
    backend: Annotated[str, strict.pattern(names.PLUGIN_NAME)]
    plugin: ShortText
    distribution: ShortText | None
    version: ShortText | None
    tools: dict[str, ShortText]
    max_opset: int | None
    compiled_on: Literal["build", "device", "nothing"]
    """Where the artifact becomes what the device executes: on the build machine, on the device at install, or
    nowhere (the ONNX artifact runs as it is)."""


@_record
class WheelRecord:
    file: BundlePath
    sha256: Sha256


@_record
class RuntimeRecord:
    name: Annotated[str, names.check_runtime_name]
    summary: ShortText
    accelerator: ShortText
    python: ShortText
    platform: ShortText
    requirements: tuple[ShortText, ...]
    definition: BundlePath
    wheels: tuple[WheelRecord, ...]

    image: dict[str, ShortText] | None = field(default=None, metadata={"written": False})
    """Read, never written: bundles built while ``runtime.image`` existed record their image (or null) here."""


@_record
class LambdaRecord:
    name: Annotated[str, names.check_lambda_name]
    handler: Annotated[str, names.check_handler]
    version: ShortText
    file: BundlePath
    sha256: Sha256
    environment: dict[Annotated[str, names.check_variable], ShortText] = field(default_factory=dict)
    """What ``[lambda] environment`` declares: all of the build machine's environment a Lambda ever gets."""
    published_version: ShortText | None = None
    arn: ShortText | None = None
    alias: ShortText | None = None

    @property
    def module(self) -> str:
        """The module a core imports: the handler without its function."""
        return self.handler.rsplit(".", 1)[0]


@_record
class GreengrassRecord:
    format: Literal["v2", "v1", "both"]
    component: ShortText
    documents: tuple[BundlePath, ...]


@_record
class KinesisRecord:
    """The Kinesis Video stream the device streams to (``[device] kinesis_video_stream``)."""

    stream: Annotated[str, strict.pattern(names.KVS_STREAM)]
    retention_hours: Size


@_record
class PluginRecord:
    name: ShortText
    distribution: ShortText | None
    version: ShortText | None
    tools: dict[str, ShortText]


@_record
class ProvenanceRecord:
    plugin: PluginRecord
    tools: dict[str, ShortText]


@_record
class BuildRecord:
    """What the pipeline knows of a build: everything in the manifest but the file list and the signer."""

    name: Annotated[str, names.check_model_name]
    version: Annotated[str, names.check_version]
    framework: ShortText
    source: SourceRecord
    model: ModelRecord
    optimization: OptimizationRecord
    parity: ParityReport | None
    target: TargetRecord | None = None
    profile: tuple[Latency, ...] = ()
    """Latency at batch 1 on each runtime of the build machine (``[profile] runs``), the original's included."""
    runtime: RuntimeRecord
    lambda_: LambdaRecord = field(metadata={"key": "lambda"})
    greengrass: GreengrassRecord
    provenance: ProvenanceRecord
    kinesis: KinesisRecord | None = None

    def to_dict(self) -> dict[str, Any]:
        """As JSON values, under the manifest's keys."""
        return strict.encode(self)


@_record
class FileEntry:
    path: BundlePath
    size: Size
    sha256: Sha256


@_record
class SigningRecord:
    algorithm: Literal["ECDSA_P256_SHA256"]
    public_key: ShortText
    fingerprint: Sha256


@_record
class Manifest(BuildRecord):
    """The signed manifest: the build record, every payload file's size and sha256, and who signed it."""

    schema_: Literal["deeplens-build/bundle@1"] = field(metadata={"key": "schema"})
    files: tuple[FileEntry, ...]
    signing: SigningRecord

    def to_json(self) -> bytes:
        import json

        return (json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


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
        return strict.decode(Manifest, raw)
    except strict.Invalid as exc:
        raise VerificationError(f"{where}: {MANIFEST} is malformed: {exc}") from exc


def build_manifest(record: BuildRecord, files: tuple[FileEntry, ...], signing: SigningRecord) -> Manifest:
    """The manifest of ``record`` as a reader will read it back (lists as tuples, every field checked): a build
    never writes what ``verify`` refuses.

    :raises BundleError: naming the field, should the pipeline have recorded something a reader refuses.
    """
    manifest = Manifest(**{f.name: getattr(record, f.name) for f in fields(record)}, schema_=SCHEMA, files=files,
                        signing=signing)
    try:
        return strict.decode(Manifest, manifest.to_dict())
    except strict.Invalid as exc:
        raise BundleError(f"the bundle's manifest would be malformed: {exc}") from exc
