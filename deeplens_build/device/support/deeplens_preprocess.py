"""How a camera frame becomes the model's input: on the device, in every Lambda that imports it, and in the build,
which turns INT8 calibration images into tensors with this same function, so the device feeds the model what it
was calibrated on.

    from deeplens_preprocess import to_tensor
    tensor = to_tensor(frame, input_shape)     # frame: HxWx3 uint8 as OpenCV and awscam give it (BGR)

The settings are the project's ``[calibration.preprocess]``; the recipe passes them to the Lambda as
``DEEPLENS_PREPROCESS`` (JSON), and without it the defaults below apply: values in [0, 1], channels as read (BGR).
"""

import json
import os

SETTINGS = "DEEPLENS_PREPROCESS"
DEFAULTS = {"scale": 1.0 / 255.0, "mean": [0.0], "std": [1.0], "rgb": False}


def settings():
    """The preprocessing this device was built for."""
    chosen = dict(DEFAULTS)
    chosen.update(json.loads(os.environ.get(SETTINGS) or "{}"))
    return chosen


def to_tensor(frame, shape, options=None):
    """Resize ``frame`` (nearest neighbour: no OpenCV needed) to the input ``shape``, reorder its channels to RGB
    when asked, scale it, subtract ``mean`` and divide by ``std`` (per channel, or one value for all), and lay it
    out as the model's float32 input, NCHW or NHWC as ``shape`` says, batch 1."""
    import numpy as np

    chosen = options or settings()
    channels_first = shape[1] in (1, 3)
    height, width = (shape[2], shape[3]) if channels_first else (shape[1], shape[2])
    rows = np.linspace(0, frame.shape[0] - 1, height).astype(int)
    cols = np.linspace(0, frame.shape[1] - 1, width).astype(int)
    image = frame[rows][:, cols].astype(np.float32)
    if chosen["rgb"]:
        image = image[..., ::-1]
    mean = np.asarray(chosen["mean"], np.float32)
    std = np.asarray(chosen["std"], np.float32)
    image = (image * np.float32(chosen["scale"]) - mean) / std
    return np.ascontiguousarray((image.transpose(2, 0, 1) if channels_first else image)[np.newaxis], np.float32)
