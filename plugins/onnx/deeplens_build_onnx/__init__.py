"""The ONNX framework plugin: the worked example of a deeplens-build plugin (README, "Writing a plugin").

An ONNX training output needs no conversion: the plugin checks the model, copies it as the artifact, and runs
the original file with onnxruntime's optimizer turned off as the parity reference, so the core's optimized
artifact is compared against the graph exactly as written.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deeplens_build import (
    Artifact,
    Framework,
    ModelFiles,
    PluginSettings,
    TrainingOutput,
    choose_one,
    hookimpl,
    onnxtools,
)


class OnnxSettings(PluginSettings):
    """``[plugins.onnx]``."""

    file: str | None = None
    """Which ``.onnx`` file to package when the output holds several."""


@hookimpl
def deeplens_build_framework() -> Framework:
    return Framework(name="onnx", summary="ONNX models (.onnx)", requires=("onnx", "onnxruntime"),
                     install="pip install deeplens-build-onnx", settings=OnnxSettings)


@hookimpl
def deeplens_build_detect(source: TrainingOutput, settings: OnnxSettings) -> ModelFiles | None:
    models = source.matching(".onnx")
    if not models:
        return None
    return ModelFiles(files=(choose_one(models, settings.file, setting="plugins.onnx.file", what="ONNX models"),))


@hookimpl
def deeplens_build_convert(source: TrainingOutput, model: ModelFiles, workdir: Path) -> Artifact:
    original = source.path(model.files[0])
    loaded = onnxtools.load(original)
    inputs, outputs = onnxtools.interface(loaded)
    target = workdir / "model.onnx"
    shutil.copyfile(original, target)
    return Artifact(format="onnx", path=target, inputs=inputs, outputs=outputs,
                    labels=source.copy_labels(workdir))


@hookimpl
def deeplens_build_reference_run(source: TrainingOutput, model: ModelFiles, inputs: Mapping[str, Any]
                                 ) -> Mapping[str, Any]:
    return onnxtools.run(source.path(model.files[0]), inputs, optimize=False)

