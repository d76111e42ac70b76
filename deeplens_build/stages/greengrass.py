"""Greengrass stage: the documents a core needs (a v2 recipe, the v1 group definitions and their model
archive), written for ``greengrass.format`` and cached by the digests of the files they name."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deeplens_build.aws import greengrass
from deeplens_build.digest import file_sha256
from deeplens_build.manifest import (
    RECIPE,
    V1_MODEL_ARCHIVE,
    v1_definition,
)
from deeplens_build.stages.lambda_package import write_zip
from deeplens_build.stages.runtime import DEFINITION, device_runtimes
from deeplens_build.values import (
    GreengrassDocuments,
    LambdaPackage,
    PublishedLambda,
    Runtime,
)

if TYPE_CHECKING:
    from deeplens_build.build import Build


def run(b: Build, payload: Mapping[str, Path], *, runtime: Runtime, opset: int | None, vendored: bool,
        lambda_pkg: LambdaPackage, published: PublishedLambda | None) -> dict[str, Path]:
    """Write the Greengrass documents for ``config.greengrass.format``; return bundle path → file."""
    config = b.config
    pins = device_pins(b, runtime, opset=opset, vendored=vendored)
    fmt = config.greengrass.format
    # what the device needs, by file name (Greengrass puts artifacts side by side); not the runtime definition
    device_files = {arc.rsplit("/", 1)[-1]: path for arc, path in payload.items() if not arc.endswith(DEFINITION)}
    environment = greengrass.project_environment(config)

    def write(scratch: Path) -> GreengrassDocuments:
        documents: dict[str, Any] = {}
        if fmt in ("v2", "both"):
            documents[RECIPE] = greengrass.recipe(
                config, artifacts=device_files, runtime=runtime, pins=pins, vendored=vendored,
                lambda_pkg=lambda_pkg, environment=environment)
        files = {}
        if fmt in ("v1", "both"):
            archive = write_zip({name: path for name, path in device_files.items() if path != lambda_pkg.path
                                 and not name.endswith((".whl", ".tar"))}, scratch / "model.zip")
            files[V1_MODEL_ARCHIVE] = archive
            for name, document in greengrass.v1_definitions(config, published, model_archive=archive).items():
                documents[v1_definition(name)] = document
        for arc, document in documents.items():
            target = scratch / arc.rsplit("/", 1)[-1]
            target.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            files[arc] = target
        return GreengrassDocuments(files=files)

    key = {"payload": {arc: file_sha256(p) for arc, p in payload.items()}, "published": published and published.arn,
           "pins": pins,
           # no local path in the key, so another machine's entry (a shared cache) is found
           "config": config.model_dump(mode="json", include={"greengrass", "lambda_", "target", "model", "device"},
                                       exclude={"lambda_": {"source"}, "model": {"source", "labels"}})}
    return dict(b.stage("greengrass", key, GreengrassDocuments, write).files)


def device_pins(b: Build, runtime: Runtime, *, opset: int | None, vendored: bool) -> dict[str, tuple[str, ...]]:
    """The runtime's exact requirements for each device Python the recipe may install it on, ``target.python``
    (the runtime's default) first: with vendored wheels those ``target.python`` lists, whose wheels the bundle
    carries; else every Python the runtime definition pins whose runtime still loads the artifact's ONNX opset."""
    platform = b.config.target.platform
    if vendored:
        return {other.python: tuple(other.requirements[platform]) for other in device_runtimes(b, runtime)}
    definition = next(r for r in b.runtimes if r.name == runtime.name)
    pins = {runtime.python: tuple(runtime.requirements[platform])}
    for python in reversed(definition.supported_pythons):  # newest first: a device's python3 is likelier new
        other = definition.for_python(python)
        if python not in pins and platform in other.requirements and (
                opset is None or other.onnx_opset is None or opset <= other.onnx_opset):
            pins[python] = tuple(other.requirements[platform])
    return pins
