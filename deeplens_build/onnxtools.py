"""ONNX helpers shared by the core and every plugin that converts to ONNX (public API).

Imports onnx and onnxruntime inside each function, so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from deeplens_build.errors import ConversionError
from deeplens_build.records import Dim, TensorSpec
from deeplens_build.types import Runner

if TYPE_CHECKING:
    import mmap

    import numpy as np
    import onnx

STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
"""Operator domains every ONNX consumer accepts (onnxruntime-gpu, TensorRT); ORT-only fused ops live elsewhere."""
EXTERNAL_MIN_BYTES = 1024
"""Weights of at least this size live in the artifact's external data file (``model.onnx.data``), not in the
graph: every stage then edits a graph of a few KiB, and runtimes map the weights instead of copying them."""


def load(path: Path, *, weights: bool = True, check: bool = True, name: str | None = None) -> onnx.ModelProto:
    """Load and check an ONNX model; a damaged or invalid file raises ``ConversionError`` naming it.

    :param weights: False leaves external data where it is (the graph alone, for a model saved by :func:`save`).
    :param check: False skips the checker (which reads the external data too), for a look at the graph alone.
    :param name: what the message calls the file (the source's name for a copy of it).
    """
    import onnx
    from google.protobuf.message import DecodeError

    try:
        if check:
            onnx.checker.check_model(str(path))  # from the file: no second copy of the model in Python
        model = onnx.load(str(path), load_external_data=weights)
    except (DecodeError, onnx.checker.ValidationError, ValueError, OSError) as exc:
        raise ConversionError(f"{name or path.name} is not a valid ONNX model: {_first_line(exc)}") from exc
    return model


def save(model: onnx.ModelProto, path: Path) -> tuple[Path, ...]:
    """Write ``model`` as ``path`` plus, for weights of ``EXTERNAL_MIN_BYTES`` or more, ``path.data`` beside it.

    :return: the files written, the graph first.
    """
    import onnx

    data = path.with_name(f"{path.name}.data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=EXTERNAL_MIN_BYTES, convert_attribute=False)
    if data.exists() and data.stat().st_size == 0:
        data.unlink()
    return (path, data) if data.exists() else (path,)


def externalize(source: Path, target: Path) -> tuple[Path, ...] | None:
    """``source``, whose weights are inline, written as ``target`` plus ``target.data`` as :func:`save` writes it,
    without decoding the weights: each one's bytes go from file to file in the kernel, and only the graph and
    the tensors' headers are parsed. Peak memory is the graph's, not twice the model's (reading a file into
    memory and parsing it holds both copies), and 500 MB take a fraction of a second instead of 3 s.

    Hand-written over protobuf's wire format (tags, varints, lengths): neither onnx nor protobuf parses a
    message lazily. It understands ModelProto.graph (7), GraphProto.initializer (5) and TensorProto.raw_data
    (9), and copies every other field's bytes as they are.

    :return: the files written, the graph first; None when the file is anything but one graph whose large
        weights are raw bytes (then nothing is left at ``target.data``, and :func:`save` is the way).
    """
    import mmap
    import os

    import onnx
    from google.protobuf.message import DecodeError

    data = target.with_name(f"{target.name}.data")
    try:
        with open(source, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view, \
                open(data, "wb", buffering=0) as out:
            graphs = [(start, end) for number, _, start, end in _fields(view, 0, len(view)) if number == _GRAPH]
            if len(graphs) != 1:
                raise _NotPlain
            model = onnx.ModelProto.FromString(_without(view, 0, len(view), _GRAPH))
            model.graph.ParseFromString(_without(view, *graphs[0], _INITIALIZER))
            for number, _, start, end in _fields(view, *graphs[0]):
                if number != _INITIALIZER:
                    continue
                tensor = model.graph.initializer.add()
                tensor.ParseFromString(_without(view, start, end, _RAW_DATA))
                raw = [(s, e) for n, _, s, e in _fields(view, start, end) if n == _RAW_DATA][-1:]
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    raise _NotPlain
                if not raw or raw[0][1] - raw[0][0] < EXTERNAL_MIN_BYTES:  # small: inline, as save leaves it
                    if raw:
                        tensor.raw_data = view[raw[0][0]:raw[0][1]]
                    if tensor.ByteSize() >= EXTERNAL_MIN_BYTES:
                        raise _NotPlain  # large weights in typed fields: onnx's own conversion encodes those
                    continue
                (first, after), offset = raw[0], out.tell()
                while (done := out.tell() - offset) < after - first:
                    if not os.sendfile(out.fileno(), f.fileno(), first + done, after - first - done):
                        raise _NotPlain  # the source shrank while it was copied
                # as onnx's set_external_data writes them (it refuses a tensor whose raw_data it does not hold)
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", data.name), ("offset", offset), ("length", after - first)):
                    tensor.external_data.add(key=key, value=str(value))
            written = out.tell()
    except (_NotPlain, DecodeError, ValueError, OSError):
        data.unlink(missing_ok=True)
        return None
    target.write_bytes(model.SerializeToString())
    if not written:
        data.unlink()
    return (target, data) if written else (target,)


_GRAPH, _INITIALIZER, _RAW_DATA = 7, 5, 9
"""ModelProto.graph, GraphProto.initializer, TensorProto.raw_data: their field numbers in onnx.proto."""


class _NotPlain(Exception):
    """The model is not one :func:`externalize` rewrites."""


def _fields(view: bytes | mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Each field of the message in ``view[start:end]``: (number, where its tag starts, where its value starts,
    where it ends). A value of wire type 2 (bytes, a message) starts after its length."""
    at = start
    while at < end:
        begin = at
        tag, at = _varint(view, at)
        wire = tag & 7
        if wire == 0:
            value, after = at, _varint(view, at)[1]
        elif wire == 1 or wire == 5:
            value, after = at, at + (8 if wire == 1 else 4)
        elif wire == 2:
            length, value = _varint(view, at)
            after = value + length
        else:  # groups, deprecated since proto2: never in ONNX
            raise ValueError(f"wire type {wire} at byte {begin}")
        if after > end:
            raise ValueError(f"a field runs past its message at byte {begin}")
        yield tag >> 3, begin, value, after
        at = after


def _varint(view: bytes | mmap.mmap, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(view) or shift > 63:
            raise ValueError(f"a truncated number at byte {at}")
        byte = view[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at


def _without(view: bytes | mmap.mmap, start: int, end: int, skipped: int) -> bytes:
    """The message in ``view[start:end]`` less every field numbered ``skipped``."""
    return b"".join(view[begin:after] for number, begin, _, after in _fields(view, start, end) if number != skipped)


def external_locations(model: onnx.ModelProto) -> list[str]:
    """The external data files the model's weights refer to, relative to its folder, in order of first use."""
    from onnx import TensorProto

    found: dict[str, None] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            found.update({entry.value: None for entry in tensor.external_data if entry.key == "location"})
    return list(found)


def files(path: Path) -> tuple[Path, ...]:
    """An ONNX file and its external data file, when it has one beside it."""
    data = path.with_name(f"{path.name}.data")
    return (path, data) if data.exists() else (path,)


def interface(model: onnx.ModelProto, layouts: Mapping[str, str | None] | None = None
              ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The model's real inputs (graph inputs that are not weights) and outputs, as TensorSpecs."""
    weights = {init.name for init in model.graph.initializer}
    layouts = layouts or {}
    inputs = tuple(_spec(v, layouts.get(v.name)) for v in model.graph.input if v.name not in weights)
    outputs = tuple(_spec(v, None) for v in model.graph.output)
    return inputs, outputs


def drop_initializer_inputs(model: onnx.ModelProto) -> int:
    """Remove weights listed as graph inputs (MXNet and caffe2onnx do this), so they can be folded.

    :return: how many inputs were removed.
    """
    weights = {init.name for init in model.graph.initializer}
    keep = [v for v in model.graph.input if v.name not in weights]
    removed = len(model.graph.input) - len(keep)
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return removed


def foreign_operators(model: onnx.ModelProto) -> list[str]:
    """Nodes outside the standard ONNX domains, as ``"domain.OpType (node name)"``."""
    return [f"{n.domain}.{n.op_type} ({n.name or 'unnamed'})" for n in model.graph.node
            if n.domain not in STANDARD_DOMAINS]


def nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every node of the model: the graph's, its subgraphs' (If, Loop, Scan bodies) and its functions'."""
    from onnx import AttributeProto

    found = []
    pending = [model.graph, *(f for f in model.functions)]
    while pending:
        for node in pending.pop().node:
            found.append(node)
            for attribute in node.attribute:
                if attribute.type == AttributeProto.GRAPH:
                    pending.append(attribute.g)
                elif attribute.type == AttributeProto.GRAPHS:
                    pending.extend(attribute.graphs)
    return found


def trim_domains(model: onnx.ModelProto) -> int:
    """Drop the operator domains the model imports but no node uses (the standard one always stays).

    :return: how many were dropped.
    """
    used = {n.domain for n in nodes(model)} | STANDARD_DOMAINS | {f.domain for f in model.functions}
    keep = [o for o in model.opset_import if o.domain in used]
    dropped = len(model.opset_import) - len(keep)
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return dropped


def oldest_ir_version(model: onnx.ModelProto) -> bool:
    """Stamp the oldest IR version the model's opsets allow: onnx writes its own newest (11 for onnx 1.18), and
    an older runtime refuses a newer IR even when it knows every operator (onnxruntime 1.16 reads IR 9 at most).

    :return: whether the version changed.
    """
    from onnx import helper

    oldest = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    changed = model.ir_version != oldest
    model.ir_version = oldest
    return changed


def lower_opset(model: onnx.ModelProto, wanted: int) -> onnx.ModelProto:
    """The model converted down to opset ``wanted`` with onnx's version converter. Give it the weights: the
    converter drops references to external data.

    :raises ConversionError: when the converter has no way down for one of its operators.
    """
    import onnx
    from onnx import version_converter

    found = opset(model)
    try:
        lowered = version_converter.convert_version(model, wanted)
        onnx.checker.check_model(lowered)
    except Exception as exc:  # the converter raises RuntimeError, IndexError or a C++ assertion as ValueError
        raise ConversionError(
            f"the model is ONNX opset {found}, the target loads opset {wanted} at most, and onnx's version "
            f"converter cannot lower it ({_first_line(exc)}); export the model at opset {wanted} or lower, or "
            "choose a target whose runtime is newer") from exc
    return lowered


def opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), None)


def run(path: Path, inputs: Mapping[str, np.ndarray], *, optimize: bool = True) -> dict[str, np.ndarray]:
    """Run an ONNX file with onnxruntime on the CPU, one call, and return every output by name.

    :param optimize: False runs the graph as written (``ORT_DISABLE_ALL``), e.g. for a reference run
        that must not share the optimizer with the artifact it is compared to.
    """
    return runner(path, optimize=optimize)(inputs)


def runner(path: Path, *, optimize: bool = True, prepack: bool = False) -> Runner:
    """A session for the ONNX file, made once, as a function: one array per input name in, one per output out.
    See :func:`session_for` for the options."""
    session = session_for(path, optimize=optimize, prepack=prepack)
    names = [o.name for o in session.get_outputs()]
    return lambda inputs: dict(zip(names, session.run(names, dict(inputs)), strict=True))


def session_for(path: Path, *, optimize: bool = True, prepack: bool = False):
    """An onnxruntime session on the CPU.

    :param optimize: False runs the graph as written (``ORT_DISABLE_ALL``).
    :param prepack: True lets onnxruntime reorder constant MatMul and Conv weights for its kernels when the
        session starts, as a device's runtime does: it pays over many runs (``[profile]``, benchmarks) but copies
        every weight first (0.7 s and the model's size again for 500 MB, measured), where without it the weights
        stay memory-mapped from their file. Checks that run a few samples (parity, FP16 and INT8 trials) go
        without; the outputs agree to float32 rounding.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def value_shape(value: onnx.ValueInfoProto) -> tuple[Dim, ...]:
    """A value's dimensions: sizes, or the names of dynamic ones (``"?"`` when unnamed)."""
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                 for d in value.type.tensor_type.shape.dim)


def _spec(value: onnx.ValueInfoProto, layout: str | None) -> TensorSpec:
    from onnx import helper

    dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
    return TensorSpec(name=value.name, shape=value_shape(value), dtype=dtype, layout=layout)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
