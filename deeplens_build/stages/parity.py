"""Parity stage (shared by every framework): the original model and the optimized artifact, same inputs.

Inputs are seeded random tensors plus the user's own samples (``.npy`` for a one-input model, ``.npz`` keyed
by input name). The build fails when any output differs by more than the tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from deeplens_build import onnxtools
from deeplens_build.config import ParityConfig
from deeplens_build.errors import ConfigError, ParityError
from deeplens_build.report import Reporter
from deeplens_build.types import OptimizedModel, OutputParity, ParityReport, TensorSpec

if TYPE_CHECKING:
    import numpy as np

Runner = Callable[[Mapping[str, "np.ndarray"]], Mapping[str, "np.ndarray"]]


def check_parity(reference: Runner, optimized: OptimizedModel, *, config: ParityConfig, task: str,
                 reporter: Reporter) -> ParityReport:
    """Compare ``reference`` (the plugin's run of the original) with onnxruntime on ``optimized``.

    :raises ParityError: naming the output and the figures when the difference passes the tolerance.
    """
    import numpy as np

    tolerance = config.tolerance_for(optimized.precision)
    samples = [*random_inputs(optimized.inputs, config.seed, config.random_samples),
               *(load_sample(path, optimized.inputs) for path in config.samples)]
    session = onnxtools.session_for(optimized.path)
    names = [o.name for o in optimized.outputs]
    abs_diff = dict.fromkeys(names, 0.0)
    rel_diff = dict.fromkeys(names, 0.0)
    agree = dict.fromkeys(names, 0)
    classifier = {o.name: task == "classification" and _is_class_scores(o) for o in optimized.outputs}
    with reporter.progress(total=len(samples), desc="parity", unit="sample") as bar:
        for inputs in samples:
            expected = reference(inputs)
            actual = dict(zip(names, session.run(names, inputs), strict=True))
            for name in names:
                want = np.asarray(expected[name], dtype=np.float64)
                got = np.asarray(actual[name], dtype=np.float64)
                if want.shape != got.shape:
                    raise ParityError(f"output {name!r}: the original model gives shape {list(want.shape)} but the "
                                      f"optimized artifact gives {list(got.shape)}")
                diff = np.abs(want - got)
                abs_diff[name] = max(abs_diff[name], float(diff.max(initial=0.0)))
                rel_diff[name] = max(rel_diff[name], float((diff / np.maximum(np.abs(want), 1e-6)).max(initial=0.0)))
                if classifier[name]:
                    agree[name] += int(np.array_equal(want.argmax(axis=-1), got.argmax(axis=-1)))
            bar.update(1)
    outputs = tuple(OutputParity(name=n, max_abs_diff=abs_diff[n], max_rel_diff=rel_diff[n],
                                 top1_agreement=agree[n] / len(samples) if classifier[n] else None) for n in names)
    report = ParityReport(max_abs_diff=max(abs_diff.values()), max_rel_diff=max(rel_diff.values()),
                          tolerance=tolerance, passed=max(abs_diff.values()) <= tolerance, samples=len(samples),
                          seed=config.seed, outputs=outputs)
    worst = max(outputs, key=lambda o: o.max_abs_diff)
    if not report.passed:
        top1 = f", top-1 agreement {worst.top1_agreement:.0%}" if worst.top1_agreement is not None else ""
        raise ParityError(
            f"parity failed for output {worst.name!r}: max abs diff {worst.max_abs_diff:.3g} > tolerance "
            f"{tolerance:.3g} (max rel diff {worst.max_rel_diff:.3g}{top1}, {len(samples)} samples, seed "
            f"{config.seed}); the optimized artifact does not compute what the original does. Try "
            "`model.precision = \"fp32\"`, or raise `parity.tolerance` if the difference is acceptable.")
    return report


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


def load_sample(path: Path, specs: tuple[TensorSpec, ...]) -> dict[str, np.ndarray]:
    """One user sample: ``.npy`` for a one-input model, ``.npz`` with one array per input name."""
    import numpy as np

    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"`parity.samples`: cannot read {path}: {exc}") from exc
    if isinstance(loaded, np.ndarray):
        if len(specs) != 1:
            raise ConfigError(f"`parity.samples`: {path.name} holds one array but the model has "
                              f"{len(specs)} inputs; save an .npz keyed by {', '.join(s.name for s in specs)}")
        arrays = {specs[0].name: loaded}
    else:
        arrays = {name: loaded[name] for name in loaded.files}
    sample = {}
    for spec in specs:
        if spec.name not in arrays:
            raise ConfigError(f"`parity.samples`: {path.name} has no array for input {spec.name!r}")
        array = arrays[spec.name]
        if tuple(array.shape) != tuple(spec.shape):
            raise ConfigError(f"`parity.samples`: {path.name} gives input {spec.name!r} shape {list(array.shape)}, "
                              f"the model takes {list(spec.shape)}")
        sample[spec.name] = array.astype(spec.dtype)
    return sample


def _is_class_scores(spec: TensorSpec) -> bool:
    """A (batch, classes) output with more than one class."""
    return len(spec.shape) == 2 and isinstance(spec.shape[-1], int) and spec.shape[-1] > 1
