"""``deeplens-build run``, a local device for development and CI: what a Greengrass core does with a bundle,
on this machine.

verify and unpack (one pass) into a device folder → the runtime environment (a virtual environment from the
vendored wheels, with the device's Python, or this interpreter when the bundle vendors none) → the Lambda
started as the recipe's Run script starts it, in a child process with a clean environment and a /tmp of its own
(its DeepLens display FIFO read into the project stream), its loop running
over the frames → its own ``deeplens_publish`` calls sending results to ``$aws/things/<thing>/infer`` on an
MQTT broker (buffering and reconnecting while it is down), their counts read back from the publisher.
SIGINT/SIGTERM, or ``max_frames`` acknowledged results, stop the device cleanly. A Lambda that exits with an
error is restarted as the nucleus would, then reported broken; an unreachable broker, lost results or fewer
results than asked for also end ``run`` with an error. ``--stream`` serves the project stream meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from deeplens_build.bundle import require_signer, unpack_bundle
from deeplens_build.device import support
from deeplens_build.device.display import local_display
from deeplens_build.device.mqtt import CONNECT_TIMEOUT, client, connect
from deeplens_build.device.watch import watch
from deeplens_build.errors import BundleError, DeviceError, UsageError
from deeplens_build.manifest import (
    DEVICE_BUILD,
    MODEL_DIR,
    MODEL_DIR_VARIABLE,
    THING_VARIABLE,
    WHEELS_DIR,
    WORK_DIR_VARIABLE,
    Manifest,
    infer_topic,
)
from deeplens_build.report import Reporter

STATS_FILE = "publish-stats.json"
STREAM_FILE = "results.mjpeg"
"""The project stream's latest frame, in the Lambda's home folder (DeepLens used /tmp/results.mjpeg)."""
RUN_SUPPORT = "run-support"
RESTARTS = 2
"""How often a Lambda that exits with an error is started again: a Greengrass nucleus restarts a failing
component and marks it broken after its third failure."""
STALL_SECONDS = 120.0
"""How long a Lambda may go without a new result before ``run`` takes it for stuck (its first result included:
a model loads, and an engine may compile on the device, first)."""
FRAMES_EXHAUSTED = support.FRAMES_EXHAUSTED
FLUSH_SECONDS = 5.0
"""How long the Lambda's publisher may take to hand waiting results to the broker when it stops."""
PASSED_VARIABLES = ("PATH", "LANG", "LC_ALL", "TZ", "AWS_REGION", "AWS_DEFAULT_REGION")
"""What a Lambda gets from the environment ``run`` was started in: what a Greengrass core would also give it,
and nothing secret (no credentials, no signing key)."""


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
    stream_port: int | None = None
    """Serve the project stream (frames and results in a browser) on 127.0.0.1 at this port."""
    kvs_record: Path | None = None
    """Record what DeepLens_Kinesis_Video would stream to Kinesis Video to this video file."""
    stall_seconds: float = STALL_SECONDS
    """A Lambda whose publisher counts no new result for this long is stuck: stopped, and restarted."""


@dataclass(frozen=True)
class DeviceSummary:
    frames: int
    published: int
    dropped: int
    reconnects: int
    messages: int
    """Status messages published (``"Model loaded"``): shown by watch, never counted as inferences."""
    topic: str


class DeviceRunError(DeviceError):
    """``run`` ended badly; ``summary`` says what did happen."""

    def __init__(self, message: str, summary: DeviceSummary):
        super().__init__(message)
        self.summary = summary




def run_device(bundle: Path, options: DeviceOptions, *, reporter: Reporter, stop: threading.Event,
               public_key: Path | None = None, allow_any_signer: bool = False) -> DeviceSummary:
    """Run ``bundle``'s Lambda until ``stop``, ``max_frames`` results, or the Lambda's end.

    :param allow_any_signer: run a bundle verified against its own embedded key only; without it, and without
        ``public_key``, the bundle is refused: running it executes its code on this machine.
    :raises DeviceError: when the broker is unreachable, the Lambda dies, or results were lost or missing.
    """
    require_signer("run executes the bundle's code on this machine", public_key, allow_any_signer, reporter)
    device_dir = options.device_dir.resolve()
    root, manifest = install_bundle(bundle, device_dir, public_key)
    code = root / "code"
    with zipfile.ZipFile(root / manifest.lambda_.file) as archive:
        archive.extractall(code)
    for rel, path in support.lambda_files(compat=True).items():  # the DeepLens modules are always there under run
        if not (code / rel).exists():
            (code / rel).parent.mkdir(exist_ok=True)
            shutil.copyfile(path, code / rel)
    python = _runtime_python(root, manifest, reporter)
    topic = infer_topic(options.thing)
    _probe_broker(options.mqtt_host, options.mqtt_port)  # before the Lambda starts: a wrong address fails in seconds
    stats = root / STATS_FILE
    reporter.step(f"device: {manifest.name} {manifest.version} in {root}, the Lambda publishing to "
                  f"{options.mqtt_host}:{options.mqtt_port} {topic}")
    environment = _lambda_environment(root, device_dir, manifest, options, stats)
    environment.update(_device_frames(options, python, root, reporter))
    isolation = _private_tmp(root, [device_dir, *([options.kvs_record.parent] if options.kvs_record else [])],
                             reporter)
    command = [*isolation, python, str(code / support.RUNNER.name), manifest.lambda_.module, str(code)]
    _compile_on_device(python, root, environment, manifest, reporter)
    totals = dict.fromkeys(("results", "published", "dropped", "reconnects", "messages"), 0)
    topics: set[str] = set()
    frame_file = root / "home" / STREAM_FILE
    running: list[int | None] = [None]  # the Lambda's process, while one runs
    with _project_stream(options, frame_file, f"{manifest.name} {manifest.version}", reporter), \
            local_display(lambda: _lambda_tmp(running[0], isolated=bool(isolation)), frame_file):
        for attempt in range(1, RESTARTS + 2):
            wanted = None if options.max_frames is None else options.max_frames - totals["published"]
            ended, counts = _run_once(command, code, environment, stats, wanted, stop, options.stall_seconds,
                                      started=lambda pid: running.__setitem__(0, pid))
            totals = {name: totals[name] + counts[name] for name in totals}
            topics.update(counts["topics"])
            if ended in (None, 0, FRAMES_EXHAUSTED) or attempt > RESTARTS:
                break
            what = (f"made no progress for {options.stall_seconds:g} s (no new result)" if ended == STALLED
                    else f"exited with code {ended}")
            reporter.warn(f"the Lambda {manifest.lambda_.module} {what}; restarting it as the nucleus would "
                          f"({attempt} of {RESTARTS} restarts)")
    # the topic the Lambda published to (the thing's, unless it names another)
    summary = DeviceSummary(frames=totals["results"], published=totals["published"], dropped=totals["dropped"],
                            reconnects=totals["reconnects"], messages=totals["messages"],
                            topic=", ".join(sorted(topics)) or topic)
    if ended == STALLED:
        raise DeviceRunError(f"the Lambda {manifest.lambda_.module} made no progress for {options.stall_seconds:g} s "
                             f"{RESTARTS + 1} times (no new result; its output is above): stuck, so stopped "
                             "(raise --stall-timeout if its results are that far apart)", summary)
    if ended not in (None, 0, FRAMES_EXHAUSTED):
        raise DeviceRunError(f"the Lambda {manifest.lambda_.module} exited with code {ended} {RESTARTS + 1} times "
                             f"(its output is above): broken, as a core would mark it", summary)
    if ended == FRAMES_EXHAUSTED and options.max_frames is not None and summary.frames < options.max_frames:
        raise DeviceRunError(f"the frames ran out after {summary.frames} of the {options.max_frames} results asked "
                             f"for: --frames {options.frames} holds fewer frames than --max-frames", summary)
    if stop.is_set():
        return summary  # stopped by the user: a result in flight at that moment may be lost, and is counted
    if options.max_frames is not None and summary.frames < options.max_frames:
        raise DeviceRunError(f"the Lambda {manifest.lambda_.module} stopped after {summary.frames} of the "
                             f"{options.max_frames} results asked for (did its frames run out?)", summary)
    if summary.published < (options.max_frames or summary.frames):  # results past --max-frames may be cut off
        raise DeviceRunError(f"{summary.dropped} of {summary.frames} result(s) never reached the MQTT broker at "
                             f"{options.mqtt_host}:{options.mqtt_port}: it was unreachable for too long", summary)
    return summary


@contextlib.contextmanager
def _project_stream(options: DeviceOptions, frames: Path, title: str, reporter: Reporter) -> Iterator[None]:
    """While the block runs, the project stream: the page, the Lambda's frames, and the results the broker got."""
    if options.stream_port is None:
        yield
        return
    from deeplens_build.device.stream import ProjectStream, Results

    results, subscribed, done = Results(), threading.Event(), threading.Event()
    listener = threading.Thread(target=watch, daemon=True, args=(options.mqtt_host, options.mqtt_port, options.thing),
                                kwargs={"count": None, "emit": results.add, "stop": done, "subscribed": subscribed})
    listener.start()
    subscribed.wait(CONNECT_TIMEOUT)
    stream = ProjectStream(options.stream_port, frames, results, title)
    reporter.step(f"project stream: {stream.url}")
    try:
        yield
    finally:
        stream.close()
        done.set()
        listener.join(timeout=5)


STALLED = -1000
"""What :func:`_run_once` answers for a Lambda it stopped because it made no progress (no exit code is negative
beyond a signal's number)."""


def _lambda_tmp(pid: int | None, *, isolated: bool) -> Path | None:
    """The Lambda's /tmp as this process reaches it: through ``/proc/PID/root`` when it has a mount namespace of its
    own (a FIFO on an overlay is a pipe of the overlay's, not of the file under it)."""
    if not isolated:
        return Path("/tmp")
    return Path(f"/proc/{pid}/root/tmp") if pid else None


def _run_once(command: list[str], code: Path, environment: dict[str, str], stats: Path, wanted: int | None,
              stop: threading.Event, stall_seconds: float,
              started: Callable[[int | None], None]) -> tuple[int | None, dict[str, int]]:
    """Run the Lambda's process until it exits, ``wanted`` results reached the broker, it makes no progress for
    ``stall_seconds``, or ``stop``.

    :return: its exit code (None when stopped here, STALLED when stuck), and what its publisher counted.
    """
    stats.unlink(missing_ok=True)
    child = subprocess.Popen(command, cwd=code, env=environment)
    started(child.pid)
    stalled = False
    try:
        results, progressed = 0, time.monotonic()
        while not stop.is_set() and child.poll() is None:
            counts = _counts(stats)
            if wanted is not None and counts["published"] >= wanted:
                break
            if counts["results"] != results:
                results, progressed = counts["results"], time.monotonic()
            elif time.monotonic() - progressed > stall_seconds:
                stalled = True
                break
            stop.wait(0.1)
    finally:
        ended = STALLED if stalled else child.poll()
        if child.poll() is None:  # stopped here, or stuck: a stuck Lambda is stopped too, never left running
            child.terminate()  # SIGTERM, as a core stops a component: the runner flushes what waits, then exits
            try:
                child.wait(timeout=FLUSH_SECONDS + 5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        started(None)
    return ended, _counts(stats)


def _counts(stats: Path) -> dict[str, int]:
    """What the Lambda's publisher counted (``deeplens_publish`` writes it after every change)."""
    counts = {"results": 0, "published": 0, "dropped": 0, "reconnects": 0, "messages": 0, "topics": []}
    try:
        return {**counts, **json.loads(stats.read_text())}  # a bundle's older publisher counts fewer things
    except (OSError, ValueError):
        return counts


def _probe_broker(host: str, port: int) -> None:
    ready = threading.Event()
    probe = client("deeplens-run-probe")
    probe.on_connect = lambda *args: ready.set()
    connect(probe, host, port, ready)
    probe.disconnect()
    probe.loop_stop()


def install_bundle(bundle: Path, device_dir: Path, public_key: Path | None) -> tuple[Path, Manifest]:
    """Verify and unpack the bundle into ``<device_dir>/<name>-<version>``, replacing an earlier install."""
    device_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".install-", dir=device_dir))
    try:
        # a device runs only what verifies; name and version are validated before they make a path
        manifest = unpack_bundle(bundle, scratch / "bundle", public_key).manifest
        root = device_dir / f"{manifest.name}-{manifest.version}"
        shutil.rmtree(root, ignore_errors=True)
        os.replace(scratch / "bundle", root)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return root, manifest


def _compile_on_device(python: str, root: Path, environment: dict[str, str], manifest: Manifest,
                       reporter: Reporter) -> None:
    """Run the target backend's on-device compile step, as the recipe's Install phase does on a core."""
    script = root / DEVICE_BUILD
    if not script.is_file():
        return
    work = environment[WORK_DIR_VARIABLE]
    reporter.step(f"device: compiling the model for this device ({DEVICE_BUILD}, kept in {work})")
    tolerance = [repr(manifest.parity.tolerance)] if manifest.parity else []
    done = subprocess.run([python, str(script), str(root / MODEL_DIR), work, *tolerance], env=environment,
                          capture_output=True, text=True)
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise DeviceError(f"the bundle's on-device compile step failed (exit {done.returncode}): {output[-1]}")


def _private_tmp(root: Path, writable: list[Path], reporter: Reporter) -> list[str]:
    """The command prefix that gives the Lambda a /tmp of its own, whose writes land in ``root/tmp``.

    In a private mount namespace (``unshare``: as root, else as the user namespace's root where the kernel allows
    one) an overlay goes over ``/tmp``: the Lambda still reads what is there (its frames and interpreter may live
    under this machine's /tmp), but what it writes, the display FIFO included, lands in ``root/tmp``, never in this
    machine's /tmp. The ``writable`` folders under /tmp (the device folder: its counts, its work folder) are bound
    back over the overlay, reached through descriptors opened before it covered them.
    Where no such mount can be made, the Lambda shares this machine's /tmp and ``run`` says so.
    """
    upper, work = _mkdir(root / "tmp"), _mkdir(root / "tmp-overlay-work")
    q = shlex.quote
    # a descriptor per folder (3, 4, ...), opened before the overlay covers /tmp: /proc/self/fd/N is the real one
    binds = dict(enumerate(sorted({p.resolve() for p in writable if p.resolve().is_relative_to("/tmp")}), start=3))
    steps = ["here=$(pwd)", *(f"exec {fd}<{q(str(folder))}" for fd, folder in binds.items()),
             "mount -t overlay overlay -o " + q(f"lowerdir=/tmp,upperdir={upper},workdir={work}") + " /tmp",
             # as given: canonicalised, /proc/self/fd/N would name the covered path again
             *(f"mount --no-canonicalize --bind /proc/self/fd/{fd} {q(str(folder))} && exec {fd}<&-"
               for fd, folder in binds.items())]
    steps.append('cd "$here" && exec "$@"')
    script = " && ".join(steps)
    unshare = shutil.which("unshare")
    for how in (["--mount", "--propagation", "private"],
                ["--user", "--map-root-user", "--mount", "--propagation", "private"]):
        prefix = [unshare, *how, "sh", "-c", script, "sh"] if unshare else []
        if prefix and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            reporter.step(f"device: the Lambda's /tmp is its own: what it writes there lands in {upper} (an overlay "
                          "in a private mount namespace)")
            return prefix
    reporter.warn("device: no private mount namespace here (unshare is missing or not allowed): the Lambda's /tmp "
                  "is this machine's, so two runs share /tmp/results.mjpeg")
    return []


def _lambda_environment(root: Path, device_dir: Path, manifest: Manifest, options: DeviceOptions,
                        stats: Path) -> dict[str, str]:
    """What a Greengrass core gives a Lambda, plus what the bundle declares, plus where ``deeplens_publish``
    reaches the broker; nothing else from this shell."""
    from deeplens_build.cache import tool_cache_environment  # the cache's pydantic is 60 ms of run's first line

    home = root / "home"
    home.mkdir(exist_ok=True)
    env = {name: os.environ[name] for name in PASSED_VARIABLES if name in os.environ}
    env.update(manifest.lambda_.environment)
    env.update(tool_cache_environment(device_dir))
    env.update({"HOME": str(home), "TMPDIR": str(home), "PYTHONUNBUFFERED": "1",
                MODEL_DIR_VARIABLE: str(root / MODEL_DIR), THING_VARIABLE: options.thing,
                # like a component's {work:path}: outlives reinstalls, so what was compiled on the device stays
                WORK_DIR_VARIABLE: str(_mkdir(device_dir / "work" / manifest.name)),
                "DEEPLENS_FRAME_INTERVAL": str(options.frame_interval),
                "DEEPLENS_MQTT": f"{options.mqtt_host}:{options.mqtt_port}",
                "DEEPLENS_MQTT_BUFFER": str(options.buffer),
                "DEEPLENS_PUBLISH_STATS": str(stats)})
    if options.stream_port is not None:
        env["DEEPLENS_STREAM"] = str(home / STREAM_FILE)
    if options.kvs_record is not None:
        env["DEEPLENS_KVS_RECORD"] = str(options.kvs_record.resolve())
    if (root / RUN_SUPPORT).is_dir():
        env["PYTHONPATH"] = str(root / RUN_SUPPORT)
    if options.max_frames:
        env["DEEPLENS_MAX_FRAMES"] = str(options.max_frames)
    return env


def _device_frames(options: DeviceOptions, python: str, root: Path, reporter: Reporter) -> dict[str, str]:
    """Where the Lambda finds ``--frames``, as variables: as given when the device's interpreter can decode them
    (``.npy`` files, or OpenCV at hand), else decoded here, once, into ``.npy`` files (no runtime ships OpenCV, so
    a bundle that vendors its runtime has none). A recorded video ends (``DEEPLENS_FRAMES_ONCE``); a folder is
    shown again and again, as a camera never runs out.

    :raises UsageError: for frames that do not exist. :raises DeviceError: when nothing here decodes them.
    """
    if not options.frames:
        return {}
    source = Path(options.frames).resolve()
    if not source.exists():
        raise UsageError(f"--frames {options.frames} does not exist; give a folder of .npy or image files, or a "
                         "video")
    variables = {"DEEPLENS_FRAMES": str(source), "DEEPLENS_FRAMES_EXHAUSTED": str(FRAMES_EXHAUSTED)}
    if source.is_dir() and all(p.suffix == ".npy" for p in source.iterdir() if p.is_file()) or \
            subprocess.run([python, "-c", "import cv2"], capture_output=True).returncode == 0:
        return variables
    try:
        import cv2
        import numpy as np
    except ImportError as exc:
        raise DeviceError(f"the bundle's runtime has no OpenCV to decode --frames {options.frames}, and neither has "
                          "this machine: pip install opencv-python-headless here, or give a folder of .npy "
                          "frames") from exc
    target = root / "frames"
    target.mkdir()
    if source.is_dir():
        frames = (cv2.imread(str(path)) for path in sorted(source.iterdir()) if path.is_file())
    else:
        video = cv2.VideoCapture(str(source))
        frames = iter(lambda: video.read()[1], None)
    count = 0
    for frame in frames:
        if frame is not None and (options.max_frames is None or count < options.max_frames):
            np.save(target / f"{count:06d}.npy", frame)
            count += 1
        elif not source.is_dir():
            break
    if count == 0:
        raise UsageError(f"--frames {options.frames} holds no frame OpenCV can read")
    reporter.note(f"device: the runtime has no OpenCV; {count} frame(s) of {options.frames} decoded here into "
                  f"{target}")
    return {**variables, "DEEPLENS_FRAMES": str(target), **({} if source.is_dir() else {"DEEPLENS_FRAMES_ONCE": "1"})}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _runtime_python(root: Path, manifest: Manifest, reporter: Reporter) -> str:
    """The device's interpreter: a venv with the vendored wheels, or this one when nothing was vendored."""
    runtime = manifest.runtime
    if not runtime.wheels:
        reporter.note(f"runtime {runtime.name}: the bundle vendors no wheels, using this interpreter "
                      f"({sys.executable})")
        return sys.executable
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    base = sys.executable if runtime.python == here else shutil.which(f"python{runtime.python}")
    if base is None:
        raise DeviceError(f"the bundle's wheels are for a Python {runtime.python} device and this machine has no "
                          f"python{runtime.python}; install it to run the bundle here, or build with "
                          f"`target.python = \"{here}\"`")
    venv = root / "venv"
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    done = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-index", "--find-links",
                           str(root / WHEELS_DIR), *runtime.requirements], capture_output=True, text=True)
    if done.returncode != 0:
        raise BundleError(f"the runtime's vendored wheels do not install here: {done.stderr.strip()[-300:]}")
    # the MQTT client deeplens_publish uses under `run` only (a core publishes through IPC or its SDK)
    import paho

    shutil.copytree(Path(paho.__file__).parent, root / RUN_SUPPORT / "paho")
    return python


