"""The OpenVINO target backend: the worked example of a target plugin (README, "Adding a target").

DeepLens ran Intel's model optimizer on the camera itself (``mo.optimize``: FP16 IR for its Intel GPU). This
backend does that ahead of time, on the build machine: ``openvino.convert_model`` reads the optimized ONNX
artifact and ``save_model`` writes ``model.xml`` + ``model.bin``. Parity runs that IR in OpenVINO on the build
machine's CPU against the original framework; on the device, ``device.py`` loads it on the GPU when there is
one, else the CPU, through OpenVINO's AUTO device.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from deeplens_build import Artifact, Runner, TargetBackend, hookimpl

HERE = Path(__file__).resolve().parent
FORMAT = "openvino-ir"


def compile_ir(artifact: Artifact, workdir: Path, precision: str) -> Artifact:
    import openvino as ov

    xml = workdir / "model.xml"
    # The ONNX already holds the precision parity accepted: FP16 weights, with the nodes the FP16 search kept in
    # FP32 still FP32. OpenVINO's own FP16 compression (save_model's default) would halve those nodes too, so
    # the IR keeps the ONNX's precision instead: an FP16 IR at precision "fp16", FP32 at "fp32".
    ov.save_model(ov.convert_model(str(artifact.path)), str(xml), compress_to_fp16=False)
    return dataclasses.replace(artifact, format=FORMAT, path=xml, extra_files=(workdir / "model.bin",))


def load_ir(artifact: Artifact) -> Runner:
    import openvino as ov

    # f32 on the build machine's CPU, which would otherwise pick bf16 where it has AMX or AVX512-BF16
    compiled = ov.Core().compile_model(str(artifact.path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    names = [spec.name for spec in artifact.outputs]

    def run(inputs):
        results = request.infer(dict(inputs))
        return {name: results[compiled.output(name)] for name in names}

    return run


@hookimpl
def deeplens_build_targets() -> list[TargetBackend]:
    return [TargetBackend(
        name="openvino", summary="OpenVINO IR for Intel CPUs and GPUs (the DeepLens camera's path, ahead of time)",
        accelerators=("cpu", "gpu"), platforms=("linux-x86_64",),
        device_module=HERE / "device.py", runtime="openvino",
        runtimes=(HERE / "runtime" / "openvino" / "runtime.toml",), compile=compile_ir, load=load_ir,
        requires=("openvino",), install="pip install deeplens-build-openvino")]
