"""A cache shared between machines in S3, on moto's HTTP server: machine B downloads what machine A built, and a
corrupt entry is discarded and rebuilt, never used."""

from __future__ import annotations

import shutil
from pathlib import Path

import boto3
from helpers import package_json

from deeplens_build import testing

CACHE = "s3://deeplens-build-cache/ci"
BUILT = {"convert", "optimize", "parity", "lambda", "greengrass"}


def _machine(tmp_path: Path, name: str, source: Path) -> Path:
    """A fresh checkout of the same project on another machine: its own work folder, the same inputs and the
    same CI signing key (so the bundles can be compared byte for byte)."""
    config = testing.write_project(tmp_path / name / "project", source=source, build={"cache": CACHE},
                                   inputs={"data": {"shape": [1, 3, 32, 32]}})
    key = testing.signing_key(tmp_path / "ci-key")
    for path in (key, key.with_name("signing-key.pub.pem")):
        shutil.copy(path, config.parent / path.name)
    return config


def test_a_second_machine_downloads_instead_of_converting(aws: str, tmp_path: Path, onnx_model_dir: Path) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="deeplens-build-cache")
    first = package_json(_machine(tmp_path, "a", onnx_model_dir))
    assert first["cached_stages"] == []
    stored = {o["Key"].split("/")[2] for o in s3.list_objects_v2(Bucket="deeplens-build-cache")["Contents"]}
    assert BUILT <= stored, "complete entries were uploaded"
    second = package_json(_machine(tmp_path, "b", onnx_model_dir))
    assert BUILT <= set(second["cached_stages"]), "machine B converted nothing"
    assert second["sha256"] == first["sha256"]


def test_a_corrupt_shared_entry_is_rebuilt_not_used(aws: str, tmp_path: Path, onnx_model_dir: Path) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="deeplens-build-cache")
    first = package_json(_machine(tmp_path, "a", onnx_model_dir))
    objects = s3.list_objects_v2(Bucket="deeplens-build-cache")["Contents"]
    [convert] = [o["Key"] for o in objects if o["Key"].split("/")[2] == "convert"]
    [optimize] = [o["Key"] for o in objects if o["Key"].split("/")[2] == "optimize"]
    s3.put_object(Bucket="deeplens-build-cache", Key=convert, Body=b"not a tar archive")  # truncated or garbage
    entry = tmp_path / "entry.tar"
    s3.download_file("deeplens-build-cache", optimize, str(entry))
    data = bytearray(entry.read_bytes())
    data[2048] ^= 0xFF  # a byte of the cached model, inside a valid archive
    s3.put_object(Bucket="deeplens-build-cache", Key=optimize, Body=bytes(data))
    second = package_json(_machine(tmp_path, "b", onnx_model_dir))
    assert "convert" not in second["cached_stages"] and "optimize" not in second["cached_stages"]
    assert "parity" in second["cached_stages"], "what was intact is still shared"
    assert any("is damaged" in w for w in second["warnings"])
    assert second["sha256"] == first["sha256"], "the rebuilt stages give the same bytes"


def test_an_unreachable_shared_cache_is_a_warning_and_a_local_build(tmp_path: Path, onnx_model_dir: Path) -> None:
    report = package_json(_machine(tmp_path, "a", onnx_model_dir))  # AWS_ENDPOINT_URL points at a closed port
    assert report["cached_stages"] == []
    [warning] = [w for w in report["warnings"] if w.startswith("shared cache")]  # said once, not per stage
    assert "shared cache s3://deeplens-build-cache/ci: cannot reach it" in warning
