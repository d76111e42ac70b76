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
    ConversionError,
    ConvertedModel,
    Framework,
    ModelFiles,
    TrainingOutput,
    hookimpl,
    onnxtools,
)


@hookimpl
def deeplens_build_framework() -> Framework:
    return Framework(name="onnx", summary="ONNX models (.onnx)", requires=("onnx", "onnxruntime"),
                     install="pip install deeplens-build-onnx")


@hookimpl
def deeplens_build_detect(source: TrainingOutput, settings: Mapping[str, Any]) -> ModelFiles | None:
    models = source.matching(".onnx")
    if not models:
        return None
    wanted = settings.get("file")
    if wanted is not None:
        if wanted not in models:
            raise ConversionError(f"`plugins.onnx.file` is {wanted!r}, but the ONNX files are {', '.join(models)}")
        return ModelFiles(files=(wanted,))
    if len(models) > 1:
        raise ConversionError(f"several ONNX models ({', '.join(models)}); choose one with "
                              "[plugins.onnx] file = \"...\" in deeplens.toml")
    return ModelFiles(files=models)


@hookimpl
def deeplens_build_convert(source: TrainingOutput, model: ModelFiles, workdir: Path) -> ConvertedModel:
    original = source.path(model.files[0])
    loaded = onnxtools.load(original)
    inputs, outputs = onnxtools.interface(loaded)
    target = workdir / "model.onnx"
    shutil.copyfile(original, target)
    return ConvertedModel(format="onnx", path=target, inputs=inputs, outputs=outputs,
                          labels=source.copy_labels(workdir))


@hookimpl
def deeplens_build_reference_run(source: TrainingOutput, model: ModelFiles, inputs: Mapping[str, Any]
                                 ) -> Mapping[str, Any]:
    return onnxtools.run(source.path(model.files[0]), inputs, optimize=False)

