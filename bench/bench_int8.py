"""INT8 against FP32, on this CPU, in one run: latency at batch 1 on onnxruntime and on OpenVINO, artifact size and
top-1 agreement on the held-out validation images.

    .venv/bin/python bench/bench_int8.py

The model: the hand-written ResNet-18 (``deeplens_build_pytorch.networks``) trained for a few steps on generated
images of 3 classes (the dominant colour), so top-1 means something; calibration images are generated the same
way, 96 of them (72 calibrate, 24 validate). Each build is ``[profile] runs`` of the target backend (median,
batch 1, same input). Goals (ratios, same run): OpenVINO INT8 ≥ 2× faster than OpenVINO FP32, onnxruntime INT8 ≥
1.5× faster than onnxruntime FP32, size ≤ 0.3× FP32, top-1 agreement ≥ 99%.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from deeplens_build_pytorch import networks
from deeplens_build_pytorch import testing as pt_testing

from deeplens_build import testing

SHAPE = (1, 3, 224, 224)
RUNS = 50
CLASSES = 3


def _frames(count: int, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, count)
    frames = rng.integers(0, 80, (count, size, size, 3)).astype(np.uint8)
    for frame, label in zip(frames, labels):
        frame[..., label] += 140
    return frames, labels


def _trained() -> torch.nn.Module:
    torch.manual_seed(0)
    net = networks.ResNet18()  # 1000 classes, as model_fn builds it; trained on the first 3
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    frames, labels = _frames(256, seed=0, size=64)  # trained small: the network pools to any size
    x = torch.from_numpy(frames.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    for step in range(40):
        batch = slice((step * 32) % 256, (step * 32) % 256 + 32)
        optimizer.zero_grad()
        loss = torch.nn.functional.nll_loss(torch.log(net(x[batch]) + 1e-9), torch.from_numpy(labels[batch]))
        loss.backward()
        optimizer.step()
    return net.eval()


def _cpu() -> str:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)


def main() -> None:
    warnings.simplefilter("ignore")
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = pt_testing.inference_layout(root / "out", _trained())
        images = root / "images"
        images.mkdir()
        for index, frame in enumerate(_frames(96, seed=1, size=224)[0]):
            cv2.imwrite(str(images / f"{index:03d}.png"), frame)
        for backend in ("onnxruntime", "openvino"):
            for precision in ("fp32", "int8"):
                config = testing.write_project(
                    root / f"{backend}-{precision}", source=source, inputs={"data": {"shape": list(SHAPE)}},
                    model={"precision": precision}, target={"backend": backend}, profile={"runs": RUNS},
                    parity={"random_samples": 2}, calibration={"samples": str(images)})
                built = testing.build(config)
                latency = next(p for p in built.manifest.profile if p.runtime == backend)
                results[f"{backend}_{precision}_ms"] = latency.median_ms
                results[f"{backend}_{precision}_bytes"] = built.sizes.artifact
                if precision == "int8":
                    agreement = [o.top1_agreement for o in built.parity.outputs if o.top1_agreement is not None]
                    results[f"{backend}_top1_agreement"] = min(agreement)
                    results[f"{backend}_float_nodes"] = len(built.manifest.optimization.fp32_nodes)
    print(f"CPU: {_cpu()}; {os.cpu_count()} cores")
    for backend, goal in (("onnxruntime", 1.5), ("openvino", 2.0)):
        fp32, int8 = results[f"{backend}_fp32_ms"], results[f"{backend}_int8_ms"]
        size = results[f"{backend}_int8_bytes"] / results[f"{backend}_fp32_bytes"]
        print(f"{backend}: INT8 {int8:.2f} ms vs FP32 {fp32:.2f} ms = {fp32 / int8:.2f}× faster (goal ≥ {goal}×: "
              f"{'met' if fp32 / int8 >= goal else 'NOT met'}); size {size:.2f}× FP32 (goal ≤ 0.3×: "
              f"{'met' if size <= 0.3 else 'NOT met'}); top-1 agreement {results[f'{backend}_top1_agreement']:.1%} "
              f"(goal ≥ 99%), {results[f'{backend}_float_nodes']:.0f} node(s) kept float")
    Path(os.environ.get("BENCH_RESULTS", "bench/results-int8.json")).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
