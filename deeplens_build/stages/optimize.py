"""Optimize stage (shared by every framework): static shapes, standard-ONNX graph optimization, FP16.

The output must stay standard ONNX so both onnxruntime-gpu and TensorRT on the device accept it. Measured:
onnxruntime's offline optimizer writes standard ONNX only at the BASIC level (constant folding, redundant node
elimination, Conv+BN/Add/Mul fusion); EXTENDED adds ORT-only fused ops and ALL adds CPU layout nodes.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

from deeplens_build import onnxtools
from deeplens_build.errors import BundleError, ConfigError
from deeplens_build.report import Reporter
from deeplens_build.types import ConvertedModel, OptimizedModel

ARTIFACT_NAME = "model.onnx"


def optimize(converted: ConvertedModel, *, shapes: Mapping[str, tuple[int, ...]], precision: str,
             workdir: Path, reporter: Reporter) -> OptimizedModel:
    """Write the optimized artifact into ``workdir`` and describe it."""
    size_before = sum(p.stat().st_size for p in converted.files)
    if converted.format != "onnx":
        copies = tuple(shutil.copy2(p, workdir / p.name) for p in converted.files)
        return OptimizedModel(format=converted.format, path=Path(copies[0]), extra_files=tuple(map(Path, copies[1:])),
                              inputs=converted.inputs, outputs=converted.outputs, precision="native", passes=(),
                              size_before=size_before, size_after=size_before, opset=None)

    import onnx
    import onnxruntime as ort

    model = onnxtools.load(converted.path)
    passes = []
    if onnxtools.drop_initializer_inputs(model):
        passes.append("drop-initializer-inputs")
    passes += _make_static(model, shapes, reporter)

    basic = workdir / "basic.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(basic)
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(basic))
    basic.unlink()
    passes.append("onnxruntime-basic")
    foreign = onnxtools.foreign_operators(model)
    if foreign:
        raise BundleError(f"optimization produced non-standard operators {', '.join(foreign[:5])}; "
                          "this is a bug in deeplens-build, please report it with the model")

    if precision == "fp16":
        from onnxconverter_common import float16

        with warnings.catch_warnings(record=True) as clamped:
            warnings.simplefilter("always")
            model = float16.convert_float_to_float16(model, keep_io_types=False)
        _float32_io(model)
        if clamped:  # one warning per value: summarize instead of flooding the terminal
            reporter.note(f"fp16: {len(clamped)} weight value(s) outside half precision's range were clamped "
                          "(the parity check measures the effect)")
        passes.append("fp16-keep-io-types")
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    target = workdir / ARTIFACT_NAME
    onnx.save(model, str(target))

    layouts = {spec.name: spec.layout for spec in converted.inputs}
    inputs, outputs = onnxtools.interface(model, layouts)
    return OptimizedModel(format="onnx", path=target, inputs=inputs, outputs=outputs, precision=precision,
                          passes=tuple(passes), size_before=size_before, size_after=target.stat().st_size,
                          opset=onnxtools.opset(model))


def _make_static(model, shapes: Mapping[str, tuple[int, ...]], reporter: Reporter) -> list[str]:
    """Fix every input's shape from config; a dynamic leading (batch) dimension becomes 1, as on the device."""
    inputs = {v.name: v for v in model.graph.input}
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise ConfigError(f"`model.inputs` names {', '.join(unknown)}, which the model does not have; "
                          f"its inputs are {', '.join(inputs)}")
    passes = []
    for name, value in inputs.items():
        dims = value.type.tensor_type.shape.dim
        wanted = shapes.get(name)
        if wanted is not None:
            if len(dims) and len(wanted) != len(dims):
                raise ConfigError(f"Field `model.inputs.{name}.shape` has {len(wanted)} dimensions but the model's "
                                  f"input {name!r} has {len(dims)}")
            del dims[:]
            for size in wanted:
                dims.add().dim_value = size
            passes.append(f"static-shape:{name}")
            continue
        current = onnxtools.value_shape(value)
        if not current:
            continue
        if any(not isinstance(d, int) or d <= 0 for d in current[1:]):
            raise ConfigError(f"input {name!r} has dynamic shape {list(current)}; set "
                              f"`model.inputs.{name}.shape` in deeplens.toml, e.g. [1, 3, 224, 224]")
        if not isinstance(current[0], int) or current[0] <= 0:
            dims[0].Clear()
            dims[0].dim_value = 1
            reporter.note(f"input {name!r}: dynamic batch dimension {current[0]!r} fixed to 1 (set "
                          f"`model.inputs.{name}.shape` to choose)")
            passes.append(f"static-shape:{name}")
    return passes



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
