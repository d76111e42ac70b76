"""Convert stage: the framework plugin turns its model into an artifact (ONNX, or a native format), at the
highest opset the device loads."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from deeplens_build.errors import DeepLensBuildError, PluginError
from deeplens_build.stages.runtime import device_runtimes, select_runtime
from deeplens_build.types import Artifact, TrainingOutput
from deeplens_build.values import Detection

if TYPE_CHECKING:
    from deeplens_build.build import Build


def opset_ceiling(b: Build) -> int | None:
    """The highest ONNX opset the device loads: the lowest of the backend's, ``target.opset`` and the ONNX
    runtime's on the device's Python (matched as the runtime stage would match it, when it can be yet; the
    match is kept in ``b.onnx_runtime`` for that stage)."""
    target, backend = b.config.target, b.target.backend
    wanted = b.config.runtime.name if b.config.runtime.name != "auto" else backend.runtime or "auto"
    try:
        runtime = select_runtime("onnx", target.platform, target.accelerator, wanted=wanted, suggested=None,
                                 available=b.runtimes)
        each = device_runtimes(b, runtime)
        b.onnx_runtime = each[0]
        # the artifact must load on every device Python the bundle is for
        runtime_opset = min((r.onnx_opset for r in each if r.onnx_opset is not None), default=None)
    except DeepLensBuildError:  # no single ONNX runtime fits yet: the runtime stage says why, with the format known
        runtime_opset = None
    limits = [limit for limit in (backend.max_opset, target.opset, runtime_opset) if limit is not None]
    return min(limits) if limits else None


def run(b: Build, training: TrainingOutput, detection: Detection, opset: int | None) -> Artifact:
    settings = b.settings[detection.plugin.framework.name]
    key = {"source": training.sha256, "files": detection.model.files, "plugin": b.plugin_identity(detection),
           "shapes": b.shapes, "settings": settings.model_dump(mode="json"), "opset": opset}

    def convert(workdir: Path) -> Artifact:
        at = f" at opset {opset} at most" if opset else ""
        b.reporter.step(f"convert: {detection.plugin.framework.name} → artifact{at}")
        return b.manager.convert(detection, training, workdir, b.shapes, settings, opset)

    converted = b.stage("convert", key, Artifact, convert)
    framework = detection.plugin.framework
    if converted.format != "onnx" and framework.device_module is None:
        raise PluginError(f"plugin {detection.plugin.name!r} made a native {converted.format} artifact but ships no "
                          "device module (Framework.device_module) to load it on a device, so neither the Lambda "
                          "nor awscam.Model could run it; package it as ONNX instead")
    layouts = {name: spec.layout for name, spec in b.config.model.inputs.items() if spec.layout}
    return dataclasses.replace(converted, inputs=tuple(
        dataclasses.replace(spec, layout=layouts.get(spec.name, spec.layout)) for spec in converted.inputs))
