"""The example's inference Lambda, run as Greengrass would: imported once, its loop publishing JSON per frame."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from helpers import example_project, open_bundle

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
        from preprocess import to_tensor  # the template's own preprocessing
    finally:
        sys.path.pop(0)
    labels = (device / "model" / "labels.txt").read_text().splitlines()
    session = onnxtools.session_for(device / "model" / "model.onnx")
    for result, path in zip(results, sorted(frames.iterdir()), strict=True):
        scores = session.run(None, {"data": to_tensor(np.load(path), [1, 3, 32, 32])})[0][0]
        assert result["index"] == int(scores.argmax()) and result["label"] == labels[result["index"]]
        assert abs(result["score"] - float(scores.max())) < 1e-6
