"""No-change rebuilds: flat in model size (the stat index and the unchanged-bundle rule).

    .venv/bin/python bench/bench_rebuild.py      (`make bench` runs it)

For a 32 MB and a 128 MB ONNX model (float MatMul weights, FP32, one parity sample), each figure is the median
of 3 runs of the real command line in a fresh process: the cold `package --no-cache`, the no-change rebuild,
and the rebuild after `touch`ing the model (its bytes read again, nothing rebuilt). Ratios: rebuild / cold
(what a rebuild saves), rebuild of the large model / rebuild of the small one (flat when close to 1), and the
cold build's peak RSS / the model's size (the largest child so far: the 128 MB figure is its own).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import median_seconds

from deeplens_build import testing

CLI = [sys.executable, "-m", "deeplens_build.cli"]


def _model(path: Path, megabytes: int) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    side, layers = 2048, max(1, megabytes // 16)  # 16 MB per 2048x2048 float32 weight
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((side, side)).astype(np.float32), f"w{i}")
               for i in range(layers)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"w{i}"], [f"h{i}"]) for i in range(layers)]
    graph = helper.make_graph(nodes, "weights", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, side])],
                              [helper.make_tensor_value_info(f"h{layers - 1}", TensorProto.FLOAT, [1, side])],
                              initializer=weights)
    path.parent.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def main() -> None:
    env = {**os.environ, "DEEPLENS_BUILD_PLUGINS": "deeplens-sources,onnx"}
    rebuilds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for megabytes in (32, 128):
            root = Path(tmp) / f"m{megabytes}"
            model = _model(root / "out" / "model.onnx", megabytes)
            config = testing.write_project(root / "p", source=model.parent, model={"task": "other"},
                                           parity={"random_samples": 1})
            key = testing.signing_key(config.parent)
            command = [*CLI, "package", "--config", str(config), "--signing-key", str(key)]

            def package(*extra: str) -> None:
                subprocess.run([*command, *extra], check=True, capture_output=True, env=env)

            cold = median_seconds(lambda: package("--no-cache"), repeat=3)
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest cold build so far
            rebuild = median_seconds(package, repeat=3)
            touched = median_seconds(lambda: (os.utime(model), package()), repeat=3)
            rebuilds[megabytes] = rebuild
            size = model.stat().st_size / 1e6
            print(f"{size:.0f} MB model: cold {cold:.2f} s (peak RSS / model = {peak / 1e6 / size:.1f}), no-change "
                  f"rebuild {rebuild:.2f} s (rebuild/cold = {rebuild / cold:.3f}), touched model {touched:.2f} s")
    print(f"rebuild 128 MB / rebuild 32 MB = {rebuilds[128] / rebuilds[32]:.2f} (1.0 is flat in model size)")


if __name__ == "__main__":
    main()
