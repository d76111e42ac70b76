"""The MXNet plugin: real tiny models saved by MXNet as SageMaker saves them, through `deeplens-build package`."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import cli, open_bundle, package_project

from deeplens_build import testing
from deeplens_build.bundle import read_manifest

mxnet_testing = pytest.importorskip("deeplens_build_mxnet.testing", reason="the mxnet plugin is a built-in")

SHAPE = {"data": (1, 3, 32, 32)}


def _sagemaker_tar(folder: Path, archive: Path, arcroot: str = "") -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=f"{arcroot}{path.name}")
    return archive


@pytest.fixture(scope="module")
def residual_checkpoints(tmp_path_factory) -> Path:
    return mxnet_testing.save_checkpoints(tmp_path_factory.mktemp("mx") / "out", mxnet_testing.residual_classifier,
                                          SHAPE)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_sagemaker_tar_with_three_checkpoints_packages_the_final_one(tmp_path: Path, residual_checkpoints: Path,
                                                                     precision: str) -> None:
    archive = _sagemaker_tar(residual_checkpoints, tmp_path / "model.tar.gz")
    report = package_project(tmp_path, archive, model={"precision": precision})
    assert report["framework"] == "mxnet" and report["parity"]["passed"]
    assert report["parity"]["max_abs_diff"] <= (1e-4 if precision == "fp32" else 1e-2)
    assert any("packaging only the final one, epoch 3" in n and "checkpoint_frequency" in n for n in report["notes"])
    manifest = testing.verify(Path(report["bundle"])).manifest.to_dict()
    assert manifest["source"]["model_files"] == ["model-symbol.json", "model-0003.params", "model-shapes.json"]
    assert manifest["model"]["inputs"][0] == {"name": "data", "shape": [1, 3, 32, 32], "dtype": "float32",
                                              "layout": "NCHW"}
    assert manifest["parity"]["outputs"][0]["top1_agreement"] == 1.0
    assert report["sizes"]["artifact"] < (residual_checkpoints / "model-0003.params").stat().st_size * 1.1


def test_nested_folder_without_shapes_file_uses_the_configured_shape(tmp_path: Path, residual_checkpoints: Path) -> None:
    nested = tmp_path / "out" / "model"
    shutil.copytree(residual_checkpoints, nested, ignore=shutil.ignore_patterns("model-shapes.json"))
    report = package_project(tmp_path, tmp_path / "out", inputs={"data": {"shape": [1, 3, 32, 32]}})
    assert read_manifest(Path(report["bundle"])).to_dict()["source"]["model_files"] == [
        "model/model-symbol.json", "model/model-0003.params"]


def test_missing_shape_names_the_config_key(tmp_path: Path, residual_checkpoints: Path) -> None:
    source = tmp_path / "out"
    shutil.copytree(residual_checkpoints, source, ignore=shutil.ignore_patterns("model-shapes.json"))
    message = package_project(tmp_path, source, expect=5)
    assert "the shape of input 'data' is unknown" in message and "set `model.inputs.data.shape`" in message


def test_softmax_output_model_exports_and_matches(tmp_path: Path) -> None:
    source = mxnet_testing.save_checkpoints(tmp_path / "out", mxnet_testing.softmax_output_classifier,
                                            {"data": (1, 3, 16, 16)}, epochs=1)
    report = package_project(tmp_path, source)
    assert report["parity"]["passed"]
    manifest = read_manifest(Path(report["bundle"])).to_dict()
    assert [i["name"] for i in manifest["model"]["inputs"]] == ["data"], "the label input is not a model input"


def test_multi_input_model(tmp_path: Path) -> None:
    source = mxnet_testing.save_checkpoints(tmp_path / "out", mxnet_testing.two_input_net,
                                            {"image": (1, 3, 8, 8), "features": (1, 5)}, epochs=2)
    report = package_project(tmp_path, source, model={"task": "other"})
    manifest = read_manifest(Path(report["bundle"])).to_dict()
    assert [(i["name"], i["shape"]) for i in manifest["model"]["inputs"]] == [("image", [1, 3, 8, 8]),
                                                                             ("features", [1, 5])]
    assert report["parity"]["passed"]


def test_gluon_export_packages(tmp_path: Path) -> None:
    from deeplens_build_mxnet import _mxnet

    mx = _mxnet()
    net = mx.gluon.nn.HybridSequential()
    net.add(mx.gluon.nn.Conv2D(4, 3), mx.gluon.nn.BatchNorm(), mx.gluon.nn.Activation("relu"),
            mx.gluon.nn.GlobalAvgPool2D(), mx.gluon.nn.Dense(3))
    net.initialize(mx.init.Xavier())
    net.hybridize()
    net(mx.nd.zeros((1, 3, 16, 16)))
    (tmp_path / "out").mkdir()
    net.export(str(tmp_path / "out" / "model"), epoch=7)
    report = package_project(tmp_path, tmp_path / "out", inputs={"data": {"shape": [1, 3, 16, 16]}}, model={"task": "other"})
    assert report["parity"]["passed"]


def test_native_format_keeps_symbol_and_params_with_the_mxnet_runtime(tmp_path: Path,
                                                                     residual_checkpoints: Path) -> None:
    report = package_project(tmp_path, residual_checkpoints, plugins={"mxnet": {"format": "native"}})
    assert report["parity"] is None
    manifest = testing.verify(Path(report["bundle"])).manifest.to_dict()
    assert manifest["model"]["format"] == "mxnet-symbol"
    assert manifest["model"]["files"] == ["model/model-symbol.json", "model/model-0000.params",
                                          "model/model-shapes.json"]
    assert manifest["runtime"]["name"] == "mxnet"
    # the device module the bundle carries loads and runs the native artifact as MXNet runs the original
    model = _device_model(report["bundle"], tmp_path / "bundle")
    assert model.inputs == [("data", [1, 3, 32, 32])] and model.device.startswith("mxnet 1.9.1")
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    from deeplens_build_mxnet import device as original

    executor = original.bind(str(residual_checkpoints / "model-symbol.json"),
                             str(residual_checkpoints / "model-0003.params"), [("data", (1, 3, 32, 32))])
    assert np.array_equal(model.run({"data": x})[0], original.run(executor, {"data": x})[0])
    assert "target  onnxruntime" not in cli("inspect", report["bundle"]).stdout, "the runtime that runs it is shown"
    params = {f["path"]: f["size"] for f in manifest["files"]}["model/model-0000.params"]
    assert params == (residual_checkpoints / "model-0003.params").stat().st_size
    assert any("parity: not applicable" in n for n in report["notes"])


def _device_model(bundle: str, folder: Path):
    """The bundle unpacked into ``folder`` and its model loaded by the device module it carries."""
    import importlib.util

    with open_bundle(bundle) as tar:
        tar.extractall(folder, filter="data")
    spec = importlib.util.spec_from_file_location(f"deeplens_model_{folder.parent.name}",
                                                  folder / "model" / "deeplens_model.py")
    device = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(device)
    return device.load(str(folder / "model"))


def test_corrupt_params_is_a_clear_error(tmp_path: Path, residual_checkpoints: Path) -> None:
    source = tmp_path / "out"
    shutil.copytree(residual_checkpoints, source)
    params = source / "model-0003.params"
    params.write_bytes(params.read_bytes()[:100])
    message = package_project(tmp_path, source, expect=5)
    assert "plugin 'mxnet' could not convert" in message
    assert "model-0003.params is damaged or not an MXNet params file" in message


@pytest.mark.parametrize("keep", [1, 100])
def test_truncated_symbol_file_is_a_clear_error(tmp_path: Path, residual_checkpoints: Path, keep: int) -> None:
    source = tmp_path / "out"
    shutil.copytree(residual_checkpoints, source)
    symbol = source / "model-symbol.json"
    symbol.write_bytes(symbol.read_bytes()[:keep])
    message = package_project(tmp_path, source, expect=5)
    assert "model-symbol.json is not a valid MXNet symbol file" in message


def test_params_of_another_model_is_a_clear_error(tmp_path: Path, residual_checkpoints: Path) -> None:
    other = mxnet_testing.save_checkpoints(tmp_path / "other", mxnet_testing.softmax_output_classifier,
                                           {"data": (1, 3, 16, 16)}, epochs=1)
    source = tmp_path / "out"
    shutil.copytree(residual_checkpoints, source)
    shutil.copyfile(other / "model-0001.params", source / "model-0003.params")
    message = package_project(tmp_path, source, expect=5)
    assert "model-0003.params does not belong to model-symbol.json" in message


def test_params_with_wrong_shapes_is_a_clear_error(tmp_path: Path, residual_checkpoints: Path) -> None:
    wider = mxnet_testing.save_checkpoints(tmp_path / "wider", lambda mx: mxnet_testing.residual_classifier(mx, 12),
                                           SHAPE, epochs=1)
    source = tmp_path / "out"
    shutil.copytree(residual_checkpoints, source)
    shutil.copyfile(wider / "model-0001.params", source / "model-0003.params")
    message = package_project(tmp_path, source, expect=5)
    assert "parameter 'fc_weight' is [12, 4096], the symbol expects [10, 4096]" in message


def test_unsupported_operator_names_operator_node_and_options(tmp_path: Path) -> None:
    def cholesky(mx):
        fc = mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=4, name="fc")
        square = mx.sym.linalg.gemm2(mx.sym.reshape(fc, (1, 2, 2)), mx.sym.reshape(fc, (1, 2, 2)), transpose_b=True)
        return mx.sym.linalg.potrf(square, name="chol")

    source = mxnet_testing.save_checkpoints(tmp_path / "out", cholesky, {"data": (1, 6)}, epochs=1)
    message = package_project(tmp_path, source, expect=5, model={"task": "other"})
    assert "operator '_linalg_potrf' (node 'chol') has no ONNX conversion" in message
    assert 'format = "native"' in message and "plugin of your own" in message


@pytest.fixture(scope="module")
def builtin_ssd(tmp_path_factory) -> Path:
    return mxnet_testing.train_builtin_ssd(tmp_path_factory.mktemp("ssd") / "out", steps=6)


def test_mxnet_ssds_deploy_symbol_packages_with_a_configured_shape(tmp_path: Path, builtin_ssd: Path) -> None:
    """What DeepLens owners ran first, MXNet SSD's deploy.py: a symbol ending in MultiBoxDetection, no label."""
    from deeplens_build_mxnet import _inference_symbol, _mxnet

    mx = _mxnet()
    source = tmp_path / "out"
    source.mkdir()
    _inference_symbol(mx, mx.sym.load(str(builtin_ssd / "model_algo_1-symbol.json"))).save(
        str(source / "deploy_model_algo_1-symbol.json"))
    shutil.copyfile(builtin_ssd / "model_algo_1-0000.params", source / "deploy_model_algo_1-0000.params")
    message = package_project(tmp_path / "a", source, expect=5, model={"task": "detection"})
    assert "shape of input 'data' is unknown" in message and "image_shape" in message
    report = package_project(tmp_path / "b", source, model={"task": "detection"},
                             inputs={"data": {"shape": [1, 3, 32, 32]}})
    assert report["parity"]["passed"] and report["parity"]["detection_agreement"] == 1.0


def test_a_native_ssd_runs_on_the_device_module(tmp_path: Path, builtin_ssd: Path) -> None:
    """format = "native" ships the inference symbol (the training branch cut), which MXNet runs on the device."""
    report = package_project(tmp_path, builtin_ssd, model={"task": "detection"},
                             plugins={"mxnet": {"format": "native"}})
    model = _device_model(report["bundle"], tmp_path / "bundle")
    assert model.inputs == [("data", [1, 3, 32, 32])] and model.outputs == ["detection_output"]
    rows = model.run({"data": np.full((1, 3, 32, 32), 128, np.float32)})[0]
    assert rows.shape == (1, 16 * 16 * 4 + 8 * 8 * 4, 6) and (rows[0, :, 0] >= 0).any()


def test_an_ssd_at_batch_two_is_refused(tmp_path: Path, builtin_ssd: Path) -> None:
    message = package_project(tmp_path, builtin_ssd, expect=5, model={"task": "detection"},
                              inputs={"data": {"shape": [2, 3, 32, 32]}})
    assert "an SSD detector converts at batch 1" in message
