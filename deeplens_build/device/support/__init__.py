"""Every file that runs on a device, in one folder: the publishing module every Lambda ships with, the Lambda
runner, the default backend's model loader and the DeepLens compatibility modules.

The build never imports them (they run on the device's Python, 3.8 and up, beside the runtime it installs): it
ships them, by the names below, and ``tests/device`` runs them as the device does. The one exception is
``deeplens_preprocess`` (numpy only), which the build also runs on INT8 calibration images, so that the device and
the calibration share one definition of the model's input.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent
PUBLISH = FOLDER / "deeplens_publish.py"
"""``deeplens_publish``: results to IPC, greengrasssdk or MQTT, whichever core the Lambda runs under."""
PREPROCESS = FOLDER / "deeplens_preprocess.py"
"""``deeplens_preprocess.to_tensor``: a camera frame to the model's input, as calibrated."""
RUNNER = FOLDER / "deeplens_runner.py"
"""How a core and ``deeplens-build run`` start the Lambda: ``python deeplens_runner.py MODULE CODE_DIR``."""
ONNXRUNTIME_MODEL = FOLDER / "deeplens_model_onnxruntime.py"
"""The built-in ``onnxruntime`` backend's ``deeplens_model.py``."""
COMPAT = FOLDER / "deeplens_compat"
"""The DeepLens device modules (awscam, mo, greengrasssdk, DeepLens_Kinesis_Video)."""
COMPAT_DIR = COMPAT.name
FRAMES_EXHAUSTED = 75
"""The exit status of a Lambda whose emulated camera ran out of frames (a recorded video came to its end; a real
camera never does), given to it as ``DEEPLENS_FRAMES_EXHAUSTED``: ``run`` ends there, restarting nothing."""
"""Where they ship in the Lambda zip, apart from its own modules, so that real ones win."""


def lambda_files(compat: bool) -> dict[str, Path]:
    """What ships beside every Lambda's own files, zip path → file (the compatibility modules when ``compat``)."""
    files = {path.name: path for path in (PUBLISH, PREPROCESS, RUNNER)}
    if compat:
        files.update({f"{COMPAT_DIR}/{path.name}": path for path in sorted(COMPAT.glob("*.py"))})
    return files
