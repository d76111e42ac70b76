"""The built-in target backend, ``onnxruntime`` (the default): the optimized ONNX artifact ships as it is and
onnxruntime runs it on the device — the CPU execution provider, or CUDA's with ``target.accelerator = "gpu"``
(the runtime is matched by accelerator, so this backend names none)."""

from __future__ import annotations

from deeplens_build import Artifact, Runner, TargetBackend, hookimpl, onnxtools
from deeplens_build.device import support


def load_onnx(artifact: Artifact) -> Runner:
    """Run an ONNX artifact in onnxruntime on this machine's CPU, fully optimized as on a device (its weights not
    prepacked: parity runs a few samples)."""
    return onnxtools.runner(artifact.path)


@hookimpl
def deeplens_build_targets() -> list[TargetBackend]:
    return [TargetBackend(
        name="onnxruntime", summary="ONNX Runtime: the optimized ONNX artifact (CPU, or CUDA on a GPU device)",
        accelerators=("cpu", "gpu"), platforms=("linux-x86_64", "linux-aarch64"),
        device_module=support.ONNXRUNTIME_MODEL, load=load_onnx, requires=("onnxruntime",),
        install="pip install onnxruntime")]
