"""The example's inference Lambda, run as Greengrass would: imported once, its loop publishing JSON per frame."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from helpers import EXAMPLE, example_project, open_bundle

from deeplens_build import onnxtools, testing


def test_template_publishes_one_prediction_per_frame_matching_onnxruntime(tmp_path: Path) -> None:
    bundle = testing.build(example_project(tmp_path)).bundle
    device = tmp_path / "device"
    with open_bundle(bundle) as tar:
        tar.extractall(device, filter="data")
    with zipfile.ZipFile(next((device / "lambda").glob("*.zip"))) as code:
        code.extractall(device / "code")
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(7)
    for i in range(5):
        np.save(frames / f"{i:03d}.npy", rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8))

    env = {**os.environ, "DEEPLENS_MODEL_DIR": str(device / "model"), "DEEPLENS_FRAMES": str(frames),
           "DEEPLENS_MAX_FRAMES": "5", "AWS_IOT_THING_NAME": "deeplens_test"}
    out = subprocess.run([sys.executable, "-c", "import inference"], cwd=device / "code", env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    results = [json.loads(line) for line in out.splitlines()]
    assert [r["frame"] for r in results] == [1, 2, 3, 4, 5]

    sys.path.insert(0, str(device / "code"))
    try:
        from deeplens_preprocess import to_tensor  # what the Lambda zip carries
    finally:
        sys.path.pop(0)
    labels = (device / "model" / "labels.txt").read_text().splitlines()
    session = onnxtools.session_for(device / "model" / "model.onnx")
    for result, path in zip(results, sorted(frames.iterdir()), strict=True):
        scores = session.run(None, {"data": to_tensor(np.load(path), [1, 3, 32, 32])})[0][0]
        assert result["index"] == int(scores.argmax()) and result["label"] == labels[result["index"]]
        assert abs(result["score"] - float(scores.max())) < 1e-6


def test_what_ships_into_a_lambda_runs_on_python_3_8() -> None:
    """Greengrass v1 cores (DeepLens included) run Python 3.7/3.8 Lambdas: the publishing module, the runner, the
    DeepLens modules, every installed target backend's device files and the example Lambda need no newer Python
    (checked by vermin, which reads the code: no 3.8 interpreter needed)."""
    from deeplens_build.device import support
    from deeplens_build.plugins import build_plugin_manager

    backends = build_plugin_manager().targets
    files = [*support.lambda_files(compat=True).values(), *sorted(EXAMPLE.glob("lambda/*.py")),
             *(path for info in backends for path in (info.backend.device_module, info.backend.device_build) if path)]
    assert {info.backend.name for info in backends} >= {"onnxruntime", "openvino", "tensorrt"}
    done = subprocess.run([Path(sys.executable).parent / "vermin", "--no-tips", "--target=3.8-", "--violations",
                           "--eval-annotations", *map(str, files)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
