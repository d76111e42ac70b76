"""The MQTT side of ``run`` and ``watch``: the broker's address, and clients that fail in seconds when it is not
there, then keep reconnecting."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from deeplens_build.errors import DeviceError, UsageError

CONNECT_TIMEOUT = 10.0
"""Seconds to wait for the broker before ``run`` or ``watch`` gives up."""


def parse_broker(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"--mqtt {text!r} is not HOST:PORT with a port from 1 to 65535")
    return host, int(port)


def client(prefix: str) -> Any:
    """A paho client with an id of its own: two clients with one id make the broker drop the older one."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{prefix}-{uuid.uuid4().hex[:12]}")
    client.reconnect_delay_set(min_delay=1, max_delay=2)
    client.connect_timeout = CONNECT_TIMEOUT
    return client


def connect(client: Any, host: str, port: int, ready: threading.Event) -> None:
    """Connect now (so a wrong address fails in seconds, not never), then keep reconnecting in the background.

    :param ready: set by the client's callbacks once the broker accepted (and, for ``watch``, subscribed).
    """
    try:
        client.connect(host, port, keepalive=10)
    except (OSError, ValueError) as exc:
        raise DeviceError(f"cannot reach the MQTT broker at {host}:{port} ({exc}); start one (e.g. mosquitto) "
                          "or pass --mqtt HOST:PORT") from exc
    client.loop_start()
    if not ready.wait(CONNECT_TIMEOUT):
        client.loop_stop()
        raise DeviceError(f"the MQTT broker at {host}:{port} did not accept the connection within "
                          f"{CONNECT_TIMEOUT:.0f} s")



@contextlib.contextmanager
def publisher(host: str, port: int) -> Iterator[Callable[[str, bytes], None]]:
    """A function publishing ``(topic, payload)`` to the broker with QoS 1, returning once it acknowledged.

    :raises DeviceError: when the broker cannot be reached, or does not acknowledge within ``CONNECT_TIMEOUT``.
    """
    ready = threading.Event()
    sender = client("deeplens-ipc")
    sender.on_connect = lambda client, userdata, flags, reason, properties: reason.is_failure or ready.set()
    connect(sender, host, port, ready)

    def publish(topic: str, payload: bytes) -> None:
        sent = sender.publish(topic, payload, qos=1)
        sent.wait_for_publish(CONNECT_TIMEOUT)
        if not sent.is_published():
            raise DeviceError(f"the MQTT broker at {host}:{port} did not acknowledge a result on {topic}")

    try:
        yield publish
    finally:
        sender.disconnect()
        sender.loop_stop()
