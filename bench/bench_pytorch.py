"""PyTorch plugin benchmark; every figure is a ratio against a baseline measured in the same run.

    .venv/bin/python bench/bench_pytorch.py

A ResNet-18 written out by hand (``deeplens_build_pytorch.networks``; seeded random weights: speed does not
depend on training) in SageMaker's inference layout (``model.pth`` + ``code/inference.py``):

- export: the convert stage (a child process starting torch, model_fn, torch.onnx.export, the core's re-save) vs
  ``torch.onnx.export(dynamo=True)`` of the same module in this process;
- latency at batch 1: the bundle's model on onnxruntime and on OpenVINO (the manifest's ``[profile]``, both
  in-process) vs PyTorch eager under ``torch.no_grad()`` here, on the same input.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import deeplens_build_pytorch as plugin
import numpy as np
import torch
from common import median_seconds
from deeplens_build_pytorch import networks
from deeplens_build_pytorch import testing as pt_testing

from deeplens_build import TrainingOutput, testing

SHAPE = (1, 3, 224, 224)
RUNS = 50


def main() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(os.cpu_count() or 1)
    module = networks.trained(networks.ResNet18())
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = pt_testing.inference_layout(root / "out", module)
        x = torch.from_numpy(np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32))

        def bare_export() -> None:
            torch.onnx.export(module, (x,), str(root / "bare" / "model.onnx"), dynamo=True, verbose=False)

        (root / "bare").mkdir()
        bare = median_seconds(bare_export, repeat=3)
        with torch.no_grad():
            eager = median_seconds(lambda: module(x), repeat=RUNS)
        for backend in ("onnxruntime", "openvino"):
            config = testing.write_project(root / backend, source=source, inputs={"data": {"shape": list(SHAPE)}},
                                           target={"backend": backend}, profile={"runs": RUNS},
                                           parity={"random_samples": 2})
            start = time.perf_counter()
            manifest = testing.build(config, use_cache=False).manifest
            results[f"build_s_{backend}"] = time.perf_counter() - start
            latency = next(p for p in manifest.profile if p.runtime == backend)
            results[f"{backend}_ms"] = latency.median_ms
        convert = _convert_seconds(source, root / "convert")
    results.update(bare_export_s=bare, convert_s=convert, eager_ms=eager * 1000)
    print(f"export: convert stage {convert:.2f} s, bare torch.onnx.export {bare:.2f} s, "
          f"convert/bare = {convert / bare:.2f}")
    for backend in ("onnxruntime", "openvino"):
        ms = results[f"{backend}_ms"]
        print(f"latency batch 1: {backend} {ms:.2f} ms, PyTorch eager {eager * 1000:.2f} ms, "
              f"{backend}/eager = {ms / (eager * 1000):.2f}")
    Path(os.environ.get("BENCH_RESULTS", "bench/results-pytorch.json")).write_text(json.dumps(results, indent=2))


def _convert_seconds(source: Path, workdir: Path) -> float:
    """The plugin's convert hook on ``source``, as the convert stage calls it."""
    files = tuple(sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()))
    output = TrainingOutput(root=source, files=files, sha256="", size=0, kind="directory", origin="out")
    settings = plugin.PyTorchSettings()
    model = plugin.deeplens_build_detect(output, settings)

    def convert() -> None:
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir()
        plugin.deeplens_build_convert(source=output, model=model, workdir=workdir, shapes={"data": SHAPE},
                                      settings=settings, opset=None)

    return median_seconds(convert, repeat=3)


if __name__ == "__main__":
    main()
