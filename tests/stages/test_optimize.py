"""The shared optimize stage: standard ONNX only, static shapes, weights out of the inputs, the target's opset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deeplens_build import onnxtools, testing
from deeplens_build.errors import ConfigError, ConversionError
from deeplens_build.report import Reporter
from deeplens_build.stages.optimize import optimize
from deeplens_build.types import Artifact


def _converted(path: Path) -> Artifact:
    inputs, outputs = onnxtools.interface(onnxtools.load(path))
    return Artifact(format="onnx", path=path, inputs=inputs, outputs=outputs)


def _two_output_net(path: Path, *, weights_as_inputs: bool = False, dynamic: str = "N") -> Path:
    """image [N,4] → Gemm → Relu → (scores via Softmax, embedding via Mul by a constant): two outputs."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b")
    two = numpy_helper.from_array(np.full(6, 2.0, np.float32), "two")
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Softmax", ["r"], ["scores"], axis=1),
             helper.make_node("Mul", ["r", "two"], ["embedding"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [dynamic, 4])]
    if weights_as_inputs:  # how MXNet's exporter and caffe2onnx write weights
        inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in (w, b, two)]
    graph = helper.make_graph(nodes, "two_outputs", inputs,
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [dynamic, 6]),
                               helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [dynamic, 6])],
                              initializer=[w, b, two])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_drops_weights_listed_as_inputs_and_fixes_the_batch(tmp_path: Path) -> None:
    source = _two_output_net(tmp_path / "net.onnx", weights_as_inputs=True)
    result = optimize(_converted(source), shapes={}, opset=None, workdir=tmp_path, reporter=Reporter(quiet=True))
    model = onnx.load(str(result.artifact.path))
    assert [i.name for i in model.graph.input] == ["x"]
    assert "drop-initializer-inputs" in result.passes
    assert result.artifact.inputs[0].shape == (1, 4)
    assert {o.name: o.shape for o in result.artifact.outputs} == {"scores": (1, 6), "embedding": (1, 6)}


def test_output_is_standard_onnx_and_computes_the_same(tmp_path: Path) -> None:
    source = testing.onnx_classifier(tmp_path / "in.onnx")
    result = optimize(_converted(source), shapes={"data": (1, 3, 32, 32)}, opset=None, workdir=tmp_path,
                      reporter=Reporter(quiet=True))
    model = onnx.load(str(result.artifact.path))
    assert onnxtools.foreign_operators(model) == []
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}, "BN folded into the conv"
    x = {"data": np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    np.testing.assert_allclose(onnxtools.run(result.artifact.path, x)["prob"],
                               onnxtools.run(source, x, optimize=False)["prob"], atol=1e-5)


def test_imports_only_the_domains_its_nodes_use_at_the_oldest_ir_version(tmp_path: Path) -> None:
    """onnxruntime's optimizer imports every domain it knows into what it writes (com.microsoft.nchwc,
    org.pytorch.aten, ...) and onnx stamps its newest IR version: an older runtime refuses both."""
    source = testing.onnx_classifier(tmp_path / "in.onnx")
    result = optimize(_converted(source), shapes={}, opset=None, workdir=tmp_path, reporter=Reporter(quiet=True))
    model = onnx.load(str(result.artifact.path))
    assert [o.domain for o in model.opset_import] == [""]
    assert model.ir_version == helper.find_min_ir_version_for(list(model.opset_import))
    assert "trim-domains" in result.passes


def test_a_model_above_the_targets_opset_is_lowered(tmp_path: Path) -> None:
    source = _two_output_net(tmp_path / "n.onnx")  # opset 17
    result = optimize(_converted(source), shapes={}, opset=14, workdir=tmp_path, reporter=Reporter(quiet=True))
    assert result.opset == 14 and "opset-17-to-14" in result.passes
    x = {"x": np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)}
    np.testing.assert_allclose(onnxtools.run(result.artifact.path, x)["scores"],
                               onnxtools.run(source, x, optimize=False)["scores"], atol=1e-6)


def test_a_model_the_version_converter_cannot_lower_is_refused_with_what_to_do(tmp_path: Path) -> None:
    source = tmp_path / "cast.onnx"
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT16)], "cast",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]), str(source))
    with pytest.raises(ConversionError, match=r"opset 23, the target loads opset 17 at most.*export the model at "
                                              r"opset 17 or lower"):
        optimize(_converted(source), shapes={}, opset=17, workdir=tmp_path, reporter=Reporter(quiet=True))


def test_dynamic_non_batch_dimension_asks_for_the_config_key(tmp_path: Path) -> None:
    source = tmp_path / "dyn.onnx"
    model = onnx.load(str(_two_output_net(tmp_path / "n.onnx")))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "features"
    onnx.save(model, str(source))
    with pytest.raises(ConfigError, match=r"set `model.inputs.x.shape` in deeplens.toml"):
        optimize(_converted(source), shapes={}, opset=None, workdir=tmp_path, reporter=Reporter(quiet=True))


def test_shape_with_the_wrong_rank_is_named(tmp_path: Path) -> None:
    source = _two_output_net(tmp_path / "n.onnx")
    with pytest.raises(ConfigError, match=r"`model.inputs.x.shape` has 3 dimensions but the model's input 'x' has 2"):
        optimize(_converted(source), shapes={"x": (1, 4, 1)}, opset=None, workdir=tmp_path,
                 reporter=Reporter(quiet=True))


def test_multi_output_model_packages_with_parity_per_output(tmp_path: Path) -> None:
    source = tmp_path / "out"
    source.mkdir()
    _two_output_net(source / "net.onnx")
    config = testing.write_project(tmp_path / "p", source=source, model={"task": "other"})
    result = testing.build(config)
    assert [o.name for o in result.parity.outputs] == ["scores", "embedding"]
    assert all(o.top1_agreement is None for o in result.parity.outputs)


def _inert_net(path: Path, ops: list[str]) -> Path:
    """MatMul layers of external weights, each followed by one of ``ops``, as a converter writes them."""
    rng = np.random.default_rng(7)
    nodes, weights, last = [], [], "x"
    for index, op in enumerate(ops):
        weights.append(numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), f"w{index}"))
        nodes += [helper.make_node("MatMul", [last, f"w{index}"], [f"m{index}"]),
                  helper.make_node(op, [f"m{index}"], [f"a{index}"], **({"axis": 1} if "Softmax" in op else {}))]
        last = f"a{index}"
    graph = helper.make_graph(nodes, "inert", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, [1, 16])], initializer=weights)
    onnxtools.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _structure(model: onnx.ModelProto) -> list[tuple]:
    return [(n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node]


@pytest.mark.parametrize("ops", [["Relu", "Sigmoid", "Tanh"], ["Softmax", "LogSoftmax"]])
def test_a_graph_the_optimizer_leaves_as_it_is_skips_it_and_links_its_weights(tmp_path: Path, ops) -> None:
    import onnxruntime as ort

    from deeplens_build.stages.optimize import inert

    (tmp_path / "in").mkdir()
    source = _inert_net(tmp_path / "in" / "model.onnx", ops)
    optimized = tmp_path / "ort.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(source), load_external_data=False)
    assert inert(graph)
    assert _structure(onnx.load(str(optimized), load_external_data=False)) == _structure(graph), "its own answer"

    out = tmp_path / "out"
    out.mkdir()
    result = optimize(_converted(source), shapes={}, opset=None, workdir=out, reporter=Reporter(quiet=True))
    assert "onnxruntime-basic" not in result.passes
    data = out / "model.onnx.data"
    assert data.stat().st_ino == (source.parent / "model.onnx.data").stat().st_ino, "the same bytes, linked"
    x = {"x": np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)}
    np.testing.assert_array_equal(onnxtools.run(result.artifact.path, x)[result.artifact.outputs[0].name],
                                  onnxtools.run(source, x, optimize=False)[result.artifact.outputs[0].name])


def test_a_graph_the_optimizer_changes_is_optimized(tmp_path: Path) -> None:
    from deeplens_build.stages.optimize import inert

    for changed in (testing.onnx_classifier(tmp_path / "bn.onnx"),  # Conv + BatchNormalization fuse
                    _two_output_net(tmp_path / "gemm.onnx")):  # Gemm and Mul by a small constant
        assert not inert(onnx.load(str(changed)))
