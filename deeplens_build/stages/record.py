"""What the manifest records of a build: every stage's result mapped onto :class:`manifest.BuildRecord`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from deeplens_build.aws import greengrass
from deeplens_build.digest import file_sha256
from deeplens_build.manifest import (
    LABELS,
    LAMBDA_DIR,
    MODEL_DIR,
    RUNTIME_DIR,
    WHEELS_DIR,
    BuildRecord,
    GreengrassRecord,
    KinesisRecord,
    LambdaRecord,
    ModelRecord,
    OptimizationRecord,
    PluginRecord,
    ProvenanceRecord,
    RuntimeRecord,
    SourceRecord,
    TargetRecord,
    WheelRecord,
)
from deeplens_build.records import Latency, ParityReport
from deeplens_build.stages.runtime import DEFINITION
from deeplens_build.types import Artifact, TrainingOutput
from deeplens_build.values import (
    Detection,
    LambdaPackage,
    Optimized,
    PublishedLambda,
    Runtime,
    Wheelhouse,
)

if TYPE_CHECKING:
    from deeplens_build.build import Build


def run(b: Build, *, training: TrainingOutput, detection: Detection, optimized: Optimized,
              compiled: Artifact, parity: ParityReport | None, profile: tuple[Latency, ...], runtime: Runtime,
              wheelhouse: Wheelhouse, lambda_pkg: LambdaPackage,
              published: PublishedLambda | None, documents: list[str], labels: bool) -> BuildRecord:
    """Everything the bundle was built from and what it holds; no absolute path, so two folders agree."""
    config, backend = b.config, b.target.backend
    platform_name = config.target.platform
    return BuildRecord(
        name=config.model.name,
        version=config.model.version,
        framework=detection.plugin.framework.name,
        source=SourceRecord(kind=training.kind, origin=training.origin, sha256=training.sha256, size=training.size,
                            model_files=detection.model.files, notes=detection.model.notes,
                            sagemaker=training.sagemaker),
        model=ModelRecord(format=compiled.format, file=f"{MODEL_DIR}/{compiled.path.name}",
                          files=tuple(f"{MODEL_DIR}/{p.name}" for p in compiled.files),
                          labels=LABELS if labels else None,
                          precision=optimized.precision, task=config.model.task, inputs=compiled.inputs,
                          outputs=compiled.outputs),
        optimization=OptimizationRecord(passes=optimized.passes, opset=optimized.opset,
                                        size_before=optimized.size_before,
                                        size_after=sum(p.stat().st_size for p in compiled.files),
                                        fp32_nodes=optimized.fp32_nodes, calibration=optimized.calibration),
        parity=parity,
        # a native artifact is run by its framework's own runtime (the runtime record): no target backend touched it
        target=None if optimized.artifact.format != "onnx" else TargetRecord(
            backend=backend.name, plugin=b.target.plugin, distribution=b.target.distribution,
            version=b.target.version, tools=dict(b.target.tool_versions), max_opset=backend.max_opset,
            compiled_on="device" if backend.device_build else "build" if backend.compile else "nothing"),
        profile=profile,
        runtime=RuntimeRecord(
            name=runtime.name, summary=runtime.summary, accelerator=runtime.accelerator, python=runtime.python,
            platform=platform_name, requirements=runtime.requirements[platform_name],
            definition=f"{RUNTIME_DIR}/{runtime.name}/{DEFINITION}",
            wheels=tuple(WheelRecord(file=f"{WHEELS_DIR}/{w.name}", sha256=file_sha256(w)) for w in wheelhouse.wheels)),
        lambda_=LambdaRecord(
            name=lambda_pkg.name, handler=lambda_pkg.handler, version=lambda_pkg.version,
            file=f"{LAMBDA_DIR}/{lambda_pkg.path.name}", sha256=lambda_pkg.sha256,
            environment=greengrass.project_environment(config),
            published_version=published.version if published else None, arn=published.arn if published else None,
            alias=published.alias if published else None),
        greengrass=GreengrassRecord(format=config.greengrass.format, component=greengrass.component_name(config),
                                    documents=tuple(documents)),
        provenance=ProvenanceRecord(plugin=PluginRecord(name=detection.plugin.name,
                                                       distribution=detection.plugin.distribution,
                                                       version=detection.plugin.version,
                                                       tools=dict(detection.plugin.tool_versions)),
                                    tools=dict(b.tools)),
        kinesis=KinesisRecord(stream=config.device.kinesis_video_stream, retention_hours=config.device.retention_hours)
        if config.device.kinesis_video_stream else None,
    )
