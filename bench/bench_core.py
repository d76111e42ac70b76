"""Benchmarks for the core pipeline; every figure is a ratio against a baseline measured in the same run.

    make bench        (or: .venv/bin/python bench/bench_core.py)

- cold build vs cached rebuild of the same project (what the stage cache saves);
- artifact size FP32 and FP16 vs the source model;
- onnxruntime latency of the optimized artifact vs the original graph run unoptimized (batch 1, same inputs);
- verify time vs reading the bundle's bytes once (the overhead of checking every digest).
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np
from common import median_seconds

from deeplens_build import onnxtools, testing


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = root / "out"
        testing.onnx_classifier(source / "model.onnx", size=224)
        configs = {p: testing.write_project(root / p, source=source, model={"precision": p},
                                            inputs={"data": {"shape": [1, 3, 224, 224]}}) for p in ("fp32", "fp16")}

        cold = median_seconds(lambda: testing.build(configs["fp32"], use_cache=False), repeat=3)
        warm = median_seconds(lambda: testing.build(configs["fp32"]), repeat=3)
        print(f"build: cold {cold * 1000:.0f} ms, cached {warm * 1000:.0f} ms, cached/cold = {warm / cold:.2f}")

        results = {p: testing.build(c) for p, c in configs.items()}
        src = (source / "model.onnx").stat().st_size
        for p, r in results.items():
            print(f"artifact {p}: {r.sizes.artifact} B, artifact/source = {r.sizes.artifact / src:.2f}")

        artifact = results["fp32"].bundle.parent.parent / ".deeplens"
        optimized = next(artifact.rglob("optimize/*/model.onnx"))
        x = {"data": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
        original = onnxtools.session_for(source / "model.onnx", optimize=False, prepack=True)
        tuned = onnxtools.session_for(optimized, prepack=True)
        base = median_seconds(lambda: original.run(None, x), repeat=50)
        ours = median_seconds(lambda: tuned.run(None, x), repeat=50)
        print(f"latency batch 1: original {base * 1000:.2f} ms, optimized {ours * 1000:.2f} ms, "
              f"optimized/original = {ours / base:.2f}")

        bundle = results["fp32"].bundle
        read = median_seconds(lambda: hashlib.sha256(bundle.read_bytes()).hexdigest(), repeat=20)
        check = median_seconds(lambda: testing.verify(bundle), repeat=20)
        print(f"verify: {check * 1000:.2f} ms, verify/sha256-of-bundle = {check / read:.1f}")


if __name__ == "__main__":
    main()
