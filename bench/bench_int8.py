"""INT8 against FP32, on this CPU, in one run: latency at batch 1 on onnxruntime and on OpenVINO, artifact size and
top-1 agreement on the held-out validation images.

    .venv/bin/python bench/bench_int8.py

The model: the hand-written ResNet-18 (``deeplens_build_pytorch.networks``) trained for a few steps on generated
images of 3 classes (the dominant colour), so top-1 means something; calibration images are generated the same
way, 96 of them (72 calibrate, 24 validate). Each build is ``[profile] runs`` of the target backend (median,
batch 1, same input). With ``BENCH_ONET=path/onet.onnx``, a real MTCNN-style ONet too (SeetaFace2's), calibrated
on generated face-like crops. Goals (ratios, same run): OpenVINO INT8 ≥ 2× faster than OpenVINO FP32, onnxruntime INT8 ≥
1.5× faster than onnxruntime FP32, size ≤ 0.3× FP32, top-1 agreement ≥ 99%.
"""

from __future__ import annotations

import json
import os
import shutil
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


def _faces(folder: Path, count: int) -> Path:
    """Face-like 48x48 crops: a skin-toned ellipse on clutter, darker eyes and mouth, varied in place and light."""
    rng = np.random.default_rng(2)
    folder.mkdir()
    for index in range(count):
        frame = rng.integers(0, 255, (48, 48, 3)).astype(np.uint8)
        centre = (24 + int(rng.integers(-4, 5)), 24 + int(rng.integers(-4, 5)))
        skin = tuple(int(c) for c in rng.integers(90, 200) * np.array([0.55, 0.7, 1.0]))
        cv2.ellipse(frame, centre, (14, 18), 0, 0, 360, skin, -1)
        for dx in (-6, 6):
            cv2.circle(frame, (centre[0] + dx, centre[1] - 4), 2, (30, 30, 40), -1)
        cv2.line(frame, (centre[0] - 5, centre[1] + 8), (centre[0] + 5, centre[1] + 8), (40, 40, 90), 2)
        cv2.imwrite(str(folder / f"{index:03d}.png"), frame)
    return folder


def _onet(root: Path, onet: Path, results: dict[str, float]) -> None:
    """A real MTCNN-style ONet (SeetaFace2's, batch 5 of 48x48 crops; outputs: face/not-face softmax and box
    regression), gated as task "other": both outputs within the INT8 bounds on the held-out crops."""
    source = root / "onet"
    source.mkdir()
    shutil.copyfile(onet, source / "onet.onnx")
    faces = _faces(root / "faces", 96)
    for backend in ("onnxruntime", "openvino"):
        for precision in ("fp32", "int8"):
            config = testing.write_project(
                root / f"onet-{backend}-{precision}", source=source, model={"precision": precision, "task": "other"},
                inputs={"input1": {"shape": [5, 3, 48, 48]}}, target={"backend": backend}, profile={"runs": RUNS},
                parity={"random_samples": 2}, calibration={"samples": str(faces), "preprocess": {
                    "scale": 0.0078125, "mean": [0.99609375], "rgb": True}})
            built = testing.build(config)
            latency = next(p for p in built.manifest.profile if p.runtime == backend)
            results[f"onet_{backend}_{precision}_ms"] = latency.median_ms
            results[f"onet_{backend}_{precision}_bytes"] = built.sizes.artifact
            if precision == "int8":
                results[f"onet_{backend}_max_abs_diff"] = built.parity.max_abs_diff
                results[f"onet_{backend}_float_nodes"] = len(built.manifest.optimization.fp32_nodes)


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
        onet = os.environ.get("BENCH_ONET")
        if onet:
            _onet(root, Path(onet), results)
    print(f"CPU: {_cpu()}; {os.cpu_count()} cores")
    for backend, goal in (("onnxruntime", 1.5), ("openvino", 2.0)):
        fp32, int8 = results[f"{backend}_fp32_ms"], results[f"{backend}_int8_ms"]
        size = results[f"{backend}_int8_bytes"] / results[f"{backend}_fp32_bytes"]
        print(f"{backend}: INT8 {int8:.2f} ms vs FP32 {fp32:.2f} ms = {fp32 / int8:.2f}× faster (goal ≥ {goal}×: "
              f"{'met' if fp32 / int8 >= goal else 'NOT met'}); size {size:.2f}× FP32 (goal ≤ 0.3×: "
              f"{'met' if size <= 0.3 else 'NOT met'}); top-1 agreement {results[f'{backend}_top1_agreement']:.1%} "
              f"(goal ≥ 99%), {results[f'{backend}_float_nodes']:.0f} node(s) kept float")
    if "onet_onnxruntime_int8_ms" in results:
        for backend in ("onnxruntime", "openvino"):
            fp32, int8 = results[f"onet_{backend}_fp32_ms"], results[f"onet_{backend}_int8_ms"]
            size = results[f"onet_{backend}_int8_bytes"] / results[f"onet_{backend}_fp32_bytes"]
            print(f"ONet on {backend}: INT8 {int8:.3f} ms vs FP32 {fp32:.3f} ms = {fp32 / int8:.2f}× faster; size "
                  f"{size:.2f}× FP32; the gate: max abs diff {results[f'onet_{backend}_max_abs_diff']:.3g} on the "
                  f"held-out crops, {results[f'onet_{backend}_float_nodes']:.0f} node(s) kept float")
    else:
        print("ONet: not measured (set BENCH_ONET to an MTCNN ONet .onnx, e.g. SeetaFace2's onet.onnx)")
    Path(os.environ.get("BENCH_RESULTS", "bench/results-int8.json")).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
