"""Runtime images built against a real Docker engine (started by .ci/run), saved into the bundle, loaded back."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from helpers import open_bundle, package_project, runtime_definition, wheel

from deeplens_build import testing


@pytest.fixture
def engine():
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.skip(f"no Docker engine answered ({exc}); .ci/run starts dockerd")
    yield client
    client.close()


def _image_project(tmp_path: Path) -> dict:
    wheelhouse = tmp_path / "wheelhouse"
    wheel(wheelhouse, "tinyrt", "1.0")
    definitions = runtime_definition(tmp_path / "runtimes", "tiny", ["tinyrt==1.0"])
    return {"name": "tiny", "definitions": str(definitions), "vendor": True, "image": True, "index": False,
            "find_links": [str(wheelhouse)]}


def test_image_round_trip_build_save_load_files(engine, tmp_path: Path, onnx_model_dir: Path) -> None:
    report = package_project(tmp_path, onnx_model_dir, runtime=_image_project(tmp_path))
    bundle = Path(report["bundle"])
    manifest = testing.verify(bundle).manifest.to_dict()
    image = manifest["runtime"]["image"]
    assert image["file"] == "runtime/image.tar" and image["tag"] == "deeplens-test-model-runtime:1.0.0"
    with open_bundle(bundle) as tar:
        saved = tar.extractfile("runtime/image.tar").read()
        recipe = json.loads(tar.extractfile("greengrass/recipe.json").read())
    assert recipe["Manifests"][0]["Lifecycle"]["Install"]["Script"].startswith(
        "docker load -i {artifacts:path}/image.tar\n")

    engine.images.remove(image["tag"], force=True)
    [loaded] = engine.images.load(saved)
    assert image["tag"] in loaded.tags
    container = engine.containers.create(image["tag"], command=["/nothing-to-run"])
    try:
        stream, _ = container.get_archive("/opt/deeplens")
        listing = tarfile.open(fileobj=io.BytesIO(b"".join(stream))).getnames()
    finally:
        container.remove(force=True)
    assert {"deeplens/model/model.onnx", "deeplens/model/labels.txt", "deeplens/wheels/tinyrt-1.0-py3-none-any.whl",
            "deeplens/lambda/deeplens-test-model.zip", "deeplens/runtime.toml"} <= set(listing)


def test_without_an_engine_the_build_fails_clearly(tmp_path: Path, onnx_model_dir: Path, monkeypatch) -> None:
    pytest.importorskip("docker")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-docker.sock'}")
    message = package_project(tmp_path, onnx_model_dir, expect=7, runtime=_image_project(tmp_path))
    assert "`runtime.image = true` needs a running Docker engine" in message


def test_image_needs_vendored_wheels(tmp_path: Path, onnx_model_dir: Path) -> None:
    message = package_project(tmp_path, onnx_model_dir, expect=3, runtime={"image": True})
    assert "set `runtime.vendor = true`" in message
