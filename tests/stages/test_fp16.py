"""FP16 on models whose input feeds two nodes (a residual or side branch straight from the input), from every
framework plugin that can express one: one Cast per input, shared by its consumers, and parity holds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import open_bundle, package_project
from onnx import TensorProto, helper, numpy_helper


def _onnx(folder: Path) -> Path:
    """Unnamed nodes, as converters often leave them: the case onnxconverter-common's casts collide on."""
    rng = np.random.default_rng(5)
    weights = [numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
               for name, shape in (("w", (3, 3, 3, 3)), ("fc_w", (4, 192)))]
    nodes = [helper.make_node("Conv", ["data", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["conv", "data"], ["summed"]),
             helper.make_node("Relu", ["data"], ["side"]),
             helper.make_node("Add", ["summed", "side"], ["both"]),
             helper.make_node("Flatten", ["both"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["prob"], axis=1)]
    graph = helper.make_graph(nodes, "side_branch", [helper.make_tensor_value_info("data", TensorProto.FLOAT,
                                                                                   [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 4])], initializer=weights)
    folder.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    return folder


def _mxnet(folder: Path) -> Path:
    mxnet_testing = pytest.importorskip("deeplens_build_mxnet.testing")
    return mxnet_testing.save_checkpoints(folder, mxnet_testing.input_side_branch, {"data": (1, 3, 8, 8)}, epochs=1)


def _caffe(folder: Path) -> Path:
    caffe_testing = pytest.importorskip("deeplens_build_caffe.testing")
    return caffe_testing.write_model(folder, caffe_testing.input_side_branch)


def _keras(folder: Path) -> Path:
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    image = keras.Input((8, 8, 3), name="image")
    summed = keras.layers.Add()([keras.layers.Conv2D(3, 3, padding="same")(image), image])
    model = keras.Model(image, keras.layers.Dense(4, activation="softmax", name="prob")(
        keras.layers.Flatten()(keras.layers.ReLU()(summed))))
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    return folder


BUILDERS = {"onnx": _onnx, "mxnet": _mxnet, "caffe": _caffe, "tensorflow": _keras}


@pytest.mark.parametrize("framework", sorted(BUILDERS))
def test_fp16_with_an_input_feeding_two_nodes_builds_and_keeps_parity(tmp_path: Path, framework: str) -> None:
    source = BUILDERS[framework](tmp_path / "out")
    report = package_project(tmp_path, source, model={"precision": "fp16"})
    assert report["framework"] == framework and report["parity"]["passed"]
    with open_bundle(report["bundle"]) as tar:
        tar.extractall(tmp_path / "bundle", filter="data")
    model = onnx.load(str(tmp_path / "bundle" / "model" / "model.onnx"))  # its weights from model.onnx.data
    onnx.checker.check_model(model, full_check=True)
    for graph_input in model.graph.input:
        assert graph_input.type.tensor_type.elem_type == TensorProto.FLOAT, "float32 in, as before"
        readers = [n for n in model.graph.node if graph_input.name in n.input]
        assert [n.op_type for n in readers] == ["Cast"], f"{graph_input.name}: one Cast, shared by its consumers"
    for graph_output in model.graph.output:
        assert graph_output.type.tensor_type.elem_type == TensorProto.FLOAT, "float32 out, as before"


def _shared_constant(folder: Path, *, as_node: bool) -> Path:
    """A bias beyond half precision's range, shared by two nodes (``Constant`` output or initializer, as
    PP-OCRv4's text recogniser has them): the search keeps the one whose output needs it in FP32, and the other,
    converted, reads the same tensor: each needs its own Cast."""
    rng = np.random.default_rng(7)
    bias = rng.standard_normal(10).astype(np.float32)
    bias[3] = 1e5
    weights = [numpy_helper.from_array((rng.standard_normal((8, 10)) * 0.3).astype(np.float32), name)
               for name in ("w1", "w2")]
    nodes = [helper.make_node("MatMul", ["data", "w1"], ["h1"], name="mm1"),
             helper.make_node("Add", ["h1", "bias"], ["logits"], name="add1"),
             helper.make_node("Softmax", ["logits"], ["prob"], axis=1, name="softmax"),
             helper.make_node("MatMul", ["data", "w2"], ["h2"], name="mm2"),
             helper.make_node("Add", ["h2", "bias"], ["raw"], name="add2")]
    if as_node:
        nodes.insert(0, helper.make_node("Constant", [], ["bias"], name="bias_constant",
                                         value=numpy_helper.from_array(bias, "bias_value")))
    else:
        weights.append(numpy_helper.from_array(bias, "bias"))
    graph = helper.make_graph(nodes, "shared_bias", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 10]),
                               helper.make_tensor_value_info("raw", TensorProto.FLOAT, [1, 10])], initializer=weights)
    folder.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    return folder


@pytest.mark.parametrize("as_node", [True, False], ids=["constant-node", "initializer"])
def test_a_tensor_shared_across_the_precisions_gets_the_casts_each_side_needs(tmp_path: Path, as_node: bool) -> None:
    source = _shared_constant(tmp_path / "out", as_node=as_node)
    report = package_project(tmp_path, source, model={"precision": "fp16", "task": "other"})
    assert report["parity"]["passed"]
    assert any("kept" in note and "in float so it passes" in note for note in report["notes"]), report["notes"]
    with open_bundle(report["bundle"]) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
    assert 0 < len(manifest["optimization"]["fp32_nodes"]) < 5, "mixed, not all FP32"


def _two_readers(kind: str) -> onnx.ModelProto:
    """``c`` read by two Adds, as each kind of input: initializer, Constant node, graph input, a source
    Cast(to=float), or an outer value read inside an If's branches."""
    rng = np.random.default_rng(3)
    c = numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "c")
    weights = [numpy_helper.from_array((rng.standard_normal((8, 10)) * 0.5).astype(np.float32), "w")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])]
    first = helper.make_node("Add", ["h", "c"], ["a"], name="add")
    if kind == "initializer":
        weights.append(c)
    elif kind == "constant":
        nodes.append(helper.make_node("Constant", [], ["c"], name="const", value=c))
    elif kind == "graph-input":
        inputs.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 10]))
    elif kind == "source-cast":
        weights.append(numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "c0"))
        nodes.append(helper.make_node("Cast", ["c0"], ["c"], name="cast", to=TensorProto.FLOAT))
    elif kind == "subgraph":
        weights += [c, numpy_helper.from_array(np.array(True), "cond")]
        branch = helper.make_graph([helper.make_node("Add", ["h", "c"], ["t"], name="inner_add")], "branch", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 10])])
        other = helper.make_graph([helper.make_node("Sub", ["h", "c"], ["u"], name="inner_sub")], "other", [],
                                  [helper.make_tensor_value_info("u", TensorProto.FLOAT, [1, 10])])
        first = helper.make_node("If", ["cond"], ["a"], name="add", then_branch=branch, else_branch=other)
    nodes += [first, helper.make_node("Add", ["a", "c"], ["a2"], name="add2"),
              helper.make_node("Softmax", ["a2"], ["prob"], name="softmax", axis=-1)]
    graph = helper.make_graph(nodes, kind, inputs, [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 10])],
                              initializer=weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("kind", ["initializer", "constant", "graph-input", "source-cast", "subgraph"])
def test_every_kind_of_input_gets_the_casts_its_readers_need(tmp_path: Path, kind: str) -> None:
    """Whichever nodes the search keeps in FP32, the trial graph loads in onnxruntime and computes the same."""
    import onnxruntime as ort

    from deeplens_build.stages.precision import _half

    model = _two_readers(kind)
    feeds = {i.name: np.random.default_rng(1).standard_normal((1, 8) if i.name == "x" else (1, 10)).astype(np.float32)
             for i in model.graph.input}
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    expected = ort.InferenceSession(str(path)).run(None, feeds)[0]
    names = [node.name for node in model.graph.node]
    for block in [(), *((name,) for name in names), ("mm", "add"), tuple(names)]:
        half, _ = _half(model, block)
        onnx.save(half, str(path))
        got = ort.InferenceSession(str(path)).run(None, feeds)[0]
        assert np.abs(got - expected).max() < 1e-2, (kind, block)


def test_external_weights_become_half_precision_as_the_converter_makes_inline_ones() -> None:
    """The precision stage converts external weights itself, tensor by tensor: the same values as
    onnxconverter-common's own conversion, its bounds included."""
    import warnings

    from onnxconverter_common.float16 import convert_np_to_float16

    from deeplens_build.stages.precision import HALF_BLOCK, _to_half

    bounds = [0, 1e-9, -1e-9, 5e-8, 1e-7, 2e4, -3e5, np.inf, -np.inf, np.nan, 1.5, -2.5, 1e4, 65504, 1e-3]
    # across blocks: the bounds at the start, the end and a block's edge
    values = np.array([*bounds, *np.random.default_rng(0).standard_normal(2 * HALF_BLOCK + 1000) * 100, *bounds],
                      np.float32)
    values[HALF_BLOCK - 3:HALF_BLOCK + len(bounds) - 3] = bounds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the converter warns about each bound it applies
        expected = convert_np_to_float16(values).astype(np.float16)
    converted, beyond = _to_half(values.tobytes())
    np.testing.assert_array_equal(np.frombuffer(converted, np.float16), expected)
    assert beyond == int(np.sum(np.isfinite(values) & (np.abs(values) > 1e4)))
