"""The precision stage at ``precision = "int8"``: a calibrated INT8 artifact, shipped only when it passes the gate.

onnxruntime's static quantization writes QDQ (QuantizeLinear/DequantizeLinear pairs around each quantized node):
weights int8 per output channel, activations calibrated (``[calibration] method``) on the calibration set, the
model's inputs and outputs float32 as at FP16. QDQ is the one graph every target reads as INT8: onnxruntime runs it
with its integer kernels, OpenVINO turns the pairs into its INT8 IR, TensorRT builds its INT8 engine from them
(explicit quantization; symmetric activations, as it requires). The gate compares the artifact with the original
on the validation set, which calibration never saw: class scores by top-1 agreement (``[parity]
top1_agreement``), other outputs within the INT8 bounds. When plain INT8 fails, the nodes that lose most are kept
in float — those reading the tensors with the lowest signal-to-quantization-noise ratio (onnxruntime's
``qdq_loss_debug`` on calibration samples) first — by the mechanism FP16 uses (:func:`precision.kept_in_float`).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from deeplens_build import onnxtools
from deeplens_build.calibration import CalibrationSet
from deeplens_build.config import Bounds, DetectionMatch
from deeplens_build.records import CalibrationReport, ParityReport
from deeplens_build.report import Reporter
from deeplens_build.stages.parity import compare
from deeplens_build.values import Optimized, ReferenceRun

PER_CHANNEL_OPSET = 13
"""The first opset whose DequantizeLinear takes an axis: per-channel weights."""
LOSS_SAMPLES = 8
"""Calibration samples the per-tensor loss is measured on: the order of the search, not its verdict."""


@dataclasses.dataclass(frozen=True)
class Int8Settings:
    bounds: Mapping[str | None, Bounds]
    top1: float
    method: str
    symmetric: bool
    """Symmetric activations (zero point 0): what TensorRT's explicit quantization requires."""
    task: str
    seed: int
    detection: DetectionMatch
    max_opset: int | None
    """The device's ceiling: per-channel weights need opset 13, to which an older graph is raised where allowed."""


def to_int8(optimized: Optimized, reference: ReferenceRun, samples: CalibrationSet, settings: Int8Settings, *,
            workdir: Path, reporter: Reporter) -> Optimized:
    """The INT8 artifact with as few nodes kept in float as the gate needs; ``optimized`` is the FP32 one."""
    import onnx

    from deeplens_build.stages.precision import kept_in_float, name_nodes

    scratch = workdir / "scratch"
    scratch.mkdir()
    model = onnx.load(str(optimized.artifact.path))
    name_nodes(model)  # onnxruntime excludes nodes from quantization by name
    if (onnxtools.opset(model) or PER_CHANNEL_OPSET) < PER_CHANNEL_OPSET and (
            settings.max_opset is None or settings.max_opset >= PER_CHANNEL_OPSET):
        model = onnx.version_converter.convert_version(model, PER_CHANNEL_OPSET)
    per_channel = (onnxtools.opset(model) or PER_CHANNEL_OPSET) >= PER_CHANNEL_OPSET
    (workdir / "float").mkdir()
    source = onnxtools.save(model, workdir / "float" / "model.onnx")[0]
    target = workdir / "model.onnx"

    def trial(block: tuple[str, ...]) -> ParityReport:
        _quantize(source, target, samples.calibration, block, settings, scratch, per_channel=per_channel)
        return compare(reference, onnxtools.runner(target), optimized.artifact.outputs, bounds=settings.bounds,
                       task=settings.task, seed=settings.seed, runtime="onnxruntime, INT8", top1=settings.top1,
                       detection=settings.detection)

    # the plain INT8 model is still at target when the search asks for the candidates
    block, _ = kept_in_float("INT8", trial, lambda: _by_loss(source, target, samples.calibration[:LOSS_SAMPLES],
                                                              scratch), reporter)
    shutil.rmtree(workdir / "float")
    scratch.rmdir()
    files = onnxtools.files(target)
    return Optimized(artifact=dataclasses.replace(optimized.artifact, path=target, extra_files=files[1:]),
                     precision="int8", passes=(*optimized.passes, "int8-qdq-mixed" if block else "int8-qdq"),
                     size_before=optimized.size_before, opset=onnxtools.opset(model), fp32_nodes=block,
                     calibration=CalibrationReport(sha256=samples.sha256, calibration=len(samples.calibration),
                                                   validation=len(samples.validation), method=settings.method))


class _Reader:
    """The calibration samples as onnxruntime's ``CalibrationDataReader`` is read: ``get_next`` until None."""

    def __init__(self, samples: Iterable[Mapping[str, Any]]):
        self._samples = iter(samples)

    def get_next(self) -> Mapping[str, Any] | None:
        return next(self._samples, None)

    def __iter__(self):  # qdq_loss_debug iterates it
        return iter(self.get_next, None)


def _quantize(source: Path, target: Path, samples: tuple[Mapping[str, Any], ...], block: tuple[str, ...],
              settings: Int8Settings, scratch: Path, *, per_channel: bool) -> None:
    import logging

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    written = scratch / "quantized.onnx"
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    # its advice to pre-process goes to the root logger: the optimize stage has done that work already
    logging.disable(logging.WARNING)
    try:
        quantize_static(source, written, _Reader(samples), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QInt8 if settings.symmetric else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=list(block), use_external_data_format=True,
                        calibrate_method=methods[settings.method],
                        extra_options={"ActivationSymmetric": settings.symmetric, "WeightSymmetric": True})
    finally:
        logging.disable(logging.NOTSET)
    onnxtools.save(onnxtools.load(written), target)  # the weights as the core keeps them, beside the graph
    for leftover in scratch.iterdir():
        leftover.unlink()


def _by_loss(source: Path, quantized: Path, samples: tuple[Mapping[str, Any], ...], scratch: Path) -> list[str]:
    """The float model's quantizable nodes, those reading the most degraded tensors of the plain INT8 model
    first (lowest signal-to-quantization-noise ratio), then the rest from the outputs back."""
    import onnx
    from onnxruntime.quantization import qdq_loss_debug as debug

    augmented_float, augmented_int8 = scratch / "float.onnx", scratch / "int8.onnx"
    debug.modify_model_output_intermediate_tensors(source, augmented_float, save_as_external_data=True)
    debug.modify_model_output_intermediate_tensors(quantized, augmented_int8, save_as_external_data=True)
    matching = debug.create_activation_matching(debug.collect_activations(str(augmented_int8), _Reader(samples)),
                                                debug.collect_activations(str(augmented_float), _Reader(samples)))
    loss = debug.compute_activation_error(matching)
    for leftover in scratch.iterdir():
        leftover.unlink()
    nodes = [n for n in onnx.load(str(source), load_external_data=False).graph.node if n.name]
    worst_first = sorted(loss, key=lambda tensor: loss[tensor].get("qdq_err", float("inf")))
    ordered = [n.name for tensor in worst_first for n in nodes if tensor in n.input]
    ordered += [n.name for n in reversed(nodes)]
    return list(dict.fromkeys(ordered))
