"""What a bundle's manifest records as it is: a model's tensors, the training job, parity and latency figures.

Frozen dataclasses, like every value in :mod:`deeplens_build.types` (which uses them); here so that reading a
bundle (``verify``, ``inspect``, a device) builds these few, not every type of the pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

Dim = int | str
"""One dimension of a tensor: a size, or the name of a dynamic dimension (``"N"``)."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model.

    :param name: the tensor's name in the model.
    :param shape: its dimensions; a ``str`` marks a dynamic one (the optimizer makes inputs static).
    :param dtype: a numpy dtype name, e.g. ``"float32"``.
    :param layout: ``"NCHW"``, ``"NHWC"`` or None when not an image; the Lambda uses it to feed frames.
    """

    name: str
    shape: tuple[Dim, ...]
    dtype: str
    layout: str | None = None


@dataclass(frozen=True)
class SageMakerJob:
    """What a SageMaker training job says about the output it left (``sagemaker-job:NAME`` sources)."""

    name: str
    arn: str
    training_image: str
    framework_hint: str | None
    hyperparameters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Latency:
    """Latency of one runtime on the build machine, batch 1, after warm-up runs."""

    runtime: str
    median_ms: float
    p95_ms: float
    runs: int


@dataclass(frozen=True)
class OutputParity:
    """Parity figures for one output over every compared sample."""

    name: str
    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float | None
    passed: bool | None = None
    """Every element within ``tolerance + rtol * |original|`` (None in manifests written before this existed)."""
    tolerance: float | None = None
    rtol: float | None = None
    detection_agreement: float | None = None
    """At ``task = "detection"``, for ``[class, score, box]`` rows: the least per-sample agreement of detections."""


@dataclass(frozen=True)
class ParityReport:
    """Original vs artifact on the same inputs; ``passed``: every output within its bounds (``tolerance`` and
    ``rtol`` are those of the outputs ``[parity.outputs]`` does not name).

    :param runtime: what ran the artifact on the build machine, e.g. ``"openvino CPU"``.
    """

    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    passed: bool
    samples: int
    seed: int
    outputs: tuple[OutputParity, ...]
    runtime: str = "onnxruntime"
    rtol: float = 0.0

    @property
    def top1_agreement(self) -> float | None:
        """The least top-1 agreement of its class-score outputs; None when it has none."""
        return min((o.top1_agreement for o in self.outputs if o.top1_agreement is not None), default=None)

    @property
    def detection_agreement(self) -> float | None:
        """The least detection agreement of its detection-row outputs; None when it has none."""
        return min((o.detection_agreement for o in self.outputs if o.detection_agreement is not None), default=None)


@dataclass(frozen=True)
class CalibrationReport:
    """At ``precision = "int8"``: what the artifact was calibrated and gated on.

    :param sha256: digest of the sample files read (names and bytes).
    :param calibration: samples the activations' ranges were calibrated on.
    :param validation: samples, held out, the gate compared on (the parity report's figures).
    """

    sha256: str
    calibration: int
    validation: int
    method: str
