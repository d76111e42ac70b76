"""Device loop benchmark: `run` on the example model vs a bare onnxruntime loop on the same frames.

    .venv/bin/python bench/bench_device.py      (needs mosquitto; `make bench` runs it)

The ratio is the overhead of the device loop: a child process importing the Lambda, its JSON lines, and QoS-1
MQTT publishes to a broker on loopback. Start-up (verify, unpack, import) is timed apart from the frames.
"""

from __future__ import annotations

import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from common import median_seconds

from deeplens_build import onnxtools, testing
from deeplens_build.device.run import DeviceOptions, run_device
from deeplens_build.report import Reporter

FRAMES = 300


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        project = shutil.copytree(Path(__file__).parent.parent / "examples" / "classifier", root / "classifier",
                                  ignore=shutil.ignore_patterns(".deeplens", "dist"))
        bundle = testing.build(project / "deeplens.toml").bundle
        frames = root / "frames"
        frames.mkdir()
        rng = np.random.default_rng(0)
        for i in range(FRAMES):
            np.save(frames / f"{i:04d}.npy", rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8))

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        (root / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
        broker = subprocess.Popen(["mosquitto", "-c", str(root / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        try:
            options = DeviceOptions(device_dir=root / "device", mqtt_port=port, frames=str(frames),
                                    max_frames=FRAMES)
            one = DeviceOptions(device_dir=root / "device", mqtt_port=port, frames=str(frames), max_frames=1)
            key = project / "signing-key.pub.pem"  # testing.build signed with the key beside the project
            startup = median_seconds(lambda: run_device(bundle, one, reporter=Reporter(quiet=True),
                                                        stop=threading.Event(), public_key=key), repeat=3)
            device = median_seconds(lambda: run_device(bundle, options, reporter=Reporter(quiet=True),
                                                       stop=threading.Event(), public_key=key), repeat=3) - startup
        finally:
            broker.terminate()

        sys.path.insert(0, str(next((root / "device").glob("*/code"))))
        from deeplens_preprocess import to_tensor

        session = onnxtools.session_for(next((root / "device").glob("*/model")) / "model.onnx", prepack=True)
        paths = sorted(frames.iterdir())
        per_frame = []

        def bare() -> None:  # reads each frame from disk as the Lambda does
            for path in paths:
                start = time.perf_counter()
                session.run(None, {"data": to_tensor(np.load(path), [1, 3, 32, 32])})[0].argmax()
                per_frame.append(time.perf_counter() - start)

        bare_time = median_seconds(bare, repeat=3)
        print(f"start-up (verify, unpack, import, 1 frame): {startup * 1000:.0f} ms")
        print(f"{FRAMES} frames: run {FRAMES / device:.0f} fps, bare onnxruntime loop {FRAMES / bare_time:.0f} fps "
              f"(per frame {statistics.median(per_frame) * 1000:.2f} ms); run/bare time = {device / bare_time:.2f}")


if __name__ == "__main__":
    main()
