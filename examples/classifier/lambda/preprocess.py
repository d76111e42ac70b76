"""Frame preprocessing, kept apart from inference.py so it can be imported without starting the loop."""


def to_tensor(frame, shape):
    """Resize (nearest neighbour, no OpenCV needed) and lay out a frame as the model's float input in [0, 1]."""
    import numpy as np

    channels_first = shape[1] in (1, 3)
    height, width = (shape[2], shape[3]) if channels_first else (shape[1], shape[2])
    rows = np.linspace(0, frame.shape[0] - 1, height).astype(int)
    cols = np.linspace(0, frame.shape[1] - 1, width).astype(int)
    image = frame[rows][:, cols].astype(np.float32) / 255.0
    return (image.transpose(2, 0, 1) if channels_first else image)[np.newaxis]
