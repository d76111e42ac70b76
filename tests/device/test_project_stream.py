"""`run --stream`: the project stream page, checked in a real browser (Debian's chromium, headless)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import Broker, open_bundle
from test_device import THING, _key, example_bundle  # noqa: F401  (example_bundle is a fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed; .ci/run installs it")



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium(url: str, profile: Path, *args: str, wait_ms: int = 2500) -> subprocess.CompletedProcess:
    """Load ``url`` in headless chromium and act (``args``) after ``wait_ms``."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--window-size=1000,600", f"--timeout={wait_ms}", *args, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def _stream_region(png: Path) -> np.ndarray:
    import cv2

    image = cv2.imread(str(png))
    assert image is not None, f"chromium wrote no screenshot at {png}"
    return image[16:496, 16:656]  # where the page puts the 640x480 stream


@pytest.mark.slow
def test_the_project_stream_shows_live_frames_and_the_latest_label(broker: Broker, example_bundle: Path,  # noqa: F811
                                                                    tmp_path: Path) -> None:
    port = _free_port()
    command = [sys.executable, "-m", "deeplens_build.cli", "run", str(example_bundle), "--public-key",
               str(_key(example_bundle)), "--mqtt", f"127.0.0.1:{broker.port}", "--thing", THING, "--fps", "10",
               "--stream", str(port), "--device-dir", str(tmp_path / "device")]
    device = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, latest = time.monotonic() + 60, None
        while time.monotonic() < deadline and not latest:
            try:
                latest = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/results.json", timeout=2))["latest"]
            except OSError:
                pass
            time.sleep(0.2)
        assert latest, "results reached the page's feed"
        url = f"http://127.0.0.1:{port}/"
        shots = []
        for index in range(2):
            shot = tmp_path / f"shot{index}.png"
            _chromium(url, tmp_path / f"profile{index}", f"--screenshot={shot}")
            shots.append(_stream_region(shot))
        assert shots[0].std() > 5 and shots[1].std() > 5, "frames are drawn, not an empty box"
        assert np.abs(shots[0].astype(int) - shots[1].astype(int)).mean() > 1, "the image changes between shots"
        with open_bundle(example_bundle) as bundle:
            labels = bundle.extractfile("model/labels.txt").read().decode().splitlines()
        for wait_ms in (2500, 5000, 10000):  # the page's first fetch may take a while on a loaded machine (CI)
            dom = _chromium(url, tmp_path / f"profile-dom-{wait_ms}", "--dump-dom", wait_ms=wait_ms).stdout
            if (shown := re.search(r'id="label">([^<]*)<', dom)) and shown.group(1) in labels:
                break
        assert shown and shown.group(1) in labels, f"the latest label, one of the model's: {dom[-600:]}"
    finally:
        device.send_signal(signal.SIGTERM)
        out, err = device.communicate(timeout=60)
    assert device.returncode == 0, err


LOCAL_DISPLAY_LAMBDA = '''
import os
import threading
import time

import deeplens_publish

FRAME = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "frame.jpg"), "rb").read()


class LocalDisplay(threading.Thread):
    """As the DeepLens samples have it: a FIFO at /tmp/results.mjpeg, opened in text mode, JPEG bytes written."""

    def run(self):
        path = "/tmp/results.mjpeg"
        if not os.path.exists(path):
            os.mkfifo(path)
        with open(path, "w") as fifo:
            while True:
                fifo.write(FRAME)
                time.sleep(0.1)


def infinite_infer_run():
    deeplens_publish.publish("Model loaded")
    while True:
        deeplens_publish.publish({"red": 0.9, "blue": 0.1})  # DeepLens's {label: probability}
        time.sleep(0.1)


LocalDisplay().start()
threading.Thread(target=infinite_infer_run).start()


def handler(event, context):
    return None
'''


@pytest.mark.slow
def test_a_deeplens_local_display_fifo_reaches_the_project_stream_in_a_tmp_of_its_own(
        broker: Broker, tmp_path: Path, onnx_model_dir: Path) -> None:
    import cv2

    from deeplens_build import testing
    from deeplens_build.device.run import _private_tmp
    from deeplens_build.report import Reporter

    if not _private_tmp(tmp_path / "probe", [], Reporter(quiet=True)):
        pytest.skip("no private mount namespace with an overlay here (root, or user namespaces): the Lambda would "
                    "share /tmp")
    code = tmp_path / "lambda"
    code.mkdir()
    (code / "inference.py").write_text(LOCAL_DISPLAY_LAMBDA)
    red = np.zeros((480, 640, 3), np.uint8)
    red[:, :, 2] = 255
    (code / "frame.jpg").write_bytes(cv2.imencode(".jpg", red)[1].tobytes())
    config = testing.write_project(tmp_path / "project", source=onnx_model_dir, **{"lambda": {
        "source": str(code), "handler": "inference.handler", "deeplens_compat": True}})
    bundle = testing.build(config).bundle
    shared = Path("/tmp/results.mjpeg")
    was_there = shared.exists()
    port = _free_port()
    command = [sys.executable, "-m", "deeplens_build.cli", "run", str(bundle), "--allow-any-signer", "--mqtt",
               f"127.0.0.1:{broker.port}", "--thing", THING, "--stream", str(port), "--device-dir",
               str(tmp_path / "device")]
    device = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, frame = time.monotonic() + 60, b""
        while time.monotonic() < deadline and not frame:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/stream.mjpeg", timeout=5) as stream:
                    head = stream.read(200_000)
                frame = head[head.find(b"\xff\xd8"):head.find(b"\xff\xd9") + 2] if b"\xff\xd9" in head else b""
            except OSError:
                pass
            time.sleep(0.2)
        assert frame == (code / "frame.jpg").read_bytes(), "the FIFO's JPEG, whole, is the stream's frame"
        shot = tmp_path / "shot.png"
        _chromium(f"http://127.0.0.1:{port}/", tmp_path / "profile", f"--screenshot={shot}")
        shown = _stream_region(shot).reshape(-1, 3).mean(axis=0)
        assert shown[2] > 200 and shown[0] < 60 and shown[1] < 60, f"the page shows the red frame: {shown}"
        dom = ""
        for wait_ms in (2500, 5000, 10000):  # the page's first fetch may take a while on a loaded machine (CI)
            dom = _chromium(f"http://127.0.0.1:{port}/", tmp_path / f"dom-{wait_ms}", "--dump-dom",
                            wait_ms=wait_ms).stdout
            if 'id="label">red<' in dom:
                break
        assert 'id="label">red<' in dom and 'id="others">then blue 0.100<' in dom, dom[-800:]
        assert 'id="status">Model loaded<' in dom and 'id="score">0.900<' in dom, dom[-800:]
        fifos = list((tmp_path / "device").rglob("results.mjpeg"))
        assert any(p.parent.name == "tmp" and p.is_fifo() for p in fifos), "the FIFO is in the device's /tmp"
        assert shared.exists() == was_there, "nothing was made in this machine's /tmp"
    finally:
        device.send_signal(signal.SIGTERM)
        out, err = device.communicate(timeout=60)
    assert device.returncode == 0, err
    assert "the Lambda's /tmp is its own" in err and "(an overlay in a private mount namespace)" in err
    assert "TypeError" not in err, "bytes through a text-mode handle did not kill the display thread"
