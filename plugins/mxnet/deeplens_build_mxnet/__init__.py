"""The MXNet framework plugin: what SageMaker MXNet jobs leave, to a parity-checked ONNX artifact.

Accepts ``PREFIX-symbol.json`` + ``PREFIX-NNNN.params`` (one or many epochs, at the top or nested in folders,
``model-shapes.json`` naming the inputs, Gluon ``HybridBlock.export`` output alike), and SSD detectors: the
SageMaker built-in object-detection algorithm's training output (``hyperparams.json`` gives the input size) or
MXNet SSD's ``deploy.py`` symbol. Converts with MXNet's own ONNX exporter; an SSD's anchors (``MultiBoxPrior``)
become a constant computed here by MXNet and its ``MultiBoxDetection`` standard ONNX (:mod:`deeplens_build.ssd`).
The parity reference is the inference symbol (the training branch cut) executed by MXNet.
``[plugins.mxnet] format = "native"`` keeps that symbol + params as the artifact, run by ``runtimes/mxnet``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from deeplens_build import (
    Artifact,
    ConversionError,
    Framework,
    ModelFiles,
    PluginSettings,
    TensorSpec,
    TrainingOutput,
    choose_one,
    hookimpl,
    onnxtools,
)

NATIVE_FORMAT = "mxnet-symbol"
INSTALL = "pip install deeplens-build-mxnet  (mxnet==1.9.1, numpy<2, onnx<=1.18.0)"
_PARAMS = re.compile(r"^(?P<prefix>.+)-(?P<epoch>\d{4})\.params$")
_SYMBOL_SUFFIX = "-symbol.json"
MIN_EXPORT_OPSET = 12
"""The oldest opset MXNet 1.9.1's exporter has converters for."""
_SHAPES_FILES = ("model-shapes.json",)
_HYPERPARAMS = "hyperparams.json"
"""What SageMaker's built-in algorithms leave beside the model; object detection's names ``image_shape``."""
_DETECTION = "_contrib_MultiBoxDetection"


class MXNetSettings(PluginSettings):
    """``[plugins.mxnet]``."""

    prefix: str | None = None
    """Which model to package when the output holds several (``PREFIX-symbol.json``)."""
    format: Literal["onnx", "native"] = "onnx"
    """``native`` keeps symbol + params as the artifact, run by ``runtimes/mxnet``."""


@hookimpl
def deeplens_build_framework() -> Framework:
    return Framework(name="mxnet", summary="MXNet checkpoints (PREFIX-symbol.json + PREFIX-NNNN.params)",
                     requires=("mxnet", "onnx"), install=INSTALL, settings=MXNetSettings,
                     device_module=Path(__file__).with_name("device.py"))


@hookimpl
def deeplens_build_detect(source: TrainingOutput, settings: MXNetSettings) -> ModelFiles | None:
    checkpoints = _checkpoints(source)
    if not checkpoints:
        return None
    prefix = choose_one(sorted(checkpoints), settings.prefix, setting="plugins.mxnet.prefix", what="MXNet models")
    epochs = checkpoints[prefix]
    final = max(epochs)
    files = [f"{prefix}{_SYMBOL_SUFFIX}", epochs[final]]
    files.extend(f for f in (_shapes_file(source, prefix), _hyperparams_file(source, prefix)) if f)
    notes = []
    if len(epochs) > 1:
        notes.append(f"{len(epochs)} checkpoints of {prefix} found (epochs {', '.join(map(str, sorted(epochs)))}): "
                     f"packaging only the final one, epoch {final}. Set checkpoint_frequency equal to the number of "
                     "epochs to keep the training output small.")
    return ModelFiles(files=tuple(files), notes=tuple(notes))


@hookimpl
def deeplens_build_convert(source: TrainingOutput, model: ModelFiles, workdir: Path,
                           shapes: Mapping[str, tuple[int, ...]], settings: MXNetSettings,
                           opset: int | None) -> Artifact:
    mx = _mxnet()
    symbol, args, auxs = _load(mx, source, model)
    inference = _inference_symbol(mx, symbol)
    input_shapes = _input_shapes(source, model, inference, args, auxs, shapes)
    labels = source.copy_labels(workdir)
    if settings.format == "native":
        target = workdir / f"model{_SYMBOL_SUFFIX}"
        target.write_text(inference.tojson())
        params = workdir / "model-0000.params"
        shutil.copyfile(source.path(model.files[1]), params)
        shapes_file = workdir / "model-shapes.json"  # what the device module binds the inputs with
        shapes_file.write_text(json.dumps([{"name": n, "shape": list(s)} for n, s in input_shapes.items()]))
        _, out_shapes, _ = inference.infer_shape(**input_shapes)
        outputs = tuple(TensorSpec(name=n, shape=tuple(s), dtype="float32")
                        for n, s in zip(inference.list_outputs(), out_shapes, strict=True))
        return Artifact(format=NATIVE_FORMAT, path=target, extra_files=(params, shapes_file),
                        inputs=_specs(input_shapes), outputs=outputs, labels=labels)

    import numpy as np
    import onnx

    target = workdir / "model.onnx"
    detector = _detection_node(symbol)
    exported = _ssd_head(mx, symbol, detector) if detector else inference
    used = set(exported.list_arguments()) | set(exported.list_auxiliary_states())
    try:
        with warnings.catch_warnings(), _exporter_opset(opset):
            warnings.simplefilter("ignore")  # the exporter warns about every opset it does not target
            mx.onnx.export_model(exported, {k: v for k, v in {**args, **auxs}.items() if k in used},
                                 in_shapes=list(input_shapes.values()), in_types=[np.float32] * len(input_shapes),
                                 onnx_file_path=str(target), dynamic=False, verbose=False)
    except AttributeError as exc:
        match = re.search(r"op type (\S+?) yet", str(exc))
        if not match:
            raise
        op = match[1]
        raise ConversionError(
            f"operator {op!r} (node {_node_of(symbol, op)!r}) has no ONNX conversion in MXNet "
            f"{mx.__version__}'s exporter. Options: replace the layer with a supported one and retrain; package the "
            "native MXNet artifact with [plugins.mxnet] format = \"native\" (runs with the MXNet runtime); or "
            "write a plugin of your own that converts it") from exc
    model_onnx = onnx.load(str(target))
    if detector:
        _append_detection(mx, model_onnx, symbol, detector, model, source, input_shapes)
        onnx.save(model_onnx, str(target))
    inputs, outputs = onnxtools.interface(model_onnx, {n: "NCHW" if len(s) == 4 else None
                                                       for n, s in input_shapes.items()})
    return Artifact(format="onnx", path=target, inputs=inputs, outputs=outputs, labels=labels)


@hookimpl
def deeplens_build_reference_run(source: TrainingOutput, model: ModelFiles, converted: Artifact,
                                 inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    from deeplens_build_mxnet import device

    shapes = tuple((name, tuple(value.shape)) for name, value in inputs.items())
    executor = _executor(str(source.path(model.files[0])), str(source.path(model.files[1])), shapes)
    outputs = device.run(executor, inputs)
    return {spec.name: out for spec, out in zip(converted.outputs, outputs, strict=True)}


@hookimpl
def deeplens_build_reference_done() -> None:
    _executor.cache_clear()


@hookimpl
def deeplens_build_runtime(converted: Artifact) -> str | None:
    return "mxnet" if converted.format == NATIVE_FORMAT else None


@contextlib.contextmanager
def _exporter_opset(opset: int | None) -> Iterator[None]:
    """Make MXNet's exporter write ``opset``: it has no argument for it and writes the newest opset the installed
    onnx knows (23 with onnx 1.18, which onnxruntime 1.16 and TensorRT 8.6 refuse), asking
    ``onnx.defs.onnx_opset_version`` when called; each operator's newest converter at or below it is used."""
    import onnx.defs

    if opset is None or opset >= onnx.defs.onnx_opset_version():
        yield
        return
    if opset < MIN_EXPORT_OPSET:
        raise ConversionError(f"the target loads ONNX opset {opset} at most, and MXNet's exporter writes opset "
                              f"{MIN_EXPORT_OPSET} at least; package the native MXNet artifact with "
                              "[plugins.mxnet] format = \"native\", or choose a target with a newer runtime")
    newest = onnx.defs.onnx_opset_version
    onnx.defs.onnx_opset_version = lambda: opset
    try:
        yield
    finally:
        onnx.defs.onnx_opset_version = newest


def _mxnet():
    """Import mxnet as the device module does (after restoring the numpy aliases it needs), with its ONNX exporter;
    a missing install is the core's to report."""
    from deeplens_build_mxnet import device

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import mxnet.onnx  # noqa: F401  (the exporter is a submodule)
    return device.mx


def _checkpoints(source: TrainingOutput) -> dict[str, dict[int, str]]:
    """prefix → {epoch: params file} for every symbol file with at least one params file beside it."""
    symbols = {f[: -len(_SYMBOL_SUFFIX)] for f in source.files if f.endswith(_SYMBOL_SUFFIX)}
    found: dict[str, dict[int, str]] = {}
    for f in source.files:
        match = _PARAMS.match(f)
        if match and match["prefix"] in symbols:
            found.setdefault(match["prefix"], {})[int(match["epoch"])] = f
    return found


def _hyperparams_file(source: TrainingOutput, prefix: str) -> str | None:
    folder = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
    return folder + _HYPERPARAMS if folder + _HYPERPARAMS in source.files else None


def _shapes_file(source: TrainingOutput, prefix: str) -> str | None:
    folder = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
    candidates = [f"{prefix}-shapes.json", *(folder + name for name in _SHAPES_FILES)]
    return next((c for c in candidates if c in source.files), None)


def _load(mx, source: TrainingOutput, model: ModelFiles):
    symbol_file, params_file = model.files[0], model.files[1]
    try:
        symbol = mx.sym.load(str(source.path(symbol_file)))
    except UnicodeDecodeError as exc:  # MXNet's own message quotes the damaged bytes, which do not decode
        raise ConversionError(f"{symbol_file} is not a valid MXNet symbol file (truncated or not JSON); take it "
                              "from the training output again") from exc
    except mx.base.MXNetError as exc:
        raise ConversionError(f"{symbol_file} is not a valid MXNet symbol file: {_mx_message(exc)}") from exc
    try:
        saved = mx.nd.load(str(source.path(params_file)))
    except (mx.base.MXNetError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{params_file} is damaged or not an MXNet params file ({_mx_message(exc)}); "
                              "take it from the training output again") from exc
    args = {k.split(":", 1)[1]: v for k, v in saved.items() if k.startswith("arg:")}
    auxs = {k.split(":", 1)[1]: v for k, v in saved.items() if k.startswith("aux:")}
    if saved and not args and not auxs:  # Gluon save_parameters style: no arg:/aux: prefixes
        names = set(symbol.list_auxiliary_states())
        args = {k: v for k, v in saved.items() if k not in names}
        auxs = {k: v for k, v in saved.items() if k in names}
    missing_aux = [a for a in symbol.list_auxiliary_states() if a not in auxs]
    unknown = sorted(set(args) - set(symbol.list_arguments()) | set(auxs) - set(symbol.list_auxiliary_states()))
    if missing_aux or unknown:
        detail = (f"missing {', '.join(missing_aux[:5])}" if missing_aux
                  else f"{', '.join(unknown[:5])} not in the symbol")
        raise ConversionError(f"{params_file} does not belong to {symbol_file}: {detail}; use the params saved with "
                              "this symbol")
    return symbol, args, auxs


def _input_shapes(source: TrainingOutput, model: ModelFiles, symbol, args, auxs,
                  configured: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    names = [a for a in symbol.list_arguments() if a not in args and not a.endswith("_label")]
    recorded = _recorded_shapes(source, model, names)
    shapes = {}
    for name in names:
        shape = configured.get(name) or recorded.get(name)
        if shape is None:
            raise ConversionError(f"the shape of input {name!r} is unknown: the training output has no "
                                  f"model-shapes.json or {_HYPERPARAMS} image_shape; set "
                                  f"`model.inputs.{name}.shape` in deeplens.toml, e.g. [1, 3, 224, 224]")
        shapes[name] = tuple(shape)
    try:
        arg_shapes, _, aux_shapes = symbol.infer_shape(**shapes)
    except Exception as exc:  # MXNetError for inconsistent shapes; names the operator in its text
        raise ConversionError(f"input shapes {shapes} do not fit the symbol: {_mx_message(exc)}") from exc
    expected = dict(zip(symbol.list_arguments(), arg_shapes, strict=True)) | dict(
        zip(symbol.list_auxiliary_states(), aux_shapes, strict=True))
    for name, value in {**args, **auxs}.items():
        if name in expected and tuple(value.shape) != tuple(expected[name]):
            raise ConversionError(f"{model.files[1]} does not belong to {model.files[0]}: parameter {name!r} is "
                                  f"{list(value.shape)}, the symbol expects {list(expected[name])}")
    return shapes


def _recorded_shapes(source: TrainingOutput, model: ModelFiles, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Input shapes the training output records: model-shapes.json, or the built-in algorithms' square
    ``image_shape`` (batch 1, 3 channels) for a single input."""
    recorded: dict[str, tuple[int, ...]] = {}
    for file in model.files[2:]:
        try:
            content = json.loads(source.path(file).read_text())
            if file.endswith(_HYPERPARAMS):
                side = int(str(content["image_shape"]).strip("[]() ").split(",")[-1])
                recorded.update({names[0]: (1, 3, side, side)} if len(names) == 1 else {})
            else:
                recorded.update({e["name"]: tuple(int(d) for d in e["shape"]) for e in content})
        except KeyError:
            continue  # hyperparameters of an algorithm without image_shape
        except (ValueError, TypeError) as exc:
            raise ConversionError(f"{file} is not what SageMaker writes ({exc}): a list of {{\"name\", \"shape\"}} "
                                  "entries, or hyperparameters with image_shape") from exc
    return recorded


def _inference_symbol(mx, symbol):
    """The symbol as inference runs it: an SSD's detection alone, its training branch (MultiBoxTarget, the losses,
    the ``label`` input) cut as MXNet SSD's deploy.py cuts it; a final SoftmaxOutput (a training loss layer whose
    label input the exporter trips over) replaced with softmax.

    In inference mode SoftmaxOutput's forward pass is a softmax over axis 1 (``multi_output`` too), so nothing
    changes numerically.
    """
    detector = _detection_node(symbol)
    if detector:
        cls_prob, loc, anchors = _ssd_inputs(mx, symbol, detector)
        return mx.sym.contrib.MultiBoxDetection(cls_prob, loc, anchors, name=detector["name"],
                                                **detector.get("attrs", {}))
    graph = json.loads(symbol.tojson())
    internals = symbol.get_internals()
    outputs = [_without_loss(mx, graph, graph["nodes"][node_id], index, internals)
               for node_id, index, _ in graph["heads"]]
    return outputs[0] if len(outputs) == 1 else mx.sym.Group(outputs)


def _without_loss(mx, graph: Mapping[str, Any], node: Mapping[str, Any], index: int, internals):
    if node["op"] != "SoftmaxOutput":
        return internals[_output_name(node, index, internals)]
    data_id, data_index, _ = node["inputs"][0]
    data = internals[_output_name(graph["nodes"][data_id], data_index, internals)]
    return mx.sym.softmax(data, axis=1, name=node["name"])


def _detection_node(symbol) -> dict[str, Any] | None:
    """The SSD's MultiBoxDetection node, if the symbol is an SSD (the built-in object-detection algorithm's, MXNet
    SSD's training or deploy symbol)."""
    found = [n for n in json.loads(symbol.tojson())["nodes"] if n["op"] == _DETECTION]
    if len(found) > 1:
        raise ConversionError(f"the symbol holds {len(found)} MultiBoxDetection layers ({found[0]['name']}, "
                              f"{found[1]['name']}...); export one detector per model")
    return found[0] if found else None


def _ssd_inputs(mx, symbol, detector: Mapping[str, Any]):
    """MultiBoxDetection's three inputs as inference computes them: class probabilities, box offsets, anchors."""
    graph = json.loads(symbol.tojson())
    internals = symbol.get_internals()
    return tuple(_without_loss(mx, graph, graph["nodes"][node_id], index, internals)
                 for node_id, index, _ in detector["inputs"])


def _ssd_head(mx, symbol, detector: Mapping[str, Any]):
    """What MXNet's exporter converts of an SSD: the class probabilities and box offsets, before the detection."""
    cls_prob, loc, _ = _ssd_inputs(mx, symbol, detector)
    return mx.sym.Group([cls_prob, loc])


def _append_detection(mx, model_onnx, symbol, detector: Mapping[str, Any], model: ModelFiles,
                      source: TrainingOutput, input_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Replace the exported head's outputs with MultiBoxDetection in standard ONNX, its anchors computed by MXNet
    now (MultiBoxPrior reads shapes only)."""
    import numpy as np

    from deeplens_build import ssd
    from deeplens_build_mxnet import device

    if next(iter(input_shapes.values()))[0] != 1:
        raise ConversionError("an SSD detector converts at batch 1 (a camera's frame at a time); set "
                              f"`model.inputs.{next(iter(input_shapes))}.shape` with batch 1")
    _, _, anchors_symbol = _ssd_inputs(mx, symbol, detector)
    executor = device.bind(anchors_symbol, str(source.path(model.files[1])), tuple(input_shapes.items()))
    anchors = device.run(executor, {n: np.zeros(s, np.float32) for n, s in input_shapes.items()})[0].reshape(-1, 4)
    attrs = {k: str(v) for k, v in detector.get("attrs", {}).items()}
    _, (prob_shape, _), _ = _ssd_head(mx, symbol, detector).infer_shape(**input_shapes)
    top_k = int(attrs.get("nms_topk", -1))
    background = int(attrs.get("background_id", 0))
    foreground = tuple(c for c in range(prob_shape[1]) if c != background)
    decoding = ssd.Decoding(
        priors=anchors, variances=np.array([_floats(attrs.get("variances", "(0.1, 0.1, 0.2, 0.2)"))]),
        foreground=foreground, labels=tuple(range(len(foreground))),
        score_threshold=float(attrs.get("threshold", 0.01)), iou_threshold=float(attrs.get("nms_threshold", 0.5)),
        clip=_flag(attrs.get("clip", "True")), per_anchor=True, class_agnostic=_flag(attrs.get("force_suppress", "0")),
        top_k=top_k if top_k > 0 else None, keep_top_k=None, rows=len(anchors), image_id=False,
        probs_layout="classes_first")
    probs, loc = (o.name for o in model_onnx.graph.output)
    ssd.append(model_onnx, probs=probs, loc=loc, decoding=decoding, output=detector["name"])


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.strip("[]() ").split(",") if v.strip()]


def _flag(text: str) -> bool:
    return text.strip().lower() in ("1", "true")


def _output_name(node: Mapping[str, Any], index: int, internals) -> str:
    """The internal output name MXNet gives a node's ``index``-th output: NAME_output, or NAME_outputI."""
    if node["op"] == "null":
        return node["name"]
    available = set(internals.list_outputs())
    single = f"{node['name']}_output"
    return single if index == 0 and single in available else f"{single}{index}"


@functools.lru_cache(maxsize=4)
def _executor(symbol_path: str, params_path: str, shapes: tuple[tuple[str, tuple[int, ...]], ...]):
    """An MXNet executor of the inference symbol, bound as the device module binds it, reused across the parity
    samples."""
    from deeplens_build_mxnet import device

    mx = _mxnet()
    return device.bind(_inference_symbol(mx, mx.sym.load(symbol_path)), params_path, shapes)


def _node_of(symbol, op: str) -> str:
    nodes = json.loads(symbol.tojson())["nodes"]
    return next((n["name"] for n in nodes if n["op"] == op), "?")


def _specs(shapes: Mapping[str, tuple[int, ...]]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(name=n, shape=s, dtype="float32", layout="NCHW" if len(s) == 4 else None)
                 for n, s in shapes.items())


def _mx_message(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if "Error" in line or "Check failed" in line] or lines or [type(exc).__name__]
    return useful[-1]
