"""The plugin manager: discovery through entry points, validation of answers, and the documented contract."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import pytest
from helpers import cli

from deeplens_build import (
    Artifact,
    ModelFiles,
    PluginSettings,
    choose_one,
    hookimpl,
    hookspecs,
    onnxtools,
    testing,
)
from deeplens_build.errors import ConfigError, PluginError
from deeplens_build.plugins import build_plugin_manager
from deeplens_build.stages import parity


def _install_fake_distribution(site: Path, dist: str, module: str, source: str, monkeypatch) -> None:
    """A real installed distribution (dist-info with an entry point) on sys.path, as pip would leave it."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-9.9.9.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 9.9.9\n")
    (info / "entry_points.txt").write_text(f"[deeplens_build]\n{module} = {module}\n")
    monkeypatch.syspath_prepend(str(site))


THIRD_PARTY = '''
from deeplens_build import Framework, hookimpl

@hookimpl
def deeplens_build_framework():
    return Framework(name="{framework}", summary="third-party test plugin")
'''


def test_builtin_plugins_are_found_through_their_entry_points() -> None:
    found = {p.name: p for p in build_plugin_manager().plugins}
    assert [(p.name, p.distribution, p.builtin) for p in found.values()] == [
        ("caffe", "deeplens-build-caffe", True), ("mxnet", "deeplens-build-mxnet", True), ("onnx", "deeplens-build-onnx", True),
        ("pytorch", "deeplens-build-pytorch", True), ("tensorflow", "deeplens-build-tensorflow", True)]
    assert found["onnx"].tool_versions["onnx"] != "not installed"


def test_third_party_plugin_is_listed_beside_the_builtins(tmp_path: Path, monkeypatch) -> None:
    _install_fake_distribution(tmp_path, "deeplens-build-acme", "acme_plugin",
                               THIRD_PARTY.format(framework="acme"), monkeypatch)
    monkeypatch.setenv("DEEPLENS_BUILD_PLUGINS", "onnx,acme_plugin")
    listed = json.loads(cli("plugins", "--json").stdout)["plugins"]  # mxnet left out on purpose
    assert [(p["framework"], p["distribution"], p["version"], p["builtin"]) for p in listed] == [
        ("acme", "deeplens-build-acme", "9.9.9", False), ("onnx", "deeplens-build-onnx", "0.1.0", True)]


def test_plugin_that_fails_to_import_is_reported_and_skipped(tmp_path: Path, monkeypatch) -> None:
    _install_fake_distribution(tmp_path, "deeplens-build-bad", "bad_plugin", "import no_such_module\n", monkeypatch)
    monkeypatch.setenv("DEEPLENS_BUILD_PLUGINS", "onnx,bad_plugin")
    manager = build_plugin_manager()
    assert [p.name for p in manager.plugins] == ["onnx"]
    [failure] = manager.failures
    assert failure.name == "bad_plugin" and "No module named 'no_such_module'" in failure.reason
    assert "skipped bad_plugin (deeplens-build-bad)" in cli("plugins").stdout


def test_disabled_plugin_is_not_loaded(tmp_path: Path, monkeypatch) -> None:
    _install_fake_distribution(tmp_path, "deeplens-build-acme", "acme_plugin",
                               THIRD_PARTY.format(framework="acme"), monkeypatch)
    monkeypatch.delenv("DEEPLENS_BUILD_PLUGINS")
    monkeypatch.setenv("DEEPLENS_BUILD_DISABLE_PLUGINS", "acme_plugin")
    assert "acme" not in [p.framework.name for p in build_plugin_manager().plugins]


def test_duplicate_framework_names_both_plugins(tmp_path: Path, monkeypatch) -> None:
    _install_fake_distribution(tmp_path, "deeplens-build-onnx-fork", "onnx_fork",
                               THIRD_PARTY.format(framework="onnx"), monkeypatch)
    monkeypatch.setenv("DEEPLENS_BUILD_PLUGINS", "onnx,onnx_fork")
    with pytest.raises(PluginError) as error:
        build_plugin_manager()
    message = str(error.value)
    assert "framework 'onnx' is provided by more than one plugin" in message
    assert "'onnx' (deeplens-build-onnx)" in message and "'onnx_fork' (deeplens-build-onnx-fork)" in message


def test_manager_rejects_a_claim_on_files_that_do_not_exist(project: Path) -> None:
    liar = testing.fake_plugin("liar", detect=lambda source: ModelFiles(files=("not/there.bin",)))
    with pytest.raises(PluginError, match=r"plugin 'liar' claimed files that are not in .*: not/there.bin"):
        testing.build(project, plugins=[liar], entry_points=False)


def test_invalid_framework_declaration_is_an_error() -> None:
    bad = testing.fake_plugin("bad")
    bad.deeplens_build_framework = hookimpl(lambda: {"name": "bad"})
    with pytest.raises(PluginError, match=r"plugin 'bad': deeplens_build_framework must return a Framework"):
        build_plugin_manager(extra=[bad], entry_points=False)


class OnnxFileSettings(PluginSettings):
    file: str | None = None
    opset: int = 17


def _claims_onnx(source, settings):
    return ModelFiles(files=(choose_one(source.matching(".onnx"), settings.file, setting="plugins.custom.file",
                                        what="ONNX models"),))


@pytest.mark.parametrize(("table", "expected"), [
    ({"custom": {"fiel": "model.onnx"}}, "Field `plugins.custom.fiel` is not a known setting"),
    ({"custom": {"opset": "seventeen"}}, "Field `plugins.custom.opset`"),
    ({"onnx": {"file": "model.onnx", "extra": 1}}, "Field `plugins.onnx.extra` is not a known setting"),
    ({"pytorch": {"file": "x"}}, "Field `plugins.pytorch` is for no installed plugin"),
])
def test_a_typo_in_a_plugin_table_fails_before_any_work_naming_the_key(tmp_path: Path, onnx_model_dir: Path,
                                                                      table: dict, expected: str) -> None:
    custom = testing.fake_plugin("custom", settings=OnnxFileSettings, detect=_claims_onnx)
    config = testing.write_project(tmp_path / "p", source=onnx_model_dir, model={"framework": "custom"},
                                   plugins=table)
    with pytest.raises(ConfigError, match=expected) as error:
        testing.build(config, plugins=[custom], only=["onnx"])
    assert error.value.exit_code == 3
    assert not (config.parent / ".deeplens" / "cache").exists(), "nothing was fetched or converted"


def test_a_plugin_gets_its_validated_settings(tmp_path: Path, onnx_model_dir: Path) -> None:
    seen = []

    def detect(source, settings):
        seen.append(settings)
        return _claims_onnx(source, settings)

    custom = testing.fake_plugin("custom", settings=OnnxFileSettings, detect=detect, convert=_copy_onnx,
                                 reference_run=lambda source, model, inputs: onnxtools.run(
                                     source.path(model.files[0]), inputs, optimize=False))
    config = testing.write_project(tmp_path / "p", source=onnx_model_dir, model={"framework": "custom"},
                                   plugins={"custom": {"file": "model.onnx", "opset": 13}},
                                   inputs={"data": {"shape": [1, 3, 32, 32]}})
    assert testing.build(config, plugins=[custom], entry_points=False).parity.passed
    assert seen == [OnnxFileSettings(file="model.onnx", opset=13)]


def test_the_original_is_released_before_the_artifact_is_loaded_for_parity(tmp_path: Path, onnx_model_dir: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Two copies of a large model's weights at once would double the build's peak memory."""
    events = []
    real_runner = parity.runner
    monkeypatch.setattr(parity, "runner", lambda *args: (events.append("artifact loaded"), real_runner(*args))[1])

    def reference_run(source, model, inputs, scratch):
        events.append("original run")
        return onnxtools.run(source.path(model.files[0]), inputs, optimize=False)

    def reference_done(converted, scratch):
        assert scratch.is_dir(), "the scratch folder is still there"
        events.append("original released")

    custom = testing.fake_plugin("custom", settings=OnnxFileSettings, detect=_claims_onnx, convert=_copy_onnx,
                                 reference_run=reference_run, reference_done=reference_done)
    config = testing.write_project(tmp_path / "p", source=onnx_model_dir, model={"framework": "custom"},
                                   inputs={"data": {"shape": [1, 3, 32, 32]}}, parity={"random_samples": 2})
    assert testing.build(config, plugins=[custom], entry_points=False).parity.passed
    assert events == ["original run", "original run", "original released", "artifact loaded"]


def test_the_onnx_plugin_keeps_no_session_after_a_build(project: Path) -> None:
    import deeplens_build_onnx

    testing.build(project, only=["onnx"], use_cache=False)
    assert deeplens_build_onnx._original.cache_info().currsize == 0


def _copy_onnx(source, model, workdir):
    target = workdir / "model.onnx"
    target.write_bytes(source.path(model.files[0]).read_bytes())
    inputs, outputs = onnxtools.interface(onnxtools.load(target))
    return Artifact(format="onnx", path=target, inputs=inputs, outputs=outputs)


def test_a_missing_framework_import_names_the_plugins_install_command(tmp_path: Path, onnx_model_dir: Path) -> None:
    def convert(source, model, workdir):
        import deeplens_no_such_framework  # noqa: F401

    needy = testing.fake_plugin("needy", install="pip install deeplens-build-needy  (needs needyfw>=2)",
                                detect=lambda source: ModelFiles(files=source.matching(".onnx")), convert=convert)
    config = testing.write_project(tmp_path / "p", source=onnx_model_dir, model={"framework": "needy"})
    with pytest.raises(PluginError) as error:
        testing.build(config, plugins=[needy], entry_points=False)
    message = str(error.value)
    assert "No module named 'deeplens_no_such_framework'" in message
    assert "install what it needs with: pip install deeplens-build-needy  (needs needyfw>=2)" in message


def test_every_hook_is_documented_for_plugin_authors() -> None:
    hooks = [f for name, f in vars(hookspecs).items() if name.startswith("deeplens_build_")]
    assert len(hooks) >= 5
    for hook in hooks:
        doc = inspect.getdoc(hook) or ""
        assert len(doc.splitlines()) > 3, f"{hook.__name__} has no manual"
        for param in inspect.signature(hook).parameters:
            assert f":param {param}:" in doc, f"{hook.__name__} does not document {param}"
        assert ":return:" in doc and "Example::" in doc, hook.__name__


def test_plugins_verify_and_inspect_do_not_import_the_frameworks(project: Path) -> None:
    """Small commands start at once: no framework for any of them, and no config models on the read path."""
    import subprocess

    from helpers import package_json

    bundle = package_json(project)["bundle"]
    probe = ("import json, sys; from deeplens_build.cli import main\n"
             "try: main(sys.argv[1:])\n"
             "except SystemExit: pass\n"
             "print('LOADED', json.dumps(sorted(m for m in sys.modules if '.' not in m)))\n")
    frameworks = {"onnx", "onnxruntime", "numpy", "tensorflow", "mxnet", "torch"}
    for args, unneeded in ((["plugins"], frameworks), (["verify", bundle], frameworks | {"pydantic", "tqdm"}),
                           (["inspect", bundle], frameworks | {"pydantic", "tqdm"})):
        out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True).stdout
        loaded = set(json.loads(out.rsplit("LOADED", 1)[1]))
        assert not loaded & unneeded, (args[0], sorted(loaded & unneeded))


DEV_PLUGIN = '''"""A framework plugin under development: the ONNX plugin's hooks, under its own name."""
import deeplens_build_onnx as base
from deeplens_build import Framework, hookimpl

EDIT = {edit}


@hookimpl
def deeplens_build_framework():
    return Framework(name="dev", summary="a plugin under development")


@hookimpl
def deeplens_build_detect(source):
    files = source.matching(".onnx")
    return base.ModelFiles(files=files) if files else None


@hookimpl
def deeplens_build_convert(source, model, workdir):
    return base.deeplens_build_convert(source=source, model=model, workdir=workdir)


@hookimpl
def deeplens_build_reference_run(converted, inputs):
    return base.deeplens_build_reference_run(converted=converted, inputs=inputs)
'''


def test_a_plugin_edited_under_the_same_version_is_run_again(tmp_path: Path, onnx_model_dir: Path,
                                                             monkeypatch) -> None:
    """The cache key holds the plugin's code, not only its version: an edit is never answered from the cache."""
    import importlib

    folder = tmp_path / "dev-plugin"
    folder.mkdir()
    module_file = folder / "dev_plugin.py"
    module_file.write_text(DEV_PLUGIN.format(edit=1))
    monkeypatch.syspath_prepend(str(folder))
    config = testing.write_project(tmp_path / "p", source=onnx_model_dir, model={"framework": "dev"})

    def build() -> tuple[str, ...]:
        module = importlib.import_module("dev_plugin")
        return testing.build(config, plugins=[importlib.reload(module)], entry_points=False).cached_stages

    assert "convert" not in build()
    assert "convert" in build(), "unchanged code: reused"
    module_file.write_text(DEV_PLUGIN.format(edit=2))
    assert "convert" not in build(), "the edited plugin converted again"
