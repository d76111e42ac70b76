"""``watch`` reads what DeepLens Lambdas publish: ``{label: probability}`` maps, status strings, plain text, beside
deeplens-build's own results; a status message is shown and never counted as an inference."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from deeplens_build.device.mqtt import publisher
from deeplens_build.device.watch import describe, watch
from deeplens_build.manifest import infer_topic


@pytest.mark.parametrize(("result", "line"), [
    ({"frame": 3, "label": "cat", "score": 0.93, "latency_ms": 1.25}, "     3 cat                  0.930 1.2 ms"),
    ({"cat": 0.1, "dog": 0.85, "bird": 0.05}, "       dog                  0.850  (then cat 0.100, bird 0.050)"),
    ({"person": 1}, "       person               1.000"),
    ("Model loaded", "status: Model loaded"),
    ({"raw": "inference started"}, "status: inference started"),
    ({"boxes": [[1, 2, 3, 4]], "label": None}, "       None                 nan nan ms"),
    ({"detections": [1, 2]}, '{"detections": [1, 2]}'),
])
def test_each_payload_is_one_readable_line(result: object, line: str) -> None:
    assert describe(result) == line


def test_status_messages_are_shown_and_not_counted(tmp_path: Path, broker) -> None:
    shown: list[object] = []
    subscribed, stop = threading.Event(), threading.Event()
    counted: list[int] = []
    listener = threading.Thread(target=lambda: counted.append(watch(
        "127.0.0.1", broker.port, "cam", count=2, emit=shown.append, stop=stop, subscribed=subscribed)))
    listener.start()
    assert subscribed.wait(30)
    with publisher("127.0.0.1", broker.port) as publish:
        for payload in (b'"Model loaded"', b'{"dog": 0.9, "cat": 0.1}', b"warming up", b'{"label": "cat"}'):
            publish(infer_topic("cam"), payload)
    listener.join(30)
    stop.set()
    assert counted == [2]
    assert shown == ["Model loaded", {"dog": 0.9, "cat": 0.1}, {"raw": "warming up"}, {"label": "cat"}]
