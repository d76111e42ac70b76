"""What every stage of one build shares (:class:`Build`), and the one way a stage's result is cached
(:meth:`Build.stage`). The stages themselves are the modules of :mod:`deeplens_build.stages`; each states, beside
its work, the key its cached result depends on. :mod:`deeplens_build.pipeline` runs them in order."""

from __future__ import annotations

import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import deeplens_build
from deeplens_build import __version__
from deeplens_build.aws.publish import require_role
from deeplens_build.cache import Cache, SharedCache
from deeplens_build.config import ProjectConfig
from deeplens_build.digest import code_sha256
from deeplens_build.errors import ConfigError, SigningError
from deeplens_build.plugins import PluginManager, installed_version
from deeplens_build.report import Reporter
from deeplens_build.signing import Signer, load_public_key, load_signer
from deeplens_build.stages.runtime import load_runtimes
from deeplens_build.types import PluginSettings
from deeplens_build.values import Detection, Runtime, TargetInfo

T = TypeVar("T")

CORE_TOOLS = ("numpy", "onnx", "onnxruntime", "onnxconverter-common")
"""Distributions whose versions shape the optimized artifact: part of every cache key and the manifest."""


@dataclass(frozen=True)
class BuildOptions:
    """What the command line adds to ``deeplens.toml``."""

    source: str | None = None
    output: Path | None = None
    signing_key: str | None = None
    use_cache: bool = True
    publish: bool = False
    shared_cache: str | None = None
    """``--cache s3://BUCKET/PREFIX``, in place of ``build.cache``."""


@dataclass
class Build:
    """What every stage of one build shares."""

    config: ProjectConfig
    options: BuildOptions
    manager: PluginManager
    reporter: Reporter
    signer: Signer
    settings: Mapping[str, PluginSettings]
    cache: Cache
    tools: Mapping[str, str]
    target: TargetInfo
    runtimes: tuple[Runtime, ...]
    """Every runtime definition: built-in, the backend's, the project's."""
    onnx_runtime: Runtime | None = None
    """The runtime that runs an ONNX artifact on the device, once the convert stage has matched it (for its
    opset ceiling); the runtime stage takes it rather than matching again."""
    cached: list[str] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)
    local_source: bool = False

    @classmethod
    def start(cls, config: ProjectConfig, options: BuildOptions, manager: PluginManager,
              reporter: Reporter) -> Build:
        """Everything that can fail without reading the model fails here, in a second."""
        target = manager.target(config.target.backend)
        backend = target.backend
        if config.target.platform not in backend.platforms or config.target.accelerator not in backend.accelerators:
            raise ConfigError(f"target backend {backend.name} serves {', '.join(backend.platforms)} devices with "
                              f"{' or '.join(backend.accelerators)}, not a {config.target.platform} device with "
                              f"`target.accelerator = \"{config.target.accelerator}\"`")
        if backend.device_build is not None and config.greengrass.format != "v2":
            raise ConfigError(f"target backend {backend.name} compiles on the device, in a Greengrass v2 recipe's "
                              "Install phase; a v1 core has none: set `greengrass.format = \"v2\"`")
        if config.greengrass.format in ("v1", "both") and not options.publish:
            # not a rule of deeplens.toml alone: --publish comes from the command line
            raise ConfigError("Greengrass v1 documents reference a published Lambda version: build with --publish, "
                              "or set `greengrass.format = \"v2\"`")
        if options.publish:  # publishing is the one side effect of a build: nothing may fail after it that can now
            require_role(config.lambda_)
        config.parity.check_input_size({name: spec.shape for name, spec in config.model.inputs.items() if spec.shape},
                                       where="Field `model.inputs`")
        tools = {name: installed_version(name) for name in CORE_TOOLS} | {"deeplens-build": __version__,
                                                                          "python": platform.python_version()}
        signer = load_signer(options.signing_key)
        shared_uri = options.shared_cache or config.build.cache
        shared = _shared_cache(shared_uri, config, signer, reporter) if shared_uri else None
        return cls(config=config, options=options, manager=manager, reporter=reporter,
                   signer=signer, settings=manager.settings(config.plugins),
                   cache=Cache(config.build.work_dir / "cache", reuse=options.use_cache, shared=shared,
                               code=code_sha256(deeplens_build)), tools=tools,
                   target=target, runtimes=load_runtimes(config.runtime.definitions, extra=backend.runtimes))

    def stage(self, name: str, key: Mapping[str, Any], result_type: type[T], build: Callable[[Path], T]) -> T:
        """``build``'s result, from the cache when ``key`` (everything it depends on) was built before."""
        result, hit = self.cache.stage(name, key, result_type, build)
        self.stages.append(name)
        if hit:
            self.cached.append(name)
            self.reporter.step(f"{name}: unchanged, reused from the cache")
        return result

    @property
    def target_identity(self) -> dict[str, Any]:
        """The target backend in a cache key: which, in which version, and the digest of its code."""
        t = self.target
        return {"name": t.backend.name, "plugin": t.plugin, "distribution": t.distribution, "version": t.version,
                "tools": dict(t.tool_versions), "code": self.manager.code(t.plugin)}

    def plugin_identity(self, detection: Detection) -> dict[str, Any]:
        """The framework plugin in a cache key: which, in which version, and the digest of its code."""
        plugin = detection.plugin
        return {"name": plugin.name, "distribution": plugin.distribution, "version": plugin.version,
                "tools": dict(plugin.tool_versions), "code": self.manager.code(plugin.name)}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: spec.shape for name, spec in self.config.model.inputs.items() if spec.shape}



def _shared_cache(uri: str, config: ProjectConfig, signer: Signer, reporter: Reporter) -> SharedCache:
    """The shared cache, its entries signed by ``[build] cache_key`` (else the signing key) and taken only when
    signed by a key of ``[build] cache_trust`` (else that key).

    :raises ConfigError: for a trusted key that is not an ECDSA P-256 public key.
    """
    cache_signer = load_signer(config.build.cache_key) if config.build.cache_key else signer
    trusted = []
    for path in config.build.cache_trust:
        pem = path.read_bytes()
        try:
            load_public_key(pem, str(path))
        except SigningError as exc:
            raise ConfigError(f"Field `build.cache_trust`: {exc}") from exc
        trusted.append(pem.decode())
    return SharedCache(uri, warn=reporter.warn, signer=cache_signer, trusted=trusted or [cache_signer.public_key_pem])
