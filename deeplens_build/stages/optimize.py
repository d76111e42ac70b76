"""Optimize stage (shared by every framework): static shapes, the target's opset, standard-ONNX graph optimization.

The output must stay standard ONNX so both onnxruntime-gpu and TensorRT on the device accept it. Measured:
onnxruntime's offline optimizer writes standard ONNX only at the BASIC level (constant folding, redundant node
elimination, Conv+BN/Add/Mul fusion); EXTENDED adds ORT-only fused ops and ALL adds CPU layout nodes.

The optimizer reads every weight and writes every weight again (measured: 2 s of a 512 MB MatMul model's cold
build, for a graph it leaves as it is); a graph none of whose nodes a BASIC pass rewrites (:func:`inert`) skips
it, and its weights are the converted artifact's own file, linked, never rewritten.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from deeplens_build import onnxtools
from deeplens_build.digest import file_sha256
from deeplens_build.errors import BundleError, ConfigError, ConversionError
from deeplens_build.report import Reporter
from deeplens_build.types import Artifact
from deeplens_build.values import Optimized

if TYPE_CHECKING:
    from deeplens_build.build import Build

ARTIFACT_NAME = "model.onnx"
INERT_OPERATORS = frozenset({"MatMul", "Relu", "Sigmoid", "Tanh", "Softmax", "LogSoftmax", "MaxPool",
                             "AveragePool", "GlobalAveragePool", "GlobalMaxPool"})
"""Operators no BASIC-level pass of onnxruntime 1.32 starts from or folds on their own (its level-1 list:
constant folding, subexpression elimination, Identity/Dropout/Slice/Unsqueeze/Expand/Cast/no-op elimination,
MatMul+Add, Conv+Add/Mul/BN, Pad, Reshape, Div+Mul, Relu+Clip, Gemm, Not+Where and Q/DQ fusions, constant
sharing): a graph of these alone comes out as it went in (tested against the optimizer itself)."""


def optimize(converted: Artifact, *, shapes: Mapping[str, tuple[int, ...]], opset: int | None,
             workdir: Path, reporter: Reporter) -> Optimized:
    """Write the optimized float32 artifact into ``workdir`` and describe it (FP16 is the precision stage's).

    :param opset: the highest opset the target loads; a higher model is lowered with onnx's version converter.
    """
    size_before = sum(p.stat().st_size for p in converted.files)
    if converted.format != "onnx":
        copies = tuple(Path(shutil.copy2(p, workdir / p.name)) for p in converted.files)
        return Optimized(artifact=dataclasses.replace(converted, path=copies[0], extra_files=copies[1:], labels=None),
                         precision="native", passes=(), size_before=size_before, opset=None)

    import onnx
    import onnxruntime as ort

    # The weights stay in external data files, which onnxruntime maps: every step here edits a graph of a few KiB,
    # so a large model is never held in memory, let alone twice (a converter's inline weights move out once).
    model = onnxtools.load(converted.path, weights=False)
    found = onnxtools.opset(model) or 0
    lower = opset is not None and found > opset
    if lower:  # onnx's version converter drops references to external data: it gets the weights
        model = onnxtools.load(converted.path)
    passes = []
    if onnxtools.drop_initializer_inputs(model):
        passes.append("drop-initializer-inputs")
    passes += _make_static(model, shapes, reporter)
    if lower:
        model = onnxtools.lower_opset(model, opset)
        passes.append(f"opset-{found}-to-{opset}")

    target = workdir / ARTIFACT_NAME
    if not lower and inert(model):
        _with_weights_of(model, converted.path, target)
        return _described(target, converted, passes, size_before)
    unoptimized = workdir / "unoptimized" / ARTIFACT_NAME
    unoptimized.parent.mkdir()
    _with_weights_of(model, converted.path, unoptimized)
    del model
    basic = workdir / "basic.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(basic)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{target.name}.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                     str(onnxtools.EXTERNAL_MIN_BYTES))
    options.log_severity_level = 3
    ort.InferenceSession(str(unoptimized), options, providers=["CPUExecutionProvider"])
    _remove_links(unoptimized.parent)
    model = onnx.load(str(basic), load_external_data=False)
    basic.unlink()
    passes.append("onnxruntime-basic")
    foreign = onnxtools.foreign_operators(model)
    if foreign:
        raise BundleError(f"optimization produced non-standard operators {', '.join(foreign[:5])}; "
                          "this is a bug in deeplens-build, please report it with the model")
    # onnxruntime imports every domain it knows into what it writes; a runtime that knows fewer refuses them
    if onnxtools.trim_domains(model):
        passes.append("trim-domains")
    if onnxtools.oldest_ir_version(model):
        passes.append(f"ir-version-{model.ir_version}")
    onnx.save(model, str(target))  # the graph; its weights are in the data file onnxruntime wrote beside it
    return _described(target, converted, passes, size_before)


def inert(model) -> bool:
    """Whether onnxruntime's BASIC optimizer would leave the graph as it is: only :data:`INERT_OPERATORS`, no
    node computable from constants alone, no two nodes computing the same, no small initializer it could share."""
    constants = {t.name for t in model.graph.initializer}
    seen = set()
    for node in model.graph.node:
        signature = (node.op_type, node.domain, tuple(node.input), node.attribute.__repr__())
        if (node.op_type not in INERT_OPERATORS or node.domain not in onnxtools.STANDARD_DOMAINS
                or all(i in constants for i in node.input) or signature in seen):
            return False
        seen.add(signature)
    return all(_elements(t) > 16 for t in model.graph.initializer)


def _elements(tensor) -> int:
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count


def _with_weights_of(model, converted: Path, target: Path) -> None:
    """Save ``model`` (a graph) as ``target``, its weights the converted artifact's data files as second names:
    no byte of them is read or written (the digests the cache holds stay known, ``cache.link``)."""
    import onnx

    from deeplens_build.cache import link

    locations = onnxtools.external_locations(model)
    for location in locations:  # beside the converted artifact (read-only: a cache entry)
        if Path(location).name != location or location in (".", ".."):
            raise ConversionError(f"{converted.name} keeps weights in {location!r}: external data must be a file "
                                  "beside the model")
        link(converted.parent / location, target.parent / location)
    if locations:
        onnx.save(model, str(target))
    else:
        onnxtools.save(model, target)


def _remove_links(folder: Path) -> None:
    """Remove ``folder``, whose data files are second names of a cache entry's: a link removed changes the
    entry's inode change time, which the stat index would take for a change."""
    from deeplens_build.cache import unlink

    for path in folder.iterdir():
        unlink(path)
    folder.rmdir()


def _described(target: Path, converted: Artifact, passes: list[str], size_before: int) -> Optimized:
    import onnx

    onnx.shape_inference.infer_shapes_path(str(target), str(target))
    model = onnxtools.load(target, weights=False)
    files = onnxtools.files(target)
    layouts = {spec.name: spec.layout for spec in converted.inputs}
    inputs, outputs = onnxtools.interface(model, layouts)
    return Optimized(artifact=Artifact(format="onnx", path=target, extra_files=files[1:], inputs=inputs,
                                       outputs=outputs),
                     precision="fp32", passes=tuple(passes), size_before=size_before, opset=onnxtools.opset(model))


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


def run(b: Build, converted: Artifact, opset: int | None) -> Optimized:
    key = {"artifact": [file_sha256(p) for p in converted.files], "format": converted.format,
           "inputs": [dataclasses.asdict(s) for s in converted.inputs],
           "outputs": [dataclasses.asdict(s) for s in converted.outputs],
           "shapes": b.shapes, "opset": opset, "tools": b.tools}

    def build(workdir: Path) -> Optimized:
        b.reporter.step(f"optimize: {converted.format}")
        return optimize(converted, shapes=b.shapes, opset=opset, workdir=workdir, reporter=b.reporter)

    return b.stage("optimize", key, Optimized, build)
