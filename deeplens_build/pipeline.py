"""The build: fetch → detect → convert → optimize → reference → precision → compile → parity → profile →
runtime → lambda → greengrass → bundle, signed.

The core owns the order, the cache and the errors; plugins fill the source, framework and target slots. This
module is only the order: each stage is a module of :mod:`deeplens_build.stages` whose ``run`` states, beside its
work, the key its cached result depends on, and caches it through the one :meth:`Build.stage`.
"""

from __future__ import annotations

from pathlib import Path

from deeplens_build.aws import greengrass
from deeplens_build.aws.publish import publish_lambda
from deeplens_build.build import Build, BuildOptions
from deeplens_build.bundle import bundle_name, remove_partials
from deeplens_build.config import ProjectConfig
from deeplens_build.digest import remembered
from deeplens_build.manifest import LABELS
from deeplens_build.plugins import PluginManager
from deeplens_build.report import Reporter
from deeplens_build.stages import (
    bundle,
    compile,
    convert,
    detect,
    fetch,
    lambda_package,
    optimize,
    parity,
    precision,
    profile,
    record,
    runtime,
)
from deeplens_build.stages import greengrass as documents
from deeplens_build.values import BuildResult

__all__ = ["BuildOptions", "package"]

STAT_INDEX = "stat-index.json"
"""In the work folder: each input's (device, inode, size, times) → sha256, so an unchanged input is not read."""


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
            return _sequence(Build.start(config, options, manager, reporter), output)
    except BaseException:
        (output / bundle_name(config.model.name, config.model.version)).unlink(missing_ok=True)
        raise


def _sequence(b: Build, output: Path) -> BuildResult:
    """The pipeline's sequence."""
    lambda_package.check_code(b.config.lambda_, lambda_package.oldest_python(b.config))  # before any model work
    training = fetch.run(b)
    detection = detect.run(b, training)
    opset = convert.opset_ceiling(b)
    converted = convert.run(b, training, detection, opset)
    optimized = optimize.run(b, converted, opset)
    reference = parity.reference(b, training, detection, converted, optimized)
    optimized = precision.run(b, optimized, reference)
    compiled = compile.run(b, optimized)
    report = parity.run(b, optimized, compiled, reference)
    latencies = profile.run(b, training, detection, converted, optimized, compiled, reference)
    device_runtime, wheelhouse = runtime.run(b, detection, converted, compiled, optimized.opset)
    lambda_pkg = lambda_package.run(b)
    payload = bundle.payload(b, detection, converted, compiled, reference, device_runtime, wheelhouse,
                             lambda_pkg)
    published = publish_lambda(lambda_pkg, b.config.lambda_, environment=greengrass.lambda_environment(b.config),
                               reporter=b.reporter) if b.options.publish else None
    written = documents.run(b, payload, runtime=device_runtime, opset=optimized.opset, vendored=bool(wheelhouse.wheels),
                            lambda_pkg=lambda_pkg, published=published)
    manifest = record.run(b, training=training, detection=detection, optimized=optimized, compiled=compiled,
                          parity=report, profile=latencies, runtime=device_runtime, wheelhouse=wheelhouse,
                          lambda_pkg=lambda_pkg, published=published,
                          documents=sorted(written), labels=LABELS in payload)
    return bundle.run(b, {**payload, **written}, manifest, training=training, compiled=compiled, parity=report,
                      output=output)
