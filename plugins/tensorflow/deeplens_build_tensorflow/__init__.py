"""The TensorFlow framework plugin: SageMaker TensorFlow outputs to a parity-checked ONNX artifact.

Accepts the TF Serving layout SageMaker leaves (``model/<version>/saved_model.pb`` + ``variables/``; the highest
version is packaged), a bare SavedModel folder, a Keras ``.keras`` or ``.h5`` file, and a frozen ``.pb`` graph
whose input and output tensor names come from ``[plugins.tensorflow] inputs`` / ``outputs``. Converts with
tf2onnx; the parity reference is the same model executed by TensorFlow.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from deeplens_build import (
    Artifact,
    ConversionError,
    Framework,
    ModelFiles,
    PluginSettings,
    TrainingOutput,
    choose_one,
    hookimpl,
    onnxtools,
)

INSTALL = "pip install deeplens-build-tensorflow  (tensorflow-cpu 2.21, tf2onnx 1.17.0)"
SAVED_MODEL = "saved_model.pb"
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
DEFAULT_SIGNATURE = "serving_default"
DEFAULT_OPSET = 17
_UNSUPPORTED = re.compile(r"Tensorflow op \[(?P<node>[^:\]]+): (?P<op>[^\]]+)\] is not supported")


class TensorFlowSettings(PluginSettings):
    """``[plugins.tensorflow]``."""

    file: str | None = None
    """Which Keras or frozen-graph file to package when the output holds several."""
    signature: str = DEFAULT_SIGNATURE
    """The SavedModel signature to convert."""
    inputs: tuple[str, ...] = ()
    """A frozen graph's input tensor names, e.g. ``["input:0"]``."""
    outputs: tuple[str, ...] = ()
    """A frozen graph's output tensor names."""
    opset: Annotated[int, Field(ge=7)] = DEFAULT_OPSET
    """The ONNX opset tf2onnx exports; lowered to the target's ceiling when that is lower."""


@hookimpl
def deeplens_build_framework() -> Framework:
    return Framework(name="tensorflow", summary="TensorFlow SavedModel, Keras (.keras/.h5) and frozen graphs",
                     requires=("tensorflow-cpu", "tf2onnx"), install=INSTALL, settings=TensorFlowSettings)


@hookimpl
def deeplens_build_detect(source: TrainingOutput, settings: TensorFlowSettings) -> ModelFiles | None:
    saved = {_parent(f): f for f in source.files if f.rsplit("/", 1)[-1] == SAVED_MODEL}
    if saved:
        return _claim_saved_model(source, saved, settings)
    keras = source.matching(*KERAS_SUFFIXES)
    frozen = source.matching(".pb")
    for candidates in (keras, frozen):
        if not candidates:
            continue
        chosen = choose_one(candidates, settings.file, setting="plugins.tensorflow.file", what="TensorFlow models")
        if chosen.endswith(".pb") and not (settings.inputs and settings.outputs):
            raise ConversionError(f"{chosen} is a frozen graph: name its tensors with [plugins.tensorflow] "
                                  "inputs = [\"input:0\"] and outputs = [\"output:0\"] in deeplens.toml")
        return ModelFiles(files=(chosen,))
    return None


@hookimpl
def deeplens_build_convert(source: TrainingOutput, model: ModelFiles, workdir: Path,
                           shapes: Mapping[str, tuple[int, ...]], settings: TensorFlowSettings,
                           opset: int | None) -> Artifact:
    loaded = _load(source.root, model.files, _frozen_key(settings))
    specs = _static_specs(loaded, shapes)
    target = workdir / "model.onnx"
    with _unsupported_ops_raise():
        loaded.export(specs, min(settings.opset, opset or settings.opset), target)
    layouts = {s.name: "NHWC" if len(s.shape) == 4 else None for s in specs}
    inputs, outputs = onnxtools.interface(onnxtools.load(target), layouts)
    return Artifact(format="onnx", path=target, inputs=inputs, outputs=outputs,
                    labels=source.copy_labels(workdir))


@hookimpl
def deeplens_build_reference_run(source: TrainingOutput, model: ModelFiles, converted: Artifact,
                                 inputs: Mapping[str, Any], settings: TensorFlowSettings) -> Mapping[str, Any]:
    outputs = _load(source.root, model.files, _frozen_key(settings)).run(inputs)
    if isinstance(outputs, Mapping):
        return outputs
    return {spec.name: value for spec, value in zip(converted.outputs, outputs, strict=True)}


@hookimpl
def deeplens_build_reference_done() -> None:
    _load.cache_clear()


@dataclass(frozen=True)
class _Loaded:
    """A model loaded by TensorFlow: its inputs, how to run it, and how to export it."""

    inputs: tuple[tuple[str, tuple[int | None, ...], str], ...]
    run: Callable[[Mapping[str, Any]], Any]
    export: Callable[[list[Any], int, Path], None]


def _tf():
    """Import TensorFlow quietly (a missing install is the core's to report)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # C++ start-up chatter, not our user's concern
    import tensorflow as tf
    import tf2onnx

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    return tf, tf2onnx


@functools.lru_cache(maxsize=4)
def _load(root: Path, files: tuple[str, ...], frozen: tuple[tuple[str, ...], tuple[str, ...], str]) -> _Loaded:
    """Load once per build: convert and every parity sample share the model."""
    first = files[0]
    if first.rsplit("/", 1)[-1] == SAVED_MODEL:
        return _saved_model(root / _parent(first), signature=frozen[2])
    if first.endswith(KERAS_SUFFIXES):
        return _keras(root / first)
    return _frozen_graph(root / first, inputs=frozen[0], outputs=frozen[1])


def _saved_model(folder: Path, *, signature: str) -> _Loaded:
    tf, tf2onnx = _tf()
    try:
        loaded = tf.saved_model.load(str(folder))
    except (OSError, ValueError, tf.errors.OpError) as exc:
        raise ConversionError(f"the SavedModel in {folder.name}/ cannot be loaded ({_first_line(exc)}); its "
                              "variables/ folder may be missing or damaged: take the training output again") from exc
    if signature not in loaded.signatures:
        raise ConversionError(f"the SavedModel has no signature {signature!r}; it has "
                              f"{', '.join(loaded.signatures) or 'none'}. Set [plugins.tensorflow] signature")
    # look the signature up through `loaded` at each call: the signature alone does not keep the variables alive
    specs = loaded.signatures[signature].structured_input_signature[1]
    names = list(specs)

    def run(inputs: Mapping[str, Any]) -> dict[str, Any]:
        outputs = loaded.signatures[signature](**{n: tf.constant(inputs[n]) for n in names})
        return {k: v.numpy() for k, v in outputs.items()}

    def export(static: list[Any], opset: int, target: Path) -> None:
        wrapper = tf.function(lambda *args: loaded.signatures[signature](**dict(zip(names, args, strict=True))),
                              input_signature=static)
        tf2onnx.convert.from_function(wrapper, input_signature=static, opset=opset, output_path=str(target))

    return _Loaded(inputs=tuple((n, tuple(specs[n].shape), specs[n].dtype.name) for n in names), run=run,
                   export=export)


def _keras(path: Path) -> _Loaded:
    tf, tf2onnx = _tf()
    import keras

    try:
        model = keras.models.load_model(str(path), compile=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConversionError(f"{path.name} is damaged or not a Keras model ({_first_line(exc)})") from exc
    names = [t.name for t in model.inputs]

    def run(inputs: Mapping[str, Any]) -> list[Any]:
        outputs = model([inputs[n] for n in names] if len(names) > 1 else inputs[names[0]], training=False)
        return [o.numpy() for o in (outputs if isinstance(outputs, list | tuple) else [outputs])]

    def export(static: list[Any], opset: int, target: Path) -> None:
        tf2onnx.convert.from_keras(model, input_signature=static, opset=opset, output_path=str(target))

    return _Loaded(inputs=tuple((t.name, tuple(t.shape), str(t.dtype)) for t in model.inputs), run=run,
                   export=export)


def _frozen_graph(path: Path, *, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> _Loaded:
    tf, tf2onnx = _tf()
    from google.protobuf.message import DecodeError

    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(path.read_bytes())
    except DecodeError as exc:
        raise ConversionError(f"{path.name} is damaged or not a frozen TensorFlow graph") from exc
    wrapped = tf.compat.v1.wrap_function(lambda: tf.compat.v1.import_graph_def(graph_def, name=""), [])
    try:
        feeds = [wrapped.graph.get_tensor_by_name(n) for n in inputs]
        fetches = [wrapped.graph.get_tensor_by_name(n) for n in outputs]
    except (KeyError, ValueError) as exc:
        raise ConversionError(f"{path.name}: {_first_line(exc)}; check [plugins.tensorflow] inputs and outputs "
                              "(tensor names such as \"input:0\")") from exc
    pruned = wrapped.prune(feeds=feeds, fetches=fetches)

    def run(values: Mapping[str, Any]) -> list[Any]:
        return [o.numpy() for o in pruned(*[tf.constant(values[n]) for n in inputs])]

    def export(static: list[Any], opset: int, target: Path) -> None:
        tf2onnx.convert.from_graph_def(graph_def, input_names=list(inputs), output_names=list(outputs), opset=opset,
                                       output_path=str(target))

    return _Loaded(inputs=tuple((n, tuple(t.shape), t.dtype.name) for n, t in zip(inputs, feeds, strict=True)),
                   run=run, export=export)


def _static_specs(loaded: _Loaded, shapes: Mapping[str, tuple[int, ...]]) -> list[Any]:
    """TensorSpecs with every dimension known: config shapes first, else a dynamic batch becomes 1."""
    tf, _ = _tf()
    specs = []
    for name, shape, dtype in loaded.inputs:
        static = shapes.get(name) or tuple(1 if d is None and i == 0 else d for i, d in enumerate(shape))
        if any(d is None for d in static):
            raise ConversionError(f"input {name!r} has dynamic shape {list(shape)}; set "
                                  f"`model.inputs.{name}.shape` in deeplens.toml")
        specs.append(tf.TensorSpec(static, dtype, name=name.split(":")[0]))
    return specs


@contextmanager
def _unsupported_ops_raise() -> Iterator[None]:
    """tf2onnx logs unsupported ops and carries on; a build must stop there, naming the op and its node."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(logging.ERROR)
    logger = logging.getLogger("tf2onnx")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    found = [m for r in records if (m := _UNSUPPORTED.search(r.getMessage()))]
    if found:
        listed = ", ".join(f"{m['op']!r} (node {m['node']!r})" for m in found[:5])
        raise ConversionError(f"tf2onnx cannot convert TensorFlow op(s) {listed}; replace them with supported "
                              "ops, try a newer [plugins.tensorflow] opset, or write a plugin of your own")


def _claim_saved_model(source: TrainingOutput, saved: Mapping[str, str], settings: TensorFlowSettings) -> ModelFiles:
    versions = {int(d.rsplit("/", 1)[-1]): d for d in saved if d.rsplit("/", 1)[-1].isdigit()}
    notes = []
    if versions:
        folder = versions[max(versions)]
        if len(versions) > 1:
            notes.append(f"TF Serving versions {', '.join(map(str, sorted(versions)))} found: packaging the highest, "
                         f"{max(versions)} ({folder}/)")
    elif len(saved) == 1:
        folder = next(iter(saved))
    else:
        raise ConversionError(f"several SavedModels ({', '.join(sorted(saved))}); keep one in the training output")
    prefix = f"{folder}/" if folder else ""
    files = [saved[folder], *(f for f in source.files if f.startswith(prefix) and f != saved[folder])]
    if settings.signature != DEFAULT_SIGNATURE:
        notes.append(f"using signature {settings.signature!r}")
    return ModelFiles(files=tuple(files), notes=tuple(notes))


def _frozen_key(settings: TensorFlowSettings) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    return settings.inputs, settings.outputs, settings.signature


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
