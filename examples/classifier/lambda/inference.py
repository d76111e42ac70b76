"""The example's inference Lambda, shaped like the AWS DeepLens samples.

Greengrass imports the module once and keeps it alive (pinned, no timeout): the work is a loop started at
import that takes the newest frame, runs the model, and publishes the top prediction as JSON to
``$aws/things/<thing>/infer``. The handler itself returns at once.
"""

import json
import os
import threading
import time

MODEL_DIR = os.environ.get("DEEPLENS_MODEL_DIR", "/greengrass-machine-learning/model")
THING = os.environ.get("AWS_IOT_THING_NAME", "deeplens")
TOPIC = f"$aws/things/{THING}/infer"


def _publisher():
    try:
        import greengrasssdk  # present on a Greengrass core
    except ImportError:
        return lambda payload: print(TOPIC, payload, flush=True)
    client = greengrasssdk.client("iot-data")
    return lambda payload: client.publish(topic=TOPIC, payload=payload)


def _frames(height, width):
    """Frames from the DeepLens camera when there is one, else generated frames (for a bench or a CI run)."""
    import numpy as np

    try:
        import awscam
    except ImportError:
        rng = np.random.default_rng(0)
        while True:
            yield rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    while True:
        ok, frame = awscam.getLastFrame()
        if ok:
            yield frame


def infinite_infer_run():
    import numpy as np
    import onnxruntime as ort

    publish = _publisher()
    session = ort.InferenceSession(os.path.join(MODEL_DIR, "model.onnx"), providers=ort.get_available_providers())
    model_input = session.get_inputs()[0]
    _, _, height, width = model_input.shape
    labels_path = os.path.join(MODEL_DIR, "labels.txt")
    labels = open(labels_path).read().split("\n") if os.path.exists(labels_path) else []
    for frame in _frames(height, width):
        start = time.perf_counter()
        # nearest-neighbour resize keeps the template free of OpenCV; HWC uint8 -> NCHW float32
        rows = np.linspace(0, frame.shape[0] - 1, height).astype(int)
        cols = np.linspace(0, frame.shape[1] - 1, width).astype(int)
        tensor = frame[rows][:, cols].transpose(2, 0, 1)[np.newaxis].astype(np.float32) / 255.0
        scores = session.run(None, {model_input.name: tensor})[0][0]
        top = int(scores.argmax())
        publish(json.dumps({
            "label": labels[top] if top < len(labels) else str(top),
            "score": float(scores[top]),
            "latency_ms": round((time.perf_counter() - start) * 1000, 3),
        }))


threading.Thread(target=infinite_infer_run, name="infinite_infer_run", daemon=True).start()


def handler(event, context):
    return None
