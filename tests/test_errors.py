"""Every bad input: one clear error naming what is wrong and what to do, and nothing at the output path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers import cli, error_line, package_json

from deeplens_build import (
    Artifact,
    ModelFiles,
    onnxtools,
    testing,
)
from deeplens_build.errors import ParityError, PluginError


def test_rejects_model_name_without_deeplens_prefix(tmp_path: Path, onnx_model_dir: Path) -> None:
    config = testing.write_project(tmp_path / "p", source=onnx_model_dir, name="squeezenet")
    message = package_json(config, expect=3)
    assert "Field `model.name` model names must start with 'deeplens-'" in message
    assert "'deeplens-squeezenet'" in message


def test_rejects_corrupt_onnx(tmp_path: Path) -> None:
    source = tmp_path / "out"
    source.mkdir()
    (source / "model.onnx").write_bytes(b"\x08\x07garbage that is not a protobuf" * 3)
    message = package_json(testing.write_project(tmp_path / "p", source=source), expect=5)
    assert message.startswith("error: plugin 'onnx' could not convert model.onnx:")
    assert "model.onnx is not a valid ONNX model" in message


def test_onnx_weights_pointing_outside_the_training_output_are_refused(tmp_path: Path) -> None:
    """External data names a file: a hostile model names one beside the training output (a secret, a device)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    (tmp_path / "secret").write_text("canary: not a weight\n" * 4)
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../secret"), ("offset", "0"), ("length", "64")):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    (tmp_path / "out").mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "out" / "m.onnx"))
    message = package_json(testing.write_project(tmp_path / "p", source=tmp_path / "out"), expect=5)
    assert message.startswith("error: plugin 'onnx' could not convert m.onnx: m.onnx is not a valid ONNX model")
    assert "points outside the directory" in message
    assert not list((tmp_path / "p").rglob("*.tar.zst"))


def test_no_plugin_claims_the_files(tmp_path: Path) -> None:
    source = tmp_path / "out"
    source.mkdir()
    (source / "weights.bin").write_bytes(b"0" * 10)
    message = package_json(testing.write_project(tmp_path / "p", source=source), expect=4)
    assert "no plugin recognises the model" in message and "weights.bin" in message
    assert "installed plugins: caffe (deeplens-build-caffe 0.1.0), mxnet (deeplens-build-mxnet 0.1.0), onnx" in message


def test_unknown_explicit_framework_lists_the_installed_plugins(tmp_path: Path, onnx_model_dir: Path) -> None:
    config = testing.write_project(tmp_path / "p", source=onnx_model_dir, model={"framework": "jax"})
    message = package_json(config, expect=5)
    assert "no plugin provides framework 'jax'; installed: caffe (deeplens-build-caffe 0.1.0), mxnet" in message


def test_missing_lambda_folder_names_the_key(tmp_path: Path, onnx_model_dir: Path) -> None:
    config = testing.write_project(tmp_path / "p", source=onnx_model_dir,
                                   **{"lambda": {"source": "no-such-folder"}})
    assert "Field `lambda.source` points to" in package_json(config, expect=3)


def test_missing_labels_file_names_the_key(tmp_path: Path, onnx_model_dir: Path) -> None:
    config = testing.write_project(tmp_path / "p", source=onnx_model_dir, model={"labels": "nope.txt"})
    assert "Field `model.labels` points to" in package_json(config, expect=3)


def test_unknown_config_key_is_named(tmp_path: Path, onnx_model_dir: Path) -> None:
    config = testing.write_project(tmp_path / "p", source=onnx_model_dir, parity={"tolerence": 0.1})
    assert "Field `parity.tolerence` is not a known setting" in package_json(config, expect=3)


def test_bad_shape_is_named_with_its_key_path(tmp_path: Path, onnx_model_dir: Path) -> None:
    config = testing.write_project(tmp_path / "p", source=onnx_model_dir, inputs={"data": {"shape": [1, -3]}})
    assert "Field `model.inputs.data.shape.1`" in package_json(config, expect=3)


def test_shape_for_an_input_the_model_lacks(tmp_path: Path, onnx_model_dir: Path) -> None:
    config = testing.write_project(tmp_path / "p", source=onnx_model_dir, inputs={"image": {"shape": [1, 3]}})
    assert "`model.inputs` names image, which the model does not have; its inputs are data" in package_json(config, expect=3)


def test_missing_config_file(tmp_path: Path) -> None:
    result = cli("package", "--config", tmp_path / "deeplens.toml", expect=3)
    assert "no deeplens.toml at" in error_line(result)


def test_missing_signing_key_fails_before_any_work(tmp_path: Path, onnx_model_dir: Path) -> None:
    config = testing.write_project(tmp_path / "p", source=onnx_model_dir)
    result = cli("package", "--config", config, expect=9)
    assert "no signing key" in error_line(result) and "deeplens-build keygen" in error_line(result)
    assert not (config.parent / ".deeplens").exists()


def _convert_copy(source, model, workdir):
    target = workdir / "model.onnx"
    target.write_bytes(source.path(model.files[0]).read_bytes())
    inputs, outputs = onnxtools.interface(onnxtools.load(target))
    return Artifact(format="onnx", path=target, inputs=inputs, outputs=outputs)


BROKEN_OPTIMIZER = testing.fake_plugin(
    "broken",  # its 'original' disagrees with its artifact, as after a broken optimization
    detect=lambda source: ModelFiles(files=found) if (found := source.matching(".broken.onnx")) else None,
    convert=_convert_copy,
    reference_run=lambda source, model, inputs: {name: value + 0.05 for name, value in
                                                 onnxtools.run(source.path(model.files[0]), inputs).items()})


def _pixel_boxes(path: Path) -> Path:
    """A detector-like head: its output is its input scaled to pixel coordinates (up to ~1000)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    scale = numpy_helper.from_array(np.full((1, 8), 320.0, np.float32), "scale")
    graph = helper.make_graph([helper.make_node("Mul", ["x", "scale"], ["boxes"])], "boxes",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 8])], [scale])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _reordered_by(relative: float):
    """A plugin whose original differs from the artifact by ``relative`` of each value: 4e-7 is what reordering
    a float sum does; 1e-2 is a genuinely wrong artifact."""
    return testing.fake_plugin(
        "boxes", detect=lambda source: ModelFiles(files=found) if (found := source.matching(".boxes.onnx")) else None,
        convert=_convert_copy,
        reference_run=lambda source, model, inputs: {name: value * (1 + relative) for name, value in
                                                     onnxtools.run(source.path(model.files[0]), inputs).items()})


def test_large_valued_outputs_pass_fp32_parity_by_default_and_a_wrong_artifact_still_fails(tmp_path: Path) -> None:
    source = _pixel_boxes(tmp_path / "out" / "head.boxes.onnx").parent
    config = testing.write_project(tmp_path / "p", source=source, inputs={"x": {"shape": [1, 8]}})
    report = testing.build(config, plugins=[_reordered_by(4e-7)], entry_points=False).parity
    assert report.passed and report.max_abs_diff > 1e-4, "beyond the absolute tolerance, within the relative one"
    assert report.rtol == 1e-5 and report.outputs[0].passed
    wrong = testing.write_project(tmp_path / "q", source=source, inputs={"x": {"shape": [1, 8]}})
    with pytest.raises(ParityError) as error:
        testing.build(wrong, plugins=[_reordered_by(1e-2)], entry_points=False)
    assert "beyond tolerance 0.0001 + rtol 1e-05 × |original|" in str(error.value)
    assert "model.precision" not in str(error.value), "fp32 is in force already: never advised"
    own = testing.write_project(tmp_path / "r", source=source, inputs={"x": {"shape": [1, 8]}},
                                parity={"outputs": {"boxes": {"rtol": 0.02}}})
    report = testing.build(own, plugins=[_reordered_by(1e-2)], entry_points=False).parity
    assert report.passed and report.outputs[0].rtol == 0.02


def _convert_native(source, model, workdir):
    artifact = _convert_copy(source, model, workdir)
    return Artifact(format="acme-native", path=artifact.path, inputs=artifact.inputs, outputs=artifact.outputs)


def test_a_native_artifact_no_device_module_can_load_is_refused(tmp_path: Path) -> None:
    native = testing.fake_plugin(
        "acme", detect=lambda source: ModelFiles(files=found) if (found := source.matching(".onnx")) else None,
        convert=_convert_native)
    config = testing.write_project(tmp_path / "p", source=testing.onnx_classifier(tmp_path / "out" / "m.onnx").parent)
    with pytest.raises(PluginError, match=r"plugin 'acme' made a native acme-native artifact but ships no device "
                                          r"module \(Framework.device_module\)"):
        testing.build(config, plugins=[native], entry_points=False)
    assert not (config.parent / "dist").exists()


def _detector(path: Path) -> Path:
    """A detector that sees the same scene whatever the frame: rows of [class, score, xmin, ymin, xmax, ymax] in
    pixels (DETECTIONS), padded with class -1."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    scene = helper.make_node("Constant", [], ["scene"], value=numpy_helper.from_array(DETECTIONS))
    graph = helper.make_graph([scene, helper.make_node("Identity", ["scene"], ["detections"])], "ssd",
                              [helper.make_tensor_value_info("frame", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("detections", TensorProto.FLOAT, [1, 4, 6])])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


DETECTIONS = np.array([[[1, 0.9, 10, 10, 110, 110], [2, 0.8, 200, 40, 300, 160], [0, 0.1, 0, 0, 5, 5],
                        [-1, 0, 0, 0, 0, 0]]], np.float32)


def _original_is(change):
    """A plugin whose original gives ``change(DETECTIONS)`` where the artifact gives DETECTIONS."""
    return testing.fake_plugin(
        "ssd", detect=lambda source: ModelFiles(files=found) if (found := source.matching(".onnx")) else None,
        convert=_convert_copy, reference_run=lambda source, model, inputs: {"detections": change(DETECTIONS.copy())})


def _shifted(rows):
    rows[..., 2:] += 1.5  # a pixel and a half: element by element far beyond 1e-4, the same boxes to a user
    return rows


def _swapped(rows):
    rows[0, [0, 1], 0] = rows[0, [1, 0], 0]  # the two confident detections exchange their classes
    return rows


def test_detector_outputs_are_compared_as_detections(tmp_path: Path) -> None:
    source = _detector(tmp_path / "out" / "ssd.onnx").parent
    tables = {"model": {"task": "detection"}}
    config = testing.write_project(tmp_path / "p", source=source, **tables)
    report = testing.build(config, plugins=[_original_is(_shifted)], entry_points=False).parity
    assert report.passed and report.max_abs_diff == pytest.approx(1.5)
    assert report.outputs[0].detection_agreement == 1.0
    wrong = testing.write_project(tmp_path / "q", source=source, **tables)
    with pytest.raises(ParityError, match=r"detections agreeing 0% \(class, IoU and score; \[parity.detection\]\)"):
        testing.build(wrong, plugins=[_original_is(_swapped)], entry_points=False)


def test_parity_failure_names_the_output_and_figures_and_writes_nothing(tmp_path: Path) -> None:
    source = tmp_path / "out"
    testing.onnx_classifier(source / "net.broken.onnx")
    config = testing.write_project(tmp_path / "p", source=source, inputs={"data": {"shape": [1, 3, 32, 32]}})
    with pytest.raises(ParityError) as error:
        testing.build(config, plugins=[BROKEN_OPTIMIZER], entry_points=False)
    message = str(error.value)
    assert ("parity failed for output 'prob' on onnxruntime: max abs diff 0.05, max rel diff" in message
            and "beyond tolerance 0.0001 + rtol 1e-05 × |original|" in message)
    assert "4 samples, seed 0" in message
    assert not (config.parent / "dist").exists()
    cache = config.parent / ".deeplens" / "cache"
    assert not (cache / "parity").exists() or not any(p.name != ".build" for p in (cache / "parity").iterdir())


REFUSED_SETTINGS = {
    "negative seed": ({"parity": {"seed": -1}}, "Field `parity.seed`"),
    "sample count past the bound": ({"parity": {"random_samples": 10_000_000}}, "Field `parity.random_samples`"),
    "sample count as a string": ({"parity": {"random_samples": "8"}}, "Field `parity.random_samples`"),
    "infinite tolerance": ({"parity": {"tolerance": float("inf")}}, "Field `parity.tolerance`"),
    "tolerance as a string": ({"parity": {"tolerance": "0.1"}}, "Field `parity.tolerance`"),
    "300-character model name": ({"model": {"name": "deeplens-" + "a" * 291}}, "Field `model.name` is 300 characters"),
    "lambda name with a parent path": ({"lambda": {"source": "lambda", "name": "../evil"}}, "Field `lambda.name`"),
    "handler that is code": ({"lambda": {"source": "lambda", "handler": "os;import os.x"}}, "Field `lambda.handler`"),
    "environment variable with a space": ({"lambda": {"source": "lambda", "environment": {"A B": "1"}}},
                                          "Field `lambda.environment"),
    "fetch limit as a string": ({"fetch": {"max_bytes": "100"}}, "Field `fetch.max_bytes`"),
    "a device Python listed twice": ({"target": {"python": ["3.11", "3.11"]}}, "Field `target.python`"),
    "the removed runtime image": ({"runtime": {"vendor": True, "image": True}},
                                  "`runtime.image` is gone: the image it built held data only and no device ran it"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_SETTINGS))
def test_refused_setting_is_one_error_naming_the_key(tmp_path: Path, onnx_model_dir: Path, case: str) -> None:
    tables, expected = REFUSED_SETTINGS[case]
    tables = dict(tables)
    model = tables.pop("model", {})
    config = testing.write_project(tmp_path / "p", source=onnx_model_dir, **tables)
    if model:  # write_project takes the name apart from the other model settings
        config = testing.write_project(tmp_path / "p", source=onnx_model_dir, name=model["name"], **tables)
    if "lambda" in tables:
        (config.parent / "lambda").mkdir(exist_ok=True)
        (config.parent / "lambda" / "inference.py").write_text(testing.MINIMAL_LAMBDA)
    assert expected in package_json(config, expect=3)
    assert not (tmp_path / "evil.zip").exists()


@pytest.mark.parametrize("key", ["work_dir", "output"])
def test_build_folder_that_is_a_file_is_named(tmp_path: Path, onnx_model_dir: Path, key: str) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "a-file").write_text("not a folder")
    config = testing.write_project(tmp_path / "p", source=onnx_model_dir, build={key: "a-file"})
    assert f"Field `build.{key}` points to" in package_json(config, expect=3)


def test_output_option_that_is_a_file_is_named(tmp_path: Path, project: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    key = testing.signing_key(project.parent)
    result = cli("package", "--config", project, "--signing-key", key, "--output", tmp_path / "a-file", expect=2)
    assert "--output" in error_line(result) and "Traceback" not in result.output


def test_an_unexpected_exception_is_one_line_with_its_own_exit_code(tmp_path: Path, monkeypatch) -> None:
    import deeplens_build.bundle

    def broken(*args, **kwargs):
        raise KeyError("something we did not foresee")

    monkeypatch.setattr(deeplens_build.bundle, "verify_bundle", broken)
    result = cli("verify", tmp_path / "any.tar.gz", expect=1)
    assert error_line(result) == ("error: internal error: KeyError: 'something we did not foresee' (run with --debug "
                                  "for the traceback; please report it)")
    assert "Traceback" not in result.output


def test_keygen_under_umask_000_makes_nothing_writable_by_others(tmp_path: Path) -> None:
    import stat
    import subprocess
    import sys

    out = tmp_path / "keys" / "nested" / "release.pem"
    subprocess.run([sys.executable, "-m", "deeplens_build.cli", "keygen", "--out", str(out)], check=True,
                   capture_output=True, preexec_fn=lambda: os.umask(0))
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in
             (out, out.with_name("release.pub.pem"), out.parent, out.parent.parent)}
    assert modes == {"release.pem": 0o600, "release.pub.pem": 0o644, "nested": 0o700, "keys": 0o700}


def test_usage_mistakes_are_one_error_line_and_a_bare_command_shows_the_help() -> None:
    assert "error: No such command 'pakage'" in error_line(cli("pakage", expect=2))
    assert "error: No such option '--sourse'" in error_line(cli("package", "--sourse", "x", expect=2))
    assert cli().output.startswith("Usage: ")  # in-process the program name is the function's


def test_a_config_nested_too_deeply_is_one_error(tmp_path: Path) -> None:
    config = tmp_path / "deeplens.toml"
    config.write_text("[model]\nname = \"deeplens-x\"\ndeep = " + "[" * 50_000 + "]" * 50_000 + "\n")
    line = error_line(cli("package", "--config", config, expect=3))
    assert "nests arrays or tables too deeply" in line, line


def test_an_input_shape_too_large_to_check_is_refused_before_any_work(tmp_path: Path, onnx_model_dir: Path) -> None:
    config = testing.write_project(tmp_path / "p", source=onnx_model_dir,
                                   inputs={"data": {"shape": [200_000, 3, 32, 32]}})
    line = package_json(config, expect=3)
    assert "input 'data' of shape [200000, 3, 32, 32] is 2457600000 bytes per sample" in line, line
    assert "`parity.max_bytes`" in line
    assert not (config.parent / ".deeplens" / "cache" / "convert").exists(), "refused before any conversion"
