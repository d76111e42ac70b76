"""The child process in which the PyTorch plugin loads a model, exports it and runs it.

Started as ``python -I worker.py KIND MODEL_DIR FILE`` by the plugin with a clean environment and a scratch folder
as its current directory, as SageMaker's serving container would run the owner's ``model_fn``: the owner's code
never runs in the build's own process, beside its signing key and AWS credentials.

It speaks on the standard input and output it was started with: each message is one JSON line, followed by as
many bytes of an ``.npz`` archive as its ``size`` says. Its first message answers the load. What the model's code
prints goes to standard error. Replies carry arrays as ``.npz`` (never pickles) so the build reads them without
running anything the model's code could have put there.
"""

import importlib.util
import io
import json
import os
import sys
import traceback
import warnings

import numpy as np

INFERENCE = "code/inference.py"


def main(kind, model_dir, file):
    commands, replies = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the model's prints (and the exporter's progress) must not corrupt the replies
    warnings.simplefilter("ignore")
    try:
        import torch

        torch.set_grad_enabled(False)
        model = _load(torch, kind, model_dir, file)
    except BaseException as exc:  # noqa: BLE001  (the owner's code may raise anything; the build reports it)
        _send(replies, {"ok": False, "error": _describe(exc, model_dir, file)})
        return 1
    _send(replies, {"ok": True, "inputs": model.inputs})
    for line in commands:
        request = json.loads(line)
        payload = commands.read(request.get("size", 0))
        try:
            reply, arrays = _handle(torch, model, request, payload)
        except BaseException as exc:  # noqa: BLE001
            reply, arrays = {"ok": False, "error": _describe(exc, model_dir, file)}, None
        _send(replies, reply, arrays)
    return 0


class _Model:
    def __init__(self, module, program=None, inputs=None):
        self.module, self.program, self.inputs = module, program, inputs


def _load(torch, kind, model_dir, file):
    path = os.path.join(model_dir, file)
    if kind == "torchscript":
        return _Model(torch.jit.load(path, map_location="cpu").eval())
    if kind == "export":
        program = torch.export.load(path)
        return _Model(program.module(), program, _program_inputs(program))
    sys.path.insert(0, os.path.join(model_dir, "code"))  # inference.py imports its helpers as SageMaker lets it
    spec = importlib.util.spec_from_file_location("inference", os.path.join(model_dir, INFERENCE))
    inference = importlib.util.module_from_spec(spec)
    sys.modules["inference"] = inference
    spec.loader.exec_module(inference)
    if not callable(getattr(inference, "model_fn", None)):
        raise _Refused("{} defines no model_fn(model_dir): SageMaker's PyTorch serving calls it to build the "
                       "model".format(INFERENCE))
    module = inference.model_fn(model_dir)
    if not isinstance(module, torch.nn.Module):
        raise _Refused("{}'s model_fn returned {}, not a torch.nn.Module".format(INFERENCE, type(module).__name__))
    return _Model(module.eval())


def _program_inputs(program):
    """The user inputs of an exported program, with their example shapes where they are static."""
    shapes = {}
    for node in program.graph.nodes:
        if node.op == "placeholder" and "val" in node.meta:
            try:
                shapes[node.name] = [int(d) for d in node.meta["val"].shape]
            except TypeError:  # a symbolic (dynamic) dimension: the project's shape decides
                shapes[node.name] = None
    return [[name, shapes.get(name)] for name in program.graph_signature.user_inputs]


def _handle(torch, model, request, payload):
    if request["op"] == "run":
        with np.load(io.BytesIO(payload), allow_pickle=False) as data:
            inputs = [torch.from_numpy(np.ascontiguousarray(data[name])) for name in request["inputs"]]
        outputs = _flatten(model.module(*inputs))
        return {"ok": True}, [o.detach().cpu().numpy() for o in outputs]
    args = tuple(torch.zeros(shape) for shape in request["shapes"])
    count = len(_flatten(model.module(*args)))
    names = ["output"] if count == 1 else ["output_{}".format(i) for i in range(count)]
    _export(torch, model, args, request, names)
    return {"ok": True, "outputs": names}, None


def _export(torch, model, args, request, names):
    """The dynamo exporter where the opset allows it (it writes opset 18 whatever is asked), the TorchScript-based
    one below that; a TorchScript module is always traced by the latter, which reads it natively."""
    options = dict(input_names=request["inputs"], output_names=names, opset_version=request["opset"])
    if request["dynamo"]:
        target = model.program if model.program is not None else model.module
        torch.onnx.export(target, args, request["path"], dynamo=True, verbose=False, **options)
        return
    module = model.module if model.program is None else _traceable(torch, model.module)
    torch.onnx.export(module, args, request["path"], dynamo=False, **options)


def _traceable(torch, graph_module):
    """An exported program's module, traceable by the TorchScript exporter: that exporter switches the module
    to eval mode, which an exported program's module refuses even when it is in eval mode already."""

    class Traceable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = graph_module

        def train(self, mode=True):
            self.training = mode
            return self

        def forward(self, *args):
            return self.inner(*args)

    return Traceable()


def _flatten(value):
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flatten(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flatten(v)]
    return [value]


class _Refused(Exception):
    """A model the plugin cannot use, said as it is."""


def _describe(exc, model_dir, file):
    """One line: where in the owner's code the exception came from (file and line), what it was."""
    if isinstance(exc, _Refused):
        return str(exc)
    what = "{}: {}".format(type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else "")
    root = os.path.realpath(model_dir) + os.sep
    owned = [frame for frame in traceback.extract_tb(exc.__traceback__)
             if os.path.realpath(frame.filename).startswith(root)]
    if isinstance(exc, SyntaxError) and exc.filename and os.path.realpath(exc.filename).startswith(root):
        return "{} line {}: {}".format(os.path.relpath(exc.filename, model_dir), exc.lineno, what)
    if owned:
        frame = owned[-1]
        return "{} line {}, in {}: {}".format(os.path.relpath(frame.filename, model_dir), frame.lineno,
                                              frame.name, what)
    return "{}: {}".format(file, what)


def _send(stream, header, arrays=None):
    payload = b""
    if arrays is not None:
        buffer = io.BytesIO()
        np.savez(buffer, *arrays)
        payload = buffer.getvalue()
    header["size"] = len(payload)
    stream.write(json.dumps(header).encode() + b"\n" + payload)
    stream.flush()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
