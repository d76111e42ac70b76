"""The ``openvino`` backend on the device, shipped as ``deeplens_model.py`` in the bundle's model folder.

Loads ``model.xml`` through OpenVINO's AUTO device over the GPU (an Intel GPU, as on the DeepLens camera, with
Intel's compute runtime installed) and the CPU, in that order, so the GPU is used when the device has one; says
on stderr which device runs the model. Written for every device Python from 3.8.
"""

import os
import sys

import openvino as ov


class Model:
    def __init__(self, model_dir):
        core = ov.Core()
        present = [d for d in ("GPU", "CPU") if any(found.startswith(d) for found in core.available_devices)]
        self.compiled = core.compile_model(os.path.join(model_dir, "model.xml"), "AUTO:" + ",".join(present))
        self.device = "openvino " + ",".join(self.compiled.get_property("EXECUTION_DEVICES"))
        self.inputs = [(i.get_any_name(), list(i.get_shape())) for i in self.compiled.inputs]
        self.outputs = [o.get_any_name() for o in self.compiled.outputs]
        self.request = self.compiled.create_infer_request()
        print("deeplens_model: running on " + self.device, file=sys.stderr)

    def run(self, feeds):
        """One array per output, in the model's output order."""
        results = self.request.infer(feeds)
        return [results[output] for output in self.compiled.outputs]


def load(model_dir):
    return Model(model_dir)
