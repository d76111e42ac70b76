"""onnxtools: inline weights out to external data without decoding them (externalize); sessions with and without
prepacking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deeplens_build import onnxtools


def _model(path: Path, *, typed_weights: bool = False, external: bool = False) -> Path:
    """x @ big + small + typed: a large raw weight, a small raw one and a small one in float_data."""
    rng = np.random.default_rng(0)
    big = rng.standard_normal((64, 32)).astype(np.float32)
    big_tensor = (helper.make_tensor("big", TensorProto.FLOAT, big.shape, big.ravel().tolist()) if typed_weights
                  else numpy_helper.from_array(big, "big"))
    small = numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "small")
    typed = helper.make_tensor("typed", TensorProto.FLOAT, [32], [0.5] * 32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "big"], ["h"]), helper.make_node("Add", ["h", "small"], ["s"]),
         helper.make_node("Add", ["s", "typed"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], initializer=[big_tensor, small, typed])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path), save_as_external_data=external, location=f"{path.name}.data", size_threshold=1024)
    return path


def test_externalize_writes_what_save_writes_without_decoding_the_weights(tmp_path: Path) -> None:
    source = _model(tmp_path / "in" / "model.onnx")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    written = onnxtools.externalize(source, tmp_path / "a" / "model.onnx")
    saved = onnxtools.save(onnxtools.load(source, weights=False, check=False), tmp_path / "b" / "model.onnx")
    assert [p.name for p in written] == [p.name for p in saved] == ["model.onnx", "model.onnx.data"]
    for ours, theirs in zip(written, saved, strict=True):
        assert ours.read_bytes() == theirs.read_bytes(), ours.name
    x = {"x": np.ones((1, 64), np.float32)}
    np.testing.assert_array_equal(onnxtools.run(written[0], x)["y"], onnxtools.run(source, x)["y"])


def test_a_model_with_only_small_weights_keeps_them_inline(tmp_path: Path) -> None:
    graph = helper.make_graph([helper.make_node("Add", ["x", "b"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              initializer=[numpy_helper.from_array(np.ones(4, np.float32), "b")])
    source = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(source))
    (tmp_path / "out").mkdir()
    assert onnxtools.externalize(source, tmp_path / "out" / "model.onnx") == (tmp_path / "out" / "model.onnx",)
    assert (tmp_path / "out" / "model.onnx").read_bytes() == source.read_bytes()


@pytest.mark.parametrize("case", ["external data", "large typed weights", "truncated", "not protobuf"])
def test_what_externalize_does_not_rewrite_is_left_to_onnx_with_nothing_written(tmp_path: Path, case: str) -> None:
    source = tmp_path / "in" / "model.onnx"
    if case in ("external data", "large typed weights"):
        _model(source, external=case == "external data", typed_weights=case == "large typed weights")
    else:
        _model(source)
        content = source.read_bytes()
        source.write_bytes(content[:len(content) // 2] if case == "truncated" else b"\xff" * 64)
    out = tmp_path / "out"
    out.mkdir()
    assert onnxtools.externalize(source, out / "model.onnx") is None
    assert list(out.iterdir()) == []


def test_sessions_without_prepacking_compute_what_prepacked_ones_do(tmp_path: Path) -> None:
    """Checks run unpacked, profile and devices prepacked: both must give the model's own answer."""
    path = _model(tmp_path / "model.onnx", external=True)
    x = {"x": np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)}
    weights = {t.name: numpy_helper.to_array(t, base_dir=str(tmp_path))
               for t in onnx.load(str(path)).graph.initializer}
    expected = x["x"] @ weights["big"] + weights["small"] + weights["typed"]
    unpacked = onnxtools.runner(path)(x)["y"]
    packed = onnxtools.runner(path, prepack=True)(x)["y"]
    np.testing.assert_allclose(unpacked, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(unpacked, packed, rtol=1e-6, atol=1e-6)
