"""FP16 on models whose input feeds two nodes (a residual or side branch straight from the input), from every
framework plugin that can express one: one Cast per input, shared by its consumers, and parity holds."""

from __future__ import annotations

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
