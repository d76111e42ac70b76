"""The build: fetch → detect → convert → optimize → reference → precision → compile → parity → profile →
runtime → lambda → bundle → sign.

The core owns the order, the cache and the errors; plugins fill the source, framework and target slots. ``package``
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
from deeplens_build.errors import BundleError, ConfigError, DeepLensBuildError
from deeplens_build.manifest import (
    DEVICE_BUILD,
    DEVICE_MODULE,
    DEVICE_REFERENCE,
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
    TargetRecord,
    WheelRecord,
    v1_definition,
)
from deeplens_build.plugins import PluginManager
from deeplens_build.report import Reporter
from deeplens_build.signing import LocalSigner, Signer, load_signer
from deeplens_build.stages.fetch import SourceContext, fetch
from deeplens_build.stages.image import build_image
from deeplens_build.stages.lambda_package import lambda_entries, package_lambda, write_zip
from deeplens_build.stages.compile import check_accepts, compile_artifact
from deeplens_build.stages.optimize import optimize
from deeplens_build.stages.parity import compare, load_reference, require, run_reference, samples_for
from deeplens_build.stages.precision import to_fp16
from deeplens_build.stages.profile import profile
from deeplens_build.stages.runtime import (
    DEFINITION,
    load_runtimes,
    select_runtime,
    vendor_wheels,
)
from deeplens_build.records import Latency, ParityReport
from deeplens_build.types import (
    BuildResult,
    BundleSizes,
    Artifact,
    Detection,
    GreengrassDocuments,
    LambdaPackage,
    Optimized,
    PluginSettings,
    PublishedLambda,
    ReferenceRun,
    Runner,
    Runtime,
    RuntimeImage,
    TargetInfo,
    TrainingOutput,
    Wheelhouse,
)
from deeplens_build.targets import load_onnx

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
    opset = _opset_ceiling(b)
    converted = _convert(b, training, detection, opset)
    optimized = _optimize(b, converted, opset)
    reference = _reference(b, training, detection, converted, optimized)
    optimized = _precision(b, optimized, reference)
    compiled = _compile(b, optimized)
    parity = _parity(b, optimized, compiled, reference)
    profile = _profile(b, training, detection, converted, optimized, compiled, reference)
    runtime, wheelhouse = _runtime(b, detection, converted, compiled, optimized.opset)
    lambda_pkg = _lambda(b)
    payload = _payload(b, converted, compiled, reference, runtime, wheelhouse, lambda_pkg)
    image = _runtime_image(b, payload, runtime)
    published = publish_lambda(lambda_pkg, config.lambda_, environment=greengrass.lambda_environment(config),
                               reporter=reporter) if options.publish else None
    documents = _greengrass_documents(b, payload, runtime=runtime, vendored=bool(wheelhouse.wheels),
                                      image=image, lambda_pkg=lambda_pkg, published=published)
    record = _manifest(b, training=training, detection=detection, optimized=optimized, compiled=compiled,
                       parity=parity, profile=profile, runtime=runtime, wheelhouse=wheelhouse, image=image,
                       lambda_pkg=lambda_pkg, published=published, documents=sorted(documents),
                       labels=LABELS in payload)
    return _bundle(b, {**payload, **documents}, record, training=training, compiled=compiled, parity=parity,
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
    target: TargetInfo
    runtimes: tuple[Runtime, ...]
    """Every runtime definition: built-in, the backend's, the project's."""
    cached: list[str] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)
    local_source: bool = False

    @classmethod
    def start(cls, config: ProjectConfig, options: BuildOptions, manager: PluginManager,
              reporter: Reporter) -> _Build:
        """Everything that can fail without reading the model fails here, in a second."""
        target = manager.target(config.target.backend)
        backend = target.backend
        if config.target.platform not in backend.platforms or config.target.accelerator not in backend.accelerators:
            raise ConfigError(f"target backend {backend.name} serves {', '.join(backend.platforms)} devices with "
                              f"{' or '.join(backend.accelerators)}, not a {config.target.platform} device with "
                              f"`target.accelerator = \"{config.target.accelerator}\"`")
        if backend.device_build is not None and config.greengrass.format != "v2":
            raise ConfigError(f"target backend {backend.name} compiles on the device, in a Greengrass v2 recipe's "
                              "Install phase; a v1 core has none: set `greengrass.format = \"v2\"`")
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
                   cache=Cache(config.build.work_dir / "cache", reuse=options.use_cache, shared=shared), tools=tools,
                   target=target, runtimes=load_runtimes(config.runtime.definitions, extra=backend.runtimes))

    def stage(self, name: str, key: Mapping[str, Any], result_type: type[T], build: Callable[[Path], T]) -> T:
        """``build``'s result, from the cache when ``key`` (everything it depends on) was built before."""
        result, hit = self.cache.stage(name, key, result_type, build)
        self.stages.append(name)
        if hit:
            self.cached.append(name)
            self.reporter.step(f"{name}: unchanged, reused from the cache")
        return result

    @property
    def target_identity(self) -> dict[str, Any]:
        t = self.target
        return {"name": t.backend.name, "plugin": t.plugin, "distribution": t.distribution, "version": t.version,
                "tools": dict(t.tool_versions)}

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
    b.local_source = not kind.prefixes
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


def _opset_ceiling(b: _Build) -> int | None:
    """The highest ONNX opset the device loads: the lowest of the backend's, ``target.opset`` and the ONNX
    runtime's on the device's Python (matched as the runtime stage will match it, when it can be yet)."""
    target, backend = b.config.target, b.target.backend
    wanted = b.config.runtime.name if b.config.runtime.name != "auto" else backend.runtime or "auto"
    try:
        runtime = select_runtime("onnx", target.platform, target.accelerator, wanted=wanted, suggested=None,
                                 available=b.runtimes)
        runtime_opset = runtime.for_python(target.python or runtime.python).onnx_opset
    except DeepLensBuildError:  # no single ONNX runtime fits yet: the runtime stage says why, with the format known
        runtime_opset = None
    limits = [limit for limit in (backend.max_opset, target.opset, runtime_opset) if limit is not None]
    return min(limits) if limits else None


def _convert(b: _Build, training: TrainingOutput, detection: Detection, opset: int | None) -> Artifact:
    settings = b.settings[detection.plugin.framework.name]
    key = {"source": training.sha256, "files": detection.model.files, "plugin": b.plugin_identity(detection),
           "shapes": b.shapes, "settings": settings.model_dump(mode="json"), "opset": opset}

    def convert(workdir: Path) -> Artifact:
        at = f" at opset {opset} at most" if opset else ""
        b.reporter.step(f"convert: {detection.plugin.framework.name} → artifact{at}")
        return b.manager.convert(detection, training, workdir, b.shapes, settings, opset)

    converted = b.stage("convert", key, Artifact, convert)
    layouts = {name: spec.layout for name, spec in b.config.model.inputs.items() if spec.layout}
    return dataclasses.replace(converted, inputs=tuple(
        dataclasses.replace(spec, layout=layouts.get(spec.name, spec.layout)) for spec in converted.inputs))


def _optimize(b: _Build, converted: Artifact, opset: int | None) -> Optimized:
    key = {"artifact": [file_sha256(p) for p in converted.files], "format": converted.format,
           "inputs": [dataclasses.asdict(s) for s in converted.inputs],
           "outputs": [dataclasses.asdict(s) for s in converted.outputs],
           "shapes": b.shapes, "opset": opset, "tools": b.tools}

    def run(workdir: Path) -> Optimized:
        b.reporter.step(f"optimize: {converted.format}")
        return optimize(converted, shapes=b.shapes, opset=opset, workdir=workdir, reporter=b.reporter)

    return b.stage("optimize", key, Optimized, run)


def _reference(b: _Build, training: TrainingOutput, detection: Detection, converted: Artifact,
               optimized: Optimized) -> ReferenceRun | None:
    """The original model's outputs on the parity samples, computed once for every comparison after."""
    if optimized.artifact.format != "onnx":
        b.reporter.note(f"parity: not applicable, the {optimized.artifact.format} artifact is the original model "
                        "itself")
        return None
    config, settings = b.config, b.settings[detection.plugin.framework.name]
    specs = optimized.artifact.inputs
    key = {"source": training.sha256, "files": detection.model.files, "plugin": b.plugin_identity(detection),
           "inputs": [dataclasses.asdict(s) for s in specs],
           "outputs": [dataclasses.asdict(s) for s in optimized.artifact.outputs],
           "seed": config.parity.seed, "random_samples": config.parity.random_samples,
           "samples": [file_sha256(p) for p in config.parity.samples if p.is_file()], "tools": b.tools}

    def run(workdir: Path) -> ReferenceRun:
        b.reporter.step(f"reference: the original model ({detection.plugin.framework.name}) on the parity samples")
        return run_reference(lambda inputs: b.manager.reference_run(detection, training, converted, inputs, settings),
                             samples_for(specs, config.parity), optimized.artifact.outputs, workdir=workdir,
                             reporter=b.reporter)

    return b.stage("reference", key, ReferenceRun, run)


def _precision(b: _Build, optimized: Optimized, reference: ReferenceRun | None) -> Optimized:
    """At ``precision = "fp16"``: the FP16 artifact, keeping in FP32 the nodes parity needs there."""
    config = b.config
    if config.model.precision != "fp16" or reference is None:
        return optimized
    tolerance = config.parity.tolerance_for("fp16")
    key = {"artifact": [file_sha256(p) for p in optimized.artifact.files], "reference": file_sha256(reference.path),
           "tolerance": tolerance, "task": config.model.task, "tools": b.tools}

    def run(workdir: Path) -> Optimized:
        b.reporter.step("precision: fp16")
        return to_fp16(optimized, reference, tolerance=tolerance, task=config.model.task, seed=config.parity.seed,
                       workdir=workdir, reporter=b.reporter)

    return b.stage("precision", key, Optimized, run)


def _compile(b: _Build, optimized: Optimized) -> Artifact:
    """What the device executes: the backend's compiled artifact, or the ONNX one when it compiles nothing here."""
    backend, artifact = b.target.backend, optimized.artifact
    if artifact.format != "onnx":
        if backend.compile is not None or backend.device_build is not None:
            raise ConfigError(f"`target.backend = \"{backend.name}\"` compiles ONNX artifacts, and this one is "
                              f"{artifact.format}; export ONNX from the plugin, or use the default backend")
        return artifact
    key = {"artifact": [file_sha256(p) for p in artifact.files], "precision": optimized.precision,
           "target": b.target_identity, "tools": b.tools}
    # what the device's runtime would refuse, refused here; remembered, so a rebuild does not even import onnx
    b.stage("target-check", key, bool, lambda _: check_accepts(artifact, backend) is None)
    if backend.compile is None:
        return artifact

    def run(workdir: Path) -> Artifact:
        b.reporter.step(f"compile: {backend.name}")
        return compile_artifact(optimized, backend, workdir,
                                lambda doing, function, *args: b.manager.call_target(b.target, doing, function,
                                                                                     *args))

    return b.stage("compile", key, Artifact, run)


def _runner(b: _Build, optimized: Optimized, compiled: Artifact) -> tuple[str, Runner]:
    """How this machine runs what the device will: the backend's runtime when it runs here, else onnxruntime."""
    backend = b.target.backend
    if backend.load is None:
        return "onnxruntime (ONNX artifact)", load_onnx(optimized.artifact)
    runner = b.manager.call_target(b.target, "load the compiled artifact", backend.load, compiled)
    return backend.name, lambda inputs: b.manager.call_target(b.target, "run the compiled artifact", runner, inputs)


def _parity(b: _Build, optimized: Optimized, compiled: Artifact, reference: ReferenceRun | None) -> ParityReport | None:
    if reference is None:
        return None
    config, backend = b.config, b.target.backend
    tolerance = config.parity.tolerance_for(optimized.precision)
    key = {"artifact": [file_sha256(p) for p in compiled.files],
           "onnx": [file_sha256(p) for p in optimized.artifact.files], "reference": file_sha256(reference.path),
           "tolerance": tolerance, "task": config.model.task, "target": b.target_identity, "tools": b.tools}

    def run(_: Path) -> ParityReport:
        name, runner = _runner(b, optimized, compiled)
        b.reporter.step(f"parity: original vs {compiled.format} on {name}")
        if backend.load is None:
            b.reporter.note(f"parity: {backend.name} does not run on this machine; compared the ONNX artifact it "
                            "compiles from, in onnxruntime")
        report = compare(reference, runner, optimized.artifact.outputs, tolerance=tolerance, task=config.model.task,
                         seed=config.parity.seed, runtime=name)
        return require(report, remedy="Try `model.precision = \"fp32\"`, or another `target.backend`; raise "
                                      "`parity.tolerance` only if the difference is acceptable.")

    return b.stage("parity", key, ParityReport, run)


def _profile(b: _Build, training: TrainingOutput, detection: Detection, converted: Artifact, optimized: Optimized,
             compiled: Artifact, reference: ReferenceRun | None) -> tuple[Latency, ...]:
    runs = b.config.profile.runs
    if not runs or reference is None:
        return ()
    settings = b.settings[detection.plugin.framework.name]
    key = {"artifact": [file_sha256(p) for p in compiled.files],
           "onnx": [file_sha256(p) for p in optimized.artifact.files], "source": training.sha256,
           "plugin": b.plugin_identity(detection), "target": b.target_identity, "runs": runs, "tools": b.tools}

    def run(_: Path) -> tuple[Latency, ...]:
        b.reporter.step(f"profile: {runs} runs per runtime, batch 1")
        samples, _ = load_reference(reference)
        runners: dict[str, Runner] = {
            f"original ({detection.plugin.framework.name})":
                lambda inputs: b.manager.reference_run(detection, training, converted, inputs, settings),
            "onnxruntime": load_onnx(optimized.artifact)}
        if b.target.backend.load is not None and b.target.backend.name != "onnxruntime":
            runners[b.target.backend.name] = _runner(b, optimized, compiled)[1]
        return profile(runners, samples[0], runs=runs, reporter=b.reporter)

    return b.stage("profile", key, tuple[Latency, ...], run)  # type: ignore[arg-type]


def _runtime(b: _Build, detection: Detection, converted: Artifact, compiled: Artifact,
             opset: int | None) -> tuple[Runtime, Wheelhouse]:
    target = b.config.target
    runtime = select_runtime(compiled.format, target.platform, target.accelerator, wanted=b.config.runtime.name,
                             suggested=b.target.backend.runtime or b.manager.runtime(detection, converted,
                                                                                    target.platform),
                             available=b.runtimes)
    runtime = runtime.for_python(target.python or runtime.python)
    if compiled.format == "onnx" and runtime.onnx_opset and opset and opset > runtime.onnx_opset:
        raise BundleError(f"the artifact is ONNX opset {opset}, but runtime {runtime.name} on Python "
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


def _payload(b: _Build, converted: Artifact, compiled: Artifact, reference: ReferenceRun | None, runtime: Runtime,
             wheelhouse: Wheelhouse, lambda_pkg: LambdaPackage) -> dict[str, Path]:
    """The archive's layout (manifest.py names its folders): bundle path → file on disk."""
    payload = {f"{MODEL_DIR}/{p.name}": p for p in compiled.files}
    native = compiled.format == converted.format != "onnx"  # a framework's own format, run by its own runtime
    if not native:
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


def _bundle(b: _Build, payload: Mapping[str, Path], record: BuildRecord, *, training: TrainingOutput,
            compiled: Artifact, parity: ParityReport | None, output: Path) -> BuildResult:
    b.reporter.step(f"bundle: signing with {b.signer.description}")
    written = b.config.build.work_dir / "written" / f"{record.name}-{record.version}.json"
    path, sha256, manifest = write_bundle(payload, record, b.signer, output, written=written,
                                          reuse=b.options.use_cache)
    sizes = BundleSizes(source=training.size, artifact=sum(p.stat().st_size for p in compiled.files),
                        bundle=path.stat().st_size)
    return BuildResult(bundle=path, sha256=sha256, name=record.name, version=record.version,
                       framework=record.framework, parity=parity, sizes=sizes, cached_stages=tuple(b.cached),
                       notes=tuple(b.reporter.notes), manifest=manifest, stages=tuple(b.stages),
                       local_inputs=b.local_source and isinstance(b.signer, LocalSigner) and not b.options.publish)


def _greengrass_documents(b: _Build, payload: Mapping[str, Path], *, runtime: Runtime, vendored: bool,
                          image: RuntimeImage | None, lambda_pkg: LambdaPackage,
                          published: PublishedLambda | None) -> dict[str, Path]:
    """Write the Greengrass documents for ``config.greengrass.format``; return bundle path → file."""
    config = b.config
    fmt = config.greengrass.format
    # what the device needs, by file name (Greengrass puts artifacts side by side); not the runtime definition
    device_files = {arc.rsplit("/", 1)[-1]: path for arc, path in payload.items() if not arc.endswith(DEFINITION)}
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


def _manifest(b: _Build, *, training: TrainingOutput, detection: Detection, optimized: Optimized,
              compiled: Artifact, parity: ParityReport | None, profile: tuple[Latency, ...], runtime: Runtime,
              wheelhouse: Wheelhouse, image: RuntimeImage | None, lambda_pkg: LambdaPackage,
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
                                        fp32_nodes=optimized.fp32_nodes),
        parity=parity,
        target=TargetRecord(backend=backend.name, plugin=b.target.plugin, distribution=b.target.distribution,
                            version=b.target.version, tools=dict(b.target.tool_versions), max_opset=backend.max_opset,
                            compiled_on="device" if backend.device_build else "build" if backend.compile
                            else "nothing"),
        profile=profile,
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
