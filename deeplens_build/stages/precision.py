"""Precision stage: FP16 that keeps parity.

Plain FP16 first (onnxconverter-common, every float tensor and weight in half precision). When that fails
parity against the original model, some nodes lose too much: weights beyond half precision's range (clamped
at 65504), and range-sensitive operators (Softmax, Exp, reductions) fed by large values. Those are kept in
FP32 — the smallest set found by a search over nodes ordered by that risk: doubling prefixes until parity
passes, then bisection between the last failing and first passing prefix, one onnxruntime run of the parity
samples per trial. Raising the tolerance is never the remedy; the node list and the final size are reported.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from deeplens_build import onnxtools
from deeplens_build.digest import file_sha256
from deeplens_build.records import ParityReport
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


def to_fp16(optimized: Optimized, reference: ReferenceRun, *, tolerance: float, task: str, seed: int,
            workdir: Path, reporter: Reporter) -> Optimized:
    """The FP16 artifact, with as few nodes kept in FP32 as parity needs; ``optimized`` is the FP32 one."""
    import onnx

    model = onnx.load(str(optimized.artifact.path))
    named = _name_nodes(model)  # onnxconverter-common blocks nodes by name
    target = workdir / optimized.artifact.path.name
    outputs = optimized.artifact.outputs
    clamped = []

    def trial(block: tuple[str, ...]) -> ParityReport:
        half, values = _half(model, block)
        clamped.append(values)
        onnxtools.save(half, target)
        onnx.shape_inference.infer_shapes_path(str(target), str(target))
        onnx.checker.check_model(str(target))
        return compare(reference, onnxtools.runner(target), outputs,
                       tolerance=tolerance, task=task, seed=seed, runtime="onnxruntime, FP16")

    plain = trial(())
    block: tuple[str, ...] = ()
    if plain.passed and clamped[0]:  # one warning per value from the converter: summarized
        reporter.note(f"fp16: {clamped[0]} weight value(s) outside half precision's range were clamped (parity "
                      "passed all the same)")
    if not plain.passed:
        candidates = _by_risk(model)
        reporter.step(f"precision: plain FP16 fails parity (max abs diff {plain.max_abs_diff:.3g} > "
                      f"{tolerance:.3g}); searching {len(candidates)} nodes for the ones to keep in FP32")
        block = _smallest_passing_prefix(candidates, trial)
        report = trial(block)
        reporter.note(f"fp16: kept {len(block)} of {len(candidates)} nodes in FP32 so parity passes "
                      f"(max abs diff {report.max_abs_diff:.3g} ≤ {tolerance:.3g}, plain FP16 gave "
                      f"{plain.max_abs_diff:.3g}): {', '.join(block[:8])}{' …' if len(block) > 8 else ''}")
    passes = [*optimized.passes, *(["name-nodes"] if named else []),
              "fp16-mixed" if block else "fp16", "fp32-io"]
    files = onnxtools.files(target)
    return Optimized(artifact=dataclasses.replace(optimized.artifact, path=target, extra_files=files[1:]),
                     precision="fp16", passes=tuple(passes), size_before=optimized.size_before, opset=optimized.opset,
                     fp32_nodes=block)


def _smallest_passing_prefix(candidates: list[str], trial) -> tuple[str, ...]:
    """The shortest prefix of ``candidates`` whose trial passes (assuming that keeping more in FP32 never hurts).

    :raises ParityError: when even every candidate in FP32 fails, which no FP16 artifact can fix.
    """
    failing, size = 0, 1
    while True:
        size = min(size, len(candidates))
        report = trial(tuple(candidates[:size]))
        if report.passed:
            break
        if size == len(candidates):
            require(report, remedy="Every node kept in FP32 still fails, so FP16 is not the cause: check the model "
                                   "at `model.precision = \"fp32\"`.")
        failing, size = size, size * 2
    passing = size
    while passing - failing > 1:
        middle = (failing + passing) // 2
        if trial(tuple(candidates[:middle])).passed:
            passing = middle
        else:
            failing = middle
    return tuple(candidates[:passing])


def _by_risk(model) -> list[str]:
    """Every node's name, riskiest in FP16 first: nodes reading weights beyond FP16's range, then range-sensitive
    operators, then the rest; within each group, nodes nearer the outputs first (their error is not diluted)."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    large = {init.name for init in model.graph.initializer if init.data_type == TensorProto.FLOAT
             and np.abs(numpy_helper.to_array(init)).max(initial=0) > FP16_MAX}
    order = list(model.graph.node)

    def risk(item: tuple[int, object]) -> tuple[int, int]:
        index, node = item
        group = 0 if large & set(node.input) else 1 if node.op_type in RANGE_SENSITIVE else 2
        return group, -index

    return [node.name for _, node in sorted(enumerate(order), key=risk)]


def _name_nodes(model) -> int:
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


def _half(model, block: tuple[str, ...]):
    """A float16 copy of ``model`` with ``block`` kept in float32 and float32 inputs and outputs, and how many
    weight values the conversion clamped to half precision's range."""
    import onnx
    from onnxconverter_common import float16

    with warnings.catch_warnings(record=True) as clamped:
        warnings.simplefilter("always")
        half = float16.convert_float_to_float16(onnx.ModelProto.FromString(model.SerializeToString()),
                                                keep_io_types=False, node_block_list=list(block))
    _float32_io(half)
    onnxtools.trim_domains(half)
    onnxtools.oldest_ir_version(half)
    return half, len(clamped)


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
    from onnx import AttributeProto

    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        for attribute in node.attribute:
            if attribute.type == AttributeProto.GRAPH:
                _rename_uses(attribute.g, old, new)
            elif attribute.type == AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    _rename_uses(subgraph, old, new)


def run(b: Build, optimized: Optimized, reference: ReferenceRun | None) -> Optimized:
    """At ``precision = "fp16"``: the FP16 artifact, keeping in FP32 the nodes parity needs there."""
    config = b.config
    if config.model.precision != "fp16" or reference is None:
        return optimized
    tolerance = config.parity.tolerance_for("fp16")
    key = {"artifact": [file_sha256(p) for p in optimized.artifact.files], "reference": file_sha256(reference.path),
           "tolerance": tolerance, "task": config.model.task, "tools": b.tools}

    def build(workdir: Path) -> Optimized:
        b.reporter.step("precision: fp16")
        return to_fp16(optimized, reference, tolerance=tolerance, task=config.model.task, seed=config.parity.seed,
                       workdir=workdir, reporter=b.reporter)

    return b.stage("precision", key, Optimized, build)
