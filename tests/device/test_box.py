"""The device box: the example bundle's recipe run as the nucleus runs it, in Debian 12 bookworm (Python 3.11,
PEP 668) and Debian 13 trixie (Python 3.13) root file systems built with debootstrap, as ``ggc_user``, with no
network, publishing through the bundle's own ``awsiotsdk`` to the IPC stand-in and on to mosquitto.

Runs where this is root and a root file system is cached or ``debootstrap`` can build one (.ci/run installs it);
skipped elsewhere, saying which.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from helpers import BUILTIN_PLUGINS, cli, example_project

from deeplens_build.device import box as device_box
from deeplens_build.device.box import UID, Box
from deeplens_build.device.mqtt import publisher
from deeplens_build.device.run import install_bundle
from deeplens_build.device.watch import watch
from deeplens_build.manifest import infer_topic

THING = "deeplens-box-1"
REFUSING_LAMBDA = '''
import deeplens_publish
from awsiot.greengrasscoreipc.model import UnauthorizedError

try:
    deeplens_publish.publish({"probe": 1}, "$aws/things/another-thing/infer")
    deeplens_publish.publish({"refused": None})
except UnauthorizedError as exc:
    deeplens_publish.publish({"refused": exc.message})


def handler(event, context):
    return None
'''
KVSSINK = "#!/bin/sh\n# stands in for the KVS producer's GStreamer plugin inspector\n[ \"$1\" = kvssink ]\n"


def _root_filesystem(suite: str) -> Path:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("the device box needs root and unshare (a mount namespace, an overlay, chroot)")
    found = device_box.cached_root_filesystem(suite)
    if found is None and shutil.which("debootstrap") is None:
        pytest.skip(f"no {suite} root file system in {device_box.cache_folder()} and no debootstrap to build one "
                    "(apt install debootstrap; .ci/run installs it)")
    return found or device_box.root_filesystem(suite)


@pytest.fixture(scope="session", params=sorted(device_box.SUITES))
def rootfs(request: pytest.FixtureRequest) -> tuple[str, Path]:
    return request.param, _root_filesystem(request.param)


class Built(NamedTuple):
    bundle: Path
    unpacked: Path
    """Verified and unpacked, as the box takes it."""
    public_key: Path


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    """The example vendoring onnxruntime for Python 3.11 and 3.13, and variants sharing its cache: the OpenVINO
    backend, a Lambda that publishes outside its policy, and a Kinesis Video stream."""
    if os.geteuid() != 0:
        pytest.skip("the device box needs root")
    root = tmp_path_factory.mktemp("box-bundles")
    config = example_project(root, python=["3.11", "3.13"])
    config.write_text(config.read_text() + "\n[runtime]\nvendor = true\n")
    (config.parent / "lambda-refused").mkdir()
    (config.parent / "lambda-refused" / "inference.py").write_text(REFUSING_LAMBDA)
    variants = {"example": config.read_text(),
                "openvino": config.read_text().replace("[target]\n", '[target]\nbackend = "openvino"\n'),
                "refused": config.read_text().replace('source = "lambda"', 'source = "lambda-refused"'),
                "kvs": config.read_text() + '\n[device]\nkinesis_video_stream = "deeplens-box-stream"\n'}
    tool = Path(sys.executable).parent / "deeplens-build"
    environment = {**os.environ, "DEEPLENS_BUILD_PLUGINS": BUILTIN_PLUGINS}
    subprocess.run([tool, "keygen", "--out", root / "key.pem"], check=True, capture_output=True)
    built = {}
    for name, text in variants.items():
        (config.parent / f"{name}.toml").write_text(text)
        done = subprocess.run([tool, "package", "--config", config.parent / f"{name}.toml", "--signing-key",
                               root / "key.pem", "--output", root / name, "--json"], capture_output=True, text=True,
                              env=environment)
        assert done.returncode == 0, done.stderr
        bundle = Path(json.loads(done.stdout)["bundle"])
        built[name] = Built(bundle, install_bundle(bundle, root / "devices" / name, root / "key.pub.pem")[0],
                            root / "key.pub.pem")
    return built


@pytest.fixture
def results(broker) -> Iterator[tuple[list[dict], threading.Event]]:
    """What arrives on mosquitto on the thing's infer topic, subscribed before the box starts."""
    received: list[dict] = []
    subscribed, stop = threading.Event(), threading.Event()
    arrived = threading.Event()

    def emit(result: dict) -> None:
        received.append(result)
        if len(received) >= 3 or "refused" in result:
            arrived.set()

    listener = threading.Thread(target=watch, args=("127.0.0.1", broker.port, THING),
                                kwargs={"count": None, "emit": emit, "stop": stop, "subscribed": subscribed})
    listener.start()
    assert subscribed.wait(30)
    yield received, arrived
    stop.set()
    listener.join(30)


@contextlib.contextmanager
def _box(rootfs: Path, bundle: Path, scratch: Path, broker) -> Iterator[Box]:
    with publisher("127.0.0.1", broker.port) as forward, \
            Box(rootfs, bundle, scratch, forward=forward, thing=THING) as box:
        yield box


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["example", "openvino"])
def test_the_example_installs_offline_as_the_component_user_and_publishes_through_ipc(
        rootfs: tuple[str, Path], bundles: dict[str, Built], tmp_path: Path, broker, results, variant: str) -> None:
    suite, root = rootfs
    received, arrived = results
    with _box(root, bundles[variant].unpacked, tmp_path / "box", broker) as box:
        first = box.install()
        assert first.returncode == 0, first.stdout
        python = device_box.SUITES[suite]
        assert f"deeplens: Python {python} (/usr/bin/python3); the bundle supports 3.11, 3.13" in first.stdout
        assert "Successfully installed" in first.stdout and "externally-managed" not in first.stdout
        venv = box.greengrass / "work" / box.component / "venv"
        assert venv.stat().st_uid == UID  # made by ggc_user, not root
        runtime = "onnxruntime" if variant == "example" else "openvino"
        assert (venv / "lib" / f"python{python}" / "site-packages" / runtime).is_dir()
        again = box.install()  # a restart, or a redeploy of the same runtime
        assert again.returncode == 0 and "the runtime is installed already" in again.stdout
        assert "Successfully installed" not in again.stdout
        box.start(tmp_path / "run.log")
        assert arrived.wait(120), (tmp_path / "run.log").read_text()
        assert f"model running on {runtime}" in (tmp_path / "run.log").read_text()
        assert box.stop() == 0  # SIGTERM: the runner hands over what waits and exits cleanly
    assert [r["frame"] for r in received[:3]] == [1, 2, 3] and all("label" in r for r in received)
    assert box.ipc.published[0][0] == infer_topic(THING) and box.ipc.refused == []


@pytest.mark.slow
def test_a_publish_outside_the_access_control_policy_is_refused_in_the_box(
        bundles: dict[str, Built], tmp_path: Path, broker, results) -> None:
    received, arrived = results
    with _box(_root_filesystem("bookworm"), bundles["refused"].unpacked, tmp_path / "box", broker) as box:
        assert box.install().returncode == 0
        box.start(tmp_path / "run.log")
        assert arrived.wait(120), (tmp_path / "run.log").read_text()
    message = ("Principal com.deeplens.deeplens-example-classifier is not authorized to perform "
               "aws.greengrass.ipc.mqttproxy:aws.greengrass#PublishToIoTCore on resource "
               "$aws/things/another-thing/infer")
    assert received == [{"refused": message}]
    assert box.ipc.refused == [("$aws/things/another-thing/infer", message)]


@pytest.mark.slow
def test_a_kinesis_video_bundle_installs_where_kvssink_is_and_says_so_where_it_is_not(
        bundles: dict[str, Built], tmp_path: Path, broker, results) -> None:
    received, arrived = results
    with _box(_root_filesystem("bookworm"), bundles["kvs"].unpacked, tmp_path / "box", broker) as box:
        missing = box.install()
        assert missing.returncode == 1
        assert ("deeplens: streaming to Kinesis Video stream deeplens-box-stream needs the KVS producer GStreamer "
                "element kvssink on this device") in missing.stdout
        box.add_file("/usr/local/bin/gst-inspect-1.0", KVSSINK)
        assert box.install().returncode == 0
        box.start(tmp_path / "run.log")
        assert arrived.wait(120), (tmp_path / "run.log").read_text()
    assert len(received) >= 3


@pytest.mark.slow
def test_the_box_command_installs_and_runs_a_bundle_and_names_a_refused_publish(
        bundles: dict[str, Built], tmp_path: Path, broker) -> None:
    _root_filesystem("bookworm")
    common = ("--mqtt", f"127.0.0.1:{broker.port}", "--thing", THING, "--work-dir", tmp_path / "work")
    example = bundles["example"]
    done = cli("box", example.bundle, "--public-key", example.public_key, "--results", "2", "--json", *common)
    summary = json.loads(done.output[done.output.index("{"):])
    assert summary["distribution"] == "bookworm" and summary["published"] >= 2
    assert summary["topic"] == infer_topic(THING)
    assert summary["installed"][0] == "deeplens: Python 3.11 (/usr/bin/python3); the bundle supports 3.11, 3.13"
    refused = bundles["refused"]
    output = cli("box", refused.bundle, "--public-key", refused.public_key, *common, expect=11).output
    line = output.strip().splitlines()[-1]
    assert "Traceback" not in output and [x for x in output.splitlines() if x.startswith("error:")] == [line]
    assert line.startswith("error: a publish was refused in the bookworm box: Principal "), line
    assert list((tmp_path / "work").iterdir()) == []  # nothing left behind


def test_the_box_takes_its_archive_from_the_apt_configuration(tmp_path: Path) -> None:
    (tmp_path / "debian.sources").write_text(
        "Types: deb\nURIs: http://archive.example/debian\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://archive.example/debian-security\nSuites: bookworm-security\n")
    (tmp_path / "other.list").write_text("deb [arch=amd64] https://vendor.example/apt stable main\n")
    assert device_box.archive(tmp_path) == "http://archive.example/debian"
    (tmp_path / "debian.sources").unlink()
    with pytest.raises(device_box.BoxError, match="no Debian archive in this machine's apt configuration"):
        device_box.archive(tmp_path)


def test_recipe_variables_are_replaced_as_the_nucleus_replaces_them() -> None:
    variables = {"artifacts:path": "/a", "artifacts:decompressedPath": "/d", "work:path": "/w",
                 "kernel:rootPath": "/g", "iot:thingName": "cam"}
    configuration = {"topic": "t/{x}", "limits": {"n": 3}, "a/b": "slash"}
    text = ("{artifacts:path} {work:path} {iot:thingName} {configuration:/topic} {configuration:/limits} "
            "{configuration:/a~1b} {configuration:/missing} {other:thing}")
    assert device_box.interpolate(text, variables, configuration) == (
        '/a /w cam t/{x} {"n": 3} slash {configuration:/missing} {other:thing}')
