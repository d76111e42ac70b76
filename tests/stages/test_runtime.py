"""Runtime selection and vendoring: against a local wheelhouse the tests build, and once against the package
index pip reaches here (the built-in runtime's real pins for an aarch64 Python 3.10 device)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from helpers import open_bundle, package_json, package_project, runtime_definition, wheel

from deeplens_build import testing
from deeplens_build.errors import BundleError, ConfigError
from deeplens_build.stages.runtime import load_runtimes, select_runtime


@pytest.mark.parametrize(("platform", "accelerator", "expected"), [
    ("linux-x86_64", "cpu", "onnxruntime"),
    ("linux-x86_64", "gpu", "onnxruntime-gpu"),
    ("linux-aarch64", "cpu", "onnxruntime"),
    ("linux-aarch64", "gpu", "onnxruntime"),  # no GPU build for aarch64: a GPU device runs the CPU runtime
])
def test_selects_the_runtime_for_format_platform_and_accelerator(platform: str, accelerator: str,
                                                                 expected: str) -> None:
    chosen = select_runtime("onnx", platform, accelerator, wanted="auto", suggested=None, available=load_runtimes())
    assert chosen.name == expected


def test_builtin_definitions_cover_the_frameworks() -> None:
    runtimes = {r.name: r for r in load_runtimes()}
    assert set(runtimes) >= {"onnxruntime", "onnxruntime-gpu", "mxnet", "tensorflow"}
    assert all(all("==" in req for reqs in r.requirements.values() for req in reqs) for r in runtimes.values()), \
        "every requirement is pinned"


def test_no_fitting_runtime_lists_the_candidates() -> None:
    with pytest.raises(BundleError, match=r"no runtime runs a caffe-native artifact.*onnxruntime \(onnx, cpu"):
        select_runtime("caffe-native", "linux-x86_64", "cpu", wanted="auto", suggested=None,
                       available=load_runtimes())
    with pytest.raises(ConfigError, match=r"runtime 'mxnet' cannot run a onnx artifact on linux-x86_64; runtimes "
                                          r"that can: onnxruntime, onnxruntime-gpu"):
        select_runtime("onnx", "linux-x86_64", "cpu", wanted="mxnet", suggested=None, available=load_runtimes())


def test_vendors_the_pinned_wheels_with_their_dependencies(tmp_path: Path, onnx_model_dir: Path) -> None:
    wheelhouse = tmp_path / "wheelhouse"
    wheel(wheelhouse, "tinyrt", "1.0", requires=("tinydep==2.0",))
    wheel(wheelhouse, "tinydep", "2.0")
    wheel(wheelhouse, "tinyrt", "1.1")
    definitions = runtime_definition(tmp_path / "runtimes", "tiny", ["tinyrt==1.0"])
    runtime = {"name": "tiny", "definitions": str(definitions), "vendor": True, "index": False,
               "find_links": [str(wheelhouse)]}
    report = package_project(tmp_path, onnx_model_dir, runtime=runtime, target={"platform": "linux-aarch64"})
    manifest = testing.verify(Path(report["bundle"])).manifest.to_dict()
    wheels = {w["file"]: w["sha256"] for w in manifest["runtime"]["wheels"]}
    assert set(wheels) == {"runtime/wheels/tinyrt-1.0-py3-none-any.whl", "runtime/wheels/tinydep-2.0-py3-none-any.whl"}
    assert wheels["runtime/wheels/tinyrt-1.0-py3-none-any.whl"] == hashlib.sha256(
        (wheelhouse / "tinyrt-1.0-py3-none-any.whl").read_bytes()).hexdigest()
    assert manifest["runtime"]["platform"] == "linux-aarch64" and manifest["runtime"]["python"] == "3.10"

    again = package_project(tmp_path, onnx_model_dir, runtime=runtime, target={"platform": "linux-aarch64"})
    assert again["sha256"] == report["sha256"]


def test_missing_wheel_is_a_clear_error(tmp_path: Path, onnx_model_dir: Path) -> None:
    wheelhouse = tmp_path / "wheelhouse"
    wheel(wheelhouse, "tinyrt", "1.1")
    definitions = runtime_definition(tmp_path / "runtimes", "tiny", ["tinyrt==1.0"])
    message = package_project(tmp_path, onnx_model_dir, expect=7, runtime={
        "name": "tiny", "definitions": str(definitions), "vendor": True, "index": False,
        "find_links": [str(wheelhouse)]})
    assert "cannot vendor runtime tiny: no wheel of tinyrt==1.0 for linux-x86_64 and Python 3.10" in message


def _per_python_wheelhouse(root: Path) -> Path:
    """The same runtime built for three device Pythons, as a real index serves it (one wheel per tag)."""
    for version in ("38", "310", "311"):
        wheel(root, "tinyrt", "1.0", tag=f"cp{version}-cp{version}-manylinux2014_aarch64")
    wheel(root, "tinyrt", "0.9", tag="cp38-cp38-manylinux2014_aarch64")
    return root


@pytest.mark.parametrize(("python", "expected"), [("3.10", "tinyrt-1.0-cp310-cp310-manylinux2014_aarch64.whl"),
                                                  ("3.8", "tinyrt-0.9-cp38-cp38-manylinux2014_aarch64.whl")])
def test_vendors_the_device_pythons_wheels_and_installs_them_with_it(tmp_path: Path, onnx_model_dir: Path,
                                                                     python: str, expected: str) -> None:
    wheelhouse = _per_python_wheelhouse(tmp_path / "wheelhouse")
    definitions = runtime_definition(tmp_path / "runtimes", "tiny", ["tinyrt==1.0"], python="3.11",
                                     pythons={"3.10": ["tinyrt==1.0"], "3.8": ["tinyrt==0.9"]})
    runtime = {"name": "tiny", "definitions": str(definitions), "vendor": True, "index": False,
               "find_links": [str(wheelhouse)]}
    report = package_project(tmp_path, onnx_model_dir, runtime=runtime,
                             target={"platform": "linux-aarch64", "python": python})
    manifest = testing.verify(Path(report["bundle"])).manifest
    assert [Path(w.file).name for w in manifest.runtime.wheels] == [expected]
    assert manifest.runtime.python == python
    with open_bundle(report["bundle"]) as bundle:
        recipe = json.loads(bundle.extractfile("greengrass/recipe.json").read())
    lifecycle = recipe["Manifests"][0]["Lifecycle"]
    install = lifecycle["Install"]["Script"]
    assert "--no-index --find-links {artifacts:path} $requirements" in install
    assert f"case \"$version\" in {python}) python=$candidate" in install, "only the Python the wheels are for"
    assert lifecycle["Run"]["Script"].startswith("exec {work:path}/venv/bin/python -u ")


def test_a_python_without_pins_or_wheels_is_a_clear_error(tmp_path: Path, onnx_model_dir: Path) -> None:
    wheelhouse = _per_python_wheelhouse(tmp_path / "wheelhouse")
    definitions = runtime_definition(tmp_path / "runtimes", "tiny", ["tinyrt==1.0"], python="3.11",
                                     pythons={"3.12": ["tinyrt==1.0"]})
    runtime = {"name": "tiny", "definitions": str(definitions), "vendor": True, "index": False,
               "find_links": [str(wheelhouse)]}
    unpinned = package_project(tmp_path / "a", onnx_model_dir, expect=3, runtime=runtime,
                               target={"platform": "linux-aarch64", "python": "3.9"})
    assert "Field `target.python` is '3.9', but runtime tiny has wheels pinned for Python 3.11, 3.12" in unpinned
    no_wheel = package_project(tmp_path / "b", onnx_model_dir, expect=7, runtime=runtime,
                               target={"platform": "linux-aarch64", "python": "3.12"})
    assert "no wheel of tinyrt==1.0 for linux-aarch64 and Python 3.12" in no_wheel


def test_a_model_past_the_device_runtimes_opset_is_lowered_to_it(tmp_path: Path) -> None:
    """onnxruntime 1.16 (the Python 3.8 pins) loads opset 19 at most: the opset-21 model is converted down."""
    source = tmp_path / "out"
    testing.onnx_classifier(source / "model.onnx", opset=21)
    report = package_project(tmp_path, source, target={"python": "3.8"}, inputs={"data": {"shape": [1, 3, 32, 32]}})
    optimization = testing.verify(Path(report["bundle"])).manifest.optimization
    assert optimization.opset == 19 and "opset-21-to-19" in optimization.passes


def test_vendors_the_builtin_runtime_for_an_aarch64_python_310_device_from_the_index(tmp_path: Path,
                                                                                     onnx_model_dir: Path) -> None:
    """Against the package index pip reaches here: the real pins have cp310 aarch64 wheels."""
    report = package_project(tmp_path, onnx_model_dir, runtime={"vendor": True},
                             target={"platform": "linux-aarch64", "python": "3.10"})
    wheels = [Path(w.file).name for w in testing.verify(Path(report["bundle"])).manifest.runtime.wheels]
    assert any(w.startswith("onnxruntime-1.23.2-cp310-cp310-") and "aarch64" in w for w in wheels), wheels
    assert any(w.startswith("numpy-1.26.4-cp310-cp310-") and "aarch64" in w for w in wheels), wheels
    assert any(w.startswith("awscrt-") and "cp310" in w for w in wheels), wheels


def test_a_wheel_replaced_under_the_same_name_is_vendored_anew(tmp_path: Path, onnx_model_dir: Path) -> None:
    """A find_links wheel rebuilt in place (same file name, other bytes) is not the cached one: the bundle ships
    the new wheel, and the build is not reported up to date."""
    wheelhouse = tmp_path / "wheelhouse"
    wheel(wheelhouse, "tinyrt", "1.0")
    definitions = runtime_definition(tmp_path / "runtimes", "tiny", ["tinyrt==1.0"])
    runtime = {"name": "tiny", "definitions": str(definitions), "vendor": True, "index": False,
               "find_links": [str(wheelhouse)]}
    config = testing.write_project(tmp_path / "project", source=onnx_model_dir, runtime=runtime,
                                   target={"platform": "linux-aarch64"})
    package_json(config)
    replaced = wheelhouse / "tinyrt-1.0-py3-none-any.whl"
    with zipfile.ZipFile(replaced, "a") as rebuilt:  # the same name, other bytes
        rebuilt.writestr("tinyrt/rebuilt.py", "")
    report = package_json(config)
    assert not report["up_to_date"]
    manifest = testing.verify(Path(report["bundle"])).manifest.to_dict()
    [shipped] = manifest["runtime"]["wheels"]
    assert shipped["sha256"] == hashlib.sha256(replaced.read_bytes()).hexdigest(), "the new wheel, not the cached"
