"""The plugin contract: every hook a plugin can implement. These docstrings are its manual.

A plugin is a module registered under the ``deeplens_build`` entry-point group. The core owns the pipeline
(fetch, detect, convert, optimize, compile, parity, runtime, lambda, bundle, sign), its order, its cache and
its errors. There are three kinds of plugin, and one module may be several:

- a **source** plugin implements ``deeplens_build_sources``: the source strings it claims (``s3://``,
  ``sagemaker-job:``, a company's ``registry://``) and how to fetch them into the work folder;
- a **target** plugin implements ``deeplens_build_targets``: backends that turn the optimized ONNX artifact
  into what a device executes (OpenVINO IR, a TensorRT engine built on the device), run it for parity, and
  name the runtime that installs it;
- a **framework** plugin fills four slots for its own framework:

1. ``deeplens_build_framework`` — declare the framework (required).
2. ``deeplens_build_detect`` — claim a training output, or return None.
3. ``deeplens_build_convert`` — turn the claimed files into an artifact (ONNX, or a native format).
4. ``deeplens_build_reference_run`` — run the *original* model, so the core can check the artifact's parity.

``deeplens_build_runtime`` is optional: only plugins with native (non-ONNX) artifacts need it; so is
``deeplens_build_reference_done``, for plugins whose reference run keeps the model loaded between samples.

Hooks 3 to 5 are called only on the plugin that claimed the training output, so a plugin never has to check
whether a call is meant for it. Call-by-keyword rules from pluggy apply: an implementation may accept fewer
arguments than the spec lists, so new arguments can be added without breaking plugins.

Import your framework inside the hook functions, never at module import time: ``deeplens-build plugins``,
``verify`` and ``inspect`` load every plugin and must stay fast. When that import fails, let the
``ImportError`` propagate: the core turns it into one error that quotes ``Framework.install``. Raise
:class:`deeplens_build.ConversionError` for a model you cannot handle; the core adds your plugin's name.

Settings: declare them as a :class:`deeplens_build.PluginSettings` subclass in ``Framework.settings``. The core
validates ``[plugins.<framework>]`` against it before any work starts (unknown keys and wrong types fail with
the key path quoted) and hands every hook the validated instance. :func:`deeplens_build.choose_one` is the
"take the file the user named, else the only one, else say how to choose" rule every plugin needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pluggy

from deeplens_build import NAME
from deeplens_build.types import (
    Artifact,
    Framework,
    ModelFiles,
    PluginSettings,
    SourceKind,
    TargetBackend,
    TrainingOutput,
)

if TYPE_CHECKING:
    import numpy as np

hookspec = pluggy.HookspecMarker(NAME)


@hookspec
def deeplens_build_sources() -> list[SourceKind]:
    """Declare the kinds of source this plugin fetches: the prefixes each claims, and its fetch function.

    Called once when the plugin manager is built; every plugin's answers are collected. A source string goes to
    the kind with the longest matching prefix; a string that matches none and looks like a URI
    (``scheme://...``) is an error listing the installed kinds; anything else is a local path (the built-in
    ``local`` kind). Two kinds claiming one prefix is an error naming both plugins.

    The fetch function receives the source string and a :class:`deeplens_build.SourceContext`: fetch
    remote bytes once with ``context.stored(...)`` (cached by the key you give, e.g. the object's ETag), then
    hand the file to ``context.from_file(...)`` (archives are extracted safely, under the user's limits) or a
    folder to ``context.from_folder(...)``; :func:`deeplens_build.aws_client` makes boto3 clients with the
    core's retries. Raise :class:`deeplens_build.SourceError` for a source that cannot be fetched, naming it and
    what to do.

    :return: a list of :class:`~deeplens_build.SourceKind`.

    Example::

        def fetch_gcs(source, context):
            bucket, _, name = source.removeprefix("gs://").partition("/")
            blob = storage.Client().bucket(bucket).get_blob(name)
            path, _ = context.stored("gcs", {"uri": source, "md5": blob.md5_hash},
                                     lambda folder: _download(blob, folder / Path(name).name))
            return context.from_file(path, kind="gcs", origin=source)

        @hookimpl
        def deeplens_build_sources():
            return [SourceKind(name="gcs", prefixes=("gs://",), summary="gs://BUCKET/OBJECT", fetch=fetch_gcs)]
    """


@hookspec
def deeplens_build_targets() -> list[TargetBackend]:
    """Declare the target backends this plugin provides.

    Called once when the plugin manager is built; every plugin's answers are collected, and two backends of one
    name are an error naming both plugins. ``[target] backend`` picks one by name (default ``"onnxruntime"``,
    the core's own: the optimized ONNX artifact, run by onnxruntime on the device).

    What the core does with a backend, in order: framework plugins export ONNX at ``max_opset`` at most (the
    lowest of it, the runtime definition's and ``target.opset``), and the optimized artifact imports only
    standard ONNX; an operator outside ``operators`` fails the build. ``compile`` turns that ONNX into the
    files that ship (cached by the ONNX's digest, the precision and the versions of ``requires``). Parity then
    runs the original framework against ``load``'s runner on the compiled files — the device's own runtime,
    on the build machine's CPU — or against onnxruntime on the ONNX when ``load`` is None. The bundle carries
    the compiled files, ``device_module`` as ``deeplens_model.py`` (what the inference Lambda loads the model
    with) and ``device_build`` as ``deeplens_compile.py``, which the recipe's Install phase runs after the
    runtime is installed, with ``deeplens_reference.npz`` beside it (the parity samples and the original's
    outputs) and the tolerance on its command line, so what it compiles is checked on the device.

    Import your runtime inside ``compile`` and ``load``, never at module import time. Raise
    :class:`deeplens_build.CompileError` for a model your backend cannot compile, naming what to change.

    :return: a list of :class:`~deeplens_build.TargetBackend`.

    The OpenVINO backend (``plugins/openvino``) is the worked example.

    Example::

        def compile_ir(artifact, workdir, precision):
            import openvino as ov
            ov.save_model(ov.convert_model(artifact.path), workdir / "model.xml", compress_to_fp16=False)
            return dataclasses.replace(artifact, format="openvino-ir", path=workdir / "model.xml",
                                       extra_files=(workdir / "model.bin",))

        @hookimpl
        def deeplens_build_targets():
            return [TargetBackend(name="openvino", summary="OpenVINO IR (Intel CPU/GPU)", accelerators=("cpu", "gpu"),
                                  platforms=("linux-x86_64",), device_module=HERE / "device.py", runtime="openvino",
                                  runtimes=(HERE / "runtime" / "openvino" / "runtime.toml",),
                                  compile=compile_ir, load=load_ir, requires=("openvino",))]
    """


@hookspec
def deeplens_build_framework() -> Framework:
    """Declare the framework this plugin handles. Every framework plugin must implement it.

    Called once when the plugin manager is built. The name must be unique among installed plugins; two
    plugins declaring the same name is an error that names both.

    :return: a :class:`~deeplens_build.Framework`.

    Example::

        class OnnxSettings(PluginSettings):
            file: str | None = None          # [plugins.onnx] file = "..."

        @hookimpl
        def deeplens_build_framework():
            return Framework(name="onnx", summary="ONNX models", requires=("onnx", "onnxruntime"),
                             install="pip install deeplens-build-onnx", settings=OnnxSettings)
    """


@hookspec(firstresult=True)
def deeplens_build_detect(source: TrainingOutput, settings: PluginSettings) -> ModelFiles | None:
    """Claim the training output if it holds a model of your framework; return None otherwise.

    Called with ``model.framework = "auto"``; the first plugin to answer wins (``firstresult``). With an
    explicit framework only that framework's plugin is asked, and None from it is an error. Do not load the
    model here: look at file names and, at most, small metadata files.

    When the output holds several checkpoints, claim only the final one and say which in ``notes``.

    :param source: the fetched and extracted training output (read-only).
    :param settings: this plugin's ``[plugins.<framework>]`` table, validated: an instance of your
        ``Framework.settings`` class (defaults where the table is silent).
    :return: a :class:`~deeplens_build.ModelFiles` naming the model's files, or None.

    Example::

        @hookimpl
        def deeplens_build_detect(source, settings):
            found = source.matching(".onnx")
            if not found:
                return None
            return ModelFiles(files=(choose_one(found, settings.file, setting="plugins.onnx.file",
                                                what="ONNX models"),))
    """


@hookspec(firstresult=True)
def deeplens_build_convert(
    source: TrainingOutput,
    model: ModelFiles,
    workdir: Path,
    shapes: Mapping[str, tuple[int, ...]],
    settings: PluginSettings,
    opset: int | None,
) -> Artifact:
    """Convert the claimed model into an artifact written under ``workdir``.

    Return ONNX (``format="onnx"``) whenever the framework can export it: the core then optimizes it and
    checks its parity. Return a native format only for models ONNX cannot express, and implement
    ``deeplens_build_runtime`` to name the runtime that runs it.

    Called only on the plugin that claimed the source. The result is cached by the core under a key made of
    the source digest, the claimed files, ``shapes``, ``settings``, ``opset`` and your plugin's and framework's
    versions, so the conversion must depend on nothing else.

    :param source: the training output.
    :param model: what your ``deeplens_build_detect`` returned.
    :param workdir: an empty folder to write the artifact into; every returned path must be inside it.
    :param shapes: input shapes from ``[model.inputs.<name>] shape`` in ``deeplens.toml``; use them when the
        model does not record its own, and raise ``ConversionError`` naming the key when both are missing.
    :param settings: this plugin's validated settings (see ``deeplens_build_detect``).
    :param opset: the highest ONNX opset the target's runtime loads, or None for no limit: export at that opset
        (or lower) when your exporter lets you choose. An artifact above it is lowered by the core with onnx's
        version converter when it can, and refused when it cannot.
    :return: a :class:`~deeplens_build.Artifact` naming the artifact, its inputs and outputs.

    Example::

        @hookimpl
        def deeplens_build_convert(source, model, workdir):
            target = workdir / "model.onnx"
            shutil.copyfile(source.path(model.files[0]), target)
            return Artifact(format="onnx", path=target, inputs=(...), outputs=(...))
    """


@hookspec(firstresult=True)
def deeplens_build_reference_run(
    source: TrainingOutput,
    model: ModelFiles,
    converted: Artifact,
    inputs: Mapping[str, np.ndarray],
    settings: PluginSettings,
    scratch: Path,
) -> Mapping[str, np.ndarray]:
    """Run the *original* model with your framework on one set of inputs.

    The parity stage calls this with seeded random inputs and the user's sample inputs, runs the optimized
    artifact on the same inputs, and fails the build when they differ beyond ``parity.tolerance``. Run the
    model in inference mode (no dropout, batch norm with its moving statistics). Called only on the plugin
    that claimed the source.

    :param source: the training output.
    :param model: what your ``deeplens_build_detect`` returned.
    :param converted: what your ``deeplens_build_convert`` returned (its input and output names).
    :param inputs: one array per input of ``converted``, keyed by name, shaped as the optimized artifact's.
    :param settings: this plugin's validated settings (see ``deeplens_build_detect``).
    :param scratch: an empty folder in the build's work folder, the same for every sample of one reference run,
        for what the run needs on disk (a child process's current directory); it is removed when the run ends.
    :return: one array per output of ``converted``, keyed by output name.

    Example::

        @hookimpl
        def deeplens_build_reference_run(source, model, inputs):
            net = myfw.load(source.path(model.files[0]))
            return {"prob": net(inputs["data"])}
    """


@hookspec
def deeplens_build_reference_done(converted: Artifact, scratch: Path) -> None:
    """Free what ``deeplens_build_reference_run`` kept loaded between its calls: the core is done with the
    original for now.

    Optional: implement it when your reference run keeps the model loaded across samples (a session, a bound
    executor), so that the original's weights are not still in memory while the core loads the artifact to
    compare it (two copies of the weights at once would double a large build's peak memory). The core calls it
    once each run over the samples has ended, success or not (after the reference samples, after profiling);
    a later reference run loads the model again. Called only on the plugin that claimed the source.

    :param converted: what your ``deeplens_build_convert`` returned, as given to the reference run.
    :param scratch: the reference run's scratch folder (see ``deeplens_build_reference_run``), still there.
    :return: nothing.

    Example::

        @hookimpl
        def deeplens_build_reference_done():
            _loaded_model.cache_clear()  # the functools.lru_cache that reference_run loads through
    """


@hookspec(firstresult=True)
def deeplens_build_runtime(converted: Artifact, platform: str) -> str | None:
    """Name the runtime (a folder under ``runtimes/``) that runs your native artifact, or return None.

    Not needed for ONNX artifacts: the core picks the runtime whose ``formats`` include the artifact's format
    and whose ``platforms`` include the target. Called only on the plugin that claimed the source.

    :param converted: what your ``deeplens_build_convert`` returned.
    :param platform: the target device platform from ``deeplens.toml`` (``linux-x86_64``, ``linux-aarch64``).
    :return: a runtime name such as ``"mxnet"``, or None to let the core match by format.

    Example::

        @hookimpl
        def deeplens_build_runtime(converted):
            return "mxnet" if converted.format == "mxnet-symbol" else None
    """
