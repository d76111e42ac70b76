"""MXNet plugin benchmark; every figure is a ratio against a baseline measured in the same run.

    .venv/bin/python bench/bench_mxnet.py

- conversion + optimize time (FP32, FP16) vs loading the checkpoint with MXNet alone;
- artifact size (FP32, FP16) vs the final .params file;
- onnxruntime latency on the optimized artifact vs MXNet on the original symbol + params (batch 1, same inputs).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from common import median_seconds
from deeplens_build_mxnet import _mxnet
from deeplens_build_mxnet.testing import residual_classifier, save_checkpoints

from deeplens_build import onnxtools, testing

SHAPE = (1, 3, 224, 224)




def main() -> None:
    mx = _mxnet()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = save_checkpoints(root / "out", residual_classifier, {"data": SHAPE}, epochs=1)
        params = source / "model-0001.params"
        load = median_seconds(lambda: mx.model.load_checkpoint(str(source / "model"), 1), repeat=5)
        print(f"baseline: MXNet load_checkpoint {load * 1000:.1f} ms, params {params.stat().st_size} B")
        for precision in ("fp32", "fp16"):
            config = testing.write_project(root / precision, source=source, model={"precision": precision})
            build = median_seconds(lambda: testing.build(config, use_cache=False), repeat=3)
            result = testing.build(config)
            print(f"{precision}: build {build * 1000:.0f} ms (build/load = {build / load:.1f}), artifact "
                  f"{result.sizes.artifact} B (artifact/params = {result.sizes.artifact / params.stat().st_size:.2f})")

        optimized = next((root / "fp32" / ".deeplens").rglob("optimize/*/model.onnx"))
        x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
        symbol, args, auxs = mx.model.load_checkpoint(str(source / "model"), 1)
        executor = symbol.bind(mx.cpu(), args={**args, "data": mx.nd.array(x)}, aux_states=auxs, grad_req="null")
        session = onnxtools.session_for(optimized, prepack=True)
        executor.forward(is_train=False)[0].wait_to_read()
        base = median_seconds(lambda: executor.forward(is_train=False)[0].wait_to_read(), repeat=50)
        ours = median_seconds(lambda: session.run(None, {"data": x}), repeat=50)
        print(f"latency batch 1: MXNet {base * 1000:.2f} ms, onnxruntime {ours * 1000:.2f} ms, "
              f"onnxruntime/MXNet = {ours / base:.2f}")


if __name__ == "__main__":
    main()
