"""Bundles of each target backend on the local device: the example Lambda loads whatever the bundle targets
through the ``deeplens_model`` module the backend ships, and says where it runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import Broker, example_project

from deeplens_build import testing


def _example_bundle(root: Path, **target: str) -> Path:
    return testing.build(example_project(root, **target)).bundle


def _run(bundle: Path, broker: Broker, device_dir: Path) -> subprocess.CompletedProcess:
    key = bundle.parent.parent / "signing-key.pub.pem"
    return subprocess.run([sys.executable, "-m", "deeplens_build.cli", "run", str(bundle), "--public-key", str(key),
                           "--mqtt", f"127.0.0.1:{broker.port}", "--max-frames", "3", "--device-dir",
                           str(device_dir), "--json"], capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_openvino_bundle_runs_its_ir_on_this_cpu(broker: Broker, tmp_path: Path) -> None:
    done = _run(_example_bundle(tmp_path, backend="openvino"), broker, tmp_path / "device")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["published"] == 3
    assert "model running on openvino CPU" in done.stderr, "the Lambda says which device runs the model"


def test_tensorrt_bundle_without_tensorrt_says_what_is_missing(broker: Broker, tmp_path: Path) -> None:
    """The on-device compile step runs before the Lambda, as the recipe's Install phase does; here no TensorRT."""
    done = _run(_example_bundle(tmp_path, backend="tensorrt", accelerator="gpu"), broker, tmp_path / "device")
    assert done.returncode == 11, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert lines == [lines[-1]] and "on-device compile step failed" in lines[0]
    assert "TensorRT is not installed for this Python" in lines[0] and "Traceback" not in done.stderr
