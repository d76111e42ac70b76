"""DeepLens's ``awscam`` on any device: camera frames, and the bundle's model run by its runtime.

Shipped by deeplens-build (``[lambda] deeplens_compat = true``) at the end of the import path, so the real
module wins on a DeepLens. A DeepLens-era Lambda keeps its code:

    ret, frame = awscam.getLastFrame()
    model = awscam.Model(model_path, {"GPU": 1})      # whatever the path: the bundle's artifact is loaded
    inference = model.parseResult("ssd", model.doInference(cv2.resize(frame, (300, 300))))

Frames come from ``DEEPLENS_FRAMES`` (a folder of ``.npy`` or image files, shown in a loop unless
``DEEPLENS_FRAMES_ONCE`` is set, or a video file, whose end ends the Lambda),
else the first camera (``/dev/video0``), else generated frames; ``DEEPLENS_FRAME_INTERVAL`` paces them like a
camera, and after ``DEEPLENS_MAX_FRAMES`` frames (``deeplens-build run --max-frames``) the camera has no newer frame
and ``getLastFrame`` waits, as on a device, until the Lambda is stopped. The model is the bundle's artifact in
``DEEPLENS_MODEL_DIR``, loaded by the target backend's ``deeplens_model`` module beside it (onnxruntime with the
best provider present, OpenVINO on the Intel GPU, a TensorRT engine): the DeepLens model optimizer's work was
done at build time. Pixels go in as float32 values, as DeepLens fed its optimized models.
"""

import glob
import os
import threading

DEEPLENS_COMPAT = True
frame_listeners = []
"""Called with every frame ``getLastFrame`` delivers (``DeepLens_Kinesis_Video`` records through it)."""
MODEL_DIR = os.environ.get("DEEPLENS_MODEL_DIR", "/greengrass-machine-learning/model")
_frames = None
_frames_lock = threading.Lock()


def getLastFrame():  # noqa: N802  (DeepLens's name)
    """The newest frame as ``(True, frame)`` (HxWx3 uint8, BGR), or ``(False, None)`` when there is none.

    A recorded video that comes to its end is the end of the emulated device: a DeepLens Lambda's loop would ask
    for the next frame forever, so the process ends there, with ``DEEPLENS_FRAMES_EXHAUSTED`` as its status (after
    the exit hooks, so the results waiting for the broker are handed over).
    """
    global _frames
    with _frames_lock:
        if _frames is None:
            _frames = _limited(_frame_source(os.environ.get("DEEPLENS_FRAMES")))
        ok, frame = next(_frames, (False, None))
        if not ok and os.environ.get("DEEPLENS_FRAMES_EXHAUSTED"):
            import atexit
            import sys

            print("awscam: the video has no more frames", file=sys.stderr)
            atexit._run_exitfuncs()
            os._exit(int(os.environ["DEEPLENS_FRAMES_EXHAUSTED"]))
    if ok:
        for listener in list(frame_listeners):
            listener(frame)
    return ok, frame


def _limited(frames):
    import time

    limit = os.environ.get("DEEPLENS_MAX_FRAMES")
    interval = float(os.environ.get("DEEPLENS_FRAME_INTERVAL", "0"))
    for count, frame in enumerate(frames, start=1):
        yield frame
        if limit is not None and count >= int(limit):
            threading.Event().wait()  # no newer frame will come; the Lambda is stopped from outside
        time.sleep(interval)


def _frame_source(source):
    import numpy as np

    if source and os.path.isdir(source):
        paths = sorted(glob.glob(os.path.join(source, "*")))
        while paths:  # a camera never runs out: show the folder again and again (a video decoded into it: once)
            for path in paths:
                frame = np.load(path) if path.endswith(".npy") else _imread(path)
                if frame is not None:
                    yield True, frame
            if os.environ.get("DEEPLENS_FRAMES_ONCE"):
                return
        return
    if source or os.path.exists("/dev/video0"):
        import cv2

        video = cv2.VideoCapture(source or 0)
        ok, frame = video.read()
        while ok:
            yield True, frame
            ok, frame = video.read()
        return
    rng = np.random.default_rng(0)
    while True:
        yield True, rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)


def _imread(path):
    import cv2

    return cv2.imread(path)


class _Outputs(dict):
    """``{output name: flat array}``, in the model's output order, also indexed by position (``results[0]``):
    DeepLens Lambdas named the outputs of the MXNet symbol they were written for, not the ONNX names."""

    shapes = {}
    """Each output's shape before it was flattened: parseResult tells SSD rows of 6 from Caffe's of 7 by it."""

    def __missing__(self, key):
        if isinstance(key, int) and not isinstance(key, bool):
            return list(self.values())[key]
        raise KeyError(key)


class Model:
    """A model loaded for inference. ``model_path`` and ``loading_config`` are accepted as DeepLens took them;
    the bundle's artifact is what runs."""

    def __init__(self, model_path, loading_config=None):
        import sys

        if MODEL_DIR not in sys.path:
            sys.path.insert(0, MODEL_DIR)
        import deeplens_model

        self._model = deeplens_model.load(MODEL_DIR)
        self._input, shape = self._model.inputs[0]
        self._channels_first = shape[1] in (1, 3)
        self.height, self.width = (shape[2], shape[3]) if self._channels_first else (shape[1], shape[2])

    def doInference(self, frame):  # noqa: N802
        """``{output name: flat float array}`` for one frame (also by position: ``[0]``), resized to the model's
        input first."""
        import numpy as np

        if frame.shape[:2] != (self.height, self.width):
            import cv2

            frame = cv2.resize(frame, (self.width, self.height))
        tensor = frame.astype(np.float32)
        tensor = (tensor.transpose(2, 0, 1) if self._channels_first else tensor)[np.newaxis]
        outputs = self._model.run({self._input: tensor})
        results = _Outputs((name, value.ravel()) for name, value in zip(self._model.outputs, outputs))
        results.shapes = {name: value.shape for name, value in zip(self._model.outputs, outputs)}
        return results

    def parseResult(self, model_type, raw_results):  # noqa: N802
        """DeepLens's result shape: ``{model_type: [{"label": i, "prob": p}, ...]}``, most probable first; for
        ``"ssd"`` each also has ``xmin``, ``ymin``, ``xmax``, ``ymax`` in pixels of the model's input (rows of the
        first output: class, probability, then box corners from 0 to 1; a negative class is padding; Caffe's rows
        start with the image's index, which is skipped)."""
        if model_type not in ("classification", "ssd"):
            # DeepLens also accepted "segmentation" but documented no result shape for it: guessing one would
            # hand the Lambda plausible nonsense, so it is told to read doInference's output itself
            raise ValueError("awscam.Model.parseResult: model_type {!r} is not one whose result shape DeepLens "
                             "documented (classification, ssd); read model.doInference(frame)'s output "
                             "directly".format(model_type))
        name, values = next(iter(raw_results.items()))
        if model_type == "ssd":
            width = getattr(raw_results, "shapes", {}).get(name, (6,))[-1]
            parsed = [{"label": int(row[0]), "prob": float(row[1]),
                       "xmin": float(row[2]) * self.width, "ymin": float(row[3]) * self.height,
                       "xmax": float(row[4]) * self.width, "ymax": float(row[5]) * self.height}
                      for row in values.reshape(-1, width)[:, -6:] if row[0] >= 0]
        else:
            parsed = [{"label": index, "prob": float(prob)} for index, prob in enumerate(values)]
        return {model_type: sorted(parsed, key=lambda item: item["prob"], reverse=True)}
