"""The recipe's lifecycle scripts run as the nucleus runs them (``sh``, the recipe variables replaced), here as
this user in a scratch device folder: the runtime goes into a virtual environment in ``{work:path}``, offline
from the artifacts, once; the scripts are checked as shell before a bundle holds them."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import open_bundle, package_json, runtime_definition, wheel

from deeplens_build import testing
from deeplens_build.aws.lifecycle import check_shell
from deeplens_build.errors import BundleError

HERE = f"{sys.version_info.major}.{sys.version_info.minor}"


def _bundle(tmp_path: Path, onnx_model_dir: Path, **tables: object) -> dict:
    """A bundle vendoring a tiny runtime pinned for this machine's Python; its recipe and its files."""
    wheelhouse = tmp_path / "wheelhouse"
    wheel(wheelhouse, "tinyrt", "1.0")
    definitions = runtime_definition(tmp_path / "runtimes", "tiny", ["tinyrt==1.0"], python=HERE)
    runtime = {"name": "tiny", "definitions": str(definitions), "vendor": True, "index": False,
               "find_links": [str(wheelhouse)]}
    config = testing.write_project(tmp_path / "project", source=onnx_model_dir, runtime=runtime, **tables)
    artifacts = tmp_path / "device" / "artifacts"
    artifacts.mkdir(parents=True)
    with open_bundle(package_json(config)["bundle"]) as tar:
        recipe = json.loads(tar.extractfile("greengrass/recipe.json").read())
        for member in tar.getmembers():  # the nucleus lays every artifact side by side
            if member.isreg() and member.name.rsplit("/", 1)[-1] in {
                    a["Uri"].rsplit("/", 1)[-1] for a in recipe["Manifests"][0]["Artifacts"]}:
                (artifacts / member.name.rsplit("/", 1)[-1]).write_bytes(tar.extractfile(member).read())
    return recipe


def _script(recipe: dict, step: str, tmp_path: Path) -> str:
    script = recipe["Manifests"][0]["Lifecycle"][step]["Script"]
    return (script.replace("{artifacts:path}", str(tmp_path / "device" / "artifacts"))
            .replace("{artifacts:decompressedPath}", str(tmp_path / "device" / "unarchived"))
            .replace("{work:path}", str(tmp_path / "device" / "work")))


def _sh(script: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env={"PATH": path or os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")})


def test_install_makes_a_virtual_environment_in_the_work_folder_once(tmp_path: Path, onnx_model_dir: Path) -> None:
    recipe = _bundle(tmp_path, onnx_model_dir)
    (tmp_path / "device" / "work").mkdir()
    first = _sh(_script(recipe, "Install", tmp_path))
    assert first.returncode == 0, first.stderr
    assert f"deeplens: Python {HERE} (" in first.stderr and f"the bundle supports {HERE}" in first.stderr
    venv = tmp_path / "device" / "work" / "venv"
    done = subprocess.run([str(venv / "bin" / "python"), "-c", "import tinyrt; print(tinyrt.VERSION)"],
                          capture_output=True, text=True)
    assert done.stdout.strip() == "1.0", "installed offline from the artifacts, into the work folder's venv"
    before = (venv / "bin" / "python").lstat().st_mtime_ns
    second = _sh(_script(recipe, "Install", tmp_path))
    assert second.returncode == 0 and "the runtime is installed already" in second.stderr, second.stderr
    assert (venv / "bin" / "python").lstat().st_mtime_ns == before, "a second start does not reinstall"


def test_a_device_without_a_supported_python_is_told_which_it_needs(tmp_path: Path, onnx_model_dir: Path) -> None:
    recipe = _bundle(tmp_path, onnx_model_dir)
    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("sh", "cat", "rm", "printf"):
        (bare / tool).symlink_to(subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True,
                                                text=True).stdout.strip() or f"/bin/{tool}")
    done = _sh(_script(recipe, "Install", tmp_path), path=str(bare))
    assert done.returncode == 1
    assert f"deeplens: no Python this bundle supports ({HERE}) on this device" in done.stderr, done.stderr


def test_streaming_to_kinesis_video_needs_kvssink_on_the_device(tmp_path: Path, onnx_model_dir: Path) -> None:
    recipe = _bundle(tmp_path, onnx_model_dir, device={"kinesis_video_stream": "deeplens-stream"})
    (tmp_path / "device" / "work").mkdir()
    missing = _sh(_script(recipe, "Install", tmp_path))
    assert missing.returncode == 1 and "needs the KVS producer GStreamer element kvssink" in missing.stderr
    stand_in = tmp_path / "gst" / "gst-inspect-1.0"  # answers for kvssink as the producer's plugin would
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\n[ \"$1\" = kvssink ]\n")
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IEXEC)
    present = _sh(_script(recipe, "Install", tmp_path), path=f"{stand_in.parent}:{os.environ['PATH']}")
    assert present.returncode == 0, present.stderr


def test_a_script_that_is_not_valid_shell_fails_the_build_not_the_device() -> None:
    check_shell("echo fine\n", "Install")
    with pytest.raises(BundleError, match="the recipe's Install script is not valid shell"):
        check_shell("if true; then echo unterminated\n", "Install")
