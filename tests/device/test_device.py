"""`run` and `watch` against a real MQTT broker: Debian's mosquitto on 127.0.0.1, started by these tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import Broker, cli, error_line, example_project, files_under

from deeplens_build import onnxtools, testing
from deeplens_build.device.run import (
    DeviceOptions,
    DeviceRunError,
    DeviceSummary,
    run_device,
)
from deeplens_build.device.watch import watch
from deeplens_build.errors import DeviceError, UsageError, VerificationError
from deeplens_build.report import Reporter

THING = "deeplens_test"


@pytest.fixture(scope="module")
def example_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("example")
    return testing.build(example_project(root)).bundle


def _key(bundle: Path) -> Path:
    """The public key beside the project that built ``bundle`` (``testing.build`` signs with it)."""
    return bundle.parent.parent / "signing-key.pub.pem"


def _run(bundle: Path, options: DeviceOptions, stop: threading.Event | None = None) -> DeviceSummary:
    return run_device(bundle, options, reporter=Reporter(quiet=True), stop=stop or threading.Event(),
                      public_key=_key(bundle))


def _lambda_bundle(tmp_path: Path, onnx_model_dir: Path, loop: str, **lambda_settings: object) -> Path:
    """A bundle whose Lambda runs ``loop`` (Python, indented 4) in its module-level thread."""
    code = tmp_path / "lambda-src"
    code.mkdir()
    body = "\n".join("    " + line for line in loop.strip().splitlines())
    (code / "inference.py").write_text("import os, threading\n\nimport deeplens_publish\n\n\n"
                                       f"def _loop():\n{body}\n\n\n"
                                       "threading.Thread(target=_loop).start()\n\n\n"
                                       "def handler(event, context):\n    return None\n")
    config = testing.write_project(tmp_path / "project", source=onnx_model_dir, **{"lambda": {
        "source": str(code), "handler": "inference.handler", **lambda_settings}})
    return testing.build(config).bundle


def _frames(folder: Path, count: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(11)
    for i in range(count):
        np.save(folder / f"{i:04d}.npy", rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8))
    return folder


def _subscribe(port: int, count: int) -> tuple[list[dict], threading.Thread, threading.Event]:
    received: list[dict] = []
    stop, subscribed = threading.Event(), threading.Event()
    thread = threading.Thread(target=watch, args=("127.0.0.1", port, THING), daemon=True,
                              kwargs={"count": count, "emit": received.append, "stop": stop, "subscribed": subscribed})
    thread.start()
    assert subscribed.wait(10), "watch subscribed before the device publishes"
    return received, thread, stop


def test_twenty_frames_give_twenty_messages_equal_to_onnxruntime(broker: Broker, example_bundle: Path,
                                                                 tmp_path: Path) -> None:
    frames = _frames(tmp_path / "frames", 20)
    received, thread, _ = _subscribe(broker.port, 20)
    options = DeviceOptions(device_dir=tmp_path / "device", mqtt_port=broker.port, thing=THING,
                            frames=str(frames), max_frames=20)
    summary = _run(example_bundle, options)
    thread.join(timeout=20)
    assert summary.frames == summary.published == 20 and summary.topic == f"$aws/things/{THING}/infer"
    assert sorted(r["frame"] for r in received) == list(range(1, 21))

    model = next((tmp_path / "device").glob("*/model"))
    sys.path.insert(0, str(next((tmp_path / "device").glob("*/code"))))
    try:
        from deeplens_preprocess import to_tensor
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
                   stop=threading.Event(), public_key=_key(example_bundle))
    assert files_under(tmp_path / "device") == set(), "nothing of a bundle that failed to verify is installed"


@pytest.mark.slow
def test_broker_restart_buffers_and_reconnects(broker: Broker, example_bundle: Path, tmp_path: Path) -> None:
    options = DeviceOptions(device_dir=tmp_path / "device", mqtt_port=broker.port, thing=THING, max_frames=40,
                            frame_interval=0.05)
    received, thread, stop_watch = _subscribe(broker.port, 40)
    result: dict = {}
    device = threading.Thread(target=lambda: result.setdefault("summary", _run(example_bundle, options)))
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


@pytest.mark.slow
def test_buffer_is_bounded_and_lost_results_fail_the_run(broker: Broker, example_bundle: Path,
                                                          tmp_path: Path) -> None:
    options = DeviceOptions(device_dir=tmp_path / "device", mqtt_port=broker.port, thing=THING, max_frames=40,
                            frame_interval=0.05, buffer=5)
    received, _, stop_watch = _subscribe(broker.port, 40)
    errors: list[DeviceRunError] = []

    def device() -> None:
        try:
            _run(example_bundle, options)
        except DeviceRunError as exc:
            errors.append(exc)

    thread = threading.Thread(target=device)
    thread.start()
    deadline = time.monotonic() + 30
    while len(received) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    broker.stop()  # and it never comes back
    thread.join(timeout=60)
    stop_watch.set()
    [error] = errors
    summary = error.summary
    assert summary.frames == 40 and summary.published + summary.dropped == 40
    assert summary.dropped >= 40 - summary.published and summary.dropped > 5, "the oldest were dropped"
    assert "never reached the MQTT broker" in str(error)


def test_unreachable_broker_fails_in_seconds(example_bundle: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    with pytest.raises(DeviceError, match=f"cannot reach the MQTT broker at 127.0.0.1:{closed_port}"):
        _run(example_bundle, DeviceOptions(device_dir=tmp_path / "device", mqtt_port=closed_port, max_frames=2))


def test_run_refuses_a_bundle_nobody_vouched_for(example_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="pass --public-key with the signer's public key"):
        run_device(example_bundle, DeviceOptions(device_dir=tmp_path / "device"), reporter=Reporter(quiet=True),
                   stop=threading.Event())
    assert not (tmp_path / "device").exists()


def test_lambda_gets_a_clean_environment(broker: Broker, tmp_path: Path, onnx_model_dir: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = _lambda_bundle(tmp_path, onnx_model_dir, 'deeplens_publish.publish({"frame": 1, "env": dict(os.environ)})',
                            environment={"DECLARED": "yes"})
    monkeypatch.setenv("DEEPLENS_SIGNING_KEY", "-----BEGIN PRIVATE KEY----- secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("GITHUB_TOKEN", "secret")
    received, thread, _ = _subscribe(broker.port, 1)
    _run(bundle, DeviceOptions(device_dir=tmp_path / "device", mqtt_port=broker.port, thing=THING, max_frames=1))
    thread.join(timeout=20)
    env = received[0]["env"]
    assert "secret" not in json.dumps(env), "nothing secret of this shell reaches the Lambda"
    assert not {"DEEPLENS_SIGNING_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "GITHUB_TOKEN"} & set(env)
    assert env["DECLARED"] == "yes" and env["AWS_IOT_THING_NAME"] == THING
    assert Path(env["DEEPLENS_MODEL_DIR"]).is_absolute() and (Path(env["DEEPLENS_MODEL_DIR"]) / "model.onnx").is_file()


def test_a_dying_loop_is_restarted_then_ends_run_with_an_error(broker: Broker, tmp_path: Path,
                                                               onnx_model_dir: Path) -> None:
    bundle = _lambda_bundle(tmp_path, onnx_model_dir, """
for frame in range(1, 4):
    deeplens_publish.publish({"frame": frame})
raise RuntimeError("camera unplugged")
""")
    options = DeviceOptions(device_dir=tmp_path / "device", mqtt_port=broker.port, thing=THING, max_frames=10)
    with pytest.raises(DeviceRunError, match="exited with code 1 3 times .*broken, as a core would mark it") as error:
        _run(bundle, options)
    assert error.value.summary.frames == error.value.summary.published == 9, "restarted twice, as a nucleus would"


def test_an_import_that_raises_while_a_thread_lives_is_restarted_not_a_hang(broker: Broker, tmp_path: Path,
                                                                            onnx_model_dir: Path) -> None:
    """A DeepLens display thread blocks opening its FIFO (nobody reads it) while the import goes on and raises:
    the interpreter would wait for that thread forever."""
    code = tmp_path / "lambda-src"
    code.mkdir()
    (code / "inference.py").write_text(
        "import threading\n\nimport deeplens_publish\n\n"
        "threading.Thread(target=threading.Event().wait).start()  # not a daemon, never ends\n"
        "deeplens_publish.publish({'frame': 1})\n"
        "raise RuntimeError('model not found')\n\n\n"
        "def handler(event, context):\n    return None\n")
    config = testing.write_project(tmp_path / "project", source=onnx_model_dir, **{"lambda": {
        "source": str(code), "handler": "inference.handler"}})
    bundle = testing.build(config).bundle
    options = DeviceOptions(device_dir=tmp_path / "device", mqtt_port=broker.port, thing=THING, max_frames=10,
                            stall_seconds=60)
    with pytest.raises(DeviceRunError, match="exited with code 1 3 times") as error:
        _run(bundle, options)
    assert error.value.summary.published == 3


def test_a_handler_module_with_a_dash_in_its_name_runs(broker: Broker, tmp_path: Path, onnx_model_dir: Path) -> None:
    code = tmp_path / "lambda-src"
    code.mkdir()
    (code / "inference-lambda.py").write_text(
        "import deeplens_publish\n\ndeeplens_publish.publish({'frame': 1})\n\n\n"
        "def handler(event, context):\n    return None\n")
    config = testing.write_project(tmp_path / "project", source=onnx_model_dir, **{"lambda": {
        "source": str(code), "handler": "inference-lambda.handler"}})
    received, thread, _ = _subscribe(broker.port, 1)
    _run(testing.build(config).bundle, DeviceOptions(device_dir=tmp_path / "device", mqtt_port=broker.port,
                                                     thing=THING, max_frames=1))
    thread.join(timeout=20)
    assert received == [{"frame": 1}]


def test_status_messages_are_not_inferences_and_the_topic_used_is_reported(broker: Broker, tmp_path: Path,
                                                                            onnx_model_dir: Path) -> None:
    bundle = _lambda_bundle(tmp_path, onnx_model_dir, """
topic = "deeplens/elsewhere/infer"
deeplens_publish.publish("Model loaded", topic)
for frame in range(1, 4):
    deeplens_publish.publish({"dog": 0.9, "frame": frame}, topic)
    if frame == 2:
        deeplens_publish.publish("still running", topic)
threading.Event().wait()  # a camera loop goes on; run stops it at --max-frames inferences
""")
    summary = _run(bundle, DeviceOptions(device_dir=tmp_path / "device", mqtt_port=broker.port, thing=THING,
                                         max_frames=3))
    assert (summary.frames, summary.published, summary.messages) == (3, 3, 2)
    assert summary.topic == "deeplens/elsewhere/infer"


def test_fewer_results_than_asked_for_is_an_error(broker: Broker, tmp_path: Path, onnx_model_dir: Path) -> None:
    bundle = _lambda_bundle(tmp_path, onnx_model_dir, """
for frame in range(1, 3):
    deeplens_publish.publish({"frame": frame})
""")
    options = DeviceOptions(device_dir=tmp_path / "device", mqtt_port=broker.port, thing=THING, max_frames=5)
    with pytest.raises(DeviceRunError, match="stopped after 2 of the 5 results"):
        _run(bundle, options)


def test_run_as_the_readme_shows_it_with_the_default_relative_device_dir(broker: Broker, example_bundle: Path,
                                                                         tmp_path: Path) -> None:
    command = [sys.executable, "-m", "deeplens_build.cli", "run", str(example_bundle), "--public-key",
               str(_key(example_bundle)), "--mqtt", f"127.0.0.1:{broker.port}", "--max-frames", "3", "--json"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["frames"] == summary["published"] == 3
    assert "MQTT broker lost" not in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / ".deeplens" / "device").is_dir()


@pytest.mark.parametrize("broker_text", ["127.0.0.1:99999", "127.0.0.1:0", "localhost", ":1883"])
def test_bad_broker_address_is_a_usage_error(broker_text: str) -> None:
    result = cli("watch", "--mqtt", broker_text, expect=2)
    assert "is not HOST:PORT with a port from 1 to 65535" in error_line(result)


def test_watch_without_a_broker_fails_instead_of_waiting(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    result = cli("watch", "--mqtt", f"127.0.0.1:{closed_port}", expect=11)
    assert "cannot reach the MQTT broker" in error_line(result)


def test_sigterm_stops_the_device_cleanly(broker: Broker, example_bundle: Path, tmp_path: Path) -> None:
    received, thread, stop_watch = _subscribe(broker.port, 3)
    command = [sys.executable, "-m", "deeplens_build.cli", "run", str(example_bundle), "--mqtt",
               f"127.0.0.1:{broker.port}", "--thing", THING, "--fps", "20", "--device-dir", str(tmp_path / "d"),
               "--public-key", str(_key(example_bundle)), "--json"]
    device = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    thread.join(timeout=30)
    device.send_signal(signal.SIGTERM)
    out, err = device.communicate(timeout=30)
    assert device.returncode == 0, err
    summary = json.loads(out)
    assert summary["frames"] >= 3 and summary["published"] >= 3
    assert summary["published"] + summary["dropped"] == summary["frames"], "a result in flight at the stop is counted"


@pytest.mark.slow
def test_a_lambda_that_stops_making_progress_is_restarted_then_reported(broker: Broker, tmp_path: Path,
                                                                         onnx_model_dir: Path) -> None:
    pids = tmp_path / "device" / "pids"  # the device folder: the Lambda sees it, /tmp is its own
    bundle = _lambda_bundle(tmp_path, onnx_model_dir, f"""
open({str(pids)!r}, "a").write("%d\\n" % os.getpid())
deeplens_publish.publish({{"frame": 1}})
threading.Event().wait()  # a camera read that never returns
""")
    options = DeviceOptions(device_dir=tmp_path / "device", mqtt_port=broker.port, thing=THING, max_frames=5,
                            stall_seconds=1.0)
    with pytest.raises(DeviceRunError, match="made no progress for 1 s 3 times .*stuck") as error:
        _run(bundle, options)
    assert error.value.summary.frames == 3, "one result per start: restarted twice, as for a crash"
    for pid in map(int, pids.read_text().split()):  # each stuck start was stopped, none left running
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_video_shorter_than_max_frames_ends_the_run_with_an_error(broker: Broker, tmp_path: Path,
                                                                     onnx_model_dir: Path) -> None:
    """A DeepLens Lambda asks awscam for the next frame forever; a recorded video's end is the device's end."""
    import cv2

    video = tmp_path / "short.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (80, 60))
    for value in (0, 100, 200):
        writer.write(np.full((60, 80, 3), value, dtype=np.uint8))
    writer.release()
    bundle = _lambda_bundle(tmp_path, onnx_model_dir, """
import awscam
count = 0
while True:
    ok, frame = awscam.getLastFrame()
    if not ok:
        continue
    count += 1
    deeplens_publish.publish({"frame": count})
""", deeplens_compat=True)
    options = DeviceOptions(device_dir=tmp_path / "device", mqtt_port=broker.port, thing=THING, max_frames=10,
                            frames=str(video))
    with pytest.raises(DeviceRunError, match="the frames ran out after 3 of the 10 results asked for") as error:
        _run(bundle, options)
    assert error.value.summary.published == 3


def test_ctrl_c_before_max_frames_is_not_success(broker: Broker, example_bundle: Path, tmp_path: Path) -> None:
    received, thread, _ = _subscribe(broker.port, 1)
    command = [sys.executable, "-m", "deeplens_build.cli", "run", str(example_bundle), "--mqtt",
               f"127.0.0.1:{broker.port}", "--thing", THING, "--fps", "5", "--max-frames", "1000",
               "--device-dir", str(tmp_path / "d"), "--public-key", str(_key(example_bundle))]
    device = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    thread.join(timeout=60)
    assert received, "the device published before it was interrupted"
    device.send_signal(signal.SIGINT)
    out, err = device.communicate(timeout=30)
    assert device.returncode == 130, err
    assert "error: interrupted after" in err and "of the 1000 results asked for" in err


@pytest.mark.slow
def test_image_frames_run_on_a_vendored_runtime_without_opencv(broker: Broker, tmp_path: Path) -> None:
    """The example Lambda reads image files with OpenCV, which no runtime vendors: run decodes them here."""
    import cv2

    frames = tmp_path / "frames"
    frames.mkdir()
    for index in range(3):
        cv2.imwrite(str(frames / f"{index}.jpg"), np.full((60, 80, 3), 60 * index, dtype=np.uint8))
    config = example_project(tmp_path / "p")
    config.write_text(config.read_text() + "\n[runtime]\nvendor = true\n")
    bundle = testing.build(config).bundle
    received, thread, _ = _subscribe(broker.port, 3)
    summary = _run(bundle, DeviceOptions(device_dir=tmp_path / "device", mqtt_port=broker.port, thing=THING,
                                         max_frames=3, frames=str(frames)))
    thread.join(timeout=30)
    assert summary.published == 3 and [r["frame"] for r in received] == [1, 2, 3]
    assert not list((tmp_path / "device").rglob("cv2")), "the device's environment has no OpenCV: decoded here"
