"""Precision stage: FP16 that keeps parity.

Plain FP16 first (onnxconverter-common, every float tensor and weight in half precision). When that fails
parity against the original model, some nodes lose too much: weights beyond half precision's range (clamped
at 65504), and range-sensitive operators (Softmax, Exp, reductions) fed by large values. Those are kept in
FP32 — the smallest set found by a search over nodes ordered by that risk: doubling prefixes until parity
passes, then bisection between the last failing and first passing prefix, one onnxruntime run of the parity
samples per trial. Raising the tolerance is never the remedy; the node list and the final size are reported.

Memory stays bounded by the largest weight, not the model: the converter edits the graph alone (its external
weights only change type), and each trial's weights are then written tensor by tensor from the float32 data
file (:func:`_write_weights`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deeplens_build import onnxtools
from deeplens_build.config import Bounds, DetectionMatch
from deeplens_build.digest import file_sha256
from deeplens_build.records import OutputParity, ParityReport
from deeplens_build.report import Reporter
from deeplens_build.stages.parity import compare, require
from deeplens_build.values import Optimized, ReferenceRun

if TYPE_CHECKING:
    from deeplens_build.build import Build

RANGE_SENSITIVE = frozenset({
    "Softmax", "LogSoftmax", "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Div", "Erf",
    "ReduceSum", "ReduceMean", "ReduceProd", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "CumSum",
    "LayerNormalization", "InstanceNormalization", "BatchNormalization", "Sigmoid", "Softplus",
})
"""Operators whose FP16 result over- or underflows first when their inputs are large or their sums long."""
FP16_MAX = 65504.0
CONVERTER_TINY, CONVERTER_HUGE = 1e-7, 1e4
"""onnxconverter-common's bounds for weights in half precision (``convert_float_to_float16``'s defaults): a
magnitude below the first becomes it, above the second becomes it; the external weights get the same."""
HALF_BLOCK = 1 << 16
"""float32 values converted at a time: 256 KiB, within a core's L2 cache."""


def to_fp16(optimized: Optimized, reference: ReferenceRun, *, bounds: Mapping[str | None, Bounds], task: str,
            seed: int, workdir: Path, reporter: Reporter, detection: DetectionMatch | None = None) -> Optimized:
    """The FP16 artifact, with as few nodes kept in FP32 as parity needs; ``optimized`` is the FP32 one."""
    import onnx

    tolerance, rtol = bounds[None].tolerance, bounds[None].rtol
    model = onnxtools.load(optimized.artifact.path, weights=False, check=False)
    folder = optimized.artifact.path.parent
    named = name_nodes(model)  # onnxconverter-common blocks nodes by name
    source = _Source.of(model)  # what each trial's casts are checked against: one inference, not one per trial
    target = workdir / optimized.artifact.path.name
    outputs = optimized.artifact.outputs
    clamped = []

    def trial(block: tuple[str, ...]) -> ParityReport:
        half, values = _half(model, block, source)
        values += _write_weights(half, folder, target)
        clamped.append(values)
        try:
            onnx.save(half, str(target))
            onnx.shape_inference.infer_shapes_path(str(target), str(target))
            onnx.checker.check_model(str(target))
            candidate = onnxtools.runner(target)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, RuntimeError) as exc:
            # onnxruntime refused the trial graph: a failed trial, so the search keeps more in FP32
            reason = (str(exc).strip() or type(exc).__name__).splitlines()[0][:200]
            return ParityReport(max_abs_diff=math.inf, max_rel_diff=math.inf, tolerance=tolerance, rtol=rtol,
                                passed=False, samples=reference.samples, seed=seed,
                                outputs=tuple(OutputParity(o.name, math.inf, math.inf, None) for o in outputs),
                                runtime=f"onnxruntime, FP16 (the graph does not load: {reason})")
        return compare(reference, candidate, outputs, bounds=bounds, task=task, seed=seed,
                       runtime="onnxruntime, FP16", detection=detection)

    block, plain = kept_in_float("FP16", trial, lambda: _by_risk(model, folder), reporter)
    if plain.passed and clamped[0]:  # one warning per value from the converter: summarized
        reporter.note(f"fp16: {clamped[0]} weight value(s) outside half precision's range were clamped (parity "
                      "passed all the same)")
    passes = [*optimized.passes, *(["name-nodes"] if named else []),
              "fp16-mixed" if block else "fp16", "fp32-io"]
    files = onnxtools.files(target)
    return Optimized(artifact=dataclasses.replace(optimized.artifact, path=target, extra_files=files[1:]),
                     precision="fp16", passes=tuple(passes), size_before=optimized.size_before, opset=optimized.opset,
                     fp32_nodes=block)


def kept_in_float(precision: str, trial: Callable[[tuple[str, ...]], ParityReport],
                  candidates: Callable[[], list[str]], reporter: Reporter) -> tuple[tuple[str, ...], ParityReport]:
    """The one mechanism FP16 and INT8 keep nodes in float by: the plain conversion first (``trial(())``); when it
    fails, the smallest prefix of ``candidates()`` (riskiest first) whose trial passes, found by
    :func:`_smallest_passing_prefix`, and said. The nodes kept, and the plain trial's report.

    :raises ParityError: when even every candidate kept in float fails: ``precision`` is not the cause.
    """
    plain = trial(())
    if plain.passed:
        return (), plain
    nodes = candidates()
    reporter.step(f"precision: plain {precision} fails ({figures(plain)}); searching {len(nodes)} nodes for the ones "
                  "to keep in float")
    block = _smallest_passing_prefix(nodes, trial, remedy=f"Every node kept in float still fails, so {precision} "
                                     "is not the cause: check the model at `model.precision = \"fp32\"`.")
    reporter.note(f"{precision.lower()}: kept {len(block)} of {len(nodes)} nodes in float so it passes "
                  f"({figures(trial(block))}; plain {precision}: {figures(plain)}): {', '.join(block[:8])}"
                  f"{' …' if len(block) > 8 else ''}")
    return block, plain


def figures(report: ParityReport) -> str:
    """A trial's figures in a line: its largest difference and bounds, and its agreement where it has one."""
    top1 = f", top-1 agreement {report.top1_agreement:.1%}" if report.top1_agreement is not None else ""
    return (f"max abs diff {report.max_abs_diff:.3g}, tolerance {report.tolerance:.3g} + {report.rtol:.3g} × "
            f"|original|{top1}, {report.samples} samples")


def _smallest_passing_prefix(candidates: list[str], trial, *, remedy: str) -> tuple[str, ...]:
    """The shortest prefix of ``candidates`` whose trial passes (assuming that keeping more in float never hurts).

    :param remedy: what the error says when even every candidate in float fails, which no such artifact can fix.
    :raises ParityError: then.
    """
    failing, size = 0, 1
    while True:
        size = min(size, len(candidates))
        report = trial(tuple(candidates[:size]))
        if report.passed:
            break
        if size == len(candidates):
            require(report, remedy=remedy)
        failing, size = size, size * 2
    passing = size
    while passing - failing > 1:
        middle = (failing + passing) // 2
        if trial(tuple(candidates[:middle])).passed:
            passing = middle
        else:
            failing = middle
    return tuple(candidates[:passing])


def _by_risk(model, folder: Path) -> list[str]:
    """Every node's name, riskiest in FP16 first: nodes reading weights beyond FP16's range, then range-sensitive
    operators, then the rest; within each group, nodes nearer the outputs first (their error is not diluted).

    :param folder: where the model's external weights are, read one at a time."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    large = {init.name for init in model.graph.initializer if init.data_type == TensorProto.FLOAT
             and np.abs(numpy_helper.to_array(init, base_dir=str(folder))).max(initial=0) > FP16_MAX}
    order = list(model.graph.node)

    def risk(item: tuple[int, object]) -> tuple[int, int]:
        index, node = item
        group = 0 if large & set(node.input) else 1 if node.op_type in RANGE_SENSITIVE else 2
        return group, -index

    return [node.name for _, node in sorted(enumerate(order), key=risk)]


def name_nodes(model) -> int:
    """Give every unnamed node a unique name; how many were named."""
    taken = {n.name for n in model.graph.node}
    count = 0
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            count += 1
    return count


@dataclass(frozen=True)
class _Source:
    """The float32 model as the casts of a trial graph are decided from: each value's element type, inferred, and
    each node by name (the converter renames a blocked node's outputs, never the node)."""

    types: Mapping[str, int]
    nodes: Mapping[str, Any]

    @classmethod
    def of(cls, model: Any) -> _Source:
        import onnx

        inferred = onnx.shape_inference.infer_shapes(model).graph
        return cls(types={v.name: v.type.tensor_type.elem_type
                          for v in (*inferred.input, *inferred.value_info, *inferred.output)},
                   nodes={node.name: node for node in _all_nodes(model.graph)})


def _half(model, block: tuple[str, ...], source: _Source | None = None):
    """A float16 copy of ``model`` with ``block`` kept in float32 and float32 inputs and outputs, and how many
    weight values the conversion clamped to half precision's range.

    :param source: ``_Source.of(model)``, when the caller has it already (a search makes many trials)."""
    import onnx
    from onnxconverter_common import float16

    with warnings.catch_warnings(record=True) as clamped:
        warnings.simplefilter("always")
        half = float16.convert_float_to_float16(onnx.ModelProto.FromString(model.SerializeToString()),
                                                keep_io_types=False, node_block_list=list(block))
    _cast_where_needed(half, source or _Source.of(model), set(block))
    _float32_io(half)
    onnxtools.trim_domains(half)
    onnxtools.oldest_ir_version(half)
    return half, len(clamped)


def _write_weights(half, folder: Path, target: Path) -> int:
    """Write ``half``'s external weights into ``target``'s data file, one tensor at a time, from the float32 data
    file in ``folder`` they still point at: in half precision where the converter made the tensor float16 (as it
    converts inline ones, clamped to half precision's range), else as they are. How many values were clamped."""
    from onnx import TensorProto

    data = target.with_name(f"{target.name}.data")
    sources: dict[str, Any] = {}
    clamped = 0
    # read, not mapped: the pages of a mapping would stay resident and count as the build's memory
    with contextlib.ExitStack() as files:
        out = files.enter_context(open(data, "wb"))
        for tensor in _initializers(half.graph):
            if tensor.data_location != TensorProto.EXTERNAL:
                continue
            info = {entry.key: entry.value for entry in tensor.external_data}
            if info["location"] not in sources:
                sources[info["location"]] = files.enter_context(open(folder / info["location"], "rb"))
            source = sources[info["location"]]
            source.seek(int(info.get("offset", 0)))
            stored = source.read(int(info["length"]))
            if tensor.data_type == TensorProto.FLOAT16:  # float32 bytes the converter marked float16
                stored, beyond = _to_half(stored)
                clamped += beyond
            offset = out.tell()
            out.write(stored)
            del tensor.external_data[:]
            for key, value in (("location", data.name), ("offset", offset), ("length", out.tell() - offset)):
                tensor.external_data.add(key=key, value=str(value))
    return clamped


def _to_half(stored: bytes) -> tuple[memoryview, int]:
    """float32 bytes as float16 bytes, bounded as onnxconverter-common bounds them (``convert_np_to_float16``, 15×
    slower: it builds index arrays of every value), and how many values were beyond its range. In blocks of
    ``HALF_BLOCK`` values, so that the seven passes over each stay in the CPU's cache (7× faster than over a
    whole 64 MB tensor, measured)."""
    import numpy as np

    values = np.frombuffer(stored, np.float32)
    half = np.empty(values.size, np.float16)
    scratch, magnitudes = np.empty(HALF_BLOCK, np.float32), np.empty(HALF_BLOCK, np.float32)
    beyond = 0
    for start in range(0, values.size, HALF_BLOCK):
        size = min(HALF_BLOCK, values.size - start)
        part, magnitude = scratch[:size], magnitudes[:size]
        part[:] = values[start:start + size]
        np.abs(part, out=magnitude)
        np.copysign(np.float32(CONVERTER_TINY), part, out=part, where=(magnitude > 0) & (magnitude < CONVERTER_TINY))
        huge = (magnitude > CONVERTER_HUGE) & np.isfinite(magnitude)
        np.copysign(np.float32(CONVERTER_HUGE), part, out=part, where=huge)
        half[start:start + size] = part
        beyond += int(np.count_nonzero(huge))
    return half.data, beyond


def _initializers(graph):
    """The initializers of ``graph`` and of its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for subgraph in _subgraphs(node):
            yield from _initializers(subgraph)


def _cast_where_needed(half, source: _Source, block: set[str]) -> None:
    """Give every node of the converted graph inputs of the precision it computes in.

    onnxconverter-common leaves some edges between the two precisions without a Cast, and onnxruntime cannot load
    the result (``Type parameter (T) ... bound to different types``): an initializer or ``Constant`` shared by a
    node kept in float32 and a converted one, a source ``Cast(to=float)`` inside the converted part, a node in a
    subgraph reading an outer value. So each node's float inputs are checked against its precision (float32 for
    a blocked node, one the converter never converts, and everything in a blocked node's subgraphs; float16 for
    the rest) and a Cast is put in front where they differ, one per tensor and precision, in every kind of input:
    initializers, ``Constant`` outputs, graph inputs, other nodes' outputs, outer values read by a subgraph.
    """
    from onnx import TensorProto, helper
    from onnxconverter_common.float16 import DEFAULT_OP_BLOCK_LIST

    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    source_types, source_nodes = source.types, source.nodes
    kept = set(DEFAULT_OP_BLOCK_LIST)

    def output_type(node, index: int, precision: int) -> int | None:
        if node.op_type == "Cast":
            return next(a.i for a in node.attribute if a.name == "to")
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            return value.data_type if value is not None else None
        source = source_nodes.get(node.name)  # the converter renames a blocked node's outputs, never the node
        name = source.output[index] if source is not None and index < len(source.output) else node.output[index]
        kind = source_types.get(name)
        return precision if kind in floats else kind

    def repair(graph, outer: dict[str, int], inherited_fp32: bool) -> dict[str, int]:
        _sort_topologically(graph)
        types = dict(outer)
        types.update({init.name: init.data_type for init in graph.initializer})
        types.update({v.name: v.type.tensor_type.elem_type for v in graph.input})
        casts: dict[tuple[str, int], str] = {}
        nodes = []
        for node in graph.node:
            fp32 = inherited_fp32 or node.name in block or node.op_type in kept
            precision = TensorProto.FLOAT if fp32 else TensorProto.FLOAT16
            if node.op_type == "Cast" and node.name in source_nodes and not fp32:
                for attribute in node.attribute:  # a source Cast to float32 inside the converted part casts to half
                    if attribute.name == "to" and attribute.i == TensorProto.FLOAT:
                        attribute.i = TensorProto.FLOAT16
            elif node.op_type not in ("Cast", "Shape", "Size"):  # those take any type as it is
                for index, name in enumerate(node.input):
                    if name and types.get(name) in floats and types[name] != precision:
                        if (name, precision) not in casts:
                            casts[name, precision] = f"{name}__as_{'fp32' if fp32 else 'fp16'}"
                            nodes.append(helper.make_node("Cast", [name], [casts[name, precision]], to=precision,
                                                          name=f"{casts[name, precision]}__cast"))
                        node.input[index] = casts[name, precision]
            for subgraph in _subgraphs(node):
                repair(subgraph, types, fp32)
                for value in subgraph.output:  # what the subgraph yields is what the node outputs
                    if value.type.tensor_type.elem_type in floats:
                        value.type.tensor_type.elem_type = precision
            for index, name in enumerate(node.output):
                if name and (kind := output_type(node, index, precision)) is not None:
                    types[name] = kind
            nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.value_info[:]  # the converter's guesses; onnx's inference writes them again from the repaired graph
        return types

    types = repair(half.graph, {}, False)
    _float32_outputs_of_float32_nodes(half.graph, types)


def _float32_outputs_of_float32_nodes(graph, types: dict[str, int]) -> None:
    """A graph output computed in float32 (by a node kept there) leaves in float32, not through the float16 Cast
    the converter puts after it: a value beyond half precision's range would come out as infinity."""
    from onnx import TensorProto, helper

    producers = {name: node for node in graph.node for name in node.output}
    for value in graph.output:
        cast = producers.get(value.name)
        if (cast is None or cast.op_type != "Cast" or types.get(cast.input[0]) != TensorProto.FLOAT
                or value.type.tensor_type.elem_type != TensorProto.FLOAT16):
            continue
        internal = f"{value.name}__fp16"
        _rename_uses(graph, value.name, internal)  # other readers keep the half-precision copy
        cast.output[:] = [internal]
        graph.node.append(helper.make_node("Identity", [cast.input[0]], [value.name], name=f"{value.name}__fp32"))
        value.type.tensor_type.elem_type = TensorProto.FLOAT


def _sort_topologically(graph) -> None:
    """Order ``graph``'s nodes so each comes after what it reads, the outer values its subgraphs read included
    (onnxconverter-common, placing its Casts, can move a node with a subgraph before what the subgraph reads);
    otherwise as they were."""
    produced = {name for node in graph.node for name in node.output}
    pending = list(graph.node)
    ready = {init.name for init in graph.initializer} | {v.name for v in graph.input}
    ordered = []
    while pending:
        index = next((i for i, node in enumerate(pending)
                      if all(name in ready or name not in produced for name in _reads(node))), 0)
        node = pending.pop(index)  # a cycle (never in a valid graph) keeps its order
        ordered.append(node)
        ready.update(node.output)
    del graph.node[:]
    graph.node.extend(ordered)


def _reads(node) -> set[str]:
    """What ``node`` reads: its inputs, and the outer values its subgraphs read."""
    names = {name for name in node.input if name}
    for subgraph in _subgraphs(node):
        inner = {name for n in subgraph.node for name in n.output} | {v.name for v in subgraph.input} | {
            init.name for init in subgraph.initializer}
        names |= {name for n in subgraph.node for name in _reads(n) if name not in inner}
    return names


def _all_nodes(graph):
    """Every node of ``graph`` and of its subgraphs."""
    for node in graph.node:
        yield node
        for subgraph in _subgraphs(node):
            yield from _all_nodes(subgraph)


def _subgraphs(node):
    """The graphs ``node`` holds in its attributes (an If's branches, a Loop's or Scan's body)."""
    from onnx import AttributeProto

    for attribute in node.attribute:
        if attribute.type == AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == AttributeProto.GRAPHS:
            yield from attribute.graphs


def _float32_io(model) -> None:
    """Put float32 graph inputs and outputs around a float16 graph: one Cast per input, shared by every node
    that reads it, and one per output.

    onnxconverter-common's own ``keep_io_types`` adds a Cast per consumer, named after the consumer; consumers
    without a name (common after conversion) all get the same Cast output name, which breaks SSA form when an
    input feeds two nodes (a residual or side branch straight from the input).
    """
    from onnx import TensorProto, helper

    graph = model.graph
    before, after = [], []
    for value in graph.input:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            internal = f"{value.name}__fp16"
            _rename_uses(graph, value.name, internal)
            before.append(helper.make_node("Cast", [value.name], [internal], to=TensorProto.FLOAT16,
                                           name=f"{value.name}__to_fp16"))
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    for value in graph.output:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            internal = f"{value.name}__fp16"
            _rename_uses(graph, value.name, internal)
            for node in graph.node:
                node.output[:] = [internal if name == value.name else name for name in node.output]
            after.append(helper.make_node("Cast", [internal], [value.name], to=TensorProto.FLOAT,
                                          name=f"{value.name}__to_fp32"))
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    nodes = [*before, *graph.node, *after]
    del graph.node[:]
    graph.node.extend(nodes)


def _rename_uses(graph, old: str, new: str) -> None:
    """Make every node that reads ``old`` (in subgraphs too, which may read outer names) read ``new``."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        for subgraph in _subgraphs(node):
            _rename_uses(subgraph, old, new)


def run(b: Build, optimized: Optimized, reference: ReferenceRun | None) -> Optimized:
    """At ``precision = "fp16"``: the FP16 artifact, keeping in FP32 the nodes parity needs there; at ``"int8"``,
    the INT8 artifact that passes the gate (:mod:`deeplens_build.stages.int8`)."""
    config = b.config
    if reference is None or config.model.precision == "fp32":
        return optimized
    if config.model.precision == "int8":
        return _int8(b, optimized, reference)
    bounds = config.parity.bounds_for("fp16")
    key = {"artifact": [file_sha256(p) for p in optimized.artifact.files], "reference": file_sha256(reference.path),
           "bounds": {str(k): dataclasses.asdict(v) for k, v in bounds.items()}, "task": config.model.task,
           "detection": config.parity.detection.model_dump(), "tools": b.tools}

    def build(workdir: Path) -> Optimized:
        b.reporter.step("precision: fp16")
        return to_fp16(optimized, reference, bounds=bounds, task=config.model.task, seed=config.parity.seed,
                       workdir=workdir, reporter=b.reporter, detection=config.parity.detection)

    return b.stage("precision", key, Optimized, build)


def _int8(b: Build, optimized: Optimized, reference: ReferenceRun) -> Optimized:
    from deeplens_build import calibration
    from deeplens_build.stages import int8
    from deeplens_build.stages.convert import opset_ceiling

    config = b.config
    settings = int8.Int8Settings(bounds=config.parity.bounds_for("int8"), top1=config.parity.top1_agreement,
                                 method=config.calibration.method, symmetric=b.target.backend.symmetric_int8,
                                 task=config.model.task, seed=config.parity.seed, detection=config.parity.detection,
                                 max_opset=opset_ceiling(b))
    key = {"artifact": [file_sha256(p) for p in optimized.artifact.files], "reference": file_sha256(reference.path),
           "calibration": calibration.identity(config.calibration), "tools": b.tools,
           "settings": {**dataclasses.asdict(settings), "detection": settings.detection.model_dump(),
                        "bounds": {str(k): dataclasses.asdict(v) for k, v in settings.bounds.items()}}}

    def build(workdir: Path) -> Optimized:
        b.reporter.step(f"precision: int8, calibrated ({config.calibration.method}) on {config.calibration.samples}")
        samples = calibration.load(config.calibration, optimized.artifact.inputs)
        return int8.to_int8(optimized, reference, samples, settings, workdir=workdir, reporter=b.reporter)

    return b.stage("precision", key, Optimized, build)
