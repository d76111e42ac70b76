"""Every module of the core and of each built-in plugin imports cleanly with warnings as errors."""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

import deeplens_build
from deeplens_build import NAME
from deeplens_build.device import support
from deeplens_build.plugins import build_plugin_manager

PLUGIN_PACKAGES = ("deeplens_build_caffe", "deeplens_build_mxnet", "deeplens_build_onnx", "deeplens_build_openvino",
                   "deeplens_build_pytorch", "deeplens_build_tensorflow", "deeplens_build_tensorrt")


def _modules(package: str, device_files: set[Path]) -> list[str]:
    """The package's modules but those that run on a device (beside its runtime, not here: tests/device runs
    them as a device does)."""
    module = importlib.import_module(package)
    found = [package] + [info.name for info in pkgutil.walk_packages(module.__path__, prefix=f"{package}.")]
    return [name for name in found if not name.startswith(f"{support.__name__}.")
            and Path(importlib.util.find_spec(name).origin).resolve() not in device_files]


def test_every_module_imports_under_warnings_as_errors() -> None:
    manager = build_plugin_manager()
    device_files = {Path(path).resolve() for b in (info.backend for info in manager.targets)
                    for path in (b.device_module, b.device_build) if path}
    device_files |= {p.framework.device_module.resolve() for p in manager.plugins if p.framework.device_module}
    modules = [m for package in ("deeplens_build", *PLUGIN_PACKAGES) for m in _modules(package, device_files)]
    assert {"deeplens_build.stages.fetch", "deeplens_build.aws.deploy", "deeplens_build.device.run",
            "deeplens_build.builtin.sources", "deeplens_build_tensorrt"} <= set(modules)
    code = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\n"
    subprocess.run([sys.executable, "-W", "error", "-c", code, *modules], check=True)


def test_every_built_in_plugin_is_covered() -> None:
    built_in = {ep.value.split(":")[0].split(".")[0] for ep in metadata.entry_points(group=NAME)
                if ep.dist is not None and ep.dist.name.startswith("deeplens-build-")}
    assert built_in <= set(PLUGIN_PACKAGES)
    assert deeplens_build.__name__ == NAME


def _imports(module: str) -> set[str]:
    """The deeplens_build modules ``module``'s source imports (at any depth of its code)."""
    import ast

    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name.startswith("deeplens_build")}


def test_no_import_runs_back_up_a_layer() -> None:
    for lower in ("deeplens_build.config", "deeplens_build.signing", "deeplens_build.cache"):
        assert not {m for m in _imports(lower) if m.startswith("deeplens_build.aws")}, lower
    stages = [m for m in _modules("deeplens_build", set()) if m.startswith("deeplens_build.stages.")]
    assert len(stages) > 10
    for stage in stages:
        assert not {m for m in _imports(stage) if m.startswith("deeplens_build.builtin")}, stage
    # the built-in plugins import what a third-party plugin can: the public face (and, for the backend, the
    # device file it ships)
    public = {f"{NAME}.{name}" for name in deeplens_build.__all__} | {NAME, f"{NAME}.onnxtools"}
    for builtin in ("deeplens_build.builtin.sources", "deeplens_build.builtin.onnxruntime"):
        assert _imports(builtin) - public <= {"deeplens_build.device", "deeplens_build.device.support"}, builtin
