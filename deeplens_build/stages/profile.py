"""Profile stage: latency at batch 1 of each runtime this build machine has, on the same input.

Like Model Navigator's profiling: the original framework (the plugin's reference run), onnxruntime on the ONNX
artifact, and the target backend's own runtime on the compiled artifact when it runs here. A few warm-up runs
first (first-call allocation and lazy compilation are not the model's latency), then ``runs`` timed ones.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from deeplens_build.report import Reporter
from deeplens_build.records import Latency
from deeplens_build.types import Runner

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
