"""Test helpers for plugin authors: run a plugin through the real pipeline in a pytest test.

Example (see README, "Testing a plugin")::

    from deeplens_build import testing
    import deeplens_build_myfw

    def test_packages_my_model(tmp_path):
        model_dir = make_my_tiny_model(tmp_path / "model")          # a real model, built in the test
        project = testing.write_project(tmp_path / "project", source=model_dir,
                                        inputs={"data": {"shape": [1, 3, 32, 32]}})
        result = testing.build(project, plugins=[deeplens_build_myfw], entry_points=False)
        assert result.parity.passed
        testing.verify(result.bundle)                               # signature + every digest

The helpers build and sign for real; nothing is mocked.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from deeplens_build import hookimpl
from deeplens_build.bundle import Verified, verify_bundle
from deeplens_build.cache import tool_cache_environment
from deeplens_build.config import load_config
from deeplens_build.layout import CONFIG_NAME
from deeplens_build.pipeline import BuildOptions, package
from deeplens_build.plugins import build_plugin_manager
from deeplens_build.report import Reporter
from deeplens_build.signing import generate_keypair
from deeplens_build.types import Framework, PluginSettings
from deeplens_build.values import BuildResult

MINIMAL_LAMBDA = '''"""A minimal long-lived inference Lambda for tests: the handler returns at once."""


def handler(event, context):
    return None
'''


def write_project(root: Path, *, source: Path | str, name: str = "deeplens-test-model", **tables: Any) -> Path:
    """Write ``deeplens.toml`` (and a minimal Lambda when none is configured) under ``root``.

    :param source: the training output (``model.source``).
    :param tables: extra settings: ``model={...}`` merges into ``[model]``; ``inputs={"data": {"shape": [...]}}``
        is a shortcut for ``model.inputs``; any other keyword is a table (``parity=``, ``plugins=``, ...).
    :return: the config file's path.
    """
    root.mkdir(parents=True, exist_ok=True)
    model = {"name": name, "source": str(source), **tables.pop("model", {})}
    if "inputs" in tables:
        model["inputs"] = tables.pop("inputs")
    config: dict[str, Any] = {"model": model, **tables}
    if "lambda" not in config:
        (root / "lambda").mkdir(exist_ok=True)
        (root / "lambda" / "inference.py").write_text(MINIMAL_LAMBDA, encoding="utf-8")
        config["lambda"] = {"source": "lambda", "handler": "inference.handler"}
    path = root / CONFIG_NAME
    path.write_text(to_toml(config), encoding="utf-8")
    return path


def fake_plugin(framework: str, *, summary: str = "a plugin written in a test", install: str = "",
                settings: type[PluginSettings] = PluginSettings, **hooks: Callable[..., Any]) -> object:
    """A framework plugin made of plain functions, for a test: pass it to :func:`build` as ``plugins=[...]``.

    :param framework: the framework name it declares (``deeplens_build_framework`` is written for you).
    :param hooks: the other hooks by their short name (``detect``, ``convert``, ``reference_run``, ``runtime``);
        each function takes the hook's arguments it needs, by name, as a real hook implementation does.

    Example::

        plugin = testing.fake_plugin("myfw", detect=lambda source: ModelFiles(files=source.matching(".myfw")))
    """
    declared = Framework(name=framework, summary=summary, install=install, settings=settings)
    plugin = _FakePlugin()
    plugin.__name__ = framework
    plugin.deeplens_build_framework = hookimpl(lambda: declared)
    for hook, function in hooks.items():
        setattr(plugin, f"deeplens_build_{hook}", hookimpl(function))
    return plugin


class _FakePlugin:
    """Hooks are set on each instance (pluggy registers objects by identity, so it must stay hashable)."""


def signing_key(directory: Path) -> Path:
    """A P-256 private key under ``directory``, made on first use."""
    key = directory / "signing-key.pem"
    if not key.exists():
        generate_keypair(key)
    return key


def build(config: Path, *, plugins: Iterable[object] = (), entry_points: bool = True,
          only: Iterable[str] | None = None, source: str | None = None, output: Path | None = None,
          key: Path | None = None, use_cache: bool = True, publish: bool = False) -> BuildResult:
    """Run ``deeplens-build package`` in-process with ``plugins`` registered beside the installed ones.

    :param entry_points: False registers only ``plugins``, so the test sees no other installed plugin.
    :param only: entry-point names to load when ``entry_points`` is True.
    :param key: the signing key; by default one made beside ``config``.
    """
    project = load_config(config)
    os.environ.update(tool_cache_environment(project.build.work_dir))
    manager = build_plugin_manager(extra=plugins, entry_points=entry_points, only=only)
    options = BuildOptions(source=source, output=output, use_cache=use_cache, publish=publish,
                           signing_key=str(key or signing_key(config.parent)))
    return package(project, options, manager=manager, reporter=Reporter(quiet=True))


def verify(bundle: Path, public_key: Path | None = None) -> Verified:
    """Verify a bundle as ``deeplens-build verify`` does; raises ``VerificationError`` on any problem."""
    return verify_bundle(bundle, public_key)


def to_toml(data: Mapping[str, Any]) -> str:
    """A project file's text for ``data``: nested tables of strings, numbers, booleans, paths and lists of them."""
    import tomli_w

    return tomli_w.dumps(_plain(data))


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def onnx_classifier(path: Path, *, seed: int = 0, size: int = 32, classes: int = 10, opset: int = 17) -> Path:
    """Write a tiny real ONNX image classifier: Conv→BatchNorm→Relu→MaxPool→Conv(+residual)→Relu→GAP→Gemm→Softmax.

    Input ``data`` is ``[N, 3, size, size]`` float32 with a dynamic batch; output ``prob`` is ``[N, classes]``.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int, scale: float = 0.2) -> Any:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    c1, c2 = 8, 8
    weights = [
        weight("conv1_w", c1, 3, 3, 3), weight("conv1_b", c1),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c1).astype(np.float32), "bn_scale"),
        weight("bn_bias", c1), weight("bn_mean", c1),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c1).astype(np.float32), "bn_var"),
        weight("conv2_w", c2, c1, 3, 3), weight("conv2_b", c2),
        weight("fc_w", classes, c2), weight("fc_b", classes),
    ]
    nodes = [
        helper.make_node("Conv", ["data", "conv1_w", "conv1_b"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"],
                         epsilon=1e-5, name="bn1"),
        helper.make_node("Relu", ["bn"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        helper.make_node("Conv", ["p1", "conv2_w", "conv2_b"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c2", "p1"], ["res"], name="residual"),
        helper.make_node("Relu", ["res"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1, name="fc"),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes, "deeplens_tiny_classifier",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", classes])],
        initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="deeplens_build.testing")
    path.parent.mkdir(parents=True, exist_ok=True)
    save(model, str(path))
    return path
