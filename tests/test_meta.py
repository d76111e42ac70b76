"""Every module imports cleanly with warnings as errors."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import deeplens_build


def test_every_module_imports_under_warnings_as_errors() -> None:
    modules = ["deeplens_build", "deeplens_build_onnx", "deeplens_build_mxnet", "deeplens_build_mxnet.testing",
               "deeplens_build_tensorflow", "deeplens_build_caffe", "deeplens_build_caffe.testing"] + [
        f"deeplens_build.{m.name}" for m in pkgutil.iter_modules(deeplens_build.__path__)]
    code = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\n"
    subprocess.run([sys.executable, "-W", "error", "-c", code, *modules], check=True)
