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
worked example); a source plugin fetches through :class:`SourceContext` and makes AWS clients with
:func:`aws_client`; :mod:`deeplens_build.testing` runs a plugin through the real pipeline in a test. Everything
a plugin needs is here: the built-in plugins (:mod:`deeplens_build.builtin`) import nothing else of the core.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deeplens_build.errors import (
    AwsError,
    CompileError,
    ConversionError,
    DeepLensBuildError,
    PluginError,
    SourceError,
)

if TYPE_CHECKING:
    from deeplens_build.clients import aws_client
    from deeplens_build.source_context import SourceContext
    from deeplens_build.types import (
        Artifact,
        Framework,
        ModelFiles,
        PluginSettings,
        Runner,
        SageMakerJob,
        SourceKind,
        TargetBackend,
        TensorSpec,
        TrainingOutput,
        choose_one,
    )

NAME = "deeplens_build"
"""The pluggy project name and the entry-point group plugins register under."""

__version__ = "0.1.0"

_LAZY = {
    **dict.fromkeys(("Artifact", "Framework", "ModelFiles", "PluginSettings", "Runner", "SageMakerJob", "SourceKind",
                     "TargetBackend", "TensorSpec", "TrainingOutput", "choose_one"), "deeplens_build.types"),
    "SourceContext": "deeplens_build.source_context",
    "aws_client": "deeplens_build.clients",
}


def __getattr__(name: str) -> Any:
    """Plugin-facing names, imported on first use: the types need pydantic and ``hookimpl`` pluggy, and
    ``verify``, ``inspect``, ``run`` and an up-to-date ``package`` use neither (each would cost its start-up)."""
    if name == "hookimpl":
        import pluggy

        value: Any = pluggy.HookimplMarker(NAME)
    elif name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = [
    "NAME",
    "Artifact",
    "AwsError",
    "CompileError",
    "ConversionError",
    "DeepLensBuildError",
    "Framework",
    "ModelFiles",
    "PluginError",
    "PluginSettings",
    "Runner",
    "SageMakerJob",
    "SourceContext",
    "SourceError",
    "SourceKind",
    "TargetBackend",
    "TensorSpec",
    "TrainingOutput",
    "aws_client",
    "choose_one",
    "hookimpl",
]
