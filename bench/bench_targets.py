"""Target backends on the build machine's CPU: latency of each compiled artifact vs the original framework.

    .venv/bin/python bench/bench_targets.py

A ResNet-18 (MXNet Gluon's model zoo, seeded random weights: latency does not depend on training) saved as a
SageMaker MXNet job leaves it, packaged for each backend that runs here with ``[profile] runs``; the figures are
the manifest's profile (median of the timed runs, batch 1, same input): each runtime's speed-up over MXNet
running the original. Goal: the best backend ≥ 1.5× faster than the original. TensorRT needs an NVIDIA GPU:
``bench/bench_tensorrt.py`` measures it on one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from deeplens_build_mxnet import _mxnet

from deeplens_build import testing

SHAPE = (1, 3, 224, 224)
RUNS = 50
GOAL = 1.5


def resnet18(folder: Path) -> Path:
    """Gluon's ResNet-18 v1, exported as ``model-symbol.json`` + ``model-0001.params``."""
    mx = _mxnet()
    mx.random.seed(0)
    net = mx.gluon.model_zoo.vision.resnet18_v1(pretrained=False, classes=10)
    net.initialize(mx.init.Xavier())
    net.hybridize()
    net(mx.nd.zeros(SHAPE))
    folder.mkdir(parents=True)
    net.export(str(folder / "model"), epoch=1)
    return folder


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        source = resnet18(Path(tmp) / "out")
        for backend in ("onnxruntime", "openvino"):
            for precision in ("fp32", "fp16"):
                config = testing.write_project(Path(tmp) / f"{backend}-{precision}", source=source,
                                               model={"precision": precision},
                                               inputs={"data": {"shape": list(SHAPE)}},
                                               target={"backend": backend}, profile={"runs": RUNS},
                                               parity={"random_samples": 2})
                profile = testing.build(config).manifest.profile
                original = profile[0].median_ms
                for latency in profile[1:]:
                    name = f"{latency.runtime}, {precision}" if latency.runtime == backend else None
                    if name:
                        results[name] = {"median_ms": latency.median_ms, "p95_ms": latency.p95_ms,
                                         "original_ms": original, "speedup": original / latency.median_ms}
    print(f"{'runtime':24} {'median ms':>10} {'p95 ms':>8} {'original ms':>12} {'speed-up':>9}")
    for name, row in results.items():
        print(f"{name:24} {row['median_ms']:10.2f} {row['p95_ms']:8.2f} {row['original_ms']:12.2f} "
              f"{row['speedup']:8.2f}×")
    best = max(results, key=lambda name: results[name]["speedup"])
    print(f"best: {best}, {results[best]['speedup']:.2f}× the original (goal ≥ {GOAL}×): "
          f"{'met' if results[best]['speedup'] >= GOAL else 'NOT met'}")
    Path(os.environ.get("BENCH_RESULTS", "bench/results-targets.json")).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
