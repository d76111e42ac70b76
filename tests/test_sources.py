"""Source plugins: a third party's source kind builds a bundle; prefixes are resolved, and clashes are errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import cli, error_line, package_json

from deeplens_build import SourceKind, hookimpl, testing
from deeplens_build.errors import PluginError, SourceError
from deeplens_build.source_context import SourceContext
from deeplens_build.types import TrainingOutput

PREFIX = "file+sha256://"


def fetch_pinned(source: str, context: SourceContext) -> TrainingOutput:
    """``file+sha256://PATH#DIGEST``: a local file, fetched only when its bytes are the ones pinned."""
    path, _, digest = source.removeprefix(PREFIX).partition("#")
    actual = hashlib.sha256(Path(path).read_bytes()).hexdigest() if Path(path).is_file() else None
    if actual != digest:
        raise SourceError(f"{path} does not match its pinned sha256 {digest[:16]}… (it is {str(actual)[:16]}…); "
                          "refusing to build from it")
    stored, _ = context.stored("pinned", {"sha256": digest}, lambda folder: _copy(Path(path), folder))
    return context.from_file(stored, kind="pinned", origin=f"{PREFIX}{Path(path).name}#{digest[:12]}")


def _copy(path: Path, folder: Path) -> Path:
    target = folder / path.name
    target.write_bytes(path.read_bytes())
    return target


class PinnedSources:
    """A source plugin as a third party writes one: a single hook."""

    __name__ = "pinned"

    @hookimpl
    def deeplens_build_sources(self):
        return [SourceKind(name="pinned", prefixes=(PREFIX,), summary=f"{PREFIX}PATH#SHA256", fetch=fetch_pinned)]


def _pinned(path: Path, digest: str | None = None) -> str:
    return f"{PREFIX}{path}#{digest or hashlib.sha256(path.read_bytes()).hexdigest()}"


def test_a_source_plugin_written_here_builds_a_bundle(tmp_path: Path, onnx_model_dir: Path) -> None:
    model = onnx_model_dir / "model.onnx"
    config = testing.write_project(tmp_path / "p", source=_pinned(model), inputs={"data": {"shape": [1, 3, 32, 32]}})
    result = testing.build(config, plugins=[PinnedSources()])
    manifest = testing.verify(result.bundle).manifest
    assert manifest.source.kind == "pinned" and manifest.source.origin.startswith(f"{PREFIX}model.onnx#")
    assert result.parity.passed


def test_the_source_plugin_refuses_bytes_that_changed(tmp_path: Path, onnx_model_dir: Path) -> None:
    model = onnx_model_dir / "model.onnx"
    config = testing.write_project(tmp_path / "p", source=_pinned(model, "0" * 64))
    with pytest.raises(SourceError, match="does not match its pinned sha256"):
        testing.build(config, plugins=[PinnedSources()])
    assert not (config.parent / "dist").exists()


def test_a_uri_no_plugin_fetches_is_one_error_listing_the_installed_kinds(tmp_path: Path) -> None:
    config = testing.write_project(tmp_path / "p", source="gs://deeplens-models/model.tar.gz")
    line = package_json(config, expect=4)
    assert "no source plugin fetches 'gs' sources" in line and "s3://" in line and "sagemaker-job:" in line


def test_two_plugins_claiming_one_prefix_are_named(tmp_path: Path, onnx_model_dir: Path) -> None:
    class Clash:
        __name__ = "clash"

        @hookimpl
        def deeplens_build_sources(self):
            return [SourceKind(name="other-s3", prefixes=("s3://",), summary="s3 again", fetch=fetch_pinned)]

    config = testing.write_project(tmp_path / "p", source=onnx_model_dir)
    with pytest.raises(PluginError, match=r"source prefix 's3://' is claimed by .*") as error:
        testing.build(config, plugins=[Clash()])
    assert "'s3' of plugin 'deeplens-sources'" in str(error.value)
    assert "'other-s3' of plugin 'clash'" in str(error.value)


def test_plugins_lists_the_source_kinds(tmp_path: Path) -> None:
    listed = json.loads(cli("plugins", "--json").stdout)["sources"]
    assert [(s["name"], s["prefixes"], s["distribution"], s["builtin"]) for s in listed] == [
        ("local", [], "deeplens-build", True), ("s3", ["s3://"], "deeplens-build", True),
        ("sagemaker-job", ["sagemaker-job:"], "deeplens-build", True)]
    assert "s3://BUCKET/KEY" in cli("plugins").stdout


def test_blocking_the_builtin_sources_leaves_a_clear_error(tmp_path: Path, onnx_model_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPLENS_BUILD_DISABLE_PLUGINS", "deeplens-sources")
    config = testing.write_project(tmp_path / "p", source=onnx_model_dir)
    assert "no source plugin fetches" in error_line(cli("package", "--config", config, "--signing-key",
                                                        testing.signing_key(config.parent), expect=4))


def test_a_renamed_source_file_is_another_source(tmp_path: Path, onnx_model_dir: Path) -> None:
    """The same bytes under another name, in the same work folder: the build sees the new name."""
    model = tmp_path / "first.onnx"
    shutil.copyfile(onnx_model_dir / "model.onnx", model)
    config = testing.write_project(tmp_path / "project", source=model)
    first = testing.verify(Path(package_json(config)["bundle"])).manifest
    assert first.source.model_files == ("first.onnx",)
    renamed = model.rename(tmp_path / "renamed.onnx")
    report = package_json(config, "--source", renamed)
    assert testing.verify(Path(report["bundle"])).manifest.source.model_files == ("renamed.onnx",)
