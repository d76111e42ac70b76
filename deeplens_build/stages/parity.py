"""Parity stage (shared by every framework and backend): the original model and the artifact, same inputs.

Inputs are seeded random tensors plus the user's own samples (``.npy`` for a one-input model, ``.npz`` keyed
by input name). The original runs once per sample (:func:`run_reference`); every candidate — the FP16 search's
trials, the compiled artifact on its backend's runtime — is compared against those outputs. The build fails
when any output differs by more than the tolerance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from deeplens_build import onnxtools
from deeplens_build.config import Bounds, DetectionMatch, ParityConfig
from deeplens_build.digest import file_sha256
from deeplens_build.errors import ConfigError, ParityError
from deeplens_build.records import OutputParity, ParityReport, TensorSpec
from deeplens_build.report import Reporter
from deeplens_build.types import Artifact, Runner, TrainingOutput
from deeplens_build.values import Detection, Optimized, ReferenceRun

if TYPE_CHECKING:
    import numpy as np

    from deeplens_build.build import Build


def samples_for(specs: tuple[TensorSpec, ...], config: ParityConfig) -> list[dict[str, np.ndarray]]:
    """The inputs parity compares on: seeded random tensors, then the user's own samples."""
    import numpy as np

    config.check_input_size({s.name: tuple(int(d) for d in s.shape) for s in specs},
                            itemsizes={s.name: np.dtype(s.dtype).itemsize for s in specs},
                            where="the model's inputs")
    return [*random_inputs(specs, config.seed, config.random_samples),
            *(load_sample(path, specs) for path in config.samples)]


def run_reference(reference: Runner, samples: list[dict[str, np.ndarray]], outputs: tuple[TensorSpec, ...], *,
                  workdir: Path, reporter: Reporter) -> ReferenceRun:
    """Run the original model (``reference``, the plugin's run) on every sample, once, and keep what it gave:
    the FP16 search and the parity of every backend compare against the same outputs."""
    import numpy as np

    arrays = {}
    with reporter.progress(total=len(samples), desc="reference", unit="sample") as bar:
        for index, inputs in enumerate(samples):
            expected = reference(inputs)
            arrays.update({f"in/{index}/{name}": value for name, value in inputs.items()})
            arrays.update({f"out/{index}/{spec.name}": np.asarray(expected[spec.name]) for spec in outputs})
            bar.update(1)
    path = workdir / "reference.npz"
    np.savez(path, **arrays)
    return ReferenceRun(path=path, samples=len(samples))


def load_reference(run: ReferenceRun) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """The samples and the original model's outputs for each, as :func:`run_reference` kept them."""
    import numpy as np

    inputs: list[dict[str, np.ndarray]] = [{} for _ in range(run.samples)]
    outputs: list[dict[str, np.ndarray]] = [{} for _ in range(run.samples)]
    with np.load(run.path, allow_pickle=False) as stored:
        for key in stored.files:
            side, index, name = key.split("/", 2)
            (inputs if side == "in" else outputs)[int(index)][name] = stored[key]
    return inputs, outputs


def compare(reference: ReferenceRun, candidate: Runner, outputs: tuple[TensorSpec, ...], *,
            bounds: Mapping[str | None, Bounds], task: str, seed: int, runtime: str,
            top1: float | None = None, detection: DetectionMatch | None = None) -> ParityReport:
    """Run ``candidate`` on the reference's samples and measure it against the original's outputs.

    :param bounds: each output's bounds by name, under None those of the others (``ParityConfig.bounds_for``).
    :param top1: judge class-score outputs by top-1 agreement instead, at least this share (INT8's gate).
    :param detection: at ``task = "detection"``, judge ``[class, score, box]`` row outputs by matching detections
        (``[parity.detection]``) instead of element by element.
    :param runtime: what ``candidate`` is, for the report (``"openvino CPU"``).
    :raises ParityError: when an output's shape differs (no figure would mean anything).
    """
    import numpy as np

    samples, expected = load_reference(reference)
    names = [o.name for o in outputs]
    abs_diff = dict.fromkeys(names, 0.0)
    rel_diff = dict.fromkeys(names, 0.0)
    within = dict.fromkeys(names, True)
    own = {name: bounds.get(name, bounds[None]) for name in names}
    agree = dict.fromkeys(names, 0)
    classifier = {o.name: task == "classification" and _is_class_scores(o) for o in outputs}
    detector = {o.name: task == "detection" and detection is not None and _is_detection_rows(o) for o in outputs}
    matched = dict.fromkeys(names, 1.0)
    for inputs, wanted in zip(samples, expected, strict=True):
        actual = candidate(inputs)
        for name in names:
            want = np.asarray(wanted[name], dtype=np.float64)
            got = np.asarray(actual[name], dtype=np.float64)
            if detector[name] and want.shape[-1] == got.shape[-1]:  # row counts differ where a layer pads
                agreement, largest = _detections_agree(want, got, detection, own[name])
                matched[name] = min(matched[name], agreement)
                abs_diff[name] = max(abs_diff[name], largest)
                continue
            if want.shape != got.shape:
                raise ParityError(f"output {name!r}: the original model gives shape {list(want.shape)} but the "
                                  f"artifact ({runtime}) gives {list(got.shape)}{_task_hint(outputs, task)}")
            diff = np.abs(want - got)
            abs_diff[name] = max(abs_diff[name], float(diff.max(initial=0.0)))
            rel_diff[name] = max(rel_diff[name], float((diff / np.maximum(np.abs(want), 1e-6)).max(initial=0.0)))
            # NaN compares false, so a NaN anywhere fails
            within[name] &= bool(np.all(diff <= own[name].tolerance + own[name].rtol * np.abs(want)))
            if classifier[name]:
                agree[name] += int(np.array_equal(want.argmax(axis=-1), got.argmax(axis=-1)))
    count = len(samples)
    if top1 is not None:
        within.update({n: agree[n] / count >= top1 for n in names if classifier[n]})
    if detection is not None:
        within.update({n: matched[n] >= detection.agreement for n in names if detector[n]})
    results = tuple(OutputParity(name=n, max_abs_diff=abs_diff[n], max_rel_diff=rel_diff[n],
                                 top1_agreement=agree[n] / count if classifier[n] else None, passed=within[n],
                                 tolerance=own[n].tolerance, rtol=own[n].rtol,
                                 detection_agreement=matched[n] if detector[n] else None) for n in names)
    return ParityReport(max_abs_diff=max(abs_diff.values()), max_rel_diff=max(rel_diff.values()),
                        tolerance=bounds[None].tolerance, rtol=bounds[None].rtol, passed=all(within.values()),
                        samples=count, seed=seed, outputs=results, runtime=runtime)


def require(report: ParityReport, *, remedy: str) -> ParityReport:
    """``report`` when it passed; otherwise a ParityError naming the worst output, its figures and ``remedy``."""
    if report.passed:
        return report
    worst = max((o for o in report.outputs if o.passed is False), key=lambda o: o.max_abs_diff,
                default=max(report.outputs, key=lambda o: o.max_abs_diff))
    top1 = f", top-1 agreement {worst.top1_agreement:.0%}" if worst.top1_agreement is not None else ""
    if worst.detection_agreement is not None:
        top1 += f", detections agreeing {worst.detection_agreement:.0%} (class, IoU and score; [parity.detection])"
    tolerance = worst.tolerance if worst.tolerance is not None else report.tolerance
    rtol = worst.rtol if worst.rtol is not None else report.rtol
    raise ParityError(
        f"parity failed for output {worst.name!r} on {report.runtime}: max abs diff {worst.max_abs_diff:.3g}, max "
        f"rel diff {worst.max_rel_diff:.3g}, beyond tolerance {tolerance:.3g} + rtol {rtol:.3g} × |original|"
        f"{top1} ({report.samples} samples, seed {report.seed}); the artifact does not compute what the original "
        f"does. {remedy}")


def random_inputs(specs: tuple[TensorSpec, ...], seed: int, count: int) -> list[dict[str, np.ndarray]]:
    """``count`` seeded input sets: standard normal floats, small non-negative integers, random booleans."""
    import numpy as np

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        sample = {}
        for spec in specs:
            dtype = np.dtype(spec.dtype)
            shape = tuple(int(d) for d in spec.shape)
            if dtype.kind == "f":
                sample[spec.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind in "iu":
                sample[spec.name] = rng.integers(0, 10, size=shape).astype(dtype)
            elif dtype.kind == "b":
                sample[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
            else:
                raise ConfigError(f"input {spec.name!r} has dtype {spec.dtype}, for which no random inputs can be "
                                  "made; give sample inputs in `parity.samples` and set `parity.random_samples`")
        samples.append(sample)
    return samples


def load_sample(path: Path, specs: tuple[TensorSpec, ...], setting: str = "parity.samples") -> dict[str, np.ndarray]:
    """One user sample: ``.npy`` for a one-input model, ``.npz`` with one array per input name.

    :param setting: the setting that named the file, for messages."""
    import numpy as np

    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"`{setting}`: cannot read {path}: {exc}") from exc
    if isinstance(loaded, np.ndarray):
        if len(specs) != 1:
            raise ConfigError(f"`{setting}`: {path.name} holds one array but the model has "
                              f"{len(specs)} inputs; save an .npz keyed by {', '.join(s.name for s in specs)}")
        arrays = {specs[0].name: loaded}
    else:
        arrays = {name: loaded[name] for name in loaded.files}
    sample = {}
    for spec in specs:
        if spec.name not in arrays:
            raise ConfigError(f"`{setting}`: {path.name} has no array for input {spec.name!r}")
        array = arrays[spec.name]
        if tuple(array.shape) != tuple(spec.shape):
            raise ConfigError(f"`{setting}`: {path.name} gives input {spec.name!r} shape {list(array.shape)}, "
                              f"the model takes {list(spec.shape)}")
        sample[spec.name] = array.astype(spec.dtype)
    return sample


def _task_hint(outputs: tuple[TensorSpec, ...], task: str) -> str:
    """Detection rows compared element by element fail on what NMS leaves in its padding: say what compares them."""
    if task == "detection" or not any(_is_detection_rows(o) for o in outputs):
        return ""
    return (" The outputs look like detection rows ([class, score, box]): set `model.task = \"detection\"` to "
            "compare them as detections ([parity.detection]).")


def _is_detection_rows(spec: TensorSpec) -> bool:
    """Rows of ``[class, score, xmin, ymin, xmax, ymax]``: DeepLens's SSD layout (``parseResult('ssd')``), or
    Caffe's ``DetectionOutput`` rows, which start with the image's index."""
    return len(spec.shape) >= 2 and spec.shape[-1] in (6, 7)


def _detections_agree(want: np.ndarray, got: np.ndarray, match: DetectionMatch,
                      bounds: Bounds) -> tuple[float, float]:
    """Matched detections over the larger count, for one sample (a negative class is padding), and the largest
    difference of a matched pair's score and corners."""
    import numpy as np

    def kept(rows: np.ndarray) -> np.ndarray:
        rows = rows.reshape(-1, rows.shape[-1])[:, -6:]
        return rows[(rows[:, 0] >= 0) & (rows[:, 1] >= match.score)]

    wanted, found = kept(want), kept(got)
    if not len(wanted) and not len(found):
        return 1.0, 0.0
    free = np.ones(len(found), dtype=bool)
    hits, largest = 0, 0.0
    for row in wanted[np.argsort(-wanted[:, 1])]:
        overlap = _iou(row[2:], found[:, 2:])
        fits = free & (found[:, 0] == row[0]) & (overlap >= match.iou) & \
            (np.abs(found[:, 1] - row[1]) <= bounds.tolerance + bounds.rtol * abs(row[1]))
        if fits.any():
            pair = int(np.argmax(np.where(fits, overlap, -1.0)))  # the closest box, not the first that fits
            free[pair] = False
            hits += 1
            largest = max(largest, float(np.abs(found[pair, 1:] - row[1:]).max()))
    return hits / max(len(wanted), len(found)), largest


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    import numpy as np

    low, high = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=1)
    area = np.prod(np.clip(box[2:] - box[:2], 0, None)) + np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None),
                                                                  axis=1)
    return inter / np.maximum(area - inter, 1e-12)


def _is_class_scores(spec: TensorSpec) -> bool:
    """A (batch, classes) output with more than one class."""
    return len(spec.shape) == 2 and isinstance(spec.shape[-1], int) and spec.shape[-1] > 1


def reference(b: Build, training: TrainingOutput, detection: Detection, converted: Artifact,
              optimized: Optimized) -> ReferenceRun | None:
    """The reference stage: the original model's outputs on the parity samples, computed once for every
    comparison after."""
    if optimized.artifact.format != "onnx":
        b.reporter.note(f"parity: not applicable, the {optimized.artifact.format} artifact is the original model "
                        "itself")
        return None
    config = b.config
    specs = optimized.artifact.inputs
    key = {"source": training.sha256, "files": detection.model.files, "plugin": b.plugin_identity(detection),
           "inputs": [dataclasses.asdict(s) for s in specs],
           "outputs": [dataclasses.asdict(s) for s in optimized.artifact.outputs],
           "seed": config.parity.seed, "random_samples": config.parity.random_samples,
           "samples": [file_sha256(p) for p in config.parity.samples if p.is_file()], "tools": b.tools}
    int8 = config.model.precision == "int8"
    if int8:  # INT8 is judged on the owner's validation samples: random inputs are not what it was calibrated for
        from deeplens_build import calibration

        key["calibration"] = calibration.identity(config.calibration)

    def build(workdir: Path) -> ReferenceRun:
        if int8:
            from deeplens_build import calibration

            b.reporter.step(f"reference: the original model ({detection.plugin.framework.name}) on the calibration's "
                            "validation samples")
            samples = list(calibration.load(config.calibration, specs).validation)
        else:
            b.reporter.step(f"reference: the original model ({detection.plugin.framework.name}) on the parity "
                            "samples")
            samples = samples_for(specs, config.parity)
        with original(b, detection, training, converted, workdir) as reference_runner:
            return run_reference(reference_runner, samples, optimized.artifact.outputs, workdir=workdir,
                                 reporter=b.reporter)

    return b.stage("reference", key, ReferenceRun, build)


@contextlib.contextmanager
def original(b: Build, detection: Detection, training: TrainingOutput, converted: Artifact,
             workdir: Path) -> Iterator[Runner]:
    """The original model, run by its plugin, with a scratch folder in the stage's ``workdir`` that is removed
    when the block ends (nothing of it enters the cache); the plugin then frees what it kept loaded, before the
    artifact is loaded beside it."""
    scratch = workdir / "scratch"
    scratch.mkdir()
    settings = b.settings[detection.plugin.framework.name]
    try:
        yield lambda inputs: b.manager.reference_run(detection, training, converted, inputs, settings, scratch)
    finally:
        try:
            b.manager.reference_done(detection, converted, scratch)
        finally:
            shutil.rmtree(scratch)


def runner(b: Build, optimized: Optimized, compiled: Artifact) -> tuple[str, Runner]:
    """How this machine runs what the device will: the backend's runtime when it runs here, else onnxruntime."""
    backend = b.target.backend
    if backend.load is None:
        return "onnxruntime (ONNX artifact)", onnxtools.runner(optimized.artifact.path)
    loaded = b.manager.call_target(b.target, "load the compiled artifact", backend.load, compiled)
    return backend.name, lambda inputs: b.manager.call_target(b.target, "run the compiled artifact", loaded, inputs)


def run(b: Build, optimized: Optimized, compiled: Artifact, reference: ReferenceRun | None) -> ParityReport | None:
    """The parity stage: the original against what the device executes, on its own runtime where it runs here."""
    if reference is None:
        return None
    config, backend = b.config, b.target.backend
    bounds = config.parity.bounds_for(optimized.precision)
    key = {"artifact": [file_sha256(p) for p in compiled.files],
           "onnx": [file_sha256(p) for p in optimized.artifact.files], "reference": file_sha256(reference.path),
           "bounds": {str(k): dataclasses.asdict(v) for k, v in bounds.items()}, "task": config.model.task,
           "target": b.target_identity, "tools": b.tools}
    top1 = config.parity.top1_agreement if optimized.precision == "int8" else None  # INT8's gate, on the target
    key.update(top1=top1, detection=config.parity.detection.model_dump())

    def build(_: Path) -> ParityReport:
        name, candidate = runner(b, optimized, compiled)
        b.reporter.step(f"parity: original vs {compiled.format} on {name}")
        if backend.load is None:
            b.reporter.note(f"parity: {backend.name} does not run on this machine; compared the ONNX artifact it "
                            "compiles from, in onnxruntime")
        report = compare(reference, candidate, optimized.artifact.outputs, bounds=bounds, task=config.model.task,
                         seed=config.parity.seed, runtime=name, top1=top1, detection=config.parity.detection)
        try_fp32 = "" if optimized.precision == "fp32" else "Try `model.precision = \"fp32\"`, or "
        return require(report, remedy=f"{try_fp32 or 'Try '}another `target.backend`; raise `parity.tolerance`, "
                                      "`parity.rtol` or one output's `[parity.outputs.NAME]` only if the difference "
                                      f"is acceptable.{_task_hint(optimized.artifact.outputs, config.model.task)}")

    return b.stage("parity", key, ParityReport, build)
