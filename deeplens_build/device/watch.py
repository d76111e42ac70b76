"""``deeplens-build watch``: the results a device publishes, printed as they arrive (the DeepLens project
output), and the listener behind ``run --stream``."""

from __future__ import annotations

import json
import threading
from typing import Any

from deeplens_build.device.mqtt import client, connect
from deeplens_build.manifest import infer_topic


def is_inference(result: Any) -> bool:
    """An inference result (a JSON object or array), not a status message: DeepLens Lambdas also publish
    strings such as ``"Model loaded"``, and text that is not JSON."""
    return isinstance(result, list) or (isinstance(result, dict) and set(result) != {"raw"})


def status_text(result: Any) -> str:
    return str(result["raw"] if isinstance(result, dict) else result)


def headline(result: Any) -> tuple[str, float | None, str]:
    """An inference result's label, score and runners-up: deeplens-build's ``label``/``score``, the top of a
    DeepLens ``{label: probability}`` map and the next three, else the result as compact JSON."""
    if isinstance(result, dict) and "label" in result:
        score = result.get("score")
        return str(result["label"]), score if _number(score) else None, ""
    if isinstance(result, dict) and result and all(_number(v) for v in result.values()):
        ranked = sorted(result.items(), key=lambda item: -item[1])
        return str(ranked[0][0]), ranked[0][1], ", ".join(f"{label} {p:.3f}" for label, p in ranked[1:4])
    return json.dumps(result, sort_keys=True), None, ""


def describe(result: Any) -> str:
    """One line a person reads: ``frame label score latency`` for deeplens-build's own results, the top label
    and the next ones for a DeepLens ``{label: probability}`` map, ``status:`` for a message."""
    if not is_inference(result):
        return f"status: {status_text(result)}"
    label, score, others = headline(result)
    if isinstance(result, dict) and "label" in result:
        latency = result.get("latency_ms")
        return (f"{result.get('frame', ''):>6} {label:<20} {score if score is not None else float('nan'):.3f} "
                f"{latency if _number(latency) else float('nan'):.1f} ms")
    if score is None:
        return label
    return f"{'':>6} {label:<20} {score:.3f}" + (f"  (then {others})" if others else "")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
