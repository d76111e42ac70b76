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
