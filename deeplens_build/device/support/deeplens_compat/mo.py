"""DeepLens's model optimizer, ``mo``, on any device: the optimization already happened when the bundle was built
(converted, optimized and parity-checked by deeplens-build), so ``optimize`` hands back the bundle's artifact."""

import os
import sys

DEEPLENS_COMPAT = True
ARTIFACTS = ("model.xml", "model.onnx")
"""What a bundle's model folder holds for its backend: OpenVINO IR, else ONNX (a TensorRT engine is built from it
on the device)."""
_said = False


def optimize(model_name, input_width, input_height, platform=None, aux_inputs=None):
    """``(0, path)``: no error, and the artifact a ``awscam.Model`` loads."""
    global _said
    if not _said:
        print("mo: {} was optimized when its bundle was built; using the bundle's artifact".format(model_name),
              file=sys.stderr)
        _said = True
    folder = os.environ.get("DEEPLENS_MODEL_DIR", "/greengrass-machine-learning/model")
    found = [name for name in ARTIFACTS if os.path.exists(os.path.join(folder, name))]
    return 0, os.path.join(folder, (found or ARTIFACTS[-1:])[0])
