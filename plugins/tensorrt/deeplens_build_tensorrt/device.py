"""The ``tensorrt`` backend on the device, shipped as ``deeplens_model.py`` in the bundle's model folder.

Loads the engine ``deeplens_compile.py`` built into the component's work folder (``DEEPLENS_WORK_DIR``) and runs
it on one CUDA stream, with device buffers allocated once. Written for every device Python from 3.8.
"""

import os
import sys

import numpy as np
import tensorrt as trt

try:
    from cuda.bindings import runtime as cudart
except ImportError:  # cuda-python before 12.6
    from cuda import cudart


def _check(result):
    error = result[0]
    if error != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError("CUDA error {}".format(error))
    return result[1] if len(result) == 2 else result[1:]


class Model:
    def __init__(self, model_dir):
        path = os.path.join(os.environ.get("DEEPLENS_WORK_DIR", model_dir), "model.engine")
        if not os.path.exists(path):
            raise RuntimeError("no TensorRT engine at {}: the recipe's Install phase builds it with "
                               "deeplens_compile.py".format(path))
        with open(path, "rb") as engine:
            self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine.read())
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate())
        self.inputs, self.outputs, self._buffers = [], [], {}
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            size = int(np.prod(shape)) * dtype.itemsize
            pointer = _check(cudart.cudaMalloc(size))
            self.context.set_tensor_address(name, int(pointer))
            self._buffers[name] = (pointer, shape, dtype, size)
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs.append((name, list(shape)))
            else:
                self.outputs.append(name)
        props = _check(cudart.cudaGetDeviceProperties(0))
        gpu = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        self.device = "tensorrt {} on {}".format(trt.__version__, gpu)
        print("deeplens_model: running on " + self.device, file=sys.stderr)

    def run(self, feeds):
        """One array per output, in the engine's output order."""
        keep = []
        for name, _ in self.inputs:
            pointer, shape, dtype, size = self._buffers[name]
            array = np.ascontiguousarray(feeds[name], dtype=dtype).reshape(shape)
            keep.append(array)  # alive until the copy has run
            _check(cudart.cudaMemcpyAsync(pointer, array.ctypes.data, size,
                                          cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT could not run the engine")
        results = []
        for name in self.outputs:
            pointer, shape, dtype, size = self._buffers[name]
            result = np.empty(shape, dtype)
            _check(cudart.cudaMemcpyAsync(result.ctypes.data, pointer, size,
                                          cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
            results.append(result)
        _check(cudart.cudaStreamSynchronize(self.stream))
        return results


def load(model_dir):
    return Model(model_dir)
