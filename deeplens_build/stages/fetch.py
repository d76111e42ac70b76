"""Fetch stage: turn a source into a TrainingOutput, through the source kind (a plugin) that claims it.

The source kinds share the core's :class:`deeplens_build.SourceContext` (cached downloads, safe extraction); the
built-in ones (local paths, ``s3://``, ``sagemaker-job:``) are :mod:`deeplens_build.builtin.sources`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deeplens_build.errors import ConfigError, PluginError
from deeplens_build.source_context import SourceContext
from deeplens_build.types import SourceKind, TrainingOutput

if TYPE_CHECKING:
    from deeplens_build.build import Build


def run(b: Build) -> TrainingOutput:
    """The source named by ``--source``, else ``model.source`` (relative to ``deeplens.toml``)."""
    source = b.options.source or b.config.model.source
    if not source:
        raise ConfigError("no source: pass --source, or set `model.source` in deeplens.toml to a folder, a "
                          "model.tar.gz, or a URI an installed source plugin fetches (`deeplens-build plugins`)")
    kind = b.manager.source_kind(source)
    b.local_source = not kind.prefixes
    if not kind.prefixes and not b.options.source:
        source = str(b.config.root / source)  # relative to deeplens.toml, like every path in it
    b.reporter.step(f"fetch: {source} ({kind.name})")
    return fetch(source, kind, SourceContext(cache=b.cache, limits=b.config.fetch, reporter=b.reporter))


def fetch(source: str, kind: SourceKind, context: SourceContext) -> TrainingOutput:
    """Acquire ``source`` with the source kind that claimed it.

    :raises PluginError: when the kind's fetch answers anything but a TrainingOutput.
    """
    output = kind.fetch(source, context)
    if not isinstance(output, TrainingOutput):
        raise PluginError(f"source kind {kind.name!r} must return a TrainingOutput for {source!r}, not "
                          f"{type(output).__name__}")
    return output
