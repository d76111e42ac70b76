"""Build the TensorRT engine on the device: ``python deeplens_compile.py MODEL_DIR WORK_DIR [TOLERANCE]``.

Shipped in the bundle's model folder by the ``tensorrt`` target backend and run by the Greengrass recipe's
Install phase (and by ``deeplens-build run``). FP16 is on where the GPU has fast FP16; the ONNX already holds the
nodes parity needs in FP32, which TensorRT keeps as the graph's casts say. ``WORK_DIR`` outlives redeployments:
the engine is rebuilt only when the ONNX, TensorRT or the GPU changed (a stamp beside it records them), and the
timing cache kept there makes a rebuild of a changed model quick. A new engine is checked against the original
model's outputs on the parity samples (``deeplens_reference.npz``) before the stamp is written: an engine that
fails parity on this GPU fails the install, and is built again on the next one. Written for every device Python
from 3.8.
"""

import hashlib
import json
import os
import sys

ENGINE = "model.engine"
STAMP = "model.engine.json"
TIMING_CACHE = "timing.cache"


def _gpu_name():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    error, props = cudart.cudaGetDeviceProperties(0)
    if error != cudart.cudaError_t.cudaSuccess:
        raise SystemExit("deeplens_compile: no CUDA GPU is usable here ({})".format(error))
    return props.name.decode() if isinstance(props.name, bytes) else str(props.name)


def _write(path, data):
    """Write ``data`` to ``path`` in one step, so a killed install never leaves half an engine."""
    scratch = path + ".partial"
    with open(scratch, "wb") as out:
        out.write(data)
    os.replace(scratch, path)


def check_parity(model_dir, tolerance, rtol=0.0):
    """The worst absolute difference between the model as ``deeplens_model`` loads it here and the original's
    outputs in ``deeplens_reference.npz``; exits unless every element is within ``tolerance + rtol * |original|``
    (the build's bounds). None when there is no reference."""
    import numpy as np

    reference = os.path.join(model_dir, "deeplens_reference.npz")
    if not os.path.exists(reference):
        return None
    sys.path.insert(0, model_dir)
    import deeplens_model

    model = deeplens_model.load(model_dir)
    worst, within = 0.0, True
    with np.load(reference, allow_pickle=False) as stored:
        samples = sorted({key.split("/")[1] for key in stored.files})
        for sample in samples:
            prefix = "in/" + sample + "/"
            feeds = {key[len(prefix):]: stored[key] for key in stored.files if key.startswith(prefix)}
            for name, got in zip(model.outputs, model.run(feeds)):
                want = stored["out/" + sample + "/" + name].astype(np.float64)
                diff = np.abs(np.asarray(got, np.float64) - want)
                worst = max(worst, float(diff.max()))
                within = within and bool(np.all(diff <= tolerance + rtol * np.abs(want)))  # NaN fails too
    if not within:
        raise SystemExit("deeplens_compile: the model fails parity on {}: max abs diff {:.3g}, beyond tolerance "
                         "{:.3g} + rtol {:.3g} x |original| over {} samples; build with model.precision = \"fp32\", "
                         "or another target.backend".format(model.device, worst, tolerance, rtol, len(samples)))
    print("deeplens_compile: parity on {}: max abs diff {:.3g}, within {:.3g} + {:.3g} x |original| over {} "
          "samples".format(model.device, worst, tolerance, rtol, len(samples)))
    return worst


def build(model_dir, work_dir, fp16=True, tolerance=None, rtol=0.0):
    """Build ``WORK_DIR/model.engine`` from ``MODEL_DIR/model.onnx``, unless the stamp says it is current.

    :param fp16: let TensorRT pick FP16 kernels (where the GPU has fast FP16); ``bench/bench_tensorrt.py``
        builds an FP32 engine too, to measure what FP16 buys.
    :param tolerance: check the new engine's parity within it and ``rtol`` (see :func:`check_parity`); None skips
        the check.
    """
    import tensorrt as trt

    onnx_path = os.path.join(model_dir, "model.onnx")
    digest = hashlib.sha256()
    for path in (onnx_path, onnx_path + ".data"):  # the graph, and its weights (external data) when apart
        if os.path.exists(path):
            with open(path, "rb") as source:
                for block in iter(lambda: source.read(1 << 20), b""):
                    digest.update(block)
    stamp = {"onnx_sha256": digest.hexdigest(), "tensorrt": trt.__version__, "gpu": _gpu_name(), "fp16": fp16}
    engine_path, stamp_path = os.path.join(work_dir, ENGINE), os.path.join(work_dir, STAMP)
    if os.path.exists(engine_path) and os.path.exists(stamp_path):
        with open(stamp_path) as recorded:
            if json.load(recorded) == stamp:
                print("deeplens_compile: engine unchanged ({gpu}, TensorRT {tensorrt})".format(**stamp))
                return
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch, and the flag is deprecated; 8.x needs it
    major = int(trt.__version__.split(".")[0])
    explicit = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if major < 10 else 0
    network = builder.create_network(explicit)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):  # from the file, so the parser finds the external data beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SystemExit("deeplens_compile: TensorRT {} cannot parse the model: {}".format(trt.__version__, errors))
    config = builder.create_builder_config()
    if fp16 and builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    quantized = (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
    if any(network.get_layer(i).type in quantized for i in range(network.num_layers)):
        config.set_flag(trt.BuilderFlag.INT8)  # a QDQ (INT8) model: INT8 where its Q/DQ pairs say, explicitly
    cache_path = os.path.join(work_dir, TIMING_CACHE)
    cached = b""
    if os.path.exists(cache_path):
        with open(cache_path, "rb") as previous:
            cached = previous.read()
    cache = config.create_timing_cache(cached)
    config.set_timing_cache(cache, ignore_mismatch=True)  # a cache from another GPU or version is ignored
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise SystemExit("deeplens_compile: TensorRT {} could not build an engine for {}".format(trt.__version__,
                                                                                             stamp["gpu"]))
    if os.path.exists(stamp_path):
        os.remove(stamp_path)  # the engine it stamped is about to be replaced
    _write(engine_path, bytes(engine))
    _write(cache_path, bytes(cache.serialize()))
    if tolerance is not None:
        os.environ["DEEPLENS_WORK_DIR"] = work_dir  # where deeplens_model finds the engine
        check_parity(model_dir, tolerance, rtol)
    _write(stamp_path, json.dumps(stamp, sort_keys=True).encode())
    print("deeplens_compile: built the engine for {gpu} with TensorRT {tensorrt}".format(**stamp))


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4, 5):
        raise SystemExit("usage: python deeplens_compile.py MODEL_DIR WORK_DIR [TOLERANCE [RTOL]]")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise SystemExit("deeplens_compile: TensorRT is not installed for this Python ({}): install the bundle's "
                         "runtime, or JetPack on a Jetson".format(sys.executable))
    os.makedirs(sys.argv[2], exist_ok=True)
    build(sys.argv[1], sys.argv[2], tolerance=float(sys.argv[3]) if len(sys.argv) >= 4 else None,
          rtol=float(sys.argv[4]) if len(sys.argv) == 5 else 0.0)
