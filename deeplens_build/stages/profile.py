"""Profile stage: latency at batch 1 of each runtime this build machine has, on the same input.

Like Model Navigator's profiling: the original framework (the plugin's reference run), onnxruntime on the ONNX
artifact, and the target backend's own runtime on the compiled artifact when it runs here. A few warm-up runs
first (first-call allocation and lazy compilation are not the model's latency), then ``runs`` timed ones.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from deeplens_build import onnxtools
from deeplens_build.digest import file_sha256
from deeplens_build.records import Latency
from deeplens_build.report import Reporter
from deeplens_build.stages import parity
from deeplens_build.types import Artifact, Runner, TrainingOutput
from deeplens_build.values import Detection, Optimized, ReferenceRun

if TYPE_CHECKING:
    from deeplens_build.build import Build

WARMUP = 3


def profile(runners: Mapping[str, Runner], inputs: Mapping[str, object], *, runs: int,
            reporter: Reporter) -> tuple[Latency, ...]:
    """One :class:`Latency` per runner, in the order given."""
    import numpy as np

    results = []
    for name, runner in runners.items():
        for _ in range(WARMUP):
            runner(inputs)
        times = []
        with reporter.progress(total=runs, desc=f"profile {name}", unit="run") as bar:
            for _ in range(runs):
                start = time.perf_counter()
                runner(inputs)
                times.append((time.perf_counter() - start) * 1000)
                bar.update(1)
        results.append(Latency(runtime=name, median_ms=round(float(np.median(times)), 4),
                               p95_ms=round(float(np.percentile(times, 95)), 4), runs=runs))
    return tuple(results)


def run(b: Build, training: TrainingOutput, detection: Detection, converted: Artifact, optimized: Optimized,
        compiled: Artifact, reference: ReferenceRun | None) -> tuple[Latency, ...]:
    """``[profile] runs = N``: latencies of the original, onnxruntime and the backend's runtime, batch 1."""
    runs = b.config.profile.runs
    if not runs or reference is None:
        return ()
    key = {"artifact": [file_sha256(p) for p in compiled.files],
           "onnx": [file_sha256(p) for p in optimized.artifact.files], "source": training.sha256,
           "plugin": b.plugin_identity(detection), "target": b.target_identity, "runs": runs, "tools": b.tools}

    def build(workdir: Path) -> tuple[Latency, ...]:
        b.reporter.step(f"profile: {runs} runs per runtime, batch 1")
        samples, _ = parity.load_reference(reference)
        with parity.original(b, detection, training, converted, workdir) as reference_runner:
            runners: dict[str, Runner] = {f"original ({detection.plugin.framework.name})": reference_runner,
                                          "onnxruntime": onnxtools.runner(optimized.artifact.path, prepack=True)}
            if b.target.backend.load is not None and b.target.backend.name != "onnxruntime":
                runners[b.target.backend.name] = parity.runner(b, optimized, compiled)[1]
            return profile(runners, samples[0], runs=runs, reporter=b.reporter)

    return b.stage("profile", key, tuple[Latency, ...], build)  # type: ignore[arg-type]
