"""precision = "int8": a classifier trained in the test on generated images (so top-1 means something), calibrated
on PNG images written in the test, gated on the held-out ones, for onnxruntime, OpenVINO and TensorRT targets."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import Broker, cli, example_project, open_bundle, package_project

from deeplens_build import ModelFiles, onnxtools, testing
from deeplens_build.device import support
from deeplens_build.device.run import DeviceOptions, run_device
from deeplens_build.errors import ParityError
from deeplens_build.manifest import PREPROCESS_VARIABLE
from deeplens_build.report import Reporter

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

SHAPE = (1, 3, 32, 32)
CLASSES = 3


def _images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """HxWx3 uint8 BGR frames whose class is the channel that dominates, with one saturated pixel each (a camera
    always has some)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, count)
    frames = rng.integers(0, 60, (count, 32, 32, 3)).astype(np.uint8)
    for frame, label in zip(frames, labels):
        frame[..., label] += 150
        frame[rng.integers(0, 32), rng.integers(0, 32), 0] = 255
    return frames, labels


def calibration_images(folder: Path, count: int) -> Path:
    for index, frame in enumerate(_images(count, seed=1)[0]):
        cv2.imwrite(str(folder / f"{index:03d}.png"), frame)
    return folder


class _Net(torch.nn.Module):
    """Conv→BatchNorm→ReLU twice, pooled, Linear, softmax; ``spike`` adds a channel that is huge only where a pixel
    saturates and that the next convolution barely reads: harmless in float, it stretches that tensor's INT8 range
    until every other value quantizes to nothing."""

    def __init__(self, spike: bool = False):
        super().__init__()
        self.spike = spike
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.conv2, self.bn2 = torch.nn.Conv2d(9 if spike else 8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, CLASSES)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        if self.spike:
            h = torch.cat([h, 1e5 * torch.relu(x[:, :1] - 0.99)], dim=1)
        h = torch.relu(self.bn2(self.conv2(h)))
        return torch.softmax(self.fc(h.mean(dim=(2, 3))), dim=1)


def _trained(spike: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    net = _Net(spike)
    if spike:
        with torch.no_grad():
            net.conv2.weight[:, 8].fill_(1e-7)
    frames, labels = _images(384, seed=0)
    x = torch.from_numpy(frames.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    optimizer = torch.optim.Adam([p for name, p in net.named_parameters()], lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        loss = torch.nn.functional.nll_loss(torch.log(net(x) + 1e-9), torch.from_numpy(labels))
        loss.backward()
        if spike:
            net.conv2.weight.grad[:, 8] = 0
        optimizer.step()
    return net.eval()


def _export(net: torch.nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(net, (torch.zeros(SHAPE),), str(path), input_names=["data"], output_names=["prob"],
                      opset_version=17, dynamo=False)
    return path


def trained_classifier(path: Path) -> Path:
    return _export(_trained(spike=False), path)


def sensitive_classifier(path: Path) -> Path:
    return _export(_trained(spike=True), path)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return calibration_images(tmp_path_factory.mktemp("calibration"), count=48)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    return trained_classifier(tmp_path_factory.mktemp("classifier") / "model.onnx")


def _int8(images: Path, **tables):
    return {"model": {"precision": "int8"}, "calibration": {"samples": str(images)}, **tables}


def _unpack(bundle: str, folder: Path) -> Path:
    with open_bundle(bundle) as tar:
        tar.extractall(folder, filter="data")
    return folder


def test_int8_ships_a_qdq_graph_with_the_gate_in_the_manifest(tmp_path: Path, classifier: Path,
                                                              images: Path) -> None:
    report = package_project(tmp_path, classifier.parent, **_int8(images))
    assert report["parity"]["passed"] and report["parity"]["top1_agreement"] >= 0.99
    manifest = testing.verify(Path(report["bundle"])).manifest
    assert manifest.model.precision == "int8" and "int8-qdq" in manifest.optimization.passes
    calibrated = manifest.optimization.calibration
    assert (calibrated.calibration, calibrated.validation, calibrated.method) == (36, 12, "minmax")
    assert manifest.parity.samples == 12, "the gate compares on the held-out samples, not random inputs"
    model = onnx.load(str(next(_unpack(report["bundle"], tmp_path / "b").rglob("model.onnx"))))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(i.data_type == onnx.TensorProto.INT8 for i in model.graph.initializer), "weights stored as int8"
    assert [i.type.tensor_type.elem_type for i in (*model.graph.input, *model.graph.output)] == \
        [onnx.TensorProto.FLOAT] * 2, "inputs and outputs stay float32"
    inspected = cli("inspect", report["bundle"]).stdout
    assert "int8    calibrated (minmax) on 36 samples, gated on 12 held out" in inspected
    assert "top-1 agreement 100.0%" in inspected


def test_a_layer_that_loses_its_answers_at_int8_is_kept_in_float(tmp_path: Path, images: Path) -> None:
    source = sensitive_classifier(tmp_path / "sensitive" / "model.onnx")
    report = package_project(tmp_path, source.parent, **_int8(images))
    assert report["parity"]["passed"]
    manifest = testing.verify(Path(report["bundle"])).manifest
    kept = manifest.optimization.fp32_nodes
    assert kept and "int8-qdq-mixed" in manifest.optimization.passes
    assert any(f"int8: kept {len(kept)} of" in note for note in report["notes"])


def test_the_gate_refuses_an_artifact_that_no_mix_saves(tmp_path: Path, classifier: Path, images: Path) -> None:
    """The original the gate compares with disagrees with every artifact (its classes reversed): no node kept in
    float can pass, and nothing is shipped."""
    reversed_original = testing.fake_plugin(
        "reversed", detect=lambda source: ModelFiles(files=found) if (found := source.matching(".onnx")) else None,
        convert=lambda source, model, workdir: _copy(source.path(model.files[0]), workdir),
        reference_run=lambda source, model, inputs: {name: value[..., ::-1] for name, value in
                                                     onnxtools.run(source.path(model.files[0]), inputs).items()})
    config = testing.write_project(tmp_path / "p", source=classifier.parent, inputs={"data": {"shape": list(SHAPE)}},
                                   **_int8(images))
    with pytest.raises(ParityError) as error:
        testing.build(config, plugins=[reversed_original], entry_points=False)
    message = str(error.value)
    assert "top-1 agreement" in message and "12 samples" in message
    assert "Every node kept in float still fails, so INT8 is not the cause" in message
    assert not (config.parent / "dist").exists()


def _copy(path: Path, workdir: Path):
    from deeplens_build import Artifact

    target = workdir / "model.onnx"
    target.write_bytes(path.read_bytes())
    inputs, outputs = onnxtools.interface(onnxtools.load(target))
    return Artifact(format="onnx", path=target, inputs=inputs, outputs=outputs)


def test_calibration_inputs_are_checked_before_any_work(tmp_path: Path, classifier: Path, images: Path) -> None:
    message = package_project(tmp_path / "a", classifier.parent, model={"precision": "int8"}, expect=3)
    assert "Field `calibration.samples` is required at model.precision = \"int8\"" in message
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(images.iterdir())[:20]:
        (few / path.name).write_bytes(path.read_bytes())
    message = package_project(tmp_path / "b", classifier.parent, expect=3, **_int8(few))
    assert "holds 20 inputs" in message and "INT8 needs at least 32" in message and "add 12 more" in message


def test_tensorrt_and_openvino_take_the_int8_artifact(tmp_path: Path, classifier: Path, images: Path) -> None:
    pytest.importorskip("openvino")
    trt = package_project(tmp_path / "trt", classifier.parent,
                          **_int8(images, target={"backend": "tensorrt", "accelerator": "gpu"}))
    model = onnx.load(str(next(_unpack(trt["bundle"], tmp_path / "t").rglob("model.onnx"))))
    zero_points = [i for i in model.graph.initializer if i.name.endswith("_zero_point")]
    assert zero_points and all(not onnx.numpy_helper.to_array(z).any() for z in zero_points), \
        "symmetric: TensorRT's explicit quantization takes zero points of 0 only"
    assert np.dtype(np.uint8) not in {onnx.numpy_helper.to_array(z).dtype for z in zero_points}, \
        "int8 activations (biases are int32)"
    ov = package_project(tmp_path / "ov", classifier.parent, **_int8(images, target={"backend": "openvino"}))
    assert ov["parity"]["passed"] and ov["parity"]["top1_agreement"] >= 0.99
    xml = next(_unpack(ov["bundle"], tmp_path / "o").rglob("model.xml")).read_text()
    assert "FakeQuantize" in xml and 'element_type="i8"' in xml, "OpenVINO's IR stays INT8"


def test_the_device_preprocesses_as_the_calibration_did(tmp_path: Path, classifier: Path, images: Path) -> None:
    assert support.PREPROCESS.read_text().count(f'SETTINGS = "{PREPROCESS_VARIABLE}"') == 1
    preprocess = {"scale": 0.00784313725490196, "mean": [1.0], "std": [1.0], "rgb": True}
    report = package_project(tmp_path, classifier.parent,
                             **_int8(images, calibration={"samples": str(images), "preprocess": preprocess}))
    folder = _unpack(report["bundle"], tmp_path / "b")
    setenv = json.loads((folder / "greengrass" / "recipe.json").read_text())["Manifests"][0]["Lifecycle"]["Setenv"]
    assert json.loads(setenv[PREPROCESS_VARIABLE]) == preprocess


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_the_example_packages_at_int8_and_runs_on_the_local_device(tmp_path: Path, images: Path,
                                                                  backend: str) -> None:
    if backend == "openvino":
        pytest.importorskip("openvino")
    config = example_project(tmp_path, backend=backend)  # the example itself: its MXNet model and its Lambda
    config.write_text(config.read_text().replace('precision = "fp16"', 'precision = "int8"')
                      + f'\n[calibration]\nsamples = "{images}"\n')
    bundle = testing.build(config).bundle
    broker = Broker(tmp_path)
    broker.start()
    try:
        summary = run_device(bundle, DeviceOptions(device_dir=tmp_path / "device", mqtt_port=broker.port,
                                                   frames=str(images), max_frames=5), reporter=Reporter(quiet=True),
                             stop=threading.Event(), public_key=bundle.parent.parent / "signing-key.pub.pem")
    finally:
        broker.stop()
    assert summary.published == 5 and summary.dropped == 0
    manifest = testing.verify(bundle).manifest
    assert manifest.model.precision == "int8" and manifest.framework == "mxnet"
    assert manifest.parity.runtime.startswith(backend) and manifest.optimization.calibration.validation == 12
