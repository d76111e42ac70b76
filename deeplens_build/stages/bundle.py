"""Bundle stage: the archive's layout (bundle path → file on disk; :mod:`deeplens_build.manifest` names its
folders), written and signed by :mod:`deeplens_build.bundle`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from deeplens_build import attest
from deeplens_build.bundle import write_bundle
from deeplens_build.config import settings_sha256
from deeplens_build.digest import file_sha256
from deeplens_build.manifest import (
    DEVICE_BUILD,
    DEVICE_MODULE,
    DEVICE_REFERENCE,
    LABELS,
    LAMBDA_DIR,
    MODEL_DIR,
    MODEL_SIGNATURE,
    PROVENANCE,
    RUNTIME_DIR,
    WHEELS_DIR,
    BuildRecord,
)
from deeplens_build.plugins import installed_version
from deeplens_build.records import ParityReport
from deeplens_build.signing import LocalSigner, fingerprint
from deeplens_build.stages.runtime import DEFINITION
from deeplens_build.types import Artifact, TrainingOutput
from deeplens_build.values import (
    BuildResult,
    BundleSizes,
    Detection,
    LambdaPackage,
    ReferenceRun,
    Runtime,
    Wheelhouse,
)

if TYPE_CHECKING:
    from deeplens_build.build import Build


def payload(b: Build, detection: Detection, converted: Artifact, compiled: Artifact, reference: ReferenceRun | None,
            runtime: Runtime, wheelhouse: Wheelhouse, lambda_pkg: LambdaPackage) -> dict[str, Path]:
    """The archive's layout (manifest.py names its folders): bundle path → file on disk."""
    payload = {f"{MODEL_DIR}/{p.name}": p for p in compiled.files}
    native = compiled.format == converted.format != "onnx"  # a framework's own format, run by its own runtime
    if native:  # convert refused one without a device module
        payload[DEVICE_MODULE] = detection.plugin.framework.device_module
    else:
        backend = b.target.backend
        payload[DEVICE_MODULE] = backend.device_module
        if backend.device_build is not None:
            payload[DEVICE_BUILD] = backend.device_build
            if reference is not None:  # what the device compiles is checked there, against the original
                payload[DEVICE_REFERENCE] = reference.path
    if labels := b.config.model.labels or converted.labels:
        payload[LABELS] = labels
    payload[f"{LAMBDA_DIR}/{lambda_pkg.path.name}"] = lambda_pkg.path
    payload[f"{RUNTIME_DIR}/{runtime.name}/{DEFINITION}"] = runtime.definition
    payload.update({f"{WHEELS_DIR}/{wheel.name}": wheel for wheel in wheelhouse.wheels})
    return payload


def attestations(b: Build, payload: Mapping[str, Path], record: BuildRecord) -> dict[str, Path]:
    """What other tools verify, beside the manifest: the model folder's OMS signature, then the SLSA provenance of
    every other file. A stage of its own, so a rebuild that changes nothing signs (and reads) nothing again."""
    digests = {arc: file_sha256(file) for arc, file in payload.items()}
    key = {"payload": digests, "record": record.to_dict(),
           "settings": settings_sha256(b.config), "signer": fingerprint(b.signer.public_key_pem),
           "tools": {name: installed_version(name) for name in attest.TOOLS}}

    def build(workdir: Path) -> dict[str, Path]:
        model = {arc.split("/", 1)[1]: sha256 for arc, sha256 in digests.items() if arc.startswith(f"{MODEL_DIR}/")}
        signature = attest.sign_model(model, b.signer, workdir)
        subjects = {**digests, MODEL_SIGNATURE: file_sha256(signature)}
        return {MODEL_SIGNATURE: signature,
                PROVENANCE: attest.provenance(record, subjects, key["settings"], b.signer, workdir)}

    return b.stage("attest", key, dict[str, Path], build)


def run(b: Build, payload: Mapping[str, Path], record: BuildRecord, *, training: TrainingOutput,
            compiled: Artifact, parity: ParityReport | None, output: Path) -> BuildResult:
    b.reporter.step(f"bundle: signing with {b.signer.description}")
    written = b.config.build.work_dir / "written" / f"{record.name}-{record.version}.json"
    path, sha256, manifest = write_bundle({**payload, **attestations(b, payload, record)}, record, b.signer, output,
                                          written=written, reuse=b.options.use_cache)
    sizes = BundleSizes(source=training.size, artifact=sum(p.stat().st_size for p in compiled.files),
                        bundle=path.stat().st_size)
    return BuildResult(bundle=path, sha256=sha256, name=record.name, version=record.version,
                       framework=record.framework, parity=parity, sizes=sizes, cached_stages=tuple(b.cached),
                       notes=tuple(b.reporter.notes), manifest=manifest, stages=tuple(b.stages),
                       local_inputs=b.local_source and isinstance(b.signer, LocalSigner) and not b.options.publish)
