"""``deeplens-build watch``: the results a device publishes, printed as they arrive (the DeepLens project
output), and the listener behind ``run --stream``."""

from __future__ import annotations

import json
import threading
from typing import Any

from deeplens_build.device.mqtt import client, connect
from deeplens_build.manifest import infer_topic


def is_inference(result: Any) -> bool:
    """An inference result (a JSON object or array), not a status message: DeepLens Lambdas also publish strings such as
    ``"Model loaded"``, and text that is not JSON."""
    return isinstance(result, list) or (isinstance(result, dict) and set(result) != {"raw"})


def describe(result: Any) -> str:
    """One line a person reads: ``frame label score latency`` for deeplens-build's own results, the top label
    and the next ones for a DeepLens ``{label: probability}`` map, ``status:`` for a message."""
    if not is_inference(result):
        return f"status: {result['raw'] if isinstance(result, dict) else result}"
    if isinstance(result, list):
        return json.dumps(result)
    if "label" in result:
        score, latency = result.get("score"), result.get("latency_ms")
        return (f"{result.get('frame', ''):>6} {str(result['label']):<20} "
                f"{score if isinstance(score, (int, float)) else float('nan'):.3f} "
                f"{latency if isinstance(latency, (int, float)) else float('nan'):.1f} ms")
    scores = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if scores and len(scores) == len(result):
        ranked = sorted(scores.items(), key=lambda item: -item[1])
        rest = ", ".join(f"{label} {p:.3f}" for label, p in ranked[1:4])
        return f"{'':>6} {ranked[0][0]:<20} {ranked[0][1]:.3f}" + (f"  (then {rest})" if rest else "")
    return json.dumps(result, sort_keys=True)


def watch(host: str, port: int, thing: str, *, count: int | None, emit: Any, stop: threading.Event,
          subscribed: threading.Event | None = None) -> int:
    """Subscribe to the thing's infer topic and hand every message to ``emit``; return how many inference results
    arrived (``count`` counts those: a status message is shown, never counted).

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
        emit(result)
        if not is_inference(result):
            return
        received += 1
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
