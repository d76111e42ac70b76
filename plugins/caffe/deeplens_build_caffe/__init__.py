"""The Caffe framework plugin: ``deploy.prototxt`` + ``*.caffemodel`` to a parity-checked ONNX artifact.

Converts with caffe2onnx 2.0.1. Its generated protobuf module cannot load under protobuf >= 4 ("Descriptors
cannot be created directly"); instead of the slow pure-Python protobuf backend (measured: 32.7 s to parse a
40 MB caffemodel, against 0.04 s), the module is rebuilt here from the serialized descriptor it embeds, with
today's protobuf, before caffe2onnx imports it. The parity reference is independent of the converter: OpenCV's
Caffe importer runs the original prototxt + caffemodel.

SSD detectors (Caffe SSD, OpenCV's res10 face detector): caffe2onnx writes ``PriorBox`` and ``DetectionOutput``
as operators no runtime has. The priors depend on shapes alone, so OpenCV computes them once here, and
``DetectionOutput`` becomes standard ONNX (:mod:`deeplens_build.ssd`) with Caffe's rows, ``[1, 1, keep_top_k, 7]``,
padded with -1.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import re
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deeplens_build import (
    Artifact,
    ConversionError,
    Framework,
    ModelFiles,
    PluginError,
    PluginSettings,
    TrainingOutput,
    choose_one,
    hookimpl,
    onnxtools,
    ssd,
)

INSTALL = ("pip install deeplens-build-caffe && pip install --no-deps caffe2onnx==2.0.1  "
           "(caffe2onnx's own pin, onnx==1.6.0, cannot build on Python 3.11)")
PB2_MODULE = "caffe2onnx.proto.caffe_upsample_pb2"
CAFFE2ONNX_OPSET = 11
"""The opset caffe2onnx 2.0.1 emits nodes for (it was built against onnx 1.6)."""
_SNAPSHOT = re.compile(r"_iter_(\d+)\.caffemodel$")
# the layer types caffe2onnx 2.0.1 converts (src/caffe2onnx.py, GenerateOnnxNodeList); Input is the graph input
SUPPORTED_LAYERS = frozenset({
    "Input", "Convolution", "Deconvolution", "BatchNorm", "BN", "Scale", "Pooling", "MaxUnpool", "Eltwise",
    "Softmax", "ReLU", "PReLU", "ReLU6", "Sigmoid", "Log", "LRN", "Dropout", "Upsample", "Interp", "Concat",
    "Slice", "Reshape", "InnerProduct", "ShuffleChannel", "Flatten", "Permute", "PriorBox", "DetectionOutput",
    "Axpy", "Normalize", "Power", "TanH", "Crop", "MVN",
})
_WEIGHTED = frozenset({"Convolution", "Deconvolution", "InnerProduct", "BatchNorm", "BN", "Scale", "PReLU"})


class CaffeSettings(PluginSettings):
    """``[plugins.caffe]``."""

    prototxt: str | None = None
    """The deploy prototxt, when the output holds several and none is named ``*deploy*``."""


@hookimpl
def deeplens_build_framework() -> Framework:
    return Framework(name="caffe", summary="Caffe models (deploy.prototxt + *.caffemodel)",
                     requires=("caffe2onnx", "opencv-python-headless"), install=INSTALL, settings=CaffeSettings)


@hookimpl
def deeplens_build_detect(source: TrainingOutput, settings: CaffeSettings) -> ModelFiles | None:
    weights = source.matching(".caffemodel")
    if not weights:
        return None
    prototxt = _prototxt(source, settings)
    snapshots = {int(m[1]): f for f in weights if (m := _SNAPSHOT.search(f))}
    notes = []
    if snapshots:
        final = max(snapshots)
        chosen = snapshots[final]
        if len(snapshots) > 1:
            iterations = ", ".join(map(str, sorted(snapshots)))
            notes.append(f"{len(snapshots)} Caffe snapshots found (iterations {iterations}):"
                         f" packaging only the highest, {chosen}")
    elif len(weights) == 1:
        chosen = weights[0]
    else:
        raise ConversionError(f"several caffemodels ({', '.join(weights)}) and none named *_iter_N.caffemodel; "
                              "keep the one to package")
    return ModelFiles(files=(prototxt, chosen), notes=tuple(notes))


@hookimpl
def deeplens_build_convert(source: TrainingOutput, model: ModelFiles, workdir: Path,
                           shapes: Mapping[str, tuple[int, ...]]) -> Artifact:
    pb2 = caffe_pb2()
    net, weights = _read(pb2, source, model)
    _apply_shapes(net, shapes, model.files[0])
    _check_layers(net, weights, model)

    import numpy as np
    from caffe2onnx.src.caffe2onnx import Caffe2Onnx

    if "float" not in np.__dict__:  # caffe2onnx uses np.float (removed in numpy 1.24) for a BatchNorm without Scale
        np.float = float

    target = workdir / "model.onnx"
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):  # caffe2onnx prints a line per layer
            onnx_model = Caffe2Onnx(net, weights, str(target)).createOnnxModel()
    except SystemExit as exc:  # caffe2onnx calls exit() on what it cannot handle
        last = (chatter.getvalue().strip().splitlines() or ["no reason given"])[-1]
        raise ConversionError(f"caffe2onnx gave up: {last}") from exc
    import onnx

    # caffe2onnx writes opset-11 nodes (e.g. Dropout's `ratio` attribute) but stamps the installed onnx's newest
    del onnx_model.opset_import[:]
    onnx_model.opset_import.add(domain="", version=CAFFE2ONNX_OPSET)
    _name_inputs_as_in_caffe(onnx_model, _input_blobs(net))
    _standard_detection(onnx_model, net, source, model)
    _refuse_foreign(onnx_model, model.files[0])
    onnx.save(onnx_model, str(target))
    loaded = onnxtools.load(target)
    inputs, outputs = onnxtools.interface(loaded, {v.name: "NCHW" if len(v.type.tensor_type.shape.dim) == 4 else None
                                                   for v in loaded.graph.input})
    return Artifact(format="onnx", path=target, inputs=inputs, outputs=outputs,
                    labels=source.copy_labels(workdir))


@hookimpl
def deeplens_build_reference_run(source: TrainingOutput, model: ModelFiles, converted: Artifact,
                                 inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    cv2 = _cv2()
    net = cv2.dnn.readNetFromCaffe(str(source.path(model.files[0])), str(source.path(model.files[1])))
    for name, value in inputs.items():
        net.setInput(value, name)
    layers = _output_layers(_read_prototxt(caffe_pb2(), source, model.files[0]), [o.name for o in converted.outputs])
    values = net.forward(layers)
    return {spec.name: value for spec, value in zip(converted.outputs, values, strict=True)}


def _standard_detection(onnx_model, net, source: TrainingOutput, model: ModelFiles) -> None:
    """Replace caffe2onnx's DetectionOutput node (and with it the PriorBox nodes feeding it) by standard ONNX."""
    import numpy as np

    layer = next((layer for layer in net.layer if layer.type == "DetectionOutput"), None)
    if layer is None:
        return
    node = next(n for n in onnx_model.graph.node if n.op_type == "DetectionOutput")
    onnx_model.graph.node.remove(node)
    p = layer.detection_output_param
    cv2 = _cv2()
    reader = cv2.dnn.readNetFromCaffe(str(source.path(model.files[0])), str(source.path(model.files[1])))
    for blob in _input_blobs(net):  # PriorBox reads shapes only; any values do
        reader.setInput(np.zeros(_blob_shape(net, blob), np.float32), blob)
    priors = reader.forward(_output_layers(net, [layer.bottom[2]])[0]).reshape(2, -1, 4)
    foreground = tuple(c for c in range(p.num_classes) if c != p.background_label_id)
    top_k = p.nms_param.top_k if p.nms_param.top_k > 0 else None
    keep = p.keep_top_k if p.keep_top_k > 0 else None
    per_class = min(top_k or len(priors[0]), len(priors[0]))
    decoding = ssd.Decoding(
        priors=priors[0], variances=np.ones((1, 4)) if p.variance_encoded_in_target else priors[1],
        foreground=foreground, labels=foreground,
        score_threshold=p.confidence_threshold if p.HasField("confidence_threshold") else float(np.finfo("f4").min),
        iou_threshold=p.nms_param.nms_threshold, clip=False, per_anchor=False, class_agnostic=False, top_k=top_k,
        keep_top_k=keep, rows=min(keep or len(foreground) * per_class, len(foreground) * per_class), image_id=True,
        probs_layout="anchors_first")
    ssd.append(onnx_model, probs=node.input[1], loc=node.input[0], decoding=decoding, output=node.output[0])


def _blob_shape(net, blob: str) -> list[int]:
    if net.input:
        index = list(net.input).index(blob)
        return list(net.input_shape[index].dim) if net.input_shape else list(net.input_dim[4 * index: 4 * index + 4])
    layer = next(layer for layer in net.layer if layer.type == "Input" and blob in layer.top)
    return list(layer.input_param.shape[0].dim)


def _refuse_foreign(onnx_model, prototxt: str) -> None:
    """A layer caffe2onnx wrote as an operator no ONNX runtime has (a PriorBox outside a detector) is named now,
    not by the runtime that cannot load it."""
    import onnx.defs

    for node in onnx_model.graph.node:
        if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type):
            raise ConversionError(f"layer {node.name!r} of {prototxt} ({node.op_type}) has no standard ONNX "
                                  "conversion here: caffe2onnx writes it as an operator no runtime has; PriorBox "
                                  "converts only as the priors of a DetectionOutput")


def caffe_pb2() -> types.ModuleType:
    """caffe2onnx's ``caffe_upsample_pb2`` rebuilt with today's protobuf (the fast backend), installed in
    ``sys.modules`` so that caffe2onnx imports this one. Tests use it to write real caffemodels."""
    if PB2_MODULE in sys.modules:
        return sys.modules[PB2_MODULE]
    spec = importlib.util.find_spec("caffe2onnx")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("No module named 'caffe2onnx'", name="caffe2onnx")  # the core adds how to install it
    from google.protobuf import descriptor_pool
    from google.protobuf.internal import builder

    generated = Path(next(iter(spec.submodule_search_locations))) / "proto" / "caffe_upsample_pb2.py"
    serialized = _embedded_descriptor(generated)
    pool = descriptor_pool.DescriptorPool()  # a pool of our own: no clash with any other "caffe" protos
    module = types.ModuleType(PB2_MODULE)
    module.DESCRIPTOR = pool.AddSerializedFile(serialized)
    builder.BuildMessageAndEnumDescriptors(module.DESCRIPTOR, module.__dict__)
    builder.BuildTopDescriptorsAndMessages(module.DESCRIPTOR, PB2_MODULE, module.__dict__)
    sys.modules[PB2_MODULE] = module
    return module


def _embedded_descriptor(generated: Path) -> bytes:
    """The ``serialized_pb=b'...'`` literal of a protoc-generated module, read without executing it."""
    for node in ast.walk(ast.parse(generated.read_text(encoding="utf-8"))):
        if isinstance(node, ast.keyword) and node.arg == "serialized_pb":
            return ast.literal_eval(node.value)
    raise PluginError(f"{generated} holds no serialized descriptor; reinstall caffe2onnx==2.0.1")


def _cv2():
    import cv2

    if not hasattr(cv2.dnn, "readNetFromCaffe"):
        raise PluginError(f"OpenCV {cv2.__version__} has no Caffe importer (removed in OpenCV 5); install "
                          "opencv-python-headless<4.12")
    return cv2


def _prototxt(source: TrainingOutput, settings: CaffeSettings) -> str:
    candidates = source.matching(".prototxt")
    deploy = [c for c in candidates if "deploy" in c.rsplit("/", 1)[-1].lower()]
    return choose_one(deploy if len(deploy) == 1 and settings.prototxt is None else candidates, settings.prototxt,
                      setting="plugins.caffe.prototxt", what="deploy prototxt files")


def _read(pb2, source: TrainingOutput, model: ModelFiles):
    from google.protobuf.message import DecodeError

    prototxt, caffemodel = model.files
    net = _read_prototxt(pb2, source, prototxt)
    weights = pb2.NetParameter()
    try:
        weights.ParseFromString(source.path(caffemodel).read_bytes())
    except DecodeError as exc:
        raise ConversionError(f"{caffemodel} is truncated or damaged ({exc}); take it from the training output "
                              "again") from exc
    if not (weights.layer or weights.layers):
        raise ConversionError(f"{caffemodel} holds no layers; it is truncated or not a caffemodel")
    return net, weights


def _apply_shapes(net, shapes: Mapping[str, tuple[int, ...]], prototxt: str) -> None:
    """Input shapes from the prototxt (``input_shape``, ``input_dim`` or Input layers), else from config."""
    declared = bool(net.input_shape or net.input_dim) or any(l.type == "Input" for l in net.layer)
    if declared:
        return
    if not net.input:
        raise ConversionError(f"{prototxt} declares no input; add an Input layer or `input:` with `input_shape`")
    name = net.input[0]
    if name not in shapes:
        raise ConversionError(f"{prototxt} gives input {name!r} no shape; set `model.inputs.{name}.shape` in "
                              "deeplens.toml, e.g. [1, 3, 224, 224]")
    net.input_shape.add().dim.extend(shapes[name])


def _check_layers(net, weights, model: ModelFiles) -> None:
    """Fail before caffe2onnx does (it prints and exits): unsupported layers, and weights that do not match."""
    prototxt, caffemodel = model.files
    for layer in net.layer:
        if layer.type not in SUPPORTED_LAYERS:
            raise ConversionError(f"layer {layer.name!r} of type {layer.type!r} cannot be converted by caffe2onnx "
                                  "2.0.1; replace it with supported layers, or write a plugin of your own")
        if layer.type == "DetectionOutput":
            _check_detection(layer, net, prototxt)
    blobs = {layer.name: layer for layer in weights.layer}
    for layer in net.layer:
        if layer.type not in _WEIGHTED:
            continue
        trained = blobs.get(layer.name)
        if trained is None or not trained.blobs:
            raise ConversionError(f"{caffemodel} has no weights for layer {layer.name!r} of {prototxt}: they are "
                                  "not from the same model")
        expected = _expected_outputs(layer)
        got = list(trained.blobs[0].shape.dim)
        if expected is not None and got and got[0] != expected:
            raise ConversionError(f"layer {layer.name!r}: {prototxt} says {expected} outputs but {caffemodel} holds "
                                  f"weights of shape {got}; they are not from the same model")


def _check_detection(layer, net, prototxt: str) -> None:
    """The DetectionOutput settings the standard ONNX detection reproduces; any other is named before conversion."""
    p = layer.detection_output_param
    center_size = 2  # Caffe's PriorBoxParameter.CodeType
    refused = [why for wrong, why in (
        (sum(other.type == "DetectionOutput" for other in net.layer) > 1, "a second DetectionOutput layer"),
        (not p.share_location, "share_location: false (a box per class)"),
        (p.code_type != center_size, f"code_type {p.code_type} (only CENTER_SIZE converts)"),
        (p.nms_param.eta != 1.0, f"nms_param.eta {p.nms_param.eta} (adaptive suppression)"),
        (len(layer.bottom) != 3, f"{len(layer.bottom)} inputs (loc, conf and priors expected)"),
    ) if wrong]
    if refused:
        raise ConversionError(f"layer {layer.name!r} (DetectionOutput) of {prototxt} cannot be converted to "
                              f"standard ONNX: {'; '.join(refused)}; change the layer's settings, or write a plugin "
                              "of your own")


def _expected_outputs(layer) -> int | None:
    if layer.type == "Convolution":  # Deconvolution weights are (inputs, outputs, ...): not checked here
        return layer.convolution_param.num_output
    if layer.type == "InnerProduct":
        return layer.inner_product_param.num_output
    return None


def _input_blobs(net) -> list[str]:
    if net.input:
        return list(net.input)
    return [layer.top[0] if layer.top else layer.name for layer in net.layer if layer.type == "Input"]


def _name_inputs_as_in_caffe(model, blobs: list[str]) -> None:
    """caffe2onnx calls inputs ``input`` or ``<blob>_input``; users (and ``model.inputs``) know the blob names."""
    renames = {value.name: blob for value, blob in zip(model.graph.input, blobs, strict=False)}
    for value in model.graph.input:
        value.name = renames.get(value.name, value.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]


def _output_layers(net, outputs: list[str]) -> list[str]:
    """OpenCV names outputs by layer; caffe2onnx names them by top blob (or layer, for in-place layers)."""
    names = {layer.name for layer in net.layer}
    by_top = {top: layer.name for layer in net.layer for top in layer.top}
    return [o if o in names else by_top.get(o, o) for o in outputs]


def _read_prototxt(pb2, source: TrainingOutput, prototxt: str):
    from google.protobuf import text_format

    net = pb2.NetParameter()
    try:
        text_format.Merge(source.path(prototxt).read_text(encoding="utf-8"), net)
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{prototxt} is not a valid Caffe prototxt: {exc}") from exc
    return net
