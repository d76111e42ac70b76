"""TensorFlow plugin benchmark; every figure is a ratio against a baseline measured in the same run.

    .venv/bin/python bench/bench_tensorflow.py

- conversion + optimize time vs loading the SavedModel with TensorFlow alone;
- artifact size (FP32, FP16) vs the SavedModel's variables;
- onnxruntime latency on the optimized artifact vs TensorFlow on the original (batch 1, same inputs).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from common import median_seconds

from deeplens_build import onnxtools, testing


def _model():
    import keras

    keras.utils.set_random_seed(0)
    image = keras.Input((224, 224, 3), name="image")
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same")(image)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.Add()([x, keras.layers.DepthwiseConv2D(3, padding="same")(x)])
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(image, keras.layers.Dense(100, activation="softmax")(x))


def main() -> None:
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        saved = root / "out" / "model" / "1"
        _model().export(str(saved), verbose=False)
        load = median_seconds(lambda: tf.saved_model.load(str(saved)), repeat=3)
        variables = sum(p.stat().st_size for p in (saved / "variables").iterdir())
        print(f"baseline: tf.saved_model.load {load * 1000:.0f} ms, variables {variables} B")
        for precision in ("fp32", "fp16"):
            config = testing.write_project(root / precision, source=root / "out", model={"precision": precision})
            build = median_seconds(lambda: testing.build(config, use_cache=False), repeat=3)
            result = testing.build(config)
            print(f"{precision}: build {build * 1000:.0f} ms (build/load = {build / load:.1f}), artifact "
                  f"{result.sizes.artifact} B (artifact/variables = {result.sizes.artifact / variables:.2f})")

        optimized = next((root / "fp32" / ".deeplens").rglob("optimize/*/model.onnx"))
        x = np.random.default_rng(0).standard_normal((1, 224, 224, 3)).astype(np.float32)
        serve = tf.saved_model.load(str(saved))
        signature = serve.signatures["serving_default"]
        session = onnxtools.session_for(optimized, prepack=True)
        tensor = tf.constant(x)
        base = median_seconds(lambda: signature(image=tensor), repeat=50)
        ours = median_seconds(lambda: session.run(None, {"image": x}), repeat=50)
        print(f"latency batch 1: TensorFlow {base * 1000:.2f} ms, onnxruntime {ours * 1000:.2f} ms, "
              f"onnxruntime/TensorFlow = {ours / base:.2f}")


if __name__ == "__main__":
    main()
