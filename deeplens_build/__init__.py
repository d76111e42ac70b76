"""deeplens-build: a SageMaker training output in, a signed Greengrass deployment bundle out.

Writing a framework plugin takes one module and one entry point::

    # deeplens_build_myfw/__init__.py
    from deeplens_build import Framework, ModelFiles, hookimpl

    @hookimpl
    def deeplens_build_framework():
        return Framework(name="myfw", summary="MyFramework checkpoints", requires=("myfw",),
                         install="pip install deeplens-build-myfw")

    @hookimpl
    def deeplens_build_detect(source):
        files = source.matching(".myfw")
        return ModelFiles(files=files[-1:]) if files else None

    # pyproject.toml
    [project.entry-points.deeplens_build]
    myfw = "deeplens_build_myfw"

The hooks, their arguments and what to return are documented in :mod:`deeplens_build.hookspecs` (source
plugins: ``deeplens_build_sources``; target backends: ``deeplens_build_targets``, with ``plugins/openvino`` as the
worked example); :mod:`deeplens_build.testing` runs a plugin through the real pipeline in a test.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deeplens_build.errors import (
    CompileError,
    ConversionError,
    DeepLensBuildError,
    PluginError,
    SourceError,
)

if TYPE_CHECKING:
    from deeplens_build.types import (
        Artifact,
        Framework,
        ModelFiles,
        PluginSettings,
        Runner,
        SourceKind,
        TargetBackend,
        TensorSpec,
        TrainingOutput,
        choose_one,
    )

NAME = "deeplens_build"
"""The pluggy project name and the entry-point group plugins register under."""

__version__ = "0.1.0"

_TYPES = {"Artifact", "Framework", "ModelFiles", "PluginSettings", "Runner", "SourceKind", "TargetBackend",
          "TensorSpec", "TrainingOutput", "choose_one"}


def __getattr__(name: str) -> Any:
    """Plugin-facing names, imported on first use: the types need pydantic and ``hookimpl`` pluggy, and
    ``verify``, ``inspect``, ``run`` and an up-to-date ``package`` use neither (each would cost its start-up)."""
    if name == "hookimpl":
        import pluggy

        value: Any = pluggy.HookimplMarker(NAME)
    elif name in _TYPES:
        from deeplens_build import types

        value = getattr(types, name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = [
    "NAME",
    "Artifact",
    "CompileError",
    "ConversionError",
    "DeepLensBuildError",
    "Framework",
    "ModelFiles",
    "PluginError",
    "PluginSettings",
    "SourceError",
    "Runner",
    "SourceKind",
    "TargetBackend",
    "TensorSpec",
    "TrainingOutput",
    "choose_one",
    "hookimpl",
]
