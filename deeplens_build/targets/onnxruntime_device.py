"""The ``onnxruntime`` backend on the device, shipped as ``deeplens_model.py`` in the bundle's model folder.

The inference Lambda calls ``load(model_dir)``; the model runs on the best execution provider the installed
onnxruntime has (CUDA with onnxruntime-gpu, else the CPU). Written for every device Python from 3.8.
"""

import os

import onnxruntime as ort


class Model:
    def __init__(self, model_dir):
        self.session = ort.InferenceSession(os.path.join(model_dir, "model.onnx"),
                                            providers=ort.get_available_providers())
        self.device = "onnxruntime " + self.session.get_providers()[0]
        self.inputs = [(i.name, i.shape) for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, feeds):
        """One array per output, in the model's output order."""
        return self.session.run(None, feeds)


def load(model_dir):
    return Model(model_dir)
