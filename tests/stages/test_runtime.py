"""Runtime selection and vendoring, with a local wheelhouse the test builds (no network)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from helpers import package_project, runtime_definition, wheel

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
    assert "cannot vendor runtime tiny for linux-x86_64" in message and "tinyrt==1.0" in message
