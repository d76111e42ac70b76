"""Regenerate model/model.onnx, the example's tiny classifier (seeded, so the bytes never change).

    .venv/bin/python examples/onnx-classifier/make_model.py
"""

from pathlib import Path

from deeplens_build.testing import onnx_classifier

if __name__ == "__main__":
    print(onnx_classifier(Path(__file__).parent / "model" / "model.onnx", seed=42))
