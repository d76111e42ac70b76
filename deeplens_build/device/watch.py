"""``deeplens-build watch``: the results a device publishes, printed as they arrive (the DeepLens project
output), and the listener behind ``run --stream``."""

from __future__ import annotations

import json
import threading
from typing import Any

from deeplens_build.device.mqtt import client, connect
from deeplens_build.manifest import infer_topic


def watch(host: str, port: int, thing: str, *, count: int | None, emit: Any, stop: threading.Event,
          subscribed: threading.Event | None = None) -> int:
    """Subscribe to the thing's infer topic and hand every result to ``emit``; return how many arrived.

    :param subscribed: set once the broker confirmed the subscription, so a caller can start publishing.
    :raises DeviceError: when the broker cannot be reached.
    """
    received = 0
    done = threading.Event()
    ready = subscribed or threading.Event()

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if not reason.is_failure:
            client.subscribe(infer_topic(thing), qos=1)

    def on_subscribe(client: Any, userdata: Any, mid: Any, reasons: Any, properties: Any) -> None:
        ready.set()

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

    listener = client("deeplens-watch")
    listener.on_connect, listener.on_subscribe, listener.on_message = on_connect, on_subscribe, on_message
    connect(listener, host, port, ready)
    try:
        while not done.is_set() and not stop.is_set():
            done.wait(0.2)
    finally:
        listener.disconnect()
        listener.loop_stop()
    return received
