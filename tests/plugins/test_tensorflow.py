"""The TensorFlow plugin: real tiny models built and saved by TensorFlow, packed as SageMaker packs them."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import package_project

from deeplens_build import testing
from deeplens_build.bundle import read_manifest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")


def _residual_keras(classes: int = 10):
    """Conv2D, BatchNorm, ReLU, a DepthwiseConv2D residual Add, pooling, Concatenate, Dropout, Dense softmax."""
    keras.utils.set_random_seed(0)
    image = keras.Input((32, 32, 3), name="image")
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(keras.layers.Conv2D(8, 3, padding="same")(image)))
    x = keras.layers.Add()([x, keras.layers.DepthwiseConv2D(3, padding="same")(x)])
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Concatenate()([keras.layers.GlobalAveragePooling2D()(x), keras.layers.GlobalMaxPooling2D()(x)])
    x = keras.layers.Dropout(0.5)(x)
    model = keras.Model(image, keras.layers.Dense(classes, activation="softmax", name="prob")(x))
    bn = model.layers[2]  # give batch norm real moving statistics, as training would
    gamma, beta, mean, var = bn.get_weights()
    rng = np.random.default_rng(0)
    bn.set_weights([gamma, beta, rng.normal(0, 0.5, mean.shape), rng.uniform(0.5, 1.5, var.shape)])
    return model


class _TwoOutputs(tf.Module):
    def __init__(self):
        super().__init__()
        self.w = tf.Variable(tf.random.stateless_normal((4, 6), seed=(1, 2)))

    @tf.function(input_signature=[tf.TensorSpec((None, 4), tf.float32, name="features")])
    def score(self, features):
        hidden = tf.nn.relu(features @ self.w)
        return {"scores": tf.nn.softmax(hidden), "embedding": hidden * 2.0}


@pytest.fixture(scope="module")
def serving_tar(tmp_path_factory) -> Path:
    """model/1 and model/2 SavedModels in the TF Serving layout, in a model.tar.gz."""
    root = tmp_path_factory.mktemp("tf")
    model = _residual_keras()
    model.export(str(root / "model" / "1"), verbose=False)
    model.export(str(root / "model" / "2"), verbose=False)
    archive = root / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "model", arcname="model")
    return archive


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tf_serving_layout_packages_the_highest_version(tmp_path: Path, serving_tar: Path, precision: str) -> None:
    report = package_project(tmp_path, serving_tar, model={"precision": precision})
    assert report["framework"] == "tensorflow" and report["parity"]["passed"]
    assert any("TF Serving versions 1, 2 found: packaging the highest, 2" in n for n in report["notes"])
    manifest = testing.verify(Path(report["bundle"])).manifest.to_dict()
    assert manifest["source"]["model_files"][0] == "model/2/saved_model.pb"
    assert all(f.startswith("model/2/") for f in manifest["source"]["model_files"])
    assert manifest["model"]["inputs"] == [{"name": "image", "shape": [1, 32, 32, 3], "dtype": "float32",
                                            "layout": "NHWC"}]


@pytest.mark.parametrize("suffix", [".keras", ".h5", ".hdf5"])
def test_keras_filespackage_project(tmp_path: Path, suffix: str) -> None:
    source = tmp_path / "out"
    source.mkdir()
    _residual_keras().save(source / f"model{suffix}")
    report = package_project(tmp_path, source)
    assert report["parity"]["passed"] and report["parity"]["max_abs_diff"] < 1e-4


def test_custom_signature_with_two_outputs(tmp_path: Path) -> None:
    module = _TwoOutputs()
    tf.saved_model.save(module, str(tmp_path / "out"), signatures={"score": module.score})
    report = package_project(tmp_path, tmp_path / "out", model={"task": "other"},
                      plugins={"tensorflow": {"signature": "score"}})
    manifest = read_manifest(Path(report["bundle"])).to_dict()
    assert sorted(o["name"] for o in manifest["model"]["outputs"]) == ["embedding", "scores"]
    assert {o["name"] for o in manifest["parity"]["outputs"]} == {"embedding", "scores"}


def test_wrong_signature_lists_the_available_ones(tmp_path: Path) -> None:
    module = _TwoOutputs()
    tf.saved_model.save(module, str(tmp_path / "out"), signatures={"score": module.score})
    message = package_project(tmp_path, tmp_path / "out", expect=5)
    assert "the SavedModel has no signature 'serving_default'; it has score" in message


def test_frozen_graph_with_named_tensors(tmp_path: Path) -> None:
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    module = _TwoOutputs()
    concrete = module.score.get_concrete_function()
    frozen = convert_variables_to_constants_v2(concrete).graph.as_graph_def()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "frozen.pb").write_bytes(frozen.SerializeToString())
    outputs = [t.name for t in convert_variables_to_constants_v2(concrete).outputs]
    report = package_project(tmp_path, tmp_path / "out", model={"task": "other"},
                      plugins={"tensorflow": {"inputs": ["features:0"], "outputs": outputs}},
                      inputs={"features:0": {"shape": [1, 4]}})
    assert report["parity"]["passed"]


def test_frozen_graph_without_tensor_names_says_what_to_set(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "graph.pb").write_bytes(b"\x00")
    assert "[plugins.tensorflow] inputs" in package_project(tmp_path, tmp_path / "out", expect=5)


def test_saved_model_with_missing_variables(tmp_path: Path, serving_tar: Path) -> None:
    with tarfile.open(serving_tar) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    source = tmp_path / "x" / "model" / "2"
    shutil.rmtree(source / "variables")
    message = package_project(tmp_path, source, expect=5)
    assert "the SavedModel in 2/ cannot be loaded" in message and "variables/" in message


def test_corrupt_h5_is_a_clear_error(tmp_path: Path) -> None:
    source = tmp_path / "out"
    source.mkdir()
    (source / "model.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    assert "model.h5 is damaged or not a Keras model" in package_project(tmp_path, source, expect=5)


def test_unsupported_op_is_named(tmp_path: Path) -> None:
    class Expm(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((1, 4), tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.linalg.expm(tf.reshape(tf.concat([x, x, x, x], 1), (1, 4, 4)))}

    module = Expm()
    tf.saved_model.save(module, str(tmp_path / "out"), signatures={"serving_default": module.serve})
    message = package_project(tmp_path, tmp_path / "out", expect=5, model={"task": "other"})
    assert "tf2onnx cannot convert TensorFlow op(s) 'MatrixSolve'" in message
