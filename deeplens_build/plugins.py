"""Builds the plugin manager and calls plugins; the one place that checks what plugins answer.

Built-in plugins are separate distributions found through the same entry-point group as third-party ones,
so nothing here knows a framework by name.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import pluggy
from pydantic import ValidationError

from deeplens_build import NAME, hookspecs
from deeplens_build.digest import code_sha256
from deeplens_build.errors import (
    CompileError,
    ConfigError,
    DeepLensBuildError,
    PluginError,
    SourceError,
    reworded,
)
from deeplens_build.names import PLUGIN_NAME, first_problem
from deeplens_build.types import (
    Artifact,
    Framework,
    ModelFiles,
    PluginSettings,
    SourceKind,
    TargetBackend,
    TensorSpec,
    TrainingOutput,
)
from deeplens_build.values import Detection, PluginInfo, SourceInfo, TargetInfo

DISABLE_ENV = "DEEPLENS_BUILD_DISABLE_PLUGINS"
"""Comma-separated entry-point names that are not loaded (e.g. to silence a broken third-party plugin)."""
ONLY_ENV = "DEEPLENS_BUILD_PLUGINS"
"""Comma-separated entry-point names to load, ignoring every other installed plugin (used by the test suite)."""

BUILTIN_DISTRIBUTIONS = frozenset(
    {"deeplens-build", "deeplens-build-onnx", "deeplens-build-mxnet", "deeplens-build-tensorflow",
     "deeplens-build-caffe", "deeplens-build-openvino", "deeplens-build-tensorrt", "deeplens-build-pytorch"}
)
CORE_SOURCES = "deeplens-sources"
"""The entry point of the built-in source kinds (local paths, s3://, sagemaker-job:) in the core's distribution.
Loaded like any plugin; registered directly when an allowlist or ``entry_points=False`` leaves it out, since
no build can fetch without it (blocking it by name still removes it)."""
CORE_TARGETS = "deeplens-targets"
"""The entry point of the built-in ``onnxruntime`` target backend, the default: registered like ``CORE_SOURCES``."""
_PLUGIN_NAME = re.compile(PLUGIN_NAME)
T = TypeVar("T")
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
        self._code: dict[str, str] = {}

    def code(self, plugin: str) -> str:
        """The digest of the code plugin ``plugin`` (its registered name) runs, for cache keys: a plugin edited
        under development, its version unchanged, must not get its old results back. Hashed once per build: every
        stage's key asks."""
        if plugin not in self._code:
            self._code[plugin] = code_sha256(self._pm.get_plugin(plugin))
        return self._code[plugin]

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
            raise reworded(exc, f"{who} could not {doing}: {exc}") from exc
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
                      inputs: Mapping[str, Any], settings: PluginSettings, scratch: Path) -> Mapping[str, Any]:
        info = detection.plugin
        outputs = self._call(info, "deeplens_build_reference_run", f"run the original {_files(detection)}",
                             source=source, model=detection.model, converted=converted, inputs=inputs,
                             settings=settings, scratch=scratch)
        missing = [o.name for o in converted.outputs if not isinstance(outputs, Mapping) or o.name not in outputs]
        if missing:
            raise PluginError(f"plugin {info.name!r}: deeplens_build_reference_run returned no value for "
                              f"output(s) {', '.join(missing)} of {_files(detection)}")
        return outputs

    def reference_done(self, detection: Detection, converted: Artifact, scratch: Path) -> None:
        self._call(detection.plugin, "deeplens_build_reference_done", f"release the original {_files(detection)}",
                   converted=converted, scratch=scratch)

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
            raise reworded(exc, f"plugin {info.name!r} could not {doing}: {exc}") from exc
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
    dists: dict[str, _Dist | None] = {}
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
            dists[ep.name] = _dist(ep.dist)
    for name, module in ((CORE_SOURCES, "deeplens_build.builtin.sources"),
                         (CORE_TARGETS, "deeplens_build.builtin.onnxruntime")):
        if not pm.has_plugin(name) and not pm.is_blocked(name):
            pm.register(importlib.import_module(module), name=name)
            dists[name] = _distribution("deeplens-build")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}") from exc
    frameworks = _collect(pm, dists, failures, _FRAMEWORKS)
    kinds = _collect(pm, dists, failures, _SOURCES)
    targets = _collect(pm, dists, failures, _TARGETS)
    infos = {
        name: PluginInfo(name=name, framework=framework, distribution=dist.name if dist else None,
                         version=dist.version if dist else None, builtin=_builtin(dist),
                         tool_versions={req: installed_version(req) for req in framework.requires})
        for name, dist, framework in frameworks}
    sources = tuple(SourceInfo(kind=kind, plugin=name, distribution=dist.name if dist else None,
                               version=dist.version if dist else None, builtin=_builtin(dist))
                    for name, dist, kind in kinds)
    backends = tuple(sorted((
        TargetInfo(backend=backend, plugin=name, distribution=dist.name if dist else None,
                   version=dist.version if dist else None, builtin=_builtin(dist),
                   tool_versions={req: installed_version(req) for req in backend.requires})
        for name, dist, backend in targets), key=lambda t: t.backend.name))
    declared = {name for found in (frameworks, kinds, targets) for name, _, _ in found} | {f.name for f in failures}
    for name, plugin in pm.list_name_plugin():
        if plugin is not None and name not in declared:
            failures.append(LoadFailure(name, None, "implements none of deeplens_build_framework, "
                                                    "deeplens_build_sources and deeplens_build_targets"))
            pm.unregister(plugin)
    return PluginManager(pm, infos, sources, backends, tuple(failures))


@dataclass(frozen=True)
class _Declaration(Generic[T]):
    """One kind of plugin, as its declaration hook answers it.

    :param many: the hook answers a list of declarations (sources, targets), not one (a framework).
    :param valid: whether one declaration is well formed; ``expected`` says what that is, for the error.
    :param claims: what a declaration claims, each as (what, who), e.g. ("framework 'onnx'", "'onnx' (dist)"):
        two declarations claiming one thing are refused, naming both.
    :param verb: how the refusal says it, between the claim and its claimants.
    """

    hook: str
    many: bool
    valid: Callable[[Any], bool]
    expected: str
    claims: Callable[[str, _Dist | None, T], Iterable[tuple[str, str]]]
    verb: str = "provided by more than one plugin:"


def _who(name: str, dist: _Dist | None) -> str:
    return f"{name!r} ({dist.name if dist else 'registered directly'})"


_FRAMEWORKS: _Declaration[Framework] = _Declaration(
    hook="deeplens_build_framework", many=False,
    valid=lambda f: (isinstance(f, Framework) and bool(_PLUGIN_NAME.match(f.name)) and isinstance(f.settings, type)
                     and issubclass(f.settings, PluginSettings)),
    expected=f"a Framework whose name matches {PLUGIN_NAME} and whose settings are a PluginSettings subclass",
    claims=lambda name, dist, f: [(f"framework {f.name!r}", _who(name, dist))])
_SOURCES: _Declaration[SourceKind] = _Declaration(
    hook="deeplens_build_sources", many=True,
    valid=lambda k: isinstance(k, SourceKind) and callable(k.fetch),
    expected="a list of SourceKind",
    claims=lambda name, dist, k: [(f"source prefix {prefix!r}" if prefix else "local paths (a kind without prefixes)",
                                   f"{k.name!r} of plugin {name!r}") for prefix in k.prefixes or ("",)],
    verb="claimed by")
_TARGETS: _Declaration[TargetBackend] = _Declaration(
    hook="deeplens_build_targets", many=True,
    valid=lambda t: (isinstance(t, TargetBackend) and bool(_PLUGIN_NAME.match(t.name))
                     and Path(t.device_module).is_file()),
    expected=f"a list of TargetBackend, each named like {PLUGIN_NAME} with an existing device_module",
    claims=lambda name, dist, t: [(f"target backend {t.name!r}", _who(name, dist))])


def _collect(pm: pluggy.PluginManager, dists: Mapping[str, _Dist | None],
             failures: list[LoadFailure], kind: _Declaration[T]) -> list[tuple[str, _Dist | None, T]]:
    """Every plugin's declarations of one kind, checked, as (plugin name, distribution, declaration); the one
    collector for frameworks, source kinds and target backends.

    :raises PluginError: for a malformed answer, or one thing claimed by two declarations (naming both).
    """
    found: list[tuple[str, _Dist | None, T]] = []
    for name, dist, answer in _declarations(pm, kind.hook, dists, failures):
        items = answer if kind.many and isinstance(answer, list | tuple) else [answer]
        if (kind.many and not isinstance(answer, list | tuple)) or not all(kind.valid(item) for item in items):
            raise PluginError(f"plugin {name!r}: {kind.hook} must return {kind.expected}; got {answer!r}")
        found += [(name, dist, item) for item in items]
    claimants: dict[str, list[str]] = {}
    for name, dist, item in found:
        for what, who in kind.claims(name, dist, item):
            claimants.setdefault(what, []).append(who)
    for what, who in claimants.items():
        if len(who) > 1:
            raise PluginError(f"{what} is {kind.verb} {' and '.join(who)}; uninstall one, or block it with "
                              f"{DISABLE_ENV}")
    return found


def _builtin(dist: _Dist | None) -> bool:
    return bool(dist and dist.name in BUILTIN_DISTRIBUTIONS)


def _declarations(pm: pluggy.PluginManager, hook: str, dists: Mapping[str, _Dist | None],
                  failures: list[LoadFailure]) -> Iterator[tuple[str, _Dist | None, Any]]:
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


@dataclass(frozen=True)
class _Dist:
    """A plugin's distribution, its metadata read once: importlib.metadata parses the METADATA file again on every
    ``.name`` and ``.version`` (53 parses were a sixth of ``deeplens-build plugins``)."""

    name: str
    version: str


def _dist(dist: metadata.Distribution | None) -> _Dist | None:
    if dist is None:
        return None
    found = dist.metadata
    return _Dist(found["Name"], found["Version"])


def _distribution(name: str) -> _Dist | None:
    try:
        return _dist(metadata.distribution(name))
    except metadata.PackageNotFoundError:
        return None


def _names_from(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    return None if value is None else {n.strip() for n in value.split(",") if n.strip()}


def installed_version(distribution: str) -> str:
    """The installed version of ``distribution``, or ``"not installed"``."""
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
