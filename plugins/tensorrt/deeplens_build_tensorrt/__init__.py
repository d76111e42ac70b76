"""The TensorRT target backend: NVIDIA GPUs and Jetson.

A TensorRT engine is specific to the GPU, the TensorRT version and the driver it was built with, so it is built
on the device: the bundle carries the optimized ONNX artifact (FP16, with the nodes parity needs kept in FP32) at
the opset TensorRT 8.6's parser accepts, and ``build_engine.py``, which the recipe's Install phase runs. On the
build machine, what can be checked without a GPU is: the artifact is standard ONNX at opset 17 or lower, every
operator is in TensorRT's supported list, and it loads and keeps parity in onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

from deeplens_build import TargetBackend, hookimpl

HERE = Path(__file__).resolve().parent
MAX_OPSET = 17
"""TensorRT 8.6's ONNX parser (JetPack 5 and 6.0) reads opset 17 at most; newer TensorRT reads it too."""
OPERATORS = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool",
    "BatchNormalization", "Cast", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "ConvTranspose", "Cos", "Cosh", "CumSum", "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu",
    "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gemm",
    "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample", "GRU",
    "HardSwish", "HardSigmoid", "Identity", "If", "ImageScaler", "InstanceNormalization", "IsNaN",
    "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LRN", "LSTM",
    "LpNormalization", "LpPool", "MatMul", "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min", "Mod", "Mul",
    "Neg", "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "Pad", "ParametricSoftplus", "Pow", "PRelu",
    "QuantizeLinear", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal",
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd",
    "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RNN", "RoiAlign", "Round",
    "ScaledTanh", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign",
    "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze",
    "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample",
    "Where", "Xor",
})
"""The operators onnx-tensorrt's support matrix (docs/operators.md) marks supported for TensorRT 8.5, the first
with opset 17, plus LayerNormalization, which 8.6 added: what every TensorRT this backend serves parses."""


@hookimpl
def deeplens_build_targets() -> list[TargetBackend]:
    return [TargetBackend(
        name="tensorrt", summary="TensorRT engine for NVIDIA GPUs and Jetson, built on the device (FP16)",
        accelerators=("gpu",), platforms=("linux-x86_64", "linux-aarch64"), device_module=HERE / "device.py",
        max_opset=MAX_OPSET, operators=OPERATORS, runtime="tensorrt",
        runtimes=(HERE / "runtime" / "tensorrt" / "runtime.toml",), device_build=HERE / "build_engine.py",
        install="pip install deeplens-build-tensorrt", symmetric_int8=True)]
