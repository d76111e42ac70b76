"""INT8 calibration data: the owner's inputs from ``[calibration] samples``, split seeded into the set the
activations' ranges are calibrated on and the validation set the gate compares on (which calibration never sees).

Tensors (``.npy`` for one input, ``.npz`` keyed by input name) are taken as they are; images (JPEG/PNG) are
decoded as OpenCV and ``awscam`` give frames (BGR) and made into the input by ``deeplens_preprocess.to_tensor``,
the function the Lambda ships with, with ``[calibration.preprocess]``: the model is calibrated on what the
device will feed it.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deeplens_build.config import MIN_CALIBRATION, CalibrationConfig
from deeplens_build.device import support
from deeplens_build.digest import tree_sha256
from deeplens_build.errors import ConfigError
from deeplens_build.records import TensorSpec
from deeplens_build.stages.parity import load_sample

if TYPE_CHECKING:
    import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TENSOR_SUFFIXES = (".npy", ".npz")
MIN_VALIDATION = 8


@dataclass(frozen=True)
class CalibrationSet:
    """The samples read, split; ``sha256`` digests the files read (names and bytes)."""

    calibration: tuple[dict[str, np.ndarray], ...]
    validation: tuple[dict[str, np.ndarray], ...]
    sha256: str


def files(config: CalibrationConfig) -> list[Path]:
    """The sample files ``[calibration] samples`` offers, in name order.

    :raises ConfigError: for a folder that is missing or holds too few of them.
    """
    folder = config.samples
    if folder is None or not folder.is_dir():
        raise ConfigError(f"Field `calibration.samples` points to {folder}, which is not a folder of inputs")
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (*IMAGE_SUFFIXES,
                                                                                       *TENSOR_SUFFIXES))
    if len(found) < MIN_CALIBRATION:
        raise ConfigError(f"`calibration.samples` ({folder}) holds {len(found)} inputs (.npy, .npz, .jpg, .png); "
                          f"INT8 needs at least {MIN_CALIBRATION}, to calibrate on and to validate on apart: add "
                          f"{MIN_CALIBRATION - len(found)} more")
    return found


def identity(config: CalibrationConfig) -> dict[str, object]:
    """What the samples drawn from ``config`` depend on, for cache keys: the files offered and the settings."""
    offered = files(config)
    return {"files": tree_sha256(config.samples, [p.name for p in offered]),
            "settings": config.model_dump(mode="json", exclude={"samples"})}


def load(config: CalibrationConfig, specs: tuple[TensorSpec, ...]) -> CalibrationSet:
    """At most ``max_samples`` of the samples, drawn seeded, read and split.

    :raises ConfigError: naming a file that cannot be read or does not fit the model's inputs.
    """
    import numpy as np

    offered = files(config)
    order = np.random.default_rng(config.seed).permutation(len(offered))[:config.max_samples]
    chosen = [offered[i] for i in order]
    samples = [_read(path, specs, config) for path in chosen]
    name, batch = specs[0].name, specs[0].shape[0]
    if batch != 1 and all(s[name].shape[0] == 1 for s in samples):  # images, for a model taking N frames at once
        samples = [{name: np.concatenate([s[name] for s in samples[i:i + batch]])}
                   for i in range(0, len(samples) - batch + 1, batch)]
    held_out = max(MIN_VALIDATION, round(len(samples) * config.validation))
    names = [p.name for p in chosen]
    return CalibrationSet(calibration=tuple(samples[held_out:]), validation=tuple(samples[:held_out]),
                          sha256=tree_sha256(config.samples, names))


def _read(path: Path, specs: tuple[TensorSpec, ...], config: CalibrationConfig) -> dict[str, np.ndarray]:
    if path.suffix.lower() in TENSOR_SUFFIXES:
        return load_sample(path, specs, setting="calibration.samples")
    image_inputs = [s for s in specs if len(s.shape) == 4 and s.shape[1 if s.layout != "NHWC" else 3] in (1, 3)]
    if len(specs) != 1 or not image_inputs:
        raise ConfigError(f"`calibration.samples`: {path.name} is an image, but the model's inputs "
                          f"({', '.join(s.name for s in specs)}) are not one image: give .npy/.npz tensors")
    try:
        import cv2
    except ImportError as exc:
        raise ConfigError("`calibration.samples` holds images: decoding them needs OpenCV "
                          "(pip install opencv-python-headless), or give .npy tensors") from exc
    frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if frame is None:
        raise ConfigError(f"`calibration.samples`: {path.name} is not an image OpenCV can read")
    spec = specs[0]
    one = [1, *spec.shape[1:]]  # a frame: a model taking a batch of N gets N images (see load)
    return {spec.name: _preprocess().to_tensor(frame, one, config.preprocess.model_dump()).astype(spec.dtype)}


@functools.cache
def _preprocess():
    """``deeplens_preprocess``, the very file the Lambda zip carries."""
    spec = importlib.util.spec_from_file_location("deeplens_preprocess", support.PREPROCESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
