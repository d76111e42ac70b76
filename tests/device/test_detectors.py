"""SSD detectors as SageMaker and Caffe leave them: the built-in object-detection algorithm's training output (a
tiny SSD trained here through MXNet's own SSD operators) and a Caffe SSD, each converted to standard ONNX, parity-
checked as detections against the framework itself, and run under `run` by a DeepLens-style SSD Lambda that
publishes boxes to a real broker (mosquitto)."""

from __future__ import annotations

import tarfile
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import Broker, open_bundle
from test_deeplens_compat import DETECTOR
from test_device import THING, _frames, _key, _subscribe

from deeplens_build import testing
from deeplens_build.device.run import DeviceOptions, run_device
from deeplens_build.report import Reporter
from deeplens_build.values import BuildResult

mxnet_testing = pytest.importorskip("deeplens_build_mxnet.testing", reason="the mxnet plugin is a built-in")
caffe_testing = pytest.importorskip("deeplens_build_caffe.testing", reason="the caffe plugin is a built-in")

STANDARD = {"", "ai.onnx"}


@pytest.fixture(scope="module")
def builtin_ssd(tmp_path_factory) -> Path:
    """model.tar.gz as the built-in object-detection algorithm leaves it."""
    folder = mxnet_testing.train_builtin_ssd(tmp_path_factory.mktemp("ssd") / "out", steps=6)
    archive = folder.parent / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return archive


def _package(tmp_path: Path, source: Path, **tables) -> BuildResult:
    code = tmp_path / "lambda"
    code.mkdir()
    (code / "lambda_function.py").write_text(DETECTOR)
    config = testing.write_project(tmp_path / "project", source=source, model={"task": "detection"},
                                   parity={"detection": {"score": 0.05}}, **tables, **{"lambda": {
                                       "source": str(code), "handler": "lambda_function.lambda_handler",
                                       "deeplens_compat": True}})
    return testing.build(config)


def _run_publishes_boxes(tmp_path: Path, bundle: Path, port: int) -> None:
    received, thread, _ = _subscribe(port, 3)
    summary = run_device(bundle, DeviceOptions(device_dir=tmp_path / "device", mqtt_port=port, thing=THING,
                                               frames=str(_frames(tmp_path / "frames", 2)), max_frames=3),
                         reporter=Reporter(quiet=True), stop=threading.Event(), public_key=_key(bundle))
    thread.join(timeout=20)
    assert summary.published == 3 and len(received) == 3
    for result in received:  # {"object<label>": [prob, xmin, ymin, xmax, ymax]} in frame pixels
        assert result and all(len(box) == 5 and box[0] > 0.1 and box[1] <= box[3] and box[2] <= box[4]
                              for box in result.values())


def _graph(bundle: Path, tmp_path: Path) -> onnx.ModelProto:
    folder = tmp_path / "unpacked"
    with open_bundle(bundle) as tar:
        tar.extractall(folder, filter="data")
    return onnx.load(str(folder / "model" / "model.onnx"))


def test_the_builtin_object_detection_output_packages_and_its_lambda_publishes_boxes(
        broker: Broker, tmp_path: Path, builtin_ssd: Path) -> None:
    built = _package(tmp_path, builtin_ssd)  # no input shape given: hyperparams.json's image_shape
    manifest = built.manifest.to_dict()
    assert manifest["source"]["model_files"] == ["model_algo_1-symbol.json", "model_algo_1-0000.params",
                                                 "hyperparams.json"]
    assert manifest["model"]["inputs"] == [{"name": "data", "shape": [1, 3, 32, 32], "dtype": "float32",
                                            "layout": "NCHW"}], "the training-only label input is cut"
    anchors = 16 * 16 * 4 + 8 * 8 * 4
    assert manifest["model"]["outputs"][0]["shape"] == [1, anchors, 6], "MultiBoxDetection's own layout"
    assert manifest["parity"]["outputs"][0]["detection_agreement"] == 1.0
    graph = _graph(built.bundle, tmp_path)
    ops = {n.op_type for n in graph.graph.node}
    assert "NonMaxSuppression" in ops and all(n.domain in STANDARD for n in graph.graph.node)
    _run_publishes_boxes(tmp_path, built.bundle, broker.port)


@pytest.mark.parametrize("options", [{}, {"nms_topk": 20, "force_suppress": True}],
                         ids=["per-class", "top-20-class-agnostic"])
def test_the_ssd_artifact_gives_mxnets_own_detections(tmp_path: Path, options: dict) -> None:
    """Not only within the parity bounds: the same rows, in the same order, as MXNet's MultiBoxDetection."""
    import onnxruntime as ort
    from deeplens_build_mxnet import _executor, device

    source = mxnet_testing.train_builtin_ssd(tmp_path / "out", steps=6, **options)
    built = _package(tmp_path, source)
    _graph(built.bundle, tmp_path)
    session = ort.InferenceSession(str(tmp_path / "unpacked" / "model" / "model.onnx"))
    executor = _executor(str(source / "model_algo_1-symbol.json"), str(source / "model_algo_1-0000.params"),
                         (("data", (1, 3, 32, 32)),))
    rng = np.random.default_rng(5)
    for _ in range(3):
        x = rng.uniform(0, 255, (1, 3, 32, 32)).astype(np.float32)
        want, got = device.run(executor, {"data": x})[0][0], session.run(None, {"data": x})[0][0]
        want, got = want[want[:, 0] >= 0], got[got[:, 0] >= 0]
        assert len(want) > 5 and want.shape == got.shape
        assert len(want) <= options.get("nms_topk", len(want))
        assert np.abs(want - got).max() < 1e-5


def test_an_ssd_compiles_for_openvino_with_detection_parity(tmp_path: Path, builtin_ssd: Path) -> None:
    built = _package(tmp_path, builtin_ssd, target={"backend": "openvino"})
    assert built.parity.runtime.startswith("openvino") and built.parity.detection_agreement == 1.0


def test_a_caffe_ssd_packages_and_its_lambda_publishes_boxes(broker: Broker, tmp_path: Path) -> None:
    source = caffe_testing.write_model(tmp_path / "out", caffe_testing.tiny_ssd)
    built = _package(tmp_path, source)
    manifest = built.manifest.to_dict()
    assert manifest["model"]["outputs"][0]["shape"] == [1, 1, 50, 7], "Caffe's rows, keep_top_k of them"
    assert manifest["parity"]["outputs"][0]["detection_agreement"] == 1.0, "against OpenCV's own Caffe reader"
    graph = _graph(built.bundle, tmp_path)
    assert not {"PriorBox", "DetectionOutput"} & {n.op_type for n in graph.graph.node}
    _run_publishes_boxes(tmp_path, built.bundle, broker.port)
