"""The build: fetch → detect → convert → optimize → parity → runtime → lambda → bundle → sign.

The core owns the order, the cache and the errors; plugins fill the source and framework slots. ``package``
reads as the sequence; each stage below is a function that states, beside its work, the key its cached
result depends on.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as metadata
import json
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from deeplens_build import __version__
from deeplens_build.aws import greengrass
from deeplens_build.aws.publish import publish_lambda
from deeplens_build.bundle import bundle_name, remove_partials, write_bundle
from deeplens_build.cache import Cache, SharedCache
from deeplens_build.config import ProjectConfig
from deeplens_build.digest import file_sha256, remembered
from deeplens_build.errors import BundleError, ConfigError
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
    KinesisRecord,
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
from deeplens_build.plugins import PluginManager
from deeplens_build.report import Reporter
from deeplens_build.signing import Signer, load_signer
from deeplens_build.stages.fetch import SourceContext, fetch
from deeplens_build.stages.image import build_image
from deeplens_build.stages.lambda_package import lambda_entries, package_lambda, write_zip
from deeplens_build.stages.optimize import optimize
from deeplens_build.stages.parity import check_parity
from deeplens_build.stages.runtime import (
    DEFINITION,
    load_runtimes,
    select_runtime,
    vendor_wheels,
)
from deeplens_build.types import (
    BuildResult,
    BundleSizes,
    ConvertedModel,
    Detection,
    GreengrassDocuments,
    LambdaPackage,
    OptimizedModel,
    ParityReport,
    PluginSettings,
    PublishedLambda,
    Runtime,
    RuntimeImage,
    TrainingOutput,
    Wheelhouse,
)

T = TypeVar("T")
STAT_INDEX = "stat-index.json"
"""In the work folder: each input's (device, inode, size, times) → sha256, so an unchanged input is not read."""

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
    shared_cache: str | None = None
    """``--cache s3://BUCKET/PREFIX``, in place of ``build.cache``."""


def package(config: ProjectConfig, options: BuildOptions, *, manager: PluginManager,
            reporter: Reporter) -> BuildResult:
    """Build the signed bundle for ``config``. On any failure nothing is left at the output path: neither a
    half-written bundle (those a killed build left are removed too) nor an earlier bundle of the same name,
    which would pass for this build's.

    The tools this drives keep caches of their own under ``$HOME`` unless told otherwise; callers point them
    into the work folder first (``cache.tool_cache_environment``), as the CLI and ``testing.build`` do."""
    output = options.output or config.build.output
    remove_partials(output)
    try:
        with remembered(config.build.work_dir / STAT_INDEX, trust=options.use_cache):
            return _package(config, options, output, manager=manager, reporter=reporter)
    except BaseException:
        (output / bundle_name(config.model.name, config.model.version)).unlink(missing_ok=True)
        raise


def _package(config: ProjectConfig, options: BuildOptions, output: Path, *, manager: PluginManager,
             reporter: Reporter) -> BuildResult:
    """The pipeline's sequence."""
    b = _Build.start(config, options, manager, reporter)
    training = _fetch(b)
    detection = _detect(b, training)
    converted = _convert(b, training, detection)
    optimized = _optimize(b, converted)
    parity = _parity(b, training, detection, converted, optimized)
    runtime, wheelhouse = _runtime(b, detection, converted, optimized)
    lambda_pkg = _lambda(b)
    payload = _payload(b, converted, optimized, runtime, wheelhouse, lambda_pkg)
    image = _runtime_image(b, payload, runtime)
    published = publish_lambda(lambda_pkg, config.lambda_, environment=greengrass.lambda_environment(config),
                               reporter=reporter) if options.publish else None
    documents = _greengrass_documents(b, payload, runtime=runtime, vendored=bool(wheelhouse.wheels),
                                      image=image, lambda_pkg=lambda_pkg, published=published)
    record = _manifest(b, training=training, detection=detection, optimized=optimized, parity=parity,
                       runtime=runtime, wheelhouse=wheelhouse, image=image, lambda_pkg=lambda_pkg,
                       published=published, documents=sorted(documents), labels=LABELS in payload)
    return _bundle(b, {**payload, **documents}, record, training=training, optimized=optimized, parity=parity,
                   output=output)


@dataclass
class _Build:
    """What every stage of one build shares."""

    config: ProjectConfig
    options: BuildOptions
    manager: PluginManager
    reporter: Reporter
    signer: Signer
    settings: Mapping[str, PluginSettings]
    cache: Cache
    tools: Mapping[str, str]
    cached: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, config: ProjectConfig, options: BuildOptions, manager: PluginManager,
              reporter: Reporter) -> _Build:
        """Everything that can fail without reading the model fails here, in a second."""
        if config.greengrass.format in ("v1", "both") and not options.publish:
            # not a rule of deeplens.toml alone: --publish comes from the command line
            raise ConfigError("Greengrass v1 documents reference a published Lambda version: build with --publish, "
                              "or set `greengrass.format = \"v2\"`")
        tools = {name: _version(name) for name in CORE_TOOLS} | {"deeplens-build": __version__,
                                                                 "python": platform.python_version()}
        shared_uri = options.shared_cache or config.build.cache
        shared = SharedCache(shared_uri, warn=reporter.warn) if shared_uri else None
        return cls(config=config, options=options, manager=manager, reporter=reporter,
                   signer=load_signer(options.signing_key), settings=manager.settings(config.plugins),
                   cache=Cache(config.build.work_dir / "cache", reuse=options.use_cache, shared=shared), tools=tools)

    def stage(self, name: str, key: Mapping[str, Any], result_type: type[T], build: Callable[[Path], T]) -> T:
        """``build``'s result, from the cache when ``key`` (everything it depends on) was built before."""
        result, hit = self.cache.stage(name, key, result_type, build)
        if hit:
            self.cached.append(name)
            self.reporter.step(f"{name}: unchanged, reused from the cache")
        return result

    def plugin_identity(self, detection: Detection) -> dict[str, Any]:
        plugin = detection.plugin
        return {"name": plugin.name, "distribution": plugin.distribution, "version": plugin.version,
                "tools": dict(plugin.tool_versions)}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: spec.shape for name, spec in self.config.model.inputs.items() if spec.shape}


def _fetch(b: _Build) -> TrainingOutput:
    source = b.options.source or b.config.model.source
    if not source:
        raise ConfigError("no source: pass --source, or set `model.source` in deeplens.toml to a folder, a "
                          "model.tar.gz, or a URI an installed source plugin fetches (`deeplens-build plugins`)")
    kind = b.manager.source_kind(source)
    if not kind.prefixes and not b.options.source:
        source = str(b.config.root / source)  # relative to deeplens.toml, like every path in it
    b.reporter.step(f"fetch: {source} ({kind.name})")
    return fetch(source, kind, SourceContext(cache=b.cache, limits=b.config.fetch, reporter=b.reporter))


def _detect(b: _Build, training: TrainingOutput) -> Detection:
    detection = b.manager.detect(training, b.config.model.framework, b.settings)
    b.reporter.step(f"detect: {detection.plugin.framework.name} model ({', '.join(detection.model.files)}) "
                    f"claimed by plugin {detection.plugin.name}")
    for note in detection.model.notes:
        b.reporter.note(note)
    return detection


def _convert(b: _Build, training: TrainingOutput, detection: Detection) -> ConvertedModel:
    settings = b.settings[detection.plugin.framework.name]
    key = {"source": training.sha256, "files": detection.model.files, "plugin": b.plugin_identity(detection),
           "shapes": b.shapes, "settings": settings.model_dump(mode="json")}

    def convert(workdir: Path) -> ConvertedModel:
        b.reporter.step(f"convert: {detection.plugin.framework.name} → artifact")
        return b.manager.convert(detection, training, workdir, b.shapes, settings)

    converted = b.stage("convert", key, ConvertedModel, convert)
    layouts = {name: spec.layout for name, spec in b.config.model.inputs.items() if spec.layout}
    return dataclasses.replace(converted, inputs=tuple(
        dataclasses.replace(spec, layout=layouts.get(spec.name, spec.layout)) for spec in converted.inputs))


def _optimize(b: _Build, converted: ConvertedModel) -> OptimizedModel:
    precision = b.config.model.precision
    key = {"artifact": [file_sha256(p) for p in converted.files], "format": converted.format,
           "inputs": [dataclasses.asdict(s) for s in converted.inputs],
           "outputs": [dataclasses.asdict(s) for s in converted.outputs],
           "shapes": b.shapes, "precision": precision, "tools": b.tools}

    def run(workdir: Path) -> OptimizedModel:
        b.reporter.step(f"optimize: {converted.format}, precision {precision}")
        return optimize(converted, shapes=b.shapes, precision=precision, workdir=workdir, reporter=b.reporter)

    return b.stage("optimize", key, OptimizedModel, run)


def _parity(b: _Build, training: TrainingOutput, detection: Detection, converted: ConvertedModel,
            optimized: OptimizedModel) -> ParityReport | None:
    if optimized.format != "onnx":
        b.reporter.note(f"parity: not applicable, the {optimized.format} artifact is the original model itself")
        return None
    config, settings = b.config, b.settings[detection.plugin.framework.name]
    key = {"source": training.sha256, "files": detection.model.files, "plugin": b.plugin_identity(detection),
           "artifact": file_sha256(optimized.path), "settings": config.parity.model_dump(mode="json"),
           "samples": [file_sha256(p) for p in config.parity.samples if p.is_file()],
           "precision": optimized.precision, "task": config.model.task, "tools": b.tools}

    def run(_: Path) -> ParityReport:
        b.reporter.step(f"parity: original ({detection.plugin.framework.name}) vs optimized (onnxruntime)")
        return check_parity(lambda inputs: b.manager.reference_run(detection, training, converted, inputs, settings),
                            optimized, config=config.parity, task=config.model.task, reporter=b.reporter)

    return b.stage("parity", key, ParityReport, run)


def _runtime(b: _Build, detection: Detection, converted: ConvertedModel,
             optimized: OptimizedModel) -> tuple[Runtime, Wheelhouse]:
    target = b.config.target
    runtime = select_runtime(optimized.format, target.platform, target.accelerator, wanted=b.config.runtime.name,
                             suggested=b.manager.runtime(detection, converted, target.platform),
                             available=load_runtimes(b.config.runtime.definitions))
    runtime = runtime.for_python(target.python or runtime.python)
    if optimized.format == "onnx" and runtime.onnx_opset and optimized.opset and optimized.opset > runtime.onnx_opset:
        raise BundleError(f"the artifact is ONNX opset {optimized.opset}, but runtime {runtime.name} on Python "
                          f"{runtime.python} ({', '.join(runtime.requirements[target.platform])}) loads opset "
                          f"{runtime.onnx_opset} at most; choose a newer `target.python`")
    b.reporter.step(f"runtime: {runtime.name} for {target.platform} ({target.accelerator}), Python {runtime.python}")
    if not b.config.runtime.vendor:
        return runtime, Wheelhouse(wheels=())
    return runtime, vendor_wheels(runtime, target.platform, config=b.config.runtime, cache=b.cache,
                                  reporter=b.reporter)


def _lambda(b: _Build) -> LambdaPackage:
    config = b.config
    key = {"config": config.lambda_.model_dump(mode="json", exclude={"source"}), "files": _lambda_digests(config),
           "default_name": config.model.name}
    return b.stage("lambda", key, LambdaPackage,
                   lambda workdir: package_lambda(config.lambda_, default_name=config.model.name, workdir=workdir))


def _payload(b: _Build, converted: ConvertedModel, optimized: OptimizedModel, runtime: Runtime,
             wheelhouse: Wheelhouse, lambda_pkg: LambdaPackage) -> dict[str, Path]:
    """The archive's layout (manifest.py names its folders): bundle path → file on disk."""
    payload = {f"{MODEL_DIR}/{p.name}": p for p in optimized.files}
    if labels := b.config.model.labels or converted.labels:
        payload[LABELS] = labels
    payload[f"{LAMBDA_DIR}/{lambda_pkg.path.name}"] = lambda_pkg.path
    payload[f"{RUNTIME_DIR}/{runtime.name}/{DEFINITION}"] = runtime.definition
    payload.update({f"{WHEELS_DIR}/{wheel.name}": wheel for wheel in wheelhouse.wheels})
    return payload


def _bundle(b: _Build, payload: Mapping[str, Path], record: BuildRecord, *, training: TrainingOutput,
            optimized: OptimizedModel, parity: ParityReport | None, output: Path) -> BuildResult:
    b.reporter.step(f"bundle: signing with {b.signer.description}")
    written = b.config.build.work_dir / "written" / f"{record.name}-{record.version}.json"
    path, sha256, manifest = write_bundle(payload, record, b.signer, output, written=written,
                                          reuse=b.options.use_cache)
    sizes = BundleSizes(source=training.size, artifact=sum(p.stat().st_size for p in optimized.files),
                        bundle=path.stat().st_size)
    return BuildResult(bundle=path, sha256=sha256, name=record.name, version=record.version,
                       framework=record.framework, parity=parity, sizes=sizes, cached_stages=tuple(b.cached),
                       notes=tuple(b.reporter.notes), manifest=manifest)


def _greengrass_documents(b: _Build, payload: Mapping[str, Path], *, runtime: Runtime, vendored: bool,
                          image: RuntimeImage | None, lambda_pkg: LambdaPackage,
                          published: PublishedLambda | None) -> dict[str, Path]:
    """Write the Greengrass documents for ``config.greengrass.format``; return bundle path → file."""
    config = b.config
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
           # no local path in the key, so another machine's entry (a shared cache) is found
           "config": config.model_dump(mode="json", include={"greengrass", "lambda_", "target", "model", "device"},
                                       exclude={"lambda_": {"source"}, "model": {"source", "labels"}})}
    return dict(b.stage("greengrass", key, GreengrassDocuments, write).files)


def _runtime_image(b: _Build, payload: dict[str, Path], runtime: Runtime) -> RuntimeImage | None:
    """The runtime image (``runtime.image = true``), cached by its contents: an engine stamps each build with a
    new creation time. Added to ``payload``."""
    config = b.config
    if not config.runtime.image:
        return None
    files = {arc.removeprefix(f"{RUNTIME_DIR}/") if arc.startswith(f"{WHEELS_DIR}/") else
             (DEFINITION if arc.endswith(DEFINITION) else arc): path for arc, path in payload.items()}
    tag = f"{config.model.name}-runtime:{config.model.version}"
    image = b.stage("image", {"files": {name: file_sha256(p) for name, p in files.items()}, "tag": tag},
                    RuntimeImage, lambda workdir: build_image(runtime, files, tag=tag, workdir=workdir,
                                                              reporter=b.reporter))
    payload[IMAGE] = image.path
    return image


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _lambda_digests(config: ProjectConfig) -> dict[str, str]:
    source = config.lambda_.source
    entries = lambda_entries(source, compat=config.lambda_.deeplens_compat) if source.is_dir() else {}
    return {rel: file_sha256(path) for rel, path in entries.items()}


def _manifest(b: _Build, *, training: TrainingOutput, detection: Detection, optimized: OptimizedModel,
              parity: ParityReport | None, runtime: Runtime, wheelhouse: Wheelhouse, image: RuntimeImage | None,
              lambda_pkg: LambdaPackage, published: PublishedLambda | None, documents: list[str],
              labels: bool) -> BuildRecord:
    """Everything the bundle was built from and what it holds; no absolute path, so two folders agree."""
    config = b.config
    platform_name = config.target.platform
    return BuildRecord(
        name=config.model.name,
        version=config.model.version,
        framework=detection.plugin.framework.name,
        source=SourceRecord(kind=training.kind, origin=training.origin, sha256=training.sha256, size=training.size,
                            model_files=detection.model.files, notes=detection.model.notes,
                            sagemaker=training.sagemaker),
        model=ModelRecord(format=optimized.format, file=f"{MODEL_DIR}/{optimized.path.name}",
                          files=tuple(f"{MODEL_DIR}/{p.name}" for p in optimized.files),
                          labels=LABELS if labels else None,
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
        provenance=ProvenanceRecord(plugin=PluginRecord(**b.plugin_identity(detection)), tools=dict(b.tools)),
        kinesis=KinesisRecord(stream=config.device.kinesis_video_stream, retention_hours=config.device.retention_hours)
        if config.device.kinesis_video_stream else None,
    )
