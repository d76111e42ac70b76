"""The Caffe plugin: real tiny Caffe models written by the tests, parity against OpenCV's Caffe importer."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest
from helpers import package_project

from deeplens_build import testing

caffe_testing = pytest.importorskip("deeplens_build_caffe.testing", reason="the caffe plugin is a built-in")


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory) -> Path:
    return caffe_testing.write_model(tmp_path_factory.mktemp("caffe") / "out", snapshots=(1000, 3000, 2000))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tar_with_snapshots_packages_the_highest_iteration(tmp_path: Path, snapshots: Path, precision: str) -> None:
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(snapshots, arcname=".")
    report = package_project(tmp_path, archive, model={"precision": precision})
    assert report["framework"] == "caffe" and report["parity"]["passed"]
    assert any("packaging only the highest, model_iter_3000.caffemodel" in n for n in report["notes"])
    manifest = testing.verify(Path(report["bundle"])).manifest.to_dict()
    assert manifest["source"]["model_files"] == ["deploy.prototxt", "model_iter_3000.caffemodel"]
    assert manifest["model"]["inputs"][0]["shape"] == [1, 3, 16, 16]
    assert manifest["model"]["inputs"][0]["layout"] == "NCHW"
    assert manifest["parity"]["outputs"][0]["top1_agreement"] == 1.0


def test_prototxt_without_input_shape_takes_it_from_config(tmp_path: Path) -> None:
    source = _with_declared_input(tmp_path / "out")
    missing = package_project(tmp_path / "a", source, expect=5)
    assert "gives input 'data' no shape; set `model.inputs.data.shape`" in missing
    report = package_project(tmp_path / "b", source, inputs={"data": {"shape": [1, 3, 16, 16]}})
    assert report["parity"]["passed"]


def _with_declared_input(folder: Path) -> Path:
    """The older prototxt style: `input: "data"` with no Input layer (and here, no input_shape)."""
    caffe_testing.write_model(folder)
    text = (folder / "deploy.prototxt").read_text()
    start = text.index("layer {")
    end = text.index("layer {", start + 1)
    (folder / "deploy.prototxt").write_text('input: "data"\n' + text[:start] + text[end:])
    return folder


def test_truncated_caffemodel_is_a_clear_error(tmp_path: Path, snapshots: Path) -> None:
    source = tmp_path / "out"
    shutil.copytree(snapshots, source)
    weights = source / "model_iter_3000.caffemodel"
    weights.write_bytes(weights.read_bytes()[:-777])
    message = package_project(tmp_path, source, expect=5)
    assert "model_iter_3000.caffemodel is truncated or damaged" in message


def test_prototxt_and_caffemodel_of_different_models(tmp_path: Path) -> None:
    def wider(net, add):
        caffe_testing.residual_net(net, add)
        net.layer[-3].inner_product_param.num_output = 12

    other = caffe_testing.write_model(tmp_path / "other", wider)
    source = caffe_testing.write_model(tmp_path / "out")
    shutil.copyfile(other / "model.caffemodel", source / "model.caffemodel")
    message = package_project(tmp_path, source, expect=5)
    assert "layer 'fc': deploy.prototxt says 10 outputs but model.caffemodel holds weights of shape [12, 1024]" in message


def test_unsupported_layer_names_its_type_and_name(tmp_path: Path) -> None:
    def with_argmax(net, add):
        caffe_testing.residual_net(net, add)
        add("top1", "ArgMax", ["prob"], ["top1"])

    source = caffe_testing.write_model(tmp_path / "out", with_argmax)
    message = package_project(tmp_path, source, expect=5)
    assert "layer 'top1' of type 'ArgMax' cannot be converted by caffe2onnx" in message


def test_conversion_keeps_the_fast_protobuf_backend(tmp_path: Path, snapshots: Path) -> None:
    import os

    from google.protobuf.internal import api_implementation

    package_project(tmp_path, snapshots)
    assert api_implementation.Type() != "python"
    assert "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION" not in os.environ


def test_a_detection_output_it_cannot_reproduce_is_named_before_conversion(tmp_path: Path) -> None:
    def per_class_boxes(net, add):
        caffe_testing.tiny_ssd(net, add)
        net.layer[-1].detection_output_param.share_location = False

    source = caffe_testing.write_model(tmp_path / "out", per_class_boxes)
    message = package_project(tmp_path, source, expect=5, model={"task": "detection"})
    assert "layer 'detection_out' (DetectionOutput) of deploy.prototxt cannot be converted to standard ONNX" in message
    assert "share_location: false" in message


def test_a_prior_box_outside_a_detector_is_named(tmp_path: Path) -> None:
    def priors_only(net, add):
        caffe_testing.tiny_ssd(net, add)
        del net.layer[-1]

    source = caffe_testing.write_model(tmp_path / "out", priors_only)
    message = package_project(tmp_path, source, expect=5, model={"task": "other"})
    assert "(PriorBox) has no standard ONNX conversion" in message
