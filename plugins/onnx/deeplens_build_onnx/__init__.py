"""The ONNX framework plugin: the worked example of a deeplens-build plugin (README, "Writing a plugin").

An ONNX training output needs no conversion: the plugin checks the model and writes it as the artifact, its
weights as external data (``onnxtools.save``; data files the source already has are copied as they are), so the
core's stages edit the graph without holding the weights.
The parity reference runs that graph exactly as written — onnxruntime with its optimizer turned off — so the
core's optimized artifact is compared against the original.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deeplens_build import (
    Artifact,
    Framework,
    ModelFiles,
    PluginSettings,
    Runner,
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
    """The source's weights move once, never decoded: inline weights are copied out as external data by
    ``onnxtools.externalize``, external data files copied as they are (both in the kernel); the checker then
    reads the graph alone (over inline weights it parses them all again: 3 s for 512 MB, measured)."""
    path = source.path(model.files[0])
    target = workdir / "model.onnx"
    files = onnxtools.externalize(path, target) or _saved(path, target, workdir)
    checked = onnxtools.load(target, weights=False, name=model.files[0])
    inputs, outputs = onnxtools.interface(checked)
    return Artifact(format="onnx", path=target, extra_files=files[1:], inputs=inputs, outputs=outputs,
                    labels=source.copy_labels(workdir))


def _saved(path: Path, target: Path, workdir: Path) -> tuple[Path, ...]:
    """What ``externalize`` leaves to onnx: weights already in external data files, or in typed fields."""
    import onnx

    loaded = onnxtools.load(path, weights=False, check=False)  # the graph, and the weights it holds inline
    locations = onnxtools.external_locations(loaded)
    if not locations:
        return onnxtools.save(loaded, target)
    for location in locations:  # inside the source's folder: SourceContext brought them as its companions
        (workdir / location).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path.parent / location, workdir / location)
    onnx.save(loaded, str(target))
    return (target, *(workdir / location for location in locations))


@hookimpl
def deeplens_build_reference_run(converted: Artifact, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    return _original(converted.path)(inputs)


@hookimpl
def deeplens_build_reference_done() -> None:
    _original.cache_clear()


@functools.lru_cache(maxsize=4)
def _original(path: Path) -> Runner:
    """The original graph in a session made once per reference run (paths in the core's cache never change): every
    parity sample reuses it; it holds all the weights, so it goes when the run is done."""
    return onnxtools.runner(path, optimize=False)

