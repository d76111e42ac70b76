"""A local device for development and CI: what a Greengrass core does with a bundle, on this machine.

verify → unpack into a device folder → the runtime environment (a virtual environment from the vendored wheels,
or this interpreter when the bundle vendors none) → the Lambda module imported in a child process, its loop
running over the frames → every result it prints published as JSON to ``$aws/things/<thing>/infer`` on an MQTT
broker. While the broker is down, results wait in a bounded buffer (the oldest are dropped first) and the client
reconnects; SIGINT/SIGTERM, or ``max_frames`` results, stop the device cleanly.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deeplens_build.bundle import verify_bundle
from deeplens_build.cache import tool_cache_environment
from deeplens_build.errors import BundleError, UsageError
from deeplens_build.report import Reporter


@dataclass(frozen=True)
class DeviceOptions:
    device_dir: Path
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    thing: str = "deeplens"
    frames: str | None = None
    max_frames: int | None = None
    frame_interval: float = 0.0
    buffer: int = 1000


@dataclass(frozen=True)
class DeviceSummary:
    frames: int
    published: int
    dropped: int
    reconnects: int
    topic: str


def parse_broker(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--mqtt {text!r} is not HOST:PORT")
    return host, int(port)


def topic_for(thing: str) -> str:
    return f"$aws/things/{thing}/infer"


def run_device(bundle: Path, options: DeviceOptions, *, reporter: Reporter, stop: threading.Event,
               public_key: Path | None = None) -> DeviceSummary:
    manifest = verify_bundle(bundle, public_key).manifest  # a device runs only what verifies
    root = options.device_dir / f"{manifest['name']}-{manifest['version']}"
    shutil.rmtree(root, ignore_errors=True)
    with tarfile.open(bundle) as tar:
        tar.extractall(root, filter="data")
    code = root / "code"
    with zipfile.ZipFile(root / manifest["lambda"]["file"]) as archive:
        archive.extractall(code)
    python = _runtime_python(root, manifest, reporter)
    module = manifest["lambda"]["handler"].rsplit(".", 1)[0]
    env = {**os.environ, **tool_cache_environment(options.device_dir),
           "DEEPLENS_MODEL_DIR": str(root / "model"), "AWS_IOT_THING_NAME": options.thing,
           "PYTHONUNBUFFERED": "1", "DEEPLENS_FRAME_INTERVAL": str(options.frame_interval)}
    if options.frames:
        env["DEEPLENS_FRAMES"] = str(Path(options.frames).resolve())
    if options.max_frames:
        env["DEEPLENS_MAX_FRAMES"] = str(options.max_frames)
    script = (f"import sys, threading; sys.path.insert(0, {str(code)!r}); import {module}; "
              "threading.Event().wait()")  # as on a core: the module lives on after import
    reporter.step(f"device: {manifest['name']} {manifest['version']} in {root}, publishing to "
                  f"{options.mqtt_host}:{options.mqtt_port} {topic_for(options.thing)}")
    child = subprocess.Popen([python, "-c", script], cwd=code, env=env, stdout=subprocess.PIPE, text=True)
    link = _Mqtt(options, reporter)
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(child.stdout, lines), daemon=True).start()
    frames = 0
    try:
        while not stop.is_set() and (options.max_frames is None or frames < options.max_frames):
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                if child.poll() is not None and lines.empty():
                    break
                continue
            if line is None:
                break
            if line.strip().startswith("{"):
                frames += 1
                link.publish(line.strip())
    finally:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
        summary = link.close()
    if child.returncode not in (0, -15) and frames == 0:
        raise BundleError(f"the Lambda {module} exited with {child.returncode} before any inference; run "
                          "it with --debug or check its output above")
    return DeviceSummary(frames=frames, **summary, topic=topic_for(options.thing))


def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _runtime_python(root: Path, manifest: dict[str, Any], reporter: Reporter) -> str:
    """The device's interpreter: a venv with the vendored wheels, or this one when nothing was vendored."""
    wheels = manifest["runtime"]["wheels"]
    if not wheels:
        reporter.note(f"runtime {manifest['runtime']['name']}: the bundle vendors no wheels, using this "
                      f"interpreter ({sys.executable})")
        return sys.executable
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    done = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-index", "--find-links",
                           str(root / "runtime" / "wheels"), *manifest["runtime"]["requirements"]],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise BundleError(f"the runtime's vendored wheels do not install here: {done.stderr.strip()[-300:]}")
    return python


class _Mqtt:
    """Publish with QoS 1; while disconnected, keep up to ``buffer`` results and reconnect in the background."""

    def __init__(self, options: DeviceOptions, reporter: Reporter):
        import paho.mqtt.client as mqtt

        self.topic = topic_for(options.thing)
        self.reporter = reporter
        self.pending: deque[str] = deque(maxlen=options.buffer)
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.published = self.dropped = self.connects = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"deeplens-device-{options.thing}")
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.connect_async(options.mqtt_host, options.mqtt_port, keepalive=10)
        self.client.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            return
        self.connects += 1
        self.connected.set()
        with self.lock:
            while self.pending:
                self._send(self.pending.popleft())

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self.connected.is_set():
            self.reporter.warn("MQTT broker lost; buffering results and reconnecting")
        self.connected.clear()

    def _send(self, payload: str) -> None:
        self.client.publish(self.topic, payload, qos=1)
        self.published += 1

    def publish(self, payload: str) -> None:
        with self.lock:
            if self.connected.is_set() and self.client.is_connected():
                self._send(payload)
                return
            if len(self.pending) == self.pending.maxlen:
                self.dropped += 1
            self.pending.append(payload)

    def close(self) -> dict[str, int]:
        deadline = time.monotonic() + 5
        while self.pending and time.monotonic() < deadline:  # give a reconnect the chance to flush
            time.sleep(0.1)
        time.sleep(0.2)
        self.client.loop_stop()
        self.client.disconnect()
        return {"published": self.published, "dropped": self.dropped + len(self.pending),
                "reconnects": max(0, self.connects - 1)}


def watch(host: str, port: int, thing: str, *, count: int | None, emit: Any, stop: threading.Event) -> int:
    """Subscribe to the thing's infer topic and hand every result to ``emit``; return how many arrived."""
    import paho.mqtt.client as mqtt

    received = 0
    done = threading.Event()

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.subscribe(topic_for(thing), qos=1)

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        nonlocal received
        try:
            result = json.loads(message.payload)
        except ValueError:
            result = {"raw": message.payload.decode(errors="replace")}
        received += 1
        emit(result)
        if count is not None and received >= count:
            done.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"deeplens-watch-{os.getpid()}")
    client.reconnect_delay_set(min_delay=1, max_delay=2)
    client.on_connect, client.on_message = on_connect, on_message
    client.connect_async(host, port, keepalive=10)
    client.loop_start()
    try:
        while not done.is_set() and not stop.is_set():
            done.wait(0.2)
    finally:
        client.loop_stop()
        client.disconnect()
    return received
