"""The PyTorch plugin: real tiny models built and saved by torch in each layout SageMaker's PyTorch jobs leave,
packed in a model.tar.gz as SageMaker packs them, packaged end to end."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import onnx
import pytest
from helpers import Broker, cli, error_line, example_project, open_bundle, package_project

from deeplens_build import testing
from deeplens_build.device.run import DeviceOptions, run_device
from deeplens_build.report import Reporter

torch = pytest.importorskip("torch")
from deeplens_build_pytorch import networks  # noqa: E402  (after torch is known to be installed)
from deeplens_build_pytorch import testing as pt_testing  # noqa: E402

SHAPE = (1, 3, 32, 32)
INPUTS = {"data": {"shape": list(SHAPE)}}


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    return networks.trained(networks.TinyCNN())


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, network: torch.nn.Module) -> dict[str, Path]:
    """One model.tar.gz per layout: TorchScript, a torch.export program, model.pth + code/inference.py."""
    root = tmp_path_factory.mktemp("pytorch")
    folders = {"torchscript": pt_testing.torchscript(root / "torchscript", network).parent,
               "export": pt_testing.exported(root / "export", network, SHAPE).parent,
               "inference": pt_testing.inference_layout(root / "inference", network)}
    return {kind: pt_testing.model_tar(folder, root / f"{kind}.tar.gz") for kind, folder in folders.items()}


def _manifest(report: dict) -> dict:
    return testing.verify(Path(report["bundle"])).manifest.to_dict()


@pytest.mark.parametrize("kind", ["torchscript", "export", "inference"])
def test_each_sagemaker_layout_packages_with_parity_against_pytorch(tmp_path: Path, layouts: dict[str, Path],
                                                                     kind: str) -> None:
    inputs = {} if kind == "export" else INPUTS  # an exported program carries its input shapes
    report = package_project(tmp_path, layouts[kind], inputs=inputs)
    assert report["framework"] == "pytorch" and report["parity"]["passed"]
    assert report["parity"]["max_abs_diff"] < 1e-5, "the artifact against the model run eagerly by torch"
    manifest = _manifest(report)
    assert [i["shape"] for i in manifest["model"]["inputs"]] == [list(SHAPE)]
    assert manifest["model"]["inputs"][0]["layout"] == "NCHW" and manifest["model"]["inputs"][0]["dtype"] == "float32"
    # the dynamo exporter where the target takes opset 18; a ScriptModule only the TorchScript-based one reads
    assert manifest["optimization"]["opset"] == (17 if kind == "torchscript" else 18)
    if kind == "inference":
        assert manifest["source"]["model_files"] == ["code/inference.py", "model.pth"]
        assert any("model_fn builds the model" in note for note in report["notes"])


@pytest.mark.parametrize("kind", ["torchscript", "export"])
def test_opset_13_uses_the_torchscript_exporter(tmp_path: Path, layouts: dict[str, Path], kind: str) -> None:
    report = package_project(tmp_path, layouts[kind], inputs={} if kind == "export" else INPUTS, target={"opset": 13})
    assert report["parity"]["passed"] and _manifest(report)["optimization"]["opset"] == 13
    with open_bundle(report["bundle"]) as tar:
        tar.extractall(tmp_path / "bundle", filter="data")
    model = onnx.load(str(next((tmp_path / "bundle").rglob("model.onnx"))))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {13}


def test_fp16_on_openvino_and_a_tensorrt_target_from_pytorch(tmp_path: Path, layouts: dict[str, Path]) -> None:
    pytest.importorskip("openvino")
    report = package_project(tmp_path / "ov", layouts["inference"], inputs=INPUTS, model={"precision": "fp16"},
                             target={"backend": "openvino"})
    assert report["parity"]["passed"] and _manifest(report)["target"]["backend"] == "openvino"
    report = package_project(tmp_path / "fp16", layouts["export"], model={"precision": "fp16"})
    assert report["parity"]["passed"] and _manifest(report)["model"]["precision"] == "fp16"
    report = package_project(tmp_path / "trt", layouts["export"], target={"backend": "tensorrt", "accelerator": "gpu"})
    manifest = _manifest(report)
    assert manifest["optimization"]["opset"] == 17 and manifest["runtime"]["name"] == "tensorrt"


def test_only_the_final_checkpoint_is_packaged(tmp_path: Path, network: torch.nn.Module) -> None:
    source = tmp_path / "out"
    for epoch in (1, 2, 10):
        pt_testing.torchscript(source / "checkpoints", network, name=f"model_epoch_{epoch}.pt")
    report = package_project(tmp_path, pt_testing.model_tar(source, tmp_path / "model.tar.gz"), inputs=INPUTS)
    assert _manifest(report)["source"]["model_files"] == ["checkpoints/model_epoch_10.pt"]
    assert any("3 checkpoints found" in n and "packaging only the final one, checkpoints/model_epoch_10.pt" in n
               for n in report["notes"])
    from deeplens_build_pytorch import PyTorchSettings, _final

    assert _final(["checkpoints/model-0003.pt", "resnet18.pt"], PyTorchSettings())[0] == "resnet18.pt", \
        "a number in a model's name does not make it a checkpoint"
    pt_testing.torchscript(source, network, name="model.pt")  # the final model beside its checkpoints wins
    report = package_project(tmp_path / "b", pt_testing.model_tar(source, tmp_path / "b.tar.gz"), inputs=INPUTS)
    assert _manifest(report)["source"]["model_files"] == ["model.pt"]


def test_model_fn_runs_in_a_clean_environment_in_a_scratch_folder(tmp_path: Path, network: torch.nn.Module,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner's code sees no AWS credentials, no signing key setting, and a current directory of its own."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak")
    monkeypatch.setenv("DEEPLENS_SIGNING_KEY", "do-not-leak")
    fn = pt_testing.MODEL_FN.format(network="TinyCNN").replace(
        "def model_fn(model_dir):\n",
        "def model_fn(model_dir):\n"
        "    leaked = sorted(k for k, v in os.environ.items() if 'do-not-leak' in v)\n"
        "    assert not leaked, leaked\n"
        "    assert os.path.realpath(os.getcwd()) != os.path.realpath(model_dir)\n"
        "    open('written-by-model-fn', 'w').close()\n")
    source = pt_testing.inference_layout(tmp_path / "out", network, model_fn=fn)
    project = tmp_path / "project"
    report = package_project(tmp_path, source, inputs=INPUTS)
    assert report["parity"]["passed"]
    assert not list(source.rglob("written-by-model-fn")), "the training output is never written"
    assert not list(project.rglob("written-by-model-fn")), "the scratch folders are removed"


def test_a_model_fn_that_raises_is_one_error_naming_its_file_and_line(tmp_path: Path,
                                                                       network: torch.nn.Module) -> None:
    fn = "def model_fn(model_dir):\n    raise RuntimeError('no weights for this device')\n"
    source = pt_testing.inference_layout(tmp_path / "out", network, model_fn=fn)
    result = cli("package", "--config", testing.write_project(tmp_path / "p", source=source, inputs=INPUTS),
                 "--signing-key", testing.signing_key(tmp_path), expect=5)
    assert error_line(result).endswith(": code/inference.py line 2, in model_fn: RuntimeError: no weights for "
                                       "this device")


def test_bad_pytorch_outputs_are_one_clear_error(tmp_path: Path, network: torch.nn.Module) -> None:
    state_dict = tmp_path / "weights"
    state_dict.mkdir()
    torch.save(network.state_dict(), state_dict / "model.pth")
    message = package_project(tmp_path / "a", state_dict, inputs=INPUTS, expect=5)
    assert "model.pth holds weights without the module's code" in message and "code/inference.py" in message
    scripted = pt_testing.torchscript(tmp_path / "ts", network).parent
    message = package_project(tmp_path / "b", scripted, expect=5)
    assert "does not carry its input shapes: set [model.inputs.NAME] shape" in message
    no_fn = pt_testing.inference_layout(tmp_path / "nofn", network, model_fn="import torch\n")
    message = package_project(tmp_path / "c", no_fn, inputs=INPUTS, expect=5)
    assert "code/inference.py defines no model_fn(model_dir)" in message


def test_a_dynamo_export_given_as_one_onnx_file_packages_with_its_data(tmp_path: Path,
                                                                        network: torch.nn.Module) -> None:
    exported = tmp_path / "export" / "model.onnx"
    exported.parent.mkdir()
    torch.onnx.export(network, (torch.zeros(SHAPE),), str(exported), input_names=["data"], dynamo=True,
                      verbose=False)
    assert (exported.parent / "model.onnx.data").is_file(), "torch writes the weights as external data"
    report = package_project(tmp_path / "p", exported)
    assert report["framework"] == "onnx" and report["parity"]["passed"]
    alone = tmp_path / "alone" / "model.onnx"
    alone.parent.mkdir()
    shutil.copyfile(exported, alone)
    message = package_project(tmp_path / "q", alone, expect=4)
    assert "keeps its weights in model.onnx.data, which is not beside it" in message
    escape = tmp_path / "escape"
    escape.mkdir()
    onnx.save(onnx.load(str(exported)), str(escape / "model.onnx"), save_as_external_data=True,
              location="../stolen.data")
    message = package_project(tmp_path / "r", escape / "model.onnx", expect=4)
    assert "outside its folder" in message


def test_plugins_lists_pytorch() -> None:
    assert "pytorch" in cli("plugins").stdout


def test_a_pytorch_bundle_runs_on_the_local_device(tmp_path: Path, layouts: dict[str, Path]) -> None:
    config = example_project(tmp_path)
    config.write_text(config.read_text().replace('source = "model.tar.gz"', f'source = "{layouts["inference"]}"'))
    bundle = testing.build(config).bundle
    broker = Broker(tmp_path)
    broker.start()
    try:
        summary = run_device(bundle, DeviceOptions(device_dir=tmp_path / "device", mqtt_port=broker.port,
                                                   max_frames=3), reporter=Reporter(quiet=True),
                             stop=threading.Event(), public_key=bundle.parent.parent / "signing-key.pub.pem")
    finally:
        broker.stop()
    assert summary.published == 3 and summary.dropped == 0 and summary.frames >= 3
