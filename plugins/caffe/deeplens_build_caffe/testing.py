"""Write tiny real Caffe models: a text ``deploy.prototxt`` and a binary ``.caffemodel`` with seeded weights.

Used by the test suite; handy for anyone testing code around this plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from deeplens_build_caffe import caffe_pb2


def residual_net(net: Any, add: Callable[..., Any]) -> None:
    """Convolution, BatchNorm + Scale, ReLU, a residual Eltwise sum, max and average Pooling, Concat,
    InnerProduct, Dropout, Softmax: the layer mix of a Caffe classifier, with Caffe's in-place layers."""
    add("data", "Input", [], ["data"], lambda l: l.input_param.shape.add().dim.extend([1, 3, 16, 16]))
    add("conv1", "Convolution", ["data"], ["conv1"], _conv(8, 3))
    add("bn1", "BatchNorm", ["conv1"], ["conv1"])
    add("scale1", "Scale", ["conv1"], ["conv1"], lambda l: setattr(l.scale_param, "bias_term", True))
    add("relu1", "ReLU", ["conv1"], ["conv1"])
    add("conv2", "Convolution", ["conv1"], ["conv2"], _conv(8, 8))
    add("sum", "Eltwise", ["conv2", "conv1"], ["sum"])
    add("pool_max", "Pooling", ["sum"], ["pool_max"], _pool(0))
    add("pool_ave", "Pooling", ["sum"], ["pool_ave"], _pool(1))
    add("concat", "Concat", ["pool_max", "pool_ave"], ["concat"])
    add("fc", "InnerProduct", ["concat"], ["fc"], lambda l: setattr(l.inner_product_param, "num_output", 10))
    add("drop", "Dropout", ["fc"], ["fc"])
    add("prob", "Softmax", ["fc"], ["prob"])


def input_side_branch(net: Any, add: Callable[..., Any]) -> None:
    """The input blob feeds two layers: a convolution, and the Eltwise sum that adds the input itself back."""
    add("data", "Input", [], ["data"], lambda l: l.input_param.shape.add().dim.extend([1, 3, 8, 8]))
    add("conv1", "Convolution", ["data"], ["conv1"], _conv(3, 3))
    add("sum", "Eltwise", ["conv1", "data"], ["sum"])
    add("fc", "InnerProduct", ["sum"], ["fc"], lambda l: setattr(l.inner_product_param, "num_output", 4))
    add("prob", "Softmax", ["fc"], ["prob"])


def tiny_ssd(net: Any, add: Callable[..., Any], *, classes: int = 3, keep_top_k: int = 50) -> None:
    """An SSD as the Caffe SSD prototxts (and OpenCV's res10 face detector) build it, at 32×32: the frame's pixels
    scaled (a ``Power`` layer), two feature maps, one L2-``Normalize``d, each with box and class convolutions
    through ``Permute`` and ``Flatten``, ``PriorBox`` anchors, the class scores reshaped for ``Softmax`` and
    flattened, and ``DetectionOutput``. ``classes`` counts the background (label 0)."""
    add("data", "Input", [], ["data"], lambda l: l.input_param.shape.add().dim.extend([1, 3, 32, 32]))
    add("pixels", "Power", ["data"], ["pixels"], lambda l: setattr(l.power_param, "scale", 1 / 255))
    add("conv1", "Convolution", ["pixels"], ["conv1"], _conv(8, 3))
    add("relu1", "ReLU", ["conv1"], ["conv1"])
    add("pool1", "Pooling", ["conv1"], ["pool1"], _pool(0))
    add("pool1_norm", "Normalize", ["pool1"], ["pool1_norm"],
        lambda l: (setattr(l.norm_param, "across_spatial", False), setattr(l.norm_param, "channel_shared", False)))
    add("conv2", "Convolution", ["pool1"], ["conv2"], _conv(8, 8))
    add("relu2", "ReLU", ["conv2"], ["conv2"])
    add("pool2", "Pooling", ["conv2"], ["pool2"], _pool(0))
    priors_per_place = 4  # min size, sqrt(min × max), aspect ratio 2 and its flip
    for source, (low, high, step) in (("pool1_norm", (6, 12, 2)), ("pool2", (12, 24, 4))):
        for kind, width in (("loc", 4), ("conf", classes)):
            add(f"{source}_mbox_{kind}", "Convolution", [source], [f"{source}_mbox_{kind}"],
                _conv(priors_per_place * width, 8))
            add(f"{source}_mbox_{kind}_perm", "Permute", [f"{source}_mbox_{kind}"], [f"{source}_mbox_{kind}_perm"],
                lambda l: l.permute_param.order.extend([0, 2, 3, 1]))
            add(f"{source}_mbox_{kind}_flat", "Flatten", [f"{source}_mbox_{kind}_perm"],
                [f"{source}_mbox_{kind}_flat"], lambda l: setattr(l.flatten_param, "axis", 1))

        def prior(layer: Any, low: int = low, high: int = high, step: int = step) -> None:
            p = layer.prior_box_param
            p.min_size.append(low)
            p.max_size.append(high)
            p.aspect_ratio.append(2.0)
            p.flip, p.clip, p.step, p.offset = True, False, step, 0.5
            p.variance.extend([0.1, 0.1, 0.2, 0.2])
        add(f"{source}_mbox_priorbox", "PriorBox", [source, "data"], [f"{source}_mbox_priorbox"], prior)
    sources = ("pool1_norm", "pool2")
    add("mbox_loc", "Concat", [f"{s}_mbox_loc_flat" for s in sources], ["mbox_loc"],
        lambda l: setattr(l.concat_param, "axis", 1))
    add("mbox_conf", "Concat", [f"{s}_mbox_conf_flat" for s in sources], ["mbox_conf"],
        lambda l: setattr(l.concat_param, "axis", 1))
    add("mbox_priorbox", "Concat", [f"{s}_mbox_priorbox" for s in sources], ["mbox_priorbox"],
        lambda l: setattr(l.concat_param, "axis", 2))
    add("mbox_conf_reshape", "Reshape", ["mbox_conf"], ["mbox_conf_reshape"],
        lambda l: l.reshape_param.shape.dim.extend([0, -1, classes]))
    add("mbox_conf_softmax", "Softmax", ["mbox_conf_reshape"], ["mbox_conf_softmax"],
        lambda l: setattr(l.softmax_param, "axis", 2))
    add("mbox_conf_flatten", "Flatten", ["mbox_conf_softmax"], ["mbox_conf_flatten"],
        lambda l: setattr(l.flatten_param, "axis", 1))

    def detection(layer: Any) -> None:
        p = layer.detection_output_param
        p.num_classes, p.share_location, p.background_label_id = classes, True, 0
        p.nms_param.nms_threshold, p.nms_param.top_k = 0.45, 100
        p.code_type, p.keep_top_k, p.confidence_threshold = 2, keep_top_k, 0.05  # 2: CENTER_SIZE
    add("detection_out", "DetectionOutput", ["mbox_loc", "mbox_conf_flatten", "mbox_priorbox"], ["detection_out"],
        detection)


def write_model(folder: Path, build: Callable[[Any, Callable[..., Any]], None] = residual_net, *,
                snapshots: tuple[int, ...] = (), seed: int = 0, bn_factor: float = 999.98) -> Path:
    """Write ``deploy.prototxt`` and ``model.caffemodel`` (or ``model_iter_N.caffemodel`` per snapshot).

    :param bn_factor: BatchNorm's moving-average factor, stored as Caffe stores it (statistics multiplied by it).
    """
    import numpy as np
    from google.protobuf import text_format

    pb2 = caffe_pb2()
    net = pb2.NetParameter(name="deeplens_tiny")

    def add(name: str, kind: str, bottom: list[str], top: list[str], configure=None) -> None:
        layer = net.layer.add(name=name, type=kind)
        layer.bottom.extend(bottom)
        layer.top.extend(top)
        if configure:
            configure(layer)

    build(net, add)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "deploy.prototxt").write_text(text_format.MessageToString(net))
    for index, name in enumerate([f"model_iter_{n}.caffemodel" for n in snapshots] or ["model.caffemodel"]):
        rng = np.random.default_rng(seed + index)
        weights = pb2.NetParameter()
        weights.CopyFrom(net)
        shapes = _blob_shapes(net)
        for layer in weights.layer:
            for shape, kind in shapes.get(layer.name, []):
                blob = layer.blobs.add()
                blob.shape.dim.extend(shape)
                blob.data.extend(_values(rng, shape, kind, bn_factor).ravel().tolist())
        (folder / name).write_bytes(weights.SerializeToString())
    return folder


def _blob_shapes(net: Any) -> dict[str, list[tuple[list[int], str]]]:
    """Each weighted layer's blob shapes, following channel counts through the graph."""
    channels: dict[str, int] = {}
    spatial: dict[str, int] = {}
    shapes: dict[str, list[tuple[list[int], str]]] = {}
    for layer in net.layer:
        if layer.type == "Input":
            dims = list(layer.input_param.shape[0].dim)
            channels[layer.top[0]], spatial[layer.top[0]] = dims[1], dims[2] * dims[3]
            continue
        c_in = channels.get(layer.bottom[0], 0)
        s_in = spatial.get(layer.bottom[0], 0)
        c_out, s_out = c_in, s_in
        if layer.type == "Convolution":
            p = layer.convolution_param
            c_out = p.num_output
            shapes[layer.name] = [([c_out, c_in, p.kernel_size[0], p.kernel_size[0]], "weight"), ([c_out], "bias")]
        elif layer.type == "InnerProduct":
            c_out, s_out = layer.inner_product_param.num_output, 1
            shapes[layer.name] = [([c_out, c_in * s_in], "weight"), ([c_out], "bias")]
        elif layer.type == "BatchNorm":
            shapes[layer.name] = [([c_in], "mean"), ([c_in], "var"), ([1], "factor")]
        elif layer.type == "Normalize":  # one scale per channel (channel_shared false)
            shapes[layer.name] = [([c_in], "gamma")]
        elif layer.type == "Scale":
            shapes[layer.name] = [([c_in], "gamma"), ([c_in], "bias")]
        elif layer.type == "Pooling":
            s_out = s_in // 4
        elif layer.type == "Concat":
            c_out = sum(channels[b] for b in layer.bottom)
        for top in layer.top:
            channels[top], spatial[top] = c_out, s_out
    return shapes


def _values(rng: Any, shape: list[int], kind: str, bn_factor: float) -> Any:
    import numpy as np

    if kind == "factor":
        return np.array([bn_factor], np.float32)
    if kind == "mean":
        return (rng.normal(0, 0.3, shape) * bn_factor).astype(np.float32)
    if kind in ("var", "gamma"):
        return (rng.uniform(0.5, 1.5, shape) * (bn_factor if kind == "var" else 1)).astype(np.float32)
    return (rng.standard_normal(shape) * 0.2).astype(np.float32)


def _conv(outputs: int, _inputs: int) -> Callable[[Any], None]:
    def configure(layer: Any) -> None:
        layer.convolution_param.num_output = outputs
        layer.convolution_param.kernel_size.append(3)
        layer.convolution_param.pad.append(1)
    return configure


def _pool(method: int) -> Callable[[Any], None]:
    def configure(layer: Any) -> None:
        layer.pooling_param.pool = method  # 0 MAX, 1 AVE
        layer.pooling_param.kernel_size = 2
        layer.pooling_param.stride = 2
    return configure
