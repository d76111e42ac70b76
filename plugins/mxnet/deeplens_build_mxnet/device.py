"""The ``mxnet`` runtime on the device, shipped as ``deeplens_model.py`` in the bundle's model folder when the
artifact is native MXNet (``[plugins.mxnet] format = "native"``): ``model-symbol.json`` + ``model-0000.params``,
input shapes in ``model-shapes.json`` (SageMaker MXNet's own file). The plugin's reference run binds the original
through :func:`bind` too, so the device runs the model as the build ran it. Written for every
device Python from 3.8; imports nothing of deeplens-build.
"""

import json
import os
import warnings

import numpy as np

# numpy 1.24 removed these aliases; mxnet 1.9.1 still uses them at import time
for _alias, _builtin in (("bool", bool), ("int", int), ("float", float), ("object", object), ("str", str),
                         ("complex", complex)):
    if _alias not in np.__dict__:
        setattr(np, _alias, _builtin)
os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")  # silence "Subgraph backend MKLDNN is activated"
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # mxnet's own use of distutils and numpy 1.x
    import mxnet as mx

SYMBOL, PARAMS, SHAPES = "model-symbol.json", "model-0000.params", "model-shapes.json"


def bind(symbol, params_path, shapes):
    """An executor for inference of ``symbol`` (a Symbol, or the path of its JSON): ``shapes`` is
    ``[(input name, shape), ...]``; a training label input (``softmax_label``) that the params do not hold is bound
    to zeros, as inference never reads it."""
    if isinstance(symbol, str):
        symbol = mx.sym.load(symbol)
    params = {k.split(":", 1)[-1]: v for k, v in mx.nd.load(params_path).items()}
    given = dict((name, tuple(shape)) for name, shape in shapes)
    batch = given[next(iter(given))][0]
    args = {}
    for name in symbol.list_arguments():
        if name in given:
            args[name] = mx.nd.zeros(given[name])
        elif name in params:
            args[name] = params[name]
        else:
            args[name] = mx.nd.zeros((batch,) if name.endswith("_label") else (1,))
    auxs = {name: params[name] for name in symbol.list_auxiliary_states()}
    return symbol.bind(mx.cpu(), args=args, aux_states=auxs, grad_req="null")


def run(executor, feeds):
    """One array per output, in the symbol's output order."""
    for name, value in feeds.items():
        executor.arg_dict[name][:] = mx.nd.array(value)
    return [out.asnumpy() for out in executor.forward(is_train=False)]


class Model:
    def __init__(self, model_dir):
        with open(os.path.join(model_dir, SHAPES)) as f:
            self.inputs = [(entry["name"], entry["shape"]) for entry in json.load(f)]
        self._executor = bind(os.path.join(model_dir, SYMBOL), os.path.join(model_dir, PARAMS), self.inputs)
        self.outputs = mx.sym.load(os.path.join(model_dir, SYMBOL)).list_outputs()
        self.device = "mxnet {} CPU".format(mx.__version__)

    def run(self, feeds):
        return run(self._executor, feeds)


def load(model_dir):
    return Model(model_dir)
