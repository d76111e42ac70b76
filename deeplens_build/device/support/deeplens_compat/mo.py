"""DeepLens's model optimizer, ``mo``, on any device: the optimization already happened when the bundle was built
(converted, optimized and parity-checked by deeplens-build), so ``optimize`` hands back the bundle's artifact."""

import os
import sys

DEEPLENS_COMPAT = True
_said = False


def optimize(model_name, input_width, input_height, platform=None, aux_inputs=None):
    """``(0, path)``: no error, and the artifact a ``awscam.Model`` loads."""
    global _said
    if not _said:
        print("mo: {} was optimized when its bundle was built; using the bundle's artifact".format(model_name),
              file=sys.stderr)
        _said = True
    return 0, os.path.join(os.environ.get("DEEPLENS_MODEL_DIR", "/greengrass-machine-learning/model"), "model.onnx")
