"""Builds the plugin manager and calls plugins; the one place that checks what plugins answer.

Built-in plugins are separate distributions found through the same entry-point group as third-party ones,
so nothing here knows a framework by name.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy
from pydantic import ValidationError

from deeplens_build import NAME, hookspecs
from deeplens_build.errors import (
    CompileError,
    ConfigError,
    DeepLensBuildError,
    PluginError,
    SourceError,
)
from deeplens_build.names import first_problem
from deeplens_build.types import (
    Artifact,
    Detection,
    Framework,
    ModelFiles,
    PluginInfo,
    PluginSettings,
    SourceInfo,
    SourceKind,
    TargetBackend,
    TargetInfo,
    TensorSpec,
    TrainingOutput,
)

DISABLE_ENV = "DEEPLENS_BUILD_DISABLE_PLUGINS"
"""Comma-separated entry-point names that are not loaded (e.g. to silence a broken third-party plugin)."""
ONLY_ENV = "DEEPLENS_BUILD_PLUGINS"
"""Comma-separated entry-point names to load, ignoring every other installed plugin (used by the test suite)."""

BUILTIN_DISTRIBUTIONS = frozenset(
    {"deeplens-build", "deeplens-build-onnx", "deeplens-build-mxnet", "deeplens-build-tensorflow",
     "deeplens-build-caffe", "deeplens-build-openvino", "deeplens-build-tensorrt"}
)
CORE_SOURCES = "deeplens-sources"
"""The entry point of the built-in source kinds (local paths, s3://, sagemaker-job:) in the core's distribution.
Loaded like any plugin; registered directly when an allowlist or ``entry_points=False`` leaves it out, since
no build can fetch without it (blocking it by name still removes it)."""
CORE_TARGETS = "deeplens-targets"
"""The entry point of the built-in ``onnxruntime`` target backend, the default: registered like ``CORE_SOURCES``."""
DEFAULT_TARGET = "onnxruntime"
_FRAMEWORK_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_URI = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True)
class LoadFailure:
    """A plugin that could not be loaded; reported by ``deeplens-build plugins`` and skipped."""

    name: str
    distribution: str | None
    reason: str


class PluginManager:
    """The loaded framework plugins and typed, validated calls into them."""

    def __init__(self, pm: pluggy.PluginManager, infos: Mapping[str, PluginInfo], sources: tuple[SourceInfo, ...],
                 targets: tuple[TargetInfo, ...], failures: tuple[LoadFailure, ...]):
        self._pm = pm
        self._infos = dict(infos)
        self.sources = sources
        self.targets = targets
        self.failures = failures

    @property
    def plugins(self) -> tuple[PluginInfo, ...]:
        return tuple(sorted(self._infos.values(), key=lambda p: p.framework.name))

    def describe(self) -> str:
        """The installed plugins, for error messages."""
        if not self._infos:
            return "no framework plugins are installed (pip install deeplens-build-onnx)"
        return ", ".join(f"{p.framework.name} ({p.distribution} {p.version})" if p.distribution
                         else f"{p.framework.name} (registered directly)" for p in self.plugins)

    def source_kind(self, source: str) -> SourceKind:
        """The source kind that claims ``source``: the longest matching prefix, else the local-path fallback.

        :raises SourceError: for a URI no installed kind claims.
        """
        claims = [(len(prefix), info.kind) for info in self.sources for prefix in info.kind.prefixes
                  if source.startswith(prefix)]
        if claims:
            return max(claims, key=lambda claim: claim[0])[1]
        fallback = [info.kind for info in self.sources if not info.kind.prefixes]
        if (uri := _URI.match(source)) and not Path(source).exists() or not fallback:
            scheme = uri["scheme"] if uri else source
            kinds = ", ".join(p for info in self.sources for p in info.kind.prefixes) or "none"
            raise SourceError(f"no source plugin fetches {scheme!r} sources ({source!r}); installed: {kinds}. "
                              "Install the source plugin for it, or download the model and give its path")
        return fallback[0]

    def target(self, name: str) -> TargetInfo:
        """The target backend called ``name`` (``target.backend``).

        :raises ConfigError: naming the installed backends when none is called so.
        """
        for info in self.targets:
            if info.backend.name == name:
                return info
        installed = ", ".join(f"{t.backend.name} ({t.distribution or t.plugin})" for t in self.targets) or "none"
        raise ConfigError(f"Field `target.backend` is {name!r}, which no installed plugin provides; installed: "
                          f"{installed}. Install its plugin (e.g. pip install deeplens-build-{name}) or choose "
                          "one of them")

    def call_target(self, info: TargetInfo, doing: str, function: Callable[..., Any], *args: Any) -> Any:
        """Call one of a backend's functions, with errors named as for plugin hooks."""
        who = f"target backend {info.backend.name!r}"
        try:
            return function(*args)
        except DeepLensBuildError as exc:
            raise type(exc)(f"{who} could not {doing}: {exc}") from exc
        except ImportError as exc:
            install = info.backend.install or f"pip install {info.distribution or info.plugin}"
            raise CompileError(f"{who} could not {doing}: {exc}; install what it needs with: {install}") from exc
        except Exception as exc:  # the backend's or its compiler's bug: name both instead of a traceback
            raise CompileError(f"{who} failed to {doing}: {type(exc).__name__}: {_first_line(exc)}") from exc

    def plugin_for(self, framework: str) -> PluginInfo:
        for info in self._infos.values():
            if info.framework.name == framework:
                return info
        raise PluginError(f"no plugin provides framework {framework!r}; installed: {self.describe()}. "
                          "Set `model.framework` to one of them or install the plugin for your framework.")

    def settings(self, tables: Mapping[str, Mapping[str, Any]]) -> dict[str, PluginSettings]:
        """Every plugin's settings (``[plugins.<framework>]``) validated by its own class, by framework name.

        :raises ConfigError: quoting the key path of the first bad value or unknown key, or naming a table that
            no installed plugin owns.
        """
        frameworks = {info.framework.name: info.framework for info in self._infos.values()}
        unknown = sorted(set(tables) - set(frameworks))
        if unknown:
            raise ConfigError(f"Field `plugins.{unknown[0]}` is for no installed plugin; installed: "
                              f"{self.describe()}")
        validated = {}
        for name, framework in frameworks.items():
            try:
                validated[name] = framework.settings.model_validate(dict(tables.get(name, {})))
            except ValidationError as exc:
                raise ConfigError(f"deeplens.toml: {first_problem(exc, ('plugins', name))}") from exc
        return validated

    def detect(self, source: TrainingOutput, framework: str, settings: Mapping[str, PluginSettings]) -> Detection:
        """Find the plugin that owns ``source``: the one named by ``framework``, or the first to claim it.

        :param settings: what :meth:`settings` returned.
        """
        if framework != "auto":
            info = self.plugin_for(framework)
            claim = self._call(info, "deeplens_build_detect", f"detect {source.origin}",
                               source=source, settings=settings[info.framework.name])
            if claim is None:
                raise SourceError(f"plugin {info.name!r} found no {framework} model in {source.origin} "
                                  f"(files: {_preview(source.files)}); check the source or set "
                                  "`model.framework = \"auto\"`")
            return Detection(info, self._check_claim(info, source, claim))
        for impl in reversed(self._pm.hook.deeplens_build_detect.get_hookimpls()):
            info = self._infos[impl.plugin_name]
            claim = self._call(info, "deeplens_build_detect", f"detect {source.origin}",
                               source=source, settings=settings[info.framework.name])
            if claim is not None:
                return Detection(info, self._check_claim(info, source, claim))
        raise SourceError(f"no plugin recognises the model in {source.origin} (files: {_preview(source.files)}); "
                          f"installed plugins: {self.describe()}. Install the plugin for your framework, or "
                          "check that the source is the training output (e.g. model.tar.gz).")

    def convert(self, detection: Detection, source: TrainingOutput, workdir: Path,
                shapes: Mapping[str, tuple[int, ...]], settings: PluginSettings, opset: int | None) -> Artifact:
        info = detection.plugin
        converted = self._call(info, "deeplens_build_convert", f"convert {_files(detection)}", source=source,
                               model=detection.model, workdir=workdir, shapes=shapes, settings=settings,
                               opset=opset)
        return _check_converted(info, converted, workdir)

    def reference_run(self, detection: Detection, source: TrainingOutput, converted: Artifact,
                      inputs: Mapping[str, Any], settings: PluginSettings) -> Mapping[str, Any]:
        info = detection.plugin
        outputs = self._call(info, "deeplens_build_reference_run", f"run the original {_files(detection)}",
                             source=source, model=detection.model, converted=converted, inputs=inputs,
                             settings=settings)
        missing = [o.name for o in converted.outputs if not isinstance(outputs, Mapping) or o.name not in outputs]
        if missing:
            raise PluginError(f"plugin {info.name!r}: deeplens_build_reference_run returned no value for "
                              f"output(s) {', '.join(missing)} of {_files(detection)}")
        return outputs

    def runtime(self, detection: Detection, converted: Artifact, platform: str) -> str | None:
        answer = self._call(detection.plugin, "deeplens_build_runtime", "choose a runtime",
                            converted=converted, platform=platform)
        if answer is not None and not isinstance(answer, str):
            raise PluginError(f"plugin {detection.plugin.name!r}: deeplens_build_runtime must return a runtime "
                              f"name or None, not {type(answer).__name__}")
        return answer

    def _call(self, info: PluginInfo, hook: str, doing: str, **kwargs: Any) -> Any:
        others = [p for name, p in self._pm.list_name_plugin() if name != info.name and p is not None]
        caller = self._pm.subset_hook_caller(hook, remove_plugins=others)
        try:
            return caller(**kwargs)
        except DeepLensBuildError as exc:
            raise type(exc)(f"plugin {info.name!r} could not {doing}: {exc}") from exc
        except ImportError as exc:  # what the plugin imports lazily is missing: say how to install it
            install = info.framework.install or f"pip install {info.distribution or info.name}"
            raise PluginError(f"plugin {info.name!r} could not {doing}: {exc}; install what it needs with: "
                              f"{install}") from exc
        except Exception as exc:  # a plugin's bug: name the plugin and the cause instead of a traceback
            raise PluginError(f"plugin {info.name!r} failed to {doing}: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _check_claim(info: PluginInfo, source: TrainingOutput, claim: object) -> ModelFiles:
        if not isinstance(claim, ModelFiles) or not claim.files:
            raise PluginError(f"plugin {info.name!r}: deeplens_build_detect must return ModelFiles naming at "
                              f"least one file, or None; got {claim!r}")
        unknown = [f for f in claim.files if f not in source.files]
        if unknown:
            raise PluginError(f"plugin {info.name!r} claimed files that are not in {source.origin}: "
                              f"{', '.join(unknown)}")
        return claim


def build_plugin_manager(
    *,
    extra: Iterable[object] = (),
    entry_points: bool = True,
    only: Iterable[str] | None = None,
) -> PluginManager:
    """Build the plugin manager: hookspecs, then every entry point of the ``deeplens_build`` group.

    :param extra: plugin objects (modules or instances) registered before the entry points, e.g. a plugin
        under test.
    :param entry_points: load installed plugins; a test can turn this off and pass ``extra`` only.
    :param only: entry-point names to load, ignoring any other installed plugin (default: ``$DEEPLENS_BUILD_PLUGINS``
        when set; the project's own tests set it so that a stray third-party plugin cannot change their outcome).
    """
    pm = pluggy.PluginManager(NAME)
    pm.add_hookspecs(hookspecs)
    blocked = _names_from(DISABLE_ENV) or set()
    if only is None:
        only = _names_from(ONLY_ENV)
    for name in blocked:
        pm.set_blocked(name)
    failures: list[LoadFailure] = []
    dists: dict[str, metadata.Distribution | None] = {}
    for plugin in extra:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        pm.register(plugin, name=name)
        dists[name] = None
    if entry_points:
        wanted = None if only is None else set(only)
        for ep in sorted(metadata.entry_points(group=NAME), key=lambda e: e.name):
            if ep.name in blocked or (wanted is not None and ep.name not in wanted) or pm.has_plugin(ep.name):
                continue
            try:
                pm.register(ep.load(), name=ep.name)
            except Exception as exc:  # a broken third-party plugin must not break unrelated builds
                failures.append(LoadFailure(ep.name, ep.dist.name if ep.dist else None, f"{type(exc).__name__}: {exc}"))
                continue
            dists[ep.name] = ep.dist
    if not pm.has_plugin(CORE_SOURCES) and not pm.is_blocked(CORE_SOURCES):
        from deeplens_build import sources

        pm.register(sources, name=CORE_SOURCES)
        dists[CORE_SOURCES] = _distribution("deeplens-build")
    if not pm.has_plugin(CORE_TARGETS) and not pm.is_blocked(CORE_TARGETS):
        from deeplens_build import targets

        pm.register(targets, name=CORE_TARGETS)
        dists[CORE_TARGETS] = _distribution("deeplens-build")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}") from exc
    infos = _declare_frameworks(pm, dists, failures)
    kinds = _declare_sources(pm, dists, failures)
    targets = _declare_targets(pm, dists, failures)
    declared = {*infos, *(k.plugin for k in kinds), *(t.plugin for t in targets), *(f.name for f in failures)}
    for name, plugin in pm.list_name_plugin():
        if plugin is not None and name not in declared:
            failures.append(LoadFailure(name, None, "implements none of deeplens_build_framework, "
                                                    "deeplens_build_sources and deeplens_build_targets"))
            pm.unregister(plugin)
    return PluginManager(pm, infos, kinds, targets, tuple(failures))


def _declare_frameworks(pm: pluggy.PluginManager, dists: Mapping[str, metadata.Distribution | None],
                        failures: list[LoadFailure]) -> dict[str, PluginInfo]:
    infos: dict[str, PluginInfo] = {}
    for name, dist, framework in _declarations(pm, "deeplens_build_framework", dists, failures):
        if not isinstance(framework, Framework) or not _FRAMEWORK_NAME.match(framework.name):
            raise PluginError(f"plugin {name!r}: deeplens_build_framework must return a Framework whose name "
                              f"matches {_FRAMEWORK_NAME.pattern}; got {framework!r}")
        if not (isinstance(framework.settings, type) and issubclass(framework.settings, PluginSettings)):
            raise PluginError(f"plugin {name!r}: Framework.settings must be a PluginSettings subclass, not "
                              f"{framework.settings!r}")
        infos[name] = PluginInfo(
            name=name,
            framework=framework,
            distribution=dist.name if dist else None,
            version=dist.version if dist else None,
            builtin=bool(dist and dist.name in BUILTIN_DISTRIBUTIONS),
            tool_versions={req: _installed_version(req) for req in framework.requires},
        )
    _one_provider_each("framework", ((i.framework.name, i.name, i.distribution) for i in infos.values()))
    return infos


def _declare_sources(pm: pluggy.PluginManager, dists: Mapping[str, metadata.Distribution | None],
                     failures: list[LoadFailure]) -> tuple[SourceInfo, ...]:
    infos: list[SourceInfo] = []
    for name, dist, kinds in _declarations(pm, "deeplens_build_sources", dists, failures):
        if not isinstance(kinds, list | tuple) or not all(isinstance(k, SourceKind) and callable(k.fetch)
                                                         for k in kinds):
            raise PluginError(f"plugin {name!r}: deeplens_build_sources must return a list of SourceKind; got "
                              f"{kinds!r}")
        infos += [SourceInfo(kind=k, plugin=name, distribution=dist.name if dist else None,
                             version=dist.version if dist else None,
                             builtin=bool(dist and dist.name in BUILTIN_DISTRIBUTIONS)) for k in kinds]
    claims: dict[str, list[SourceInfo]] = {}
    for info in infos:
        for prefix in info.kind.prefixes or ("",):
            claims.setdefault(prefix, []).append(info)
    for prefix, providers in claims.items():
        if len(providers) > 1:
            who = " and ".join(f"{p.kind.name!r} of plugin {p.plugin!r}" for p in providers)
            what = f"source prefix {prefix!r}" if prefix else "local paths (a kind without prefixes)"
            raise PluginError(f"{what} is claimed by {who}; uninstall one, or block it with {DISABLE_ENV}")
    return tuple(infos)


def _declare_targets(pm: pluggy.PluginManager, dists: Mapping[str, metadata.Distribution | None],
                     failures: list[LoadFailure]) -> tuple[TargetInfo, ...]:
    infos: list[TargetInfo] = []
    for name, dist, backends in _declarations(pm, "deeplens_build_targets", dists, failures):
        if not isinstance(backends, list | tuple) or not all(
                isinstance(t, TargetBackend) and _FRAMEWORK_NAME.match(t.name) and Path(t.device_module).is_file()
                for t in backends):
            raise PluginError(f"plugin {name!r}: deeplens_build_targets must return a list of TargetBackend, each "
                              f"named like {_FRAMEWORK_NAME.pattern} with an existing device_module; got {backends!r}")
        infos += [TargetInfo(backend=t, plugin=name, distribution=dist.name if dist else None,
                             version=dist.version if dist else None,
                             builtin=bool(dist and dist.name in BUILTIN_DISTRIBUTIONS),
                             tool_versions={req: _installed_version(req) for req in t.requires}) for t in backends]
    _one_provider_each("target backend", ((t.backend.name, t.plugin, t.distribution) for t in infos))
    return tuple(sorted(infos, key=lambda t: t.backend.name))


def _one_provider_each(what: str, provided: Iterable[tuple[str, str, str | None]]) -> None:
    """Refuse a name two plugins provide; ``provided`` holds (name, plugin, distribution) per declaration."""
    by_name: dict[str, list[tuple[str, str | None]]] = {}
    for name, plugin, distribution in provided:
        by_name.setdefault(name, []).append((plugin, distribution))
    for name, providers in by_name.items():
        if len(providers) > 1:
            who = " and ".join(f"{plugin!r} ({distribution or 'registered directly'})"
                               for plugin, distribution in providers)
            raise PluginError(f"{what} {name!r} is provided by more than one plugin: {who}; uninstall one, or block "
                              f"it with {DISABLE_ENV}")


def _declarations(pm: pluggy.PluginManager, hook: str, dists: Mapping[str, metadata.Distribution | None],
                  failures: list[LoadFailure]) -> Iterator[tuple[str, metadata.Distribution | None, Any]]:
    """Each plugin's answer to a declaration hook, as (plugin name, distribution, answer). A plugin whose
    declaration raises is reported and unregistered, like one that fails to import."""
    for impl in getattr(pm.hook, hook).get_hookimpls():
        name, dist = impl.plugin_name, dists.get(impl.plugin_name)
        try:
            answer = impl.function()
        except Exception as exc:  # a broken third-party plugin must not break unrelated builds
            failures.append(LoadFailure(name, dist.name if dist else None, f"{type(exc).__name__}: {exc}"))
            pm.unregister(name=name)
            continue
        yield name, dist, answer


def _distribution(name: str) -> metadata.Distribution | None:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def _names_from(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    return None if value is None else {n.strip() for n in value.split(",") if n.strip()}


def _installed_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _check_converted(info: PluginInfo, converted: object, workdir: Path) -> Artifact:
    def fail(problem: str) -> PluginError:
        return PluginError(f"plugin {info.name!r}: deeplens_build_convert {problem}")

    if not isinstance(converted, Artifact):
        raise fail(f"must return an Artifact, got {type(converted).__name__}")
    root = workdir.resolve()
    for path in (*converted.files, *([converted.labels] if converted.labels else [])):
        if not Path(path).is_file():
            raise fail(f"returned {path}, which is not a file")
        if not Path(path).resolve().is_relative_to(root):
            raise fail(f"returned {path}, outside the work folder it was given ({workdir})")
    if not converted.inputs or not converted.outputs:
        raise fail("returned a model without inputs or outputs")
    for spec in (*converted.inputs, *converted.outputs):
        _check_spec(spec, fail)
    return converted


def _check_spec(spec: object, fail: Callable[[str], PluginError]) -> None:
    import numpy as np  # lazily: `plugins`, `verify` and `inspect` never get here

    if not isinstance(spec, TensorSpec):
        raise fail(f"must describe tensors with TensorSpec, got {spec!r}")
    try:
        np.dtype(spec.dtype)
    except TypeError as exc:
        raise fail(f"gave tensor {spec.name!r} an unknown dtype {spec.dtype!r}") from exc
    if spec.layout not in (None, "NCHW", "NHWC"):
        raise fail(f"gave tensor {spec.name!r} layout {spec.layout!r}; use 'NCHW', 'NHWC' or None")


def _files(detection: Detection) -> str:
    return ", ".join(detection.model.files)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]


def _preview(files: tuple[str, ...], limit: int = 8) -> str:
    shown = ", ".join(files[:limit])
    return shown + (f", … ({len(files) - limit} more)" if len(files) > limit else "") if files else "none"
