"""The IPC stand-in against the real ``awsiotsdk`` client (awscrt's eventstream RPC over a Unix socket): what
the recipe's policy allows reaches mosquitto, anything else is refused with the nucleus's error, and a wrong
token never connects."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from deeplens_build.device.ipc import MQTT_PROXY, IpcServer, allowed, policies
from deeplens_build.device.mqtt import publisher
from deeplens_build.device.watch import watch

ACCESS = {MQTT_PROXY: {"c:mqttproxy:1": {"operations": ["aws.greengrass#PublishToIoTCore"],
                                         "resources": ["$aws/things/cam-1/infer"]}}}
CLIENT = """
import sys
from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
from awsiot.greengrasscoreipc.model import QOS, UnauthorizedError
client = GreengrassCoreIPCClientV2()
for topic in sys.argv[1:]:
    try:
        client.publish_to_iot_core(topic_name=topic, qos=QOS.AT_LEAST_ONCE, payload=b'{"label": "cat"}')
        print("published", topic)
    except UnauthorizedError as exc:
        print("refused", exc.message)
"""


def _client(socket: Path, token: str, *topics: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT": str(socket), "SVCUID": token}
    return subprocess.run([sys.executable, "-c", CLIENT, *topics], capture_output=True, text=True, timeout=60,
                          env=environment)


def test_the_real_client_publishes_what_the_policy_allows_and_is_refused_the_rest(tmp_path: Path, broker) -> None:
    received: list[dict] = []
    subscribed, stop = threading.Event(), threading.Event()
    listener = threading.Thread(target=watch, args=("127.0.0.1", broker.port, "cam-1"),
                                kwargs={"count": 1, "emit": received.append, "stop": stop, "subscribed": subscribed})
    listener.start()
    assert subscribed.wait(30)
    with publisher("127.0.0.1", broker.port) as forward, \
            IpcServer(tmp_path / "ipc.socket", "com.deeplens.x", policies(ACCESS, MQTT_PROXY), forward) as server:
        done = _client(tmp_path / "ipc.socket", server.token, "$aws/things/cam-1/infer", "$aws/things/cam-2/infer")
    listener.join(30)
    stop.set()
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "published $aws/things/cam-1/infer",
        "refused Principal com.deeplens.x is not authorized to perform aws.greengrass.ipc.mqttproxy:"
        "aws.greengrass#PublishToIoTCore on resource $aws/things/cam-2/infer"]
    assert received == [{"label": "cat"}]
    assert server.published == [("$aws/things/cam-1/infer", b'{"label": "cat"}')]
    assert [topic for topic, _ in server.refused] == ["$aws/things/cam-2/infer"]


def test_a_wrong_token_does_not_connect(tmp_path: Path) -> None:
    with IpcServer(tmp_path / "ipc.socket", "c", (), lambda topic, payload: None) as server:
        done = _client(tmp_path / "ipc.socket", "not-" + server.token, "t")
    assert done.returncode != 0 and "published" not in done.stdout
    assert server.published == []


@pytest.mark.parametrize(("resource", "topic", "expected"), [
    ("$aws/things/cam-1/infer", "$aws/things/cam-1/infer", True),
    ("$aws/things/+/infer", "$aws/things/cam-9/infer", True),
    ("$aws/things/#", "$aws/things/cam-9/infer/x", True),
    ("$aws/things/*", "$aws/things/cam-9/infer", True),
    ("$aws/things/+/infer", "$aws/things/cam-9/other", False),
    ("$aws/things/cam-1/infer", "$aws/things/cam-1/infer/more", False),
])
def test_resources_match_as_the_nucleus_matches_them(resource: str, topic: str, expected: bool) -> None:
    rules = policies({MQTT_PROXY: {"p": {"operations": ["*"], "resources": [resource]}}}, MQTT_PROXY)
    assert allowed(rules, "aws.greengrass#PublishToIoTCore", topic) is expected
