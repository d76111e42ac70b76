"""Publish inference results the way the core in front of this Lambda expects. Shipped by deeplens-build in
every Lambda zip, beside the Lambda's own modules; it needs nothing of deeplens-build.

    import deeplens_publish

    deeplens_publish.publish({"label": "cat", "score": 0.93})    # to $aws/things/<thing>/infer, QoS 1

The path is chosen once, by what the process finds around it:

- a Greengrass v2 core (the nucleus sets ``AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT``): Greengrass
  IPC, ``publish_to_iot_core`` with QoS 1 (``awsiotsdk``, which the runtime definitions install). Printing
  would only reach the component's log, never MQTT;
- ``deeplens-build run`` (``DEEPLENS_MQTT=HOST:PORT``): MQTT straight to that broker, QoS 1; while the broker is
  down, up to ``DEEPLENS_MQTT_BUFFER`` results wait (the oldest are dropped first);
- a Greengrass v1 core (DeepLens): ``greengrasssdk``'s ``iot-data`` client;
- none of these (a developer running the module by hand): one JSON line per result on stdout, said once.

``show(frame)`` is the project stream: the annotated frame, as JPEG, at ``stream_path()`` (``$DEEPLENS_STREAM``,
else ``/tmp/results.mjpeg`` as on DeepLens), where ``deeplens-build run --stream`` serves it to a browser.
"""

import atexit
import json
import os
import sys
import threading
import time
import uuid
from collections import deque

IPC_SOCKET = "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT"
STREAM = "DEEPLENS_STREAM"
MQTT = "DEEPLENS_MQTT"
MQTT_BUFFER = "DEEPLENS_MQTT_BUFFER"
STATS = "DEEPLENS_PUBLISH_STATS"
FLUSH_SECONDS = 5.0

_lock = threading.Lock()
_chosen = None


def topic(thing=None):
    """The device's results topic: ``$aws/things/<thing>/infer`` (the thing from ``AWS_IOT_THING_NAME``)."""
    return "$aws/things/{}/infer".format(thing or os.environ.get("AWS_IOT_THING_NAME", "deeplens"))


def publish(result, topic_name=None):
    """Publish ``result`` (a JSON-serialisable value, or a ready str/bytes payload) to ``topic_name``."""
    payload = result if isinstance(result, (str, bytes)) else json.dumps(result)
    publisher().publish(topic_name or topic(), payload)


def stream_path():
    """Where the project stream's frames go."""
    return os.environ.get(STREAM, "/tmp/results.mjpeg")


def show(frame):
    """Put ``frame`` (HxWx3 uint8, BGR, already annotated) on the project stream; a no-op without OpenCV."""
    try:
        import cv2
    except ImportError:
        return
    ok, jpeg = cv2.imencode(".jpg", frame)
    if ok:
        path = stream_path()
        with open(path + ".tmp", "wb") as f:
            f.write(jpeg.tobytes())
        os.replace(path + ".tmp", path)  # a reader never sees half a frame


def publisher():
    """The publishing path for this process, chosen on first use."""
    global _chosen
    with _lock:
        if _chosen is None:
            _chosen = _choose()
        return _chosen


def _choose():
    if os.environ.get(IPC_SOCKET):
        return IpcPublisher()
    if os.environ.get(MQTT):
        return MqttPublisher(os.environ[MQTT], buffer=int(os.environ.get(MQTT_BUFFER, "1000")))
    try:
        import greengrasssdk
    except ImportError:
        greengrasssdk = None
    if greengrasssdk is not None and not getattr(greengrasssdk, "DEEPLENS_COMPAT", False):
        return GreengrassV1Publisher(greengrasssdk)
    print("deeplens_publish: no Greengrass core and no MQTT broker here: results go to stdout", file=sys.stderr)
    return StdoutPublisher()


class IpcPublisher:
    """Greengrass v2: the nucleus's IPC, QoS 1."""

    def __init__(self):
        from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
        from awsiot.greengrasscoreipc.model import QOS

        self._client = GreengrassCoreIPCClientV2()
        self._qos = QOS.AT_LEAST_ONCE

    def publish(self, topic_name, payload):
        data = payload.encode() if isinstance(payload, str) else payload
        self._client.publish_to_iot_core(topic_name=topic_name, qos=self._qos, payload=data)


class GreengrassV1Publisher:
    """Greengrass v1 (DeepLens): the core's own SDK."""

    def __init__(self, greengrasssdk):
        self._client = greengrasssdk.client("iot-data")

    def publish(self, topic_name, payload):
        self._client.publish(topic=topic_name, payload=payload)


class StdoutPublisher:
    def publish(self, topic_name, payload):
        print(payload if isinstance(payload, str) else payload.decode(), flush=True)


def is_status(payload):
    """A status message (``"Model loaded"``, any text that is not a JSON object or array), not an inference
    result: DeepLens Lambdas publish both to the same topic."""
    try:
        value = json.loads(payload)
    except ValueError:
        return True
    return not isinstance(value, (dict, list))


class MqttPublisher:
    """MQTT to a broker (``deeplens-build run``), QoS 1: counts what the broker acknowledged, inference results
    and status messages apart, keeps up to ``buffer`` of them while it is down and reconnects; writes its counts
    and the topics it published to to ``$DEEPLENS_PUBLISH_STATS``.

    Our lock guards counters only and is never held while calling paho: paho's network thread holds its own
    locks while it runs our callbacks, so holding ours around a paho call would invert the order and deadlock.
    Which kind a message id was is kept under a second lock, for an acknowledgement that may come back before
    ``publish`` has returned its id.
    """

    def __init__(self, address, buffer):
        import paho.mqtt.client as mqtt

        host, _, port = address.rpartition(":")
        self._pending = deque(maxlen=buffer)
        self._lock = threading.Lock()
        self._ids = threading.Lock()
        self._kinds, self._early = {}, set()
        self.messages = self.acknowledged_messages = 0
        self.topics = set()
        self._connected = threading.Event()
        self.results = self.sent = self.acknowledged = self.dropped = self.connects = 0
        self._stats = os.environ.get(STATS)
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                   client_id="deeplens-lambda-{}".format(uuid.uuid4().hex[:12]))
        self._client.reconnect_delay_set(min_delay=1, max_delay=2)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = lambda *args: self._connected.clear()
        self._client.on_publish = self._on_publish
        self._client.connect_async(host, int(port), keepalive=10)
        self._client.loop_start()
        atexit.register(self.close)

    def publish(self, topic_name, payload):
        status = is_status(payload)
        with self._lock:
            if status:
                self.messages += 1
            else:
                self.results += 1
            self.topics.add(topic_name)
            online = self._connected.is_set()
            if online:
                self.sent += 1
            else:
                if len(self._pending) == self._pending.maxlen:
                    self.dropped += 1
                self._pending.append((topic_name, payload, status))
            self._write_stats()
        if online:
            self._send(topic_name, payload, status)

    def close(self):
        """Give the broker a few seconds to take what is waiting, then record the counts and disconnect."""
        deadline = time.monotonic() + FLUSH_SECONDS
        while self._waiting() and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            # whatever the broker did not acknowledge is lost: waiting, unacknowledged, or being published by the
            # Lambda's thread at the very moment the process was told to stop
            self.dropped = self.results - self.acknowledged
            self._pending.clear()
            self._write_stats()
        self._client.disconnect()
        self._client.loop_stop()

    def _waiting(self):
        with self._lock:
            return bool(self._pending) or self.sent > self.acknowledged + self.acknowledged_messages

    def _send(self, topic_name, payload, status):
        """Hand a result to paho; it was counted as sent, under the lock, when it left ``_pending`` (or never
        entered it): close() must never find a result in neither place and stop waiting for it."""
        # paho keeps an unacknowledged QoS 1 message and sends it again after a reconnect
        mid = self._client.publish(topic_name, payload, qos=1).mid
        with self._ids:
            acknowledged = mid in self._early
            if acknowledged:
                self._early.discard(mid)
            else:
                self._kinds[mid] = status
        if acknowledged:
            self._count_acknowledged(status)

    def _on_connect(self, client, userdata, flags, reason, properties):
        if reason.is_failure:
            return
        with self._lock:
            self.connects += 1
            self._connected.set()
            waiting = list(self._pending)
            self._pending.clear()
            self.sent += len(waiting)
        for item in waiting:
            self._send(*item)

    def _on_publish(self, client, userdata, mid, reason, properties):
        with self._ids:
            if mid not in self._kinds:
                self._early.add(mid)
                return
            status = self._kinds.pop(mid)
        self._count_acknowledged(status)

    def _count_acknowledged(self, status):
        with self._lock:
            if status:
                self.acknowledged_messages += 1
            else:
                self.acknowledged += 1
            self._write_stats()

    def _write_stats(self):
        if not self._stats:
            return
        temporary = self._stats + ".tmp"
        with open(temporary, "w") as f:
            json.dump({"results": self.results, "published": self.acknowledged, "dropped": self.dropped,
                       "reconnects": max(0, self.connects - 1), "messages": self.acknowledged_messages,
                       "topics": sorted(self.topics)}, f)
        os.replace(temporary, self._stats)
