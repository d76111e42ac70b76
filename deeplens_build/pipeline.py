"""The build: fetch → detect → convert → optimize → parity → runtime → lambda → bundle → sign.

The core owns the order, the cache and the errors; plugins only fill the framework slots.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as metadata
import json
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deeplens_build import __version__
from deeplens_build.bundle import bundle_name, remove_partials, write_bundle
from deeplens_build.cache import Cache, tool_cache_environment
from deeplens_build.config import ProjectConfig
from deeplens_build.digest import file_sha256
from deeplens_build.errors import ConfigError
from deeplens_build.fetch import SAGEMAKER_PREFIX, fetch
from deeplens_build import greengrass
from deeplens_build.image import build_image
from deeplens_build.lambda_package import package_lambda, write_zip
from deeplens_build.manifest import (
    IMAGE,
    LABELS,
    LAMBDA_COMPONENT,
    LAMBDA_DIR,
    MODEL_DIR,
    RECIPE,
    RUNTIME_DIR,
    V1_MODEL_ARCHIVE,
    WHEELS_DIR,
    BuildRecord,
    GreengrassRecord,
    ImageRecord,
    LambdaRecord,
    ModelRecord,
    OptimizationRecord,
    PluginRecord,
    ProvenanceRecord,
    RuntimeRecord,
    SourceRecord,
    WheelRecord,
    v1_definition,
)
from deeplens_build.publish import publish_lambda
from deeplens_build.optimize import optimize
from deeplens_build.parity import check_parity
from deeplens_build.plugins import PluginManager
from deeplens_build.report import Reporter
from deeplens_build.runtime import DEFINITION, load_runtimes, select_runtime, vendor_wheels
from deeplens_build.signing import load_signer
from deeplens_build.types import (
    BuildResult,
    BundleSizes,
    ConvertedModel,
    Detection,
    GreengrassDocuments,
    LambdaPackage,
    OptimizedModel,
    ParityReport,
    PublishedLambda,
    Runtime,
    RuntimeImage,
    TrainingOutput,
    Wheelhouse,
)

CORE_TOOLS = ("numpy", "onnx", "onnxruntime", "onnxconverter-common")
"""Distributions whose versions shape the optimized artifact: part of every cache key and the manifest."""


@dataclass(frozen=True)
class BuildOptions:
    """What the command line adds to ``deeplens.toml``."""

    source: str | None = None
    output: Path | None = None
    signing_key: str | None = None
    use_cache: bool = True
    publish: bool = False


def package(config: ProjectConfig, options: BuildOptions, *, manager: PluginManager,
            reporter: Reporter) -> BuildResult:
    """Build the signed bundle for ``config``. On any failure nothing is left at the output path: neither a
    half-written bundle (those a killed build left are removed too) nor an earlier bundle of the same name,
    which would pass for this build's."""
    output = options.output or config.build.output
    remove_partials(output)
    try:
        return _build(config, options, output, manager=manager, reporter=reporter)
    except BaseException:
        (output / bundle_name(config.model.name, config.model.version)).unlink(missing_ok=True)
        raise


def _build(config: ProjectConfig, options: BuildOptions, output: Path, *, manager: PluginManager,
           reporter: Reporter) -> BuildResult:
    signer = load_signer(options.signing_key)  # before any heavy work: a missing key fails in a second
    os.environ.update(tool_cache_environment(config.build.work_dir))  # before onnxruntime or keras is imported
    if config.greengrass.format in ("v1", "both") and not options.publish:
        raise ConfigError("Greengrass v1 documents reference a published Lambda version: build with --publish, "
                          "or set `greengrass.format = \"v2\"`")
    source = options.source or _configured_source(config)
    plugin_settings = manager.settings(config.plugins)  # a typo in a plugin's table fails before any work
    cache = Cache(config.build.work_dir / "cache", reuse=options.use_cache)
    tools = {name: _version(name) for name in CORE_TOOLS} | {"deeplens-build": __version__,
                                                             "python": platform.python_version()}
    cached: list[str] = []

    reporter.step(f"fetch: {source}")
    training = fetch(source, cache=cache, limits=config.fetch, reporter=reporter)
    detection = manager.detect(training, config.model.framework, plugin_settings)
    plugin = detection.plugin
    settings = plugin_settings[plugin.framework.name]
    reporter.step(f"detect: {plugin.framework.name} model ({', '.join(detection.model.files)}) "
                  f"claimed by plugin {plugin.name}")
    for note in detection.model.notes:
        reporter.note(note)

    shapes = {name: spec.shape for name, spec in config.model.inputs.items() if spec.shape}
    layouts = {name: spec.layout for name, spec in config.model.inputs.items() if spec.layout}
    plugin_identity = {"name": plugin.name, "distribution": plugin.distribution, "version": plugin.version,
                       "tools": dict(plugin.tool_versions)}

    def convert(workdir: Path) -> ConvertedModel:
        reporter.step(f"convert: {plugin.framework.name} → artifact")
        return manager.convert(detection, training, workdir, shapes, settings)

    converted, hit = cache.stage("convert", {"source": training.sha256, "files": detection.model.files,
                                             "plugin": plugin_identity, "shapes": shapes,
                                             "settings": settings.model_dump(mode="json")},
                                 ConvertedModel, convert)
    _record("convert", hit, cached, reporter)
    converted = dataclasses.replace(converted, inputs=tuple(
        dataclasses.replace(spec, layout=layouts.get(spec.name, spec.layout)) for spec in converted.inputs))

    def optimize_stage(workdir: Path) -> OptimizedModel:
        reporter.step(f"optimize: {converted.format}, precision {config.model.precision}")
        return optimize(converted, shapes=shapes, precision=config.model.precision, workdir=workdir,
                        reporter=reporter)

    optimized, hit = cache.stage("optimize", {"artifact": [file_sha256(p) for p in converted.files],
                                              "format": converted.format,
                                              "inputs": [dataclasses.asdict(s) for s in converted.inputs],
                                              "outputs": [dataclasses.asdict(s) for s in converted.outputs],
                                              "shapes": shapes, "precision": config.model.precision,
                                              "tools": tools}, OptimizedModel, optimize_stage)
    _record("optimize", hit, cached, reporter)

    parity: ParityReport | None = None
    if optimized.format == "onnx":
        def parity_stage(_: Path) -> ParityReport:
            reporter.step(f"parity: original ({plugin.framework.name}) vs optimized (onnxruntime)")
            return check_parity(
                lambda inputs: manager.reference_run(detection, training, converted, inputs, settings),
                optimized, config=config.parity, task=config.model.task, reporter=reporter)

        samples = [file_sha256(p) for p in config.parity.samples if p.is_file()]
        parity, hit = cache.stage("parity", {"source": training.sha256, "files": detection.model.files,
                                             "plugin": plugin_identity, "artifact": file_sha256(optimized.path),
                                             "settings": config.parity.model_dump(mode="json"),
                                             "samples": samples, "precision": optimized.precision,
                                             "task": config.model.task, "tools": tools}, ParityReport, parity_stage)
        _record("parity", hit, cached, reporter)
    else:
        reporter.note(f"parity: not applicable, the {optimized.format} artifact is the original model itself")

    target = config.target
    runtime = select_runtime(optimized.format, target.platform, target.accelerator, wanted=config.runtime.name,
                             suggested=manager.runtime(detection, converted, target.platform),
                             available=load_runtimes(config.runtime.definitions))
    reporter.step(f"runtime: {runtime.name} for {target.platform} ({target.accelerator})")
    wheelhouse = Wheelhouse(wheels=())
    if config.runtime.vendor:
        wheelhouse = vendor_wheels(runtime, target.platform, config=config.runtime, cache=cache, reporter=reporter)

    lambda_pkg, hit = cache.stage(
        "lambda", {"config": config.lambda_.model_dump(mode="json", exclude={"source"}),
                   "files": _lambda_digests(config), "default_name": config.model.name},
        LambdaPackage, lambda workdir: package_lambda(config.lambda_, default_name=config.model.name,
                                                           workdir=workdir))
    _record("lambda", hit, cached, reporter)

    labels = config.model.labels or converted.labels
    if labels is not None and not labels.is_file():
        raise ConfigError(f"Field `model.labels` points to {labels}, which is not a file")
    payload = {f"{MODEL_DIR}/{p.name}": p for p in optimized.files}
    if labels is not None:
        payload[LABELS] = labels
    payload[f"{LAMBDA_DIR}/{lambda_pkg.path.name}"] = lambda_pkg.path
    payload[f"{RUNTIME_DIR}/{runtime.name}/{DEFINITION}"] = runtime.definition
    payload.update({f"{WHEELS_DIR}/{wheel.name}": wheel for wheel in wheelhouse.wheels})

    image = None
    if config.runtime.image:
        image = _runtime_image(config, cache, payload, runtime=runtime, reporter=reporter)
        payload[IMAGE] = image.path

    published = None
    if options.publish:
        published = publish_lambda(lambda_pkg, config.lambda_, environment=greengrass.lambda_environment(config),
                                   reporter=reporter)
    documents = _greengrass_documents(config, cache, payload, runtime=runtime, vendored=bool(wheelhouse.wheels),
                                      image=image, lambda_pkg=lambda_pkg, published=published)
    payload.update(documents)

    record = _manifest(config, training=training, detection=detection, optimized=optimized, parity=parity,
                         runtime=runtime, wheelhouse=wheelhouse, image=image, lambda_pkg=lambda_pkg,
                         published=published, documents=sorted(documents),
                         labels=LABELS if labels else None, tools=tools, plugin_identity=plugin_identity)
    reporter.step(f"bundle: signing with {signer.description}")
    path, sha256, manifest = write_bundle(payload, record, signer, output)
    sizes = BundleSizes(source=training.size, artifact=sum(p.stat().st_size for p in optimized.files),
                        bundle=path.stat().st_size)
    return BuildResult(bundle=path, sha256=sha256, name=config.model.name, version=config.model.version,
                       framework=plugin.framework.name, parity=parity, sizes=sizes, cached_stages=tuple(cached),
                       notes=tuple(reporter.notes), manifest=manifest)


def _greengrass_documents(config: ProjectConfig, cache: Cache, payload: Mapping[str, Path], *, runtime: Runtime,
                          vendored: bool, image: RuntimeImage | None, lambda_pkg: LambdaPackage,
                          published: PublishedLambda | None) -> dict[str, Path]:
    """Write the Greengrass documents for ``config.greengrass.format``; return bundle path → file."""
    fmt = config.greengrass.format
    # what the device needs, by file name (Greengrass puts artifacts side by side); not the runtime definition
    device_files = {path.name: path for arc, path in payload.items() if not arc.endswith(DEFINITION)}
    environment = dict(config.lambda_.environment)

    def write(scratch: Path) -> GreengrassDocuments:
        documents: dict[str, Any] = {}
        if fmt in ("v2", "both"):
            documents[RECIPE] = greengrass.recipe(
                config, artifacts=device_files, runtime=runtime, vendored=vendored, image=image,
                lambda_pkg=lambda_pkg, environment=environment)
            if published is not None:
                documents[LAMBDA_COMPONENT] = greengrass.lambda_component_request(config, published)
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
           "config": config.model_dump(mode="json", include={"greengrass", "lambda_", "target", "model"})}
    result, _ = cache.stage("greengrass", key, GreengrassDocuments, write)
    return dict(result.files)


def _runtime_image(config: ProjectConfig, cache: Cache, payload: Mapping[str, Path], *, runtime: Runtime,
                   reporter: Reporter) -> RuntimeImage:
    """The runtime image, cached by its contents: an engine stamps each build with a new creation time."""
    if not config.runtime.vendor:
        raise ConfigError("`runtime.image = true` puts the vendored wheels into the image: set `runtime.vendor = true`")
    files = {arc.removeprefix("runtime/") if arc.startswith("runtime/wheels/") else
             ("runtime.toml" if arc.endswith(DEFINITION) else arc): path for arc, path in payload.items()}
    tag = f"{config.model.name}-runtime:{config.model.version}"
    result, hit = cache.stage("image", {"files": {name: file_sha256(p) for name, p in files.items()}, "tag": tag},
                              RuntimeImage, lambda workdir: build_image(runtime, files, tag=tag, workdir=workdir,
                                                                        reporter=reporter))
    if hit:
        reporter.step(f"runtime: image {tag} unchanged, reused from the cache")
    return result


def _configured_source(config: ProjectConfig) -> str:
    source = config.model.source
    if not source:
        raise ConfigError("no source: pass --source, or set `model.source` in deeplens.toml to a folder, a "
                          f"model.tar.gz, an s3:// URI or {SAGEMAKER_PREFIX}NAME")
    if source.startswith(("s3://", SAGEMAKER_PREFIX)):
        return source
    return str(config.root / source)  # relative to deeplens.toml, like every path in it


def _record(stage: str, hit: bool, cached: list[str], reporter: Reporter) -> None:
    if hit:
        cached.append(stage)
        reporter.step(f"{stage}: unchanged, reused from the cache")


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _lambda_digests(config: ProjectConfig) -> dict[str, str]:
    from deeplens_build.lambda_package import lambda_files

    source = config.lambda_.source
    return {rel: file_sha256(source / rel) for rel in lambda_files(source)} if source.is_dir() else {}


def _manifest(config: ProjectConfig, *, training: TrainingOutput, detection: Detection, optimized: OptimizedModel,
              parity: ParityReport | None, runtime: Runtime, wheelhouse: Wheelhouse, image: RuntimeImage | None,
              lambda_pkg: LambdaPackage, published: PublishedLambda | None, documents: list[str],
              labels: str | None, tools: Mapping[str, str], plugin_identity: Mapping[str, Any]) -> BuildRecord:
    """Everything the bundle was built from and what it holds; no absolute path, so two folders agree."""
    platform_name = config.target.platform
    return BuildRecord(
        name=config.model.name,
        version=config.model.version,
        framework=detection.plugin.framework.name,
        source=SourceRecord(kind=training.kind, origin=training.origin, sha256=training.sha256, size=training.size,
                            model_files=detection.model.files, notes=detection.model.notes,
                            sagemaker=training.sagemaker),
        model=ModelRecord(format=optimized.format, file=f"{MODEL_DIR}/{optimized.path.name}",
                          files=tuple(f"{MODEL_DIR}/{p.name}" for p in optimized.files), labels=labels,
                          precision=optimized.precision, task=config.model.task, inputs=optimized.inputs,
                          outputs=optimized.outputs),
        optimization=OptimizationRecord(passes=optimized.passes, opset=optimized.opset,
                                        size_before=optimized.size_before, size_after=optimized.size_after),
        parity=parity,
        runtime=RuntimeRecord(
            name=runtime.name, summary=runtime.summary, accelerator=runtime.accelerator, python=runtime.python,
            platform=platform_name, requirements=runtime.requirements[platform_name],
            definition=f"{RUNTIME_DIR}/{runtime.name}/{DEFINITION}",
            wheels=tuple(WheelRecord(file=f"{WHEELS_DIR}/{w.name}", sha256=file_sha256(w)) for w in wheelhouse.wheels),
            image=ImageRecord(file=IMAGE, tag=image.tag, id=image.image_id) if image else None),
        lambda_=LambdaRecord(
            name=lambda_pkg.name, handler=lambda_pkg.handler, version=lambda_pkg.version,
            file=f"{LAMBDA_DIR}/{lambda_pkg.path.name}", sha256=lambda_pkg.sha256,
            environment=dict(config.lambda_.environment),
            published_version=published.version if published else None, arn=published.arn if published else None,
            alias=published.alias if published else None),
        greengrass=GreengrassRecord(format=config.greengrass.format, component=greengrass.component_name(config),
                                    documents=tuple(documents)),
        provenance=ProvenanceRecord(plugin=PluginRecord(**plugin_identity), tools=dict(tools)),
    )
