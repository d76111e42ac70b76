"""`run` and `watch` against a real MQTT broker: Debian's mosquitto on 127.0.0.1, started by these tests."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from deeplens_build import onnxtools, testing
from deeplens_build.device import DeviceOptions, run_device, watch
from deeplens_build.errors import VerificationError
from deeplens_build.report import Reporter

EXAMPLE = Path(__file__).parent.parent / "examples" / "classifier"
THING = "deeplens_test"


class Broker:
    def __init__(self, workdir: Path):
        if shutil.which("mosquitto") is None:
            pytest.skip("mosquitto is not installed; .ci/run installs it")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(["mosquitto", "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.process:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def broker(tmp_path: Path):
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def example_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("example")
    project = shutil.copytree(EXAMPLE, root / "classifier", ignore=shutil.ignore_patterns(".deeplens", "dist"))
    return testing.build(project / "deeplens.toml").bundle


def _frames(folder: Path, count: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(11)
    for i in range(count):
        np.save(folder / f"{i:04d}.npy", rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8))
    return folder


def _subscribe(port: int, count: int) -> tuple[list[dict], threading.Thread, threading.Event]:
    received: list[dict] = []
    stop = threading.Event()
    thread = threading.Thread(target=watch, args=("127.0.0.1", port, THING),
                              kwargs={"count": count, "emit": received.append, "stop": stop}, daemon=True)
    thread.start()
    time.sleep(0.5)  # subscribed before the device publishes
    return received, thread, stop


def test_twenty_frames_give_twenty_messages_equal_to_onnxruntime(broker: Broker, example_bundle: Path,
                                                                 tmp_path: Path) -> None:
    frames = _frames(tmp_path / "frames", 20)
    received, thread, _ = _subscribe(broker.port, 20)
    options = DeviceOptions(device_dir=tmp_path / "device", mqtt_port=broker.port, thing=THING,
                            frames=str(frames), max_frames=20)
    summary = run_device(example_bundle, options, reporter=Reporter(quiet=True), stop=threading.Event())
    thread.join(timeout=20)
    assert summary.frames == summary.published == 20 and summary.topic == f"$aws/things/{THING}/infer"
    assert sorted(r["frame"] for r in received) == list(range(1, 21))

    model = next((tmp_path / "device").glob("*/model"))
    sys.path.insert(0, str(next((tmp_path / "device").glob("*/code"))))
    try:
        from preprocess import to_tensor
    finally:
        sys.path.pop(0)
    session = onnxtools.session_for(model / "model.onnx")
    by_frame = {r["frame"]: r for r in received}
    for index, path in enumerate(sorted(frames.iterdir()), start=1):
        scores = session.run(None, {"data": to_tensor(np.load(path), [1, 3, 32, 32])})[0][0]
        assert by_frame[index]["index"] == int(scores.argmax())


def test_tampered_bundle_is_refused(example_bundle: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered.tar.gz"
    data = bytearray(example_bundle.read_bytes())
    data[-300] ^= 0xFF
    tampered.write_bytes(bytes(data))
    with pytest.raises(VerificationError):
        run_device(tampered, DeviceOptions(device_dir=tmp_path / "device"), reporter=Reporter(quiet=True),
                   stop=threading.Event())
    assert not (tmp_path / "device").exists()


def test_broker_restart_buffers_and_reconnects(broker: Broker, example_bundle: Path, tmp_path: Path) -> None:
    options = DeviceOptions(device_dir=tmp_path / "device", mqtt_port=broker.port, thing=THING, max_frames=40,
                            frame_interval=0.05)
    received, thread, stop_watch = _subscribe(broker.port, 40)
    result: dict = {}
    device = threading.Thread(target=lambda: result.setdefault("summary", run_device(
        example_bundle, options, reporter=Reporter(quiet=True), stop=threading.Event())))
    device.start()
    deadline = time.monotonic() + 30
    while len(received) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    broker.stop()
    time.sleep(1.0)  # the device keeps inferring meanwhile
    broker.start()
    device.join(timeout=60)
    stop_watch.set()
    summary = result["summary"]
    assert summary.frames == 40, "inference went on while the broker was down"
    assert summary.reconnects >= 1
    assert summary.published == 40 and summary.dropped == 0, "buffered results were sent after reconnecting"


def test_buffer_is_bounded_when_the_broker_never_answers(example_bundle: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    options = DeviceOptions(device_dir=tmp_path / "device", mqtt_port=closed_port, thing=THING, max_frames=12,
                            buffer=5)
    summary = run_device(example_bundle, options, reporter=Reporter(quiet=True), stop=threading.Event())
    assert (summary.frames, summary.published, summary.dropped) == (12, 0, 12)


def test_sigterm_stops_the_device_cleanly(broker: Broker, example_bundle: Path, tmp_path: Path) -> None:
    received, thread, stop_watch = _subscribe(broker.port, 3)
    command = [sys.executable, "-m", "deeplens_build.cli", "run", str(example_bundle), "--mqtt",
               f"127.0.0.1:{broker.port}", "--thing", THING, "--fps", "20", "--device-dir", str(tmp_path / "d"),
               "--json"]
    device = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    thread.join(timeout=30)
    device.send_signal(signal.SIGTERM)
    out, err = device.communicate(timeout=30)
    assert device.returncode == 0, err
    summary = json.loads(out)
    assert summary["frames"] >= 3 and summary["published"] == summary["frames"]
