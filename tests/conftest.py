"""Shared fixtures: real tiny models, real projects, a signing key, and moto as an HTTP server on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import BUILTIN_PLUGINS

from deeplens_build import testing
from deeplens_build.cache import TOOL_CACHE_VARIABLES


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No stray plugins, no real AWS account, no key from the developer's shell; the tool cache variables a
    build sets (``testing.build`` points them into its project) put back afterwards, so no later test (the device
    box's root file system cache) follows them."""
    tool_caches = {name: os.environ.get(name) for name in TOOL_CACHE_VARIABLES}
    monkeypatch.setenv("DEEPLENS_BUILD_PLUGINS", BUILTIN_PLUGINS)
    monkeypatch.delenv("DEEPLENS_BUILD_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("DEEPLENS_SIGNING_KEY", raising=False)
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: no call leaves the machine
    yield
    for name, value in tool_caches.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def onnx_model_dir(tmp_path: Path) -> Path:
    """A training-output folder holding a tiny real ONNX classifier and its labels."""
    folder = tmp_path / "training-output"
    testing.onnx_classifier(folder / "model.onnx", seed=1)
    (folder / "labels.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    return folder


@pytest.fixture
def project(tmp_path: Path, onnx_model_dir: Path) -> Path:
    """A project whose deeplens.toml builds ``onnx_model_dir``."""
    return testing.write_project(tmp_path / "project", source=onnx_model_dir,
                                 inputs={"data": {"shape": [1, 3, 32, 32], "layout": "NCHW"}})


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto as a real HTTP server on 127.0.0.1 (S3, SageMaker, KMS, Lambda, IAM, IoT, Greengrass v1)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point boto3 at the moto server, through the standard AWS_ENDPOINT_URL variable."""
    import requests

    requests.post(f"{moto_endpoint}/moto-api/reset", timeout=10)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    return moto_endpoint

