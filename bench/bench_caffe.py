"""Caffe plugin benchmark; every figure is a ratio against a baseline measured in the same run.

    .venv/bin/python bench/bench_caffe.py

- caffemodel parse time with the rebuilt protobuf module (fast backend) vs the pure-Python backend that
  PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python would force (run in a subprocess, as that route would);
- conversion + optimize time, and artifact size vs the caffemodel;
- onnxruntime latency on the optimized artifact vs OpenCV dnn on the original (batch 1, same inputs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import median_seconds
from deeplens_build_caffe import _cv2, caffe_pb2
from deeplens_build_caffe.testing import write_model

from deeplens_build import onnxtools, testing

PARSE = """
import sys, time
from deeplens_build_caffe import caffe_pb2
data = open(sys.argv[1], "rb").read()
net = caffe_pb2().NetParameter()
start = time.perf_counter()
net.ParseFromString(data)
print(time.perf_counter() - start)
"""




def _wide(net, add) -> None:
    """A wider net than the tests', so the caffemodel weighs a few MB."""
    add("data", "Input", [], ["data"], lambda l: l.input_param.shape.add().dim.extend([1, 3, 64, 64]))
    add("conv1", "Convolution", ["data"], ["conv1"], lambda l: (setattr(l.convolution_param, "num_output", 32),
                                                                l.convolution_param.kernel_size.append(3),
                                                                l.convolution_param.pad.append(1)))
    add("relu1", "ReLU", ["conv1"], ["conv1"])
    add("pool", "Pooling", ["conv1"], ["pool"], lambda l: (setattr(l.pooling_param, "kernel_size", 2),
                                                          setattr(l.pooling_param, "stride", 2)))
    add("fc", "InnerProduct", ["pool"], ["fc"], lambda l: setattr(l.inner_product_param, "num_output", 64))
    add("prob", "Softmax", ["fc"], ["prob"])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = write_model(root / "out", _wide)
        weights = source / "model.caffemodel"

        def parse(implementation: str | None) -> float:
            env = dict(os.environ)
            if implementation:
                env["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] = implementation
            out = subprocess.run([sys.executable, "-c", PARSE, str(weights)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            return float(out.strip().splitlines()[-1])

        fast, slow = parse(None), parse("python")
        print(f"parse {weights.stat().st_size} B caffemodel: rebuilt module {fast * 1000:.1f} ms, pure-Python "
              f"backend {slow * 1000:.1f} ms, pure-Python/rebuilt = {slow / fast:.0f}")

        caffe_pb2()
        config = testing.write_project(root / "p", source=source, model={"task": "other"})
        build = median_seconds(lambda: testing.build(config, use_cache=False), repeat=3)
        result = testing.build(config)
        print(f"build {build * 1000:.0f} ms (build/parse = {build / fast:.0f}), artifact {result.sizes.artifact} B "
              f"(artifact/caffemodel = {result.sizes.artifact / weights.stat().st_size:.2f})")

        optimized = next((root / "p" / ".deeplens").rglob("optimize/*/model.onnx"))
        x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
        net = _cv2().dnn.readNetFromCaffe(str(source / "deploy.prototxt"), str(weights))
        session = onnxtools.session_for(optimized, prepack=True)

        def opencv() -> None:
            net.setInput(x, "data")
            net.forward("prob")

        base = median_seconds(opencv, repeat=50)
        ours = median_seconds(lambda: session.run(None, {"data": x}), repeat=50)
        print(f"latency batch 1: OpenCV dnn {base * 1000:.2f} ms, onnxruntime {ours * 1000:.2f} ms, "
              f"onnxruntime/OpenCV = {ours / base:.2f}")


if __name__ == "__main__":
    main()
