"""Tiny real MXNet models, trained for nothing but saved exactly as SageMaker MXNet jobs save them.

Used by the test suite and the embedded example; handy for anyone testing code around this plugin.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from deeplens_build_mxnet import _mxnet


def residual_classifier(mx, classes: int = 10):
    """Conv→BatchNorm→ReLU, a residual Conv→BatchNorm block, LeakyReLU, max+avg pooling concatenated, tanh,
    Flatten, Dropout, FullyConnected, softmax: the layer mix a DeepLens classifier uses."""
    data = mx.sym.var("data")
    c1 = mx.sym.Convolution(data, num_filter=8, kernel=(3, 3), pad=(1, 1), name="conv1")
    a1 = mx.sym.Activation(mx.sym.BatchNorm(c1, fix_gamma=False, name="bn1"), act_type="relu", name="relu1")
    c2 = mx.sym.Convolution(a1, num_filter=8, kernel=(3, 3), pad=(1, 1), name="conv2")
    res = mx.sym.elemwise_add(mx.sym.BatchNorm(c2, fix_gamma=False, name="bn2"), a1, name="residual")
    a2 = mx.sym.LeakyReLU(res, act_type="leaky", slope=0.1, name="lrelu")
    pooled = mx.sym.concat(mx.sym.Pooling(a2, kernel=(2, 2), stride=(2, 2), pool_type="max", name="maxpool"),
                           mx.sym.Pooling(a2, kernel=(2, 2), stride=(2, 2), pool_type="avg", name="avgpool"),
                           dim=1, name="concat")
    flat = mx.sym.Flatten(mx.sym.Activation(pooled, act_type="tanh", name="tanh"), name="flatten")
    fc = mx.sym.FullyConnected(mx.sym.Dropout(flat, p=0.5, name="dropout"), num_hidden=classes, name="fc")
    return mx.sym.softmax(fc, name="prob")


def softmax_output_classifier(mx, classes: int = 5):
    """The legacy Module-API shape: a SoftmaxOutput loss layer with its softmax_label input."""
    data = mx.sym.var("data")
    conv = mx.sym.Activation(mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), name="conv"), act_type="sigmoid")
    fc = mx.sym.FullyConnected(mx.sym.Flatten(conv), num_hidden=classes, name="fc")
    return mx.sym.SoftmaxOutput(fc, name="softmax")


def two_input_net(mx):
    """An image and a feature vector, joined: a multi-input model."""
    image, features = mx.sym.var("image"), mx.sym.var("features")
    conv = mx.sym.Activation(mx.sym.Convolution(image, num_filter=4, kernel=(3, 3), name="conv"), act_type="relu")
    joined = mx.sym.concat(mx.sym.Flatten(conv), mx.sym.FullyConnected(features, num_hidden=6, name="fc_feat"), dim=1)
    return mx.sym.softmax(mx.sym.FullyConnected(joined, num_hidden=3, name="fc"), name="prob")


def input_side_branch(mx, classes: int = 4):
    """The input feeds two nodes: a convolution, and the residual sum that adds the input itself back."""
    data = mx.sym.var("data")
    conv = mx.sym.Convolution(data, num_filter=3, kernel=(3, 3), pad=(1, 1), name="conv")
    summed = mx.sym.Activation(mx.sym.elemwise_add(conv, data, name="input_residual"), act_type="relu")
    return mx.sym.softmax(mx.sym.FullyConnected(mx.sym.Flatten(summed), num_hidden=classes, name="fc"), name="prob")


def save_checkpoints(folder: Path, build: Callable, shapes: dict[str, tuple[int, ...]], *, epochs: int = 3,
                     prefix: str = "model", shapes_file: bool = True, seed: int = 0) -> Path:
    """Initialise ``build(mx)`` with seeded weights and save ``epochs`` checkpoints, as SageMaker MXNet does.

    Each epoch's params differ a little, so packaging the wrong one shows in the parity check.
    """
    import numpy as np

    mx = _mxnet()
    symbol = build(mx)
    mx.random.seed(seed)
    label_names = [a for a in symbol.list_arguments() if a.endswith("_label")]
    module = mx.mod.Module(symbol, data_names=list(shapes), label_names=label_names or None, context=mx.cpu())
    batch = next(iter(shapes.values()))[0]
    module.bind(data_shapes=list(shapes.items()), label_shapes=[(n, (batch,)) for n in label_names] or None,
                for_training=False)
    module.init_params(mx.init.Xavier(magnitude=2.0))
    args, auxs = module.get_params()
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for epoch in range(1, epochs + 1):
        drift = {k: mx.nd.array(v.asnumpy() * (1 + 0.1 * epoch)) for k, v in args.items()}
        stats = {k: mx.nd.array(rng.uniform(0.5, 1.5, v.shape)) for k, v in auxs.items()}
        module.set_params(drift, stats)
        module.save_checkpoint(str(folder / prefix), epoch)
    if shapes_file:
        entries = [{"name": name, "shape": list(shape)} for name, shape in shapes.items()]
        (folder / "model-shapes.json").write_text(json.dumps(entries))
    return folder


def ssd_training_symbol(mx, classes: int = 2, *, nms_topk: int = 400, force_suppress: bool = False):
    """A tiny SSD as MXNet's SSD example (``symbol_builder.get_symbol_train``) and SageMaker's built-in
    object-detection algorithm build it: pixels scaled, two feature maps, per-map class and box convolutions,
    MultiBoxPrior anchors, MultiBoxTarget and the losses for training, MultiBoxDetection behind ``det_out``.
    Inputs ``data`` and ``label`` (``[batch, objects, 5]``: class, corners)."""
    data, label = mx.sym.var("data"), mx.sym.var("label")
    pixels = data * (1.0 / 255)  # the network takes a frame's pixels as awscam gives them
    body = mx.sym.Activation(mx.sym.Convolution(pixels, num_filter=8, kernel=(3, 3), pad=(1, 1), stride=(2, 2),
                                                name="conv1"), act_type="relu", name="relu1")
    deeper = mx.sym.Activation(mx.sym.Convolution(body, num_filter=8, kernel=(3, 3), pad=(1, 1), stride=(2, 2),
                                                  name="conv2"), act_type="relu", name="relu2")
    locs, confs, anchors = [], [], []
    for index, (layer, sizes) in enumerate([(body, (0.2, 0.3)), (deeper, (0.5, 0.7))]):
        ratios = (1.0, 2.0, 0.5)
        per_place = len(sizes) + len(ratios) - 1
        loc = mx.sym.Convolution(layer, num_filter=per_place * 4, kernel=(3, 3), pad=(1, 1), name=f"loc{index}")
        conf = mx.sym.Convolution(layer, num_filter=per_place * (classes + 1), kernel=(3, 3), pad=(1, 1),
                                  name=f"cls{index}")
        locs.append(mx.sym.Flatten(mx.sym.transpose(loc, axes=(0, 2, 3, 1))))
        confs.append(mx.sym.Flatten(mx.sym.transpose(conf, axes=(0, 2, 3, 1))))
        anchors.append(mx.sym.Flatten(mx.sym.contrib.MultiBoxPrior(layer, sizes=sizes, ratios=ratios,
                                                                   name=f"anchors{index}")))
    loc_preds = mx.sym.concat(*locs, dim=1, name="multibox_loc_pred")
    cls_preds = mx.sym.transpose(mx.sym.reshape(mx.sym.concat(*confs, dim=1), shape=(0, -1, classes + 1)),
                                 axes=(0, 2, 1), name="multibox_cls_pred")
    anchor_boxes = mx.sym.reshape(mx.sym.concat(*anchors, dim=1), shape=(0, -1, 4), name="multibox_anchors")
    target = mx.sym.contrib.MultiBoxTarget(anchor_boxes, label, cls_preds, overlap_threshold=0.5, ignore_label=-1,
                                           negative_mining_ratio=3, negative_mining_thresh=0.5,
                                           variances=(0.1, 0.1, 0.2, 0.2), name="multibox_target")
    cls_prob = mx.sym.SoftmaxOutput(cls_preds, label=target[2], ignore_label=-1, use_ignore=True, multi_output=True,
                                    normalization="valid", name="cls_prob")
    loc_loss = mx.sym.MakeLoss(mx.sym.smooth_l1(target[1] * (loc_preds - target[0]), scalar=1.0),
                               normalization="valid", name="loc_loss")
    cls_label = mx.sym.MakeLoss(target[2], grad_scale=0, name="cls_label")
    det = mx.sym.contrib.MultiBoxDetection(cls_prob, loc_preds, anchor_boxes, name="detection", nms_threshold=0.45,
                                           force_suppress=force_suppress, variances=(0.1, 0.1, 0.2, 0.2),
                                           nms_topk=nms_topk)
    return mx.sym.Group([cls_prob, loc_loss, cls_label, mx.sym.MakeLoss(det, grad_scale=0, name="det_out")])


def train_builtin_ssd(folder: Path, *, classes: int = 2, size: int = 32, steps: int = 5, seed: int = 0,
                      **symbol_options) -> Path:
    """Train :func:`ssd_training_symbol` for ``steps`` batches on boxes drawn on noise (pixel values, 0 to 255,
    as a camera frame reaches awscam's ``doInference``) and save it as the SageMaker
    built-in object-detection algorithm leaves it: ``model_algo_1-symbol.json``, ``model_algo_1-0000.params`` and
    ``hyperparams.json`` (``image_shape``, ``num_classes``)."""
    import numpy as np

    mx = _mxnet()
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (8, 3, size, size)).astype(np.float32)  # pixels, as awscam feeds them
    labels = np.full((8, 2, 5), -1, dtype=np.float32)
    for i in range(8):
        low = rng.uniform(0.05, 0.5, 2)
        high = low + rng.uniform(0.2, 0.45, 2)
        labels[i, 0] = [i % classes, *low, *np.minimum(high, 1.0)]
        x0, y0 = (low * size).astype(int)
        x1, y1 = (np.minimum(high, 1.0) * size).astype(int)
        images[i, i % classes, y0:y1, x0:x1] = 255.0  # an object of its class's colour, to learn to see
    module = mx.mod.Module(ssd_training_symbol(mx, classes, **symbol_options), data_names=["data"],
                           label_names=["label"], context=mx.cpu())
    batches = mx.io.NDArrayIter(images, labels, batch_size=4, label_name="label")
    module.bind(data_shapes=batches.provide_data, label_shapes=batches.provide_label)
    module.init_params(mx.init.Xavier(magnitude=2.0))
    module.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": 0.01, "momentum": 0.9})
    done = 0
    while done < steps:
        batches.reset()
        for batch in batches:
            module.forward_backward(batch)
            module.update()
            done += 1
            if done == steps:
                break
    folder.mkdir(parents=True, exist_ok=True)
    module.save_checkpoint(str(folder / "model_algo_1"), 0)
    hyperparams = {"image_shape": str(size), "num_classes": str(classes), "mini_batch_size": "4",
                   "base_network": "tiny", "epochs": "1"}
    (folder / "hyperparams.json").write_text(json.dumps(hyperparams))
    return folder
