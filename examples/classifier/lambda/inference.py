"""The example's inference Lambda, shaped like the AWS DeepLens samples.

Greengrass imports the module once and keeps it alive (pinned, no timeout): the work is a loop started at
import that takes the newest frame, resizes it to the model's input, runs the model, and publishes the top
prediction as JSON to ``$aws/things/<thing>/infer``. The handler returns at once. The model is loaded by
``deeplens_model``, which the bundle's target backend ships in the model folder: onnxruntime, OpenVINO (on the
Intel GPU when there is one) or a TensorRT engine built on the device — this code is the same for each.

Frames come from the DeepLens camera (``awscam``) when there is one; otherwise from ``DEEPLENS_FRAMES`` (a folder
of ``.npy`` HxWx3 uint8 frames, or of images, or a video file, read with OpenCV), or generated frames. Results go
through ``deeplens_publish`` (shipped beside this module by deeplens-build): Greengrass IPC on a v2 core, the
Greengrass SDK on a v1 core, MQTT under ``deeplens-build run``. ``DEEPLENS_MAX_FRAMES`` stops the loop after N
frames (for an emulator or a CI run).
"""

import glob
import os
import sys
import threading
import time

import deeplens_publish
from deeplens_preprocess import to_tensor  # shipped beside this module, the calibration's own definition

MODEL_DIR = os.environ.get("DEEPLENS_MODEL_DIR", "/greengrass-machine-learning/model")
sys.path.insert(0, MODEL_DIR)
import deeplens_model  # noqa: E402  (the target backend's loader, in the bundle's model folder)


def _frames(source):
    """Yield HxWx3 uint8 frames forever (or until the source runs out)."""
    import numpy as np

    try:
        import awscam  # the DeepLens camera
    except ImportError:
        awscam = None
    if awscam is not None:
        while True:
            ok, frame = awscam.getLastFrame()
            if ok:
                yield frame
    elif source and os.path.isdir(source):
        for path in sorted(glob.glob(os.path.join(source, "*"))):
            if path.endswith(".npy"):
                yield np.load(path)
            else:
                import cv2

                frame = cv2.imread(path)
                if frame is not None:
                    yield frame
    elif source:
        import cv2

        video = cv2.VideoCapture(source)
        ok, frame = video.read()
        while ok:
            yield frame
            ok, frame = video.read()
    else:
        rng = np.random.default_rng(0)
        while True:
            yield rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)


def _annotated(frame, text):
    import cv2

    frame = frame.copy()
    cv2.putText(frame, text, (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 1, (255, 165, 20), 2)
    return frame


def infinite_infer_run(max_frames=None):
    model = deeplens_model.load(MODEL_DIR)  # onnxruntime, OpenVINO or TensorRT: whatever the bundle targets
    print("model running on " + model.device, file=sys.stderr)
    input_name, input_shape = model.inputs[0]
    labels_path = os.path.join(MODEL_DIR, "labels.txt")
    labels = open(labels_path).read().splitlines() if os.path.exists(labels_path) else []
    interval = float(os.environ.get("DEEPLENS_FRAME_INTERVAL", "0"))  # an emulated camera's frame period
    for count, frame in enumerate(_frames(os.environ.get("DEEPLENS_FRAMES")), start=1):
        start = time.perf_counter()
        scores = model.run({input_name: to_tensor(frame, input_shape)})[0][0]
        top = int(scores.argmax())
        label = labels[top] if top < len(labels) else str(top)
        deeplens_publish.publish({
            "frame": count,
            "label": label,
            "index": top,
            "score": float(scores[top]),
            "latency_ms": round((time.perf_counter() - start) * 1000, 3),
        })
        if os.environ.get(deeplens_publish.STREAM):  # someone watches the project stream
            deeplens_publish.show(_annotated(frame, f"{label} {scores[top]:.2f}"))
        if max_frames is not None and count >= max_frames:
            return
        time.sleep(interval)


_MAX = os.environ.get("DEEPLENS_MAX_FRAMES")
_loop = threading.Thread(target=infinite_infer_run, args=(int(_MAX) if _MAX else None,), name="infinite_infer_run",
                         daemon=_MAX is None)
_loop.start()


def handler(event, context):
    return None
