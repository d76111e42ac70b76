"""Mixed precision against onnxconverter-common's own search (``auto_convert_mixed_precision``), in one run.

    .venv/bin/python bench/bench_fp16.py

The model: a classifier whose per-class bias passes half precision's range, the bias shared by a second head
that reports raw scores (the structure that made the precision stage crash on PP-OCRv4's recogniser: a tensor
read by a node kept in FP32 and by a converted one), widened so sizes mean something. For each method: the
artifact's size against the FP32 artifact, the largest difference from FP32 on the same seeded inputs, and the
time the search took, as a ratio of the two methods.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from deeplens_build import onnxtools, testing

WIDTH = 512


def _model(path: Path) -> None:
    rng = np.random.default_rng(7)
    bias = rng.standard_normal(10).astype(np.float32)
    bias[3] = 1e5
    weights = [numpy_helper.from_array((rng.standard_normal(shape) * 0.05).astype(np.float32), name)
               for name, shape in (("w0", (64, WIDTH)), ("w1", (WIDTH, WIDTH)), ("w2", (WIDTH, 10)),
                                   ("w3", (WIDTH, 10)))]
    weights.append(numpy_helper.from_array(bias, "bias"))
    nodes = [helper.make_node("MatMul", ["data", "w0"], ["h0"]), helper.make_node("Relu", ["h0"], ["r0"]),
             helper.make_node("MatMul", ["r0", "w1"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["l"]), helper.make_node("Add", ["l", "bias"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
             helper.make_node("MatMul", ["r1", "w3"], ["s"]), helper.make_node("Add", ["s", "bias"], ["raw"])]
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 10]),
                               helper.make_tensor_value_info("raw", TensorProto.FLOAT, [1, 10])], initializer=weights)
    path.parent.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _max_diff(candidate: Path, reference: Path, samples: list[dict[str, np.ndarray]]) -> float:
    ours, theirs = onnxtools.runner(candidate), onnxtools.runner(reference)
    return max(float(np.abs(ours(s)[name].astype(np.float64) - value).max())
               for s in samples for name, value in theirs(s).items())


def main() -> None:
    from onnxconverter_common.auto_mixed_precision import auto_convert_mixed_precision

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _model(root / "out" / "model.onnx")
        # an absolute tolerance: the raw head's values near 1e5 differ by float32's own rounding (0.008) already
        parity = {"tolerance": 0.05}
        testing.build(testing.write_project(root / "fp32", source=root / "out", model={"task": "other"},
                                                   parity=parity))
        config = testing.write_project(root / "fp16", source=root / "out",
                                       model={"task": "other", "precision": "fp16"}, parity=parity)
        start = time.perf_counter()
        ours = testing.build(config)
        ours_seconds = time.perf_counter() - start
        fp32_model = next((root / "fp32" / ".deeplens" / "cache" / "optimize").glob("*/model.onnx"))
        ours_model = next((root / "fp16" / ".deeplens" / "cache" / "precision").glob("*/model.onnx"))
        rng = np.random.default_rng(0)
        samples = [{"data": rng.standard_normal((1, 64)).astype(np.float32)} for _ in range(4)]

        size = sum(p.stat().st_size for p in onnxtools.files(fp32_model))
        print(f"FP32 artifact {size} B; {len(ours.manifest.optimization.fp32_nodes)} node(s) kept in FP32 by ours")
        results = [("deeplens-build", ours_model, ours_seconds)]
        start = time.perf_counter()
        try:
            theirs = auto_convert_mixed_precision(onnx.load(str(fp32_model)), samples[0], rtol=0.05, atol=0.05,
                                                  keep_io_types=True)
        except Exception as exc:  # a measured outcome, not a bench failure: say it and go on
            print(f"{'auto_mixed_precision':22} failed: {type(exc).__name__}: {exc}")
        else:
            theirs_model = root / "theirs.onnx"
            onnx.save(theirs, str(theirs_model))
            results.append(("auto_mixed_precision", theirs_model, time.perf_counter() - start))
        for name, model, seconds in results:
            ratio = sum(p.stat().st_size for p in onnxtools.files(model)) / size
            print(f"{name:22} size {ratio:.2f}x FP32, max diff {_max_diff(model, fp32_model, samples):.3g}, "
                  f"{seconds:.2f} s (ours: the whole build)")


if __name__ == "__main__":
    main()
