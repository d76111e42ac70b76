"""The ``onnxruntime`` backend on the device, shipped as ``deeplens_model.py`` in the bundle's model folder.

The inference Lambda calls ``load(model_dir)``; the model runs on the best execution provider the installed
onnxruntime has (CUDA with onnxruntime-gpu, else the CPU). Written for every device Python from 3.8.
"""

import os

import onnxruntime as ort

# Azure's provider sends requests to a remote endpoint: onnxruntime's PyPI wheels list it first, as if it ran
# the model, so it is left out (the model runs on the first of the others: CUDA with onnxruntime-gpu, else CPU).
REMOTE_PROVIDERS = ("AzureExecutionProvider",)


class Model:
    def __init__(self, model_dir):
        providers = [p for p in ort.get_available_providers() if p not in REMOTE_PROVIDERS]
        self.session = ort.InferenceSession(os.path.join(model_dir, "model.onnx"), providers=providers)
        self.device = "onnxruntime " + self.session.get_providers()[0]
        self.inputs = [(i.name, i.shape) for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, feeds):
        """One array per output, in the model's output order."""
        return self.session.run(None, feeds)


def load(model_dir):
    return Model(model_dir)
