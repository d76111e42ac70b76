"""Compile stage: the optimized ONNX artifact becomes what the target backend's runtime executes.

Before any compiler runs, what the device's runtime would refuse is refused here, on the build machine: an
opset above the backend's ceiling, an operator domain it does not import, an operator its parser lacks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deeplens_build import onnxtools
from deeplens_build.digest import file_sha256
from deeplens_build.errors import CompileError, ConfigError
from deeplens_build.types import Artifact, TargetBackend
from deeplens_build.values import Optimized

if TYPE_CHECKING:
    from deeplens_build.build import Build


def check_accepts(artifact: Artifact, backend: TargetBackend) -> None:
    """Raise ``CompileError`` naming what of an ONNX artifact the backend's runtime does not accept."""
    import onnx

    model = onnx.load(str(artifact.path), load_external_data=False)
    found = onnxtools.opset(model)
    if backend.max_opset is not None and found is not None and found > backend.max_opset:
        raise CompileError(f"the artifact is ONNX opset {found} and {backend.name} loads opset {backend.max_opset} "
                           "at most; export the model at that opset or lower")
    accepted = {*backend.domains, *onnxtools.STANDARD_DOMAINS}
    domains = sorted({o.domain for o in model.opset_import} - accepted)
    if domains:
        raise CompileError(f"the artifact imports operator domain(s) {', '.join(domains)}, which {backend.name} "
                           f"does not accept (it accepts {', '.join(repr(d) for d in backend.domains)})")
    if backend.operators is not None:
        missing = sorted({n.op_type for n in onnxtools.nodes(model) if n.domain in onnxtools.STANDARD_DOMAINS}
                         - backend.operators)
        if missing:
            raise CompileError(f"{backend.name}'s ONNX parser does not support operator(s) {', '.join(missing)}; "
                               "replace those layers, or choose another `target.backend`")


def compile_artifact(optimized: Optimized, backend: TargetBackend, workdir: Path,
                     call: Callable[[str, Callable[..., Any], Any], Any]) -> Artifact:
    """``backend.compile``'s artifact, checked: every file it names exists inside ``workdir``.

    :param call: how to call into the backend (``PluginManager.call_target``, which names it in errors).
    """
    assert backend.compile is not None
    compiled = call("compile the artifact", backend.compile, optimized.artifact, workdir, optimized.precision)
    if not isinstance(compiled, Artifact):
        raise CompileError(f"target backend {backend.name!r}: compile must return an Artifact, got "
                           f"{type(compiled).__name__}")
    root = workdir.resolve()
    for path in compiled.files:
        if not Path(path).is_file() or not Path(path).resolve().is_relative_to(root):
            raise CompileError(f"target backend {backend.name!r}: compile returned {path}, which is not a file in "
                               f"the folder it was given ({workdir})")
    return compiled


def run(b: Build, optimized: Optimized) -> Artifact:
    """What the device executes: the backend's compiled artifact, or the ONNX one when it compiles nothing here."""
    backend, artifact = b.target.backend, optimized.artifact
    if artifact.format != "onnx":
        if backend.compile is not None or backend.device_build is not None:
            raise ConfigError(f"`target.backend = \"{backend.name}\"` compiles ONNX artifacts, and this one is "
                              f"{artifact.format}; export ONNX from the plugin, or use the default backend")
        return artifact
    key = {"artifact": [file_sha256(p) for p in artifact.files], "precision": optimized.precision,
           "target": b.target_identity, "tools": b.tools}
    # what the device's runtime would refuse, refused here; remembered, so a rebuild does not even import onnx
    b.stage("target-check", key, bool, lambda _: check_accepts(artifact, backend) is None)
    if backend.compile is None:
        return artifact

    def build(workdir: Path) -> Artifact:
        b.reporter.step(f"compile: {backend.name}")
        return compile_artifact(optimized, backend, workdir,
                                lambda doing, function, *args: b.manager.call_target(b.target, doing, function,
                                                                                     *args))

    return b.stage("compile", key, Artifact, build)
