"""deeplens_publish, the module shipped beside every Lambda: each core's publishing path.

Greengrass IPC and greengrasssdk have no local stand-in (they talk to a running nucleus or v1 core), so those two
branches are tested at their boundary: the client class is replaced by a recorder that checks topic, QoS and
payload. The MQTT branch is tested for real against mosquitto, here and in test_device.py (``run`` goes through
it).
"""

from __future__ import annotations

import importlib
import json
import sys
import types

import pytest

from deeplens_build.device import support


@pytest.fixture
def deeplens_publish(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(support.FOLDER))
    for name in ("IPC_SOCKET", "MQTT"):
        monkeypatch.delenv(getattr(importlib.import_module("deeplens_publish"), name), raising=False)
    monkeypatch.setenv("AWS_IOT_THING_NAME", "deeplens_abc")
    module = importlib.reload(importlib.import_module("deeplens_publish"))
    yield module
    sys.modules.pop("deeplens_publish", None)


class _Recorder:
    calls: list[dict] = []

    def __init__(self, *args, **kwargs):
        _Recorder.calls = []

    def publish_to_iot_core(self, **kwargs):
        _Recorder.calls.append(kwargs)


def test_on_a_v2_core_results_go_through_ipc_with_qos_1(deeplens_publish, monkeypatch: pytest.MonkeyPatch) -> None:
    from awsiot.greengrasscoreipc import clientv2
    from awsiot.greengrasscoreipc.model import QOS

    monkeypatch.setattr(clientv2, "GreengrassCoreIPCClientV2", _Recorder)  # the boundary: no nucleus here
    monkeypatch.setenv(deeplens_publish.IPC_SOCKET, "/greengrass/v2/ipc.socket")
    monkeypatch.setitem(sys.modules, "greengrasssdk", types.SimpleNamespace())  # IPC wins over a v1 SDK
    deeplens_publish.publish({"label": "cat", "score": 0.93})
    assert isinstance(deeplens_publish.publisher(), deeplens_publish.IpcPublisher)
    [call] = _Recorder.calls
    assert call["topic_name"] == "$aws/things/deeplens_abc/infer"
    assert call["qos"] == QOS.AT_LEAST_ONCE
    assert json.loads(call["payload"]) == {"label": "cat", "score": 0.93}


def test_on_a_v1_core_results_go_through_greengrasssdk(deeplens_publish, monkeypatch: pytest.MonkeyPatch) -> None:
    published: list[dict] = []
    sdk = types.SimpleNamespace(client=lambda kind: types.SimpleNamespace(
        publish=lambda **kwargs: published.append({"kind": kind, **kwargs})))
    monkeypatch.setitem(sys.modules, "greengrasssdk", sdk)  # the boundary: the v1 core's own SDK
    deeplens_publish.publish({"label": "dog"})
    assert published == [{"kind": "iot-data", "topic": "$aws/things/deeplens_abc/infer", "payload": '{"label": "dog"}'}]


def test_without_a_core_results_are_printed_and_a_compat_sdk_is_not_taken_for_one(
        deeplens_publish, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "greengrasssdk", types.SimpleNamespace(DEEPLENS_COMPAT=True))
    deeplens_publish.publish({"label": "bird"})
    out, err = capsys.readouterr()
    assert json.loads(out) == {"label": "bird"} and "results go to stdout" in err


@pytest.mark.slow
def test_results_waiting_for_the_broker_are_not_dropped_while_they_are_handed_over(deeplens_publish, tmp_path,
                                                                                   monkeypatch) -> None:
    """A Lambda that publishes before its connection is up, then exits at once (a dying loop does): close() waits
    until the broker has every result, also while the connect callback is handing the waiting ones to paho (a
    window a loaded machine once hit: nothing pending, nothing counted in flight, three results dropped)."""
    import time

    from helpers import Broker

    broker = Broker(tmp_path)  # its port is chosen; it starts only once the results wait
    monkeypatch.setenv(deeplens_publish.STATS, str(tmp_path / "stats.json"))
    publisher = deeplens_publish.MqttPublisher(f"127.0.0.1:{broker.port}", buffer=10)
    handed = publisher._client.publish

    def slow_hand_over(*args, **kwargs):
        time.sleep(0.3)  # close() polls every 50 ms
        return handed(*args, **kwargs)

    monkeypatch.setattr(publisher._client, "publish", slow_hand_over)
    for frame in range(3):
        publisher.publish("$aws/things/deeplens_abc/infer", json.dumps({"frame": frame}))
    broker.start()
    try:
        publisher.close()
    finally:
        broker.stop()
    counts = json.loads((tmp_path / "stats.json").read_text())
    assert counts == {"results": 3, "published": 3, "dropped": 0, "reconnects": 0, "messages": 0,
                      "topics": ["$aws/things/deeplens_abc/infer"]}
