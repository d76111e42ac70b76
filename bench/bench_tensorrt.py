"""TensorRT on an NVIDIA GPU: engines built as the device builds them, parity, and FP16 vs FP32 throughput.

Two steps, because the GPU machine has TensorRT but not the frameworks, and this one the opposite:

    .venv/bin/python bench/bench_tensorrt.py prepare trt-bench     # here: bundles for the example and ResNet-18
    python3 bench/bench_tensorrt.py measure trt-bench              # on the GPU machine (tensorrt, cuda-python, numpy)

``prepare`` packages the example (batch 1) and Gluon's ResNet-18 (batch 8) with ``[target] backend = "tensorrt"``
and keeps each bundle's model folder (with ``deeplens_reference.npz``: the original framework's outputs on the
parity samples). ``measure`` builds each engine with the bundle's own ``deeplens_compile.py`` (FP16, then FP32),
measures its parity with that script's own check, loads it with the bundle's ``deeplens_model.py`` and times
batch-8 throughput.
Goal: FP16 ≥ 2× FP32 on ResNet-18 at batch 8. Figures are ratios within one run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GOAL = 2.0
MODELS = {"example": 1, "resnet18": 8}
"""Each model and its batch size."""


def _prepare(out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_targets import resnet18

    from deeplens_build import testing
    from deeplens_build.bundle import unpack_bundle

    example = Path(__file__).parents[1] / "examples" / "classifier"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"example": example / "model.tar.gz", "resnet18": resnet18(Path(tmp) / "resnet18-out")}
        for name, batch in MODELS.items():
            shape = [batch, 3, 32, 32] if name == "example" else [batch, 3, 224, 224]
            config = testing.write_project(Path(tmp) / name, source=sources[name], name=f"deeplens-{name}",
                                           model={"precision": "fp16"}, inputs={"data": {"shape": shape}},
                                           target={"backend": "tensorrt", "accelerator": "gpu"},
                                           parity={"random_samples": 4})
            result = testing.build(config)
            unpack_bundle(result.bundle, Path(tmp) / f"{name}-bundle", None)
            shutil.copytree(Path(tmp) / f"{name}-bundle" / "model", out / name)  # deeplens_reference.npz too
            print(f"{name}: {out / name} (batch {batch}, parity in onnxruntime {result.parity.max_abs_diff:.3g})")


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _throughput(model, feeds: dict, seconds: float = 3.0) -> float:
    for _ in range(10):
        model.run(feeds)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.run(feeds)
        count += 1
    return count / (time.perf_counter() - start)


def measure(out: Path) -> None:
    import os

    rows = {}
    for name, batch in MODELS.items():
        folder = out / name
        compile_step = _module(folder / "deeplens_compile.py", f"{name}_compile")
        device = _module(folder / "deeplens_model.py", f"{name}_model")
        reference = np.load(folder / "deeplens_reference.npz")
        for precision, fp16 in (("fp16", True), ("fp32", False)):
            work = folder / f"work-{precision}"
            work.mkdir(exist_ok=True)
            started = time.perf_counter()
            compile_step.build(str(folder), str(work), fp16=fp16)
            built = time.perf_counter() - started
            os.environ["DEEPLENS_WORK_DIR"] = str(work)
            worst = compile_step.check_parity(str(folder), math.inf)  # the device's own check, never failing here
            model = device.load(str(folder))
            feeds = {key.split("/")[2]: reference[key] for key in reference.files if key.startswith("in/0/")}
            rate = _throughput(model, feeds) * batch
            rows[f"{name} {precision}"] = {"build_s": built, "max_abs_diff": worst, "images_per_s": rate,
                                           "device": model.device}
            print(f"{name:9} {precision}: engine built in {built:.1f} s, parity max abs diff {worst:.3g}, "
                  f"{rate:.0f} images/s at batch {batch} ({model.device})")
    ratio = rows["resnet18 fp16"]["images_per_s"] / rows["resnet18 fp32"]["images_per_s"]
    print(f"ResNet-18 batch 8: FP16 {ratio:.2f}× FP32 throughput (goal ≥ {GOAL}×): "
          f"{'met' if ratio >= GOAL else 'NOT met'}")
    (out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("prepare", "measure"):
        raise SystemExit(__doc__)
    (_prepare if sys.argv[1] == "prepare" else measure)(Path(sys.argv[2]))
