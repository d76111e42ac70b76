"""A cache shared between machines in S3, on moto's HTTP server: machine B downloads what machine A built, and a
corrupt entry is discarded and rebuilt, never used."""

from __future__ import annotations

import hashlib
import json
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
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="deeplens-build-cache")["Contents"]]
    [convert] = [k for k in keys if k.split("/")[2] == "convert"]
    s3.put_object(Bucket="deeplens-build-cache", Key=convert, Body=b"not a result")  # truncated or garbage
    second = package_json(_machine(tmp_path, "b", onnx_model_dir))
    assert "convert" not in second["cached_stages"] and "parity" in second["cached_stages"]
    assert any("the convert entry" in w and "is damaged" in w for w in second["warnings"])

    held = json.loads(s3.get_object(Bucket="deeplens-build-cache", Key=convert)["Body"].read())["files"]
    weights = convert.split("/convert/")[0] + "/blobs/" + held["model.onnx.data"]  # optimize holds them too
    data = bytearray(s3.get_object(Bucket="deeplens-build-cache", Key=weights)["Body"].read())
    data[2048] ^= 0xFF  # one byte, in an object of the right size
    s3.put_object(Bucket="deeplens-build-cache", Key=weights, Body=bytes(data))
    third = package_json(_machine(tmp_path, "c", onnx_model_dir))
    assert "convert" not in third["cached_stages"], "the damaged weights were not used"
    assert "optimize" in third["cached_stages"], "optimize took the weights machine C had just converted"
    assert any("does not match its digest" in w for w in third["warnings"])
    repaired = s3.get_object(Bucket="deeplens-build-cache", Key=weights)["Body"].read()
    assert hashlib.sha256(repaired).hexdigest() == weights.rsplit("/", 1)[-1], "machine C uploaded them again"

    fourth = package_json(_machine(tmp_path, "d", onnx_model_dir))
    assert BUILT <= set(fourth["cached_stages"]) and not fourth["warnings"]
    assert first["sha256"] == second["sha256"] == third["sha256"] == fourth["sha256"]


def test_a_shared_result_naming_a_file_outside_its_entry_is_not_used(aws: str, tmp_path: Path,
                                                                     onnx_model_dir: Path) -> None:
    """Digests only vouch for the files an entry holds: a result whose artifact is some other file of this machine
    (a key, a credential) would be read and signed into the bundle. It is refused, and the stage built here."""
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="deeplens-build-cache")
    first = package_json(_machine(tmp_path, "a", onnx_model_dir))
    canary = tmp_path / "canary.pem"
    canary.write_text("-----BEGIN PRIVATE KEY----- not for a bundle\n")
    [convert] = [o["Key"] for o in s3.list_objects_v2(Bucket="deeplens-build-cache")["Contents"]
                 if o["Key"].split("/")[2] == "convert"]
    recorded = json.loads(s3.get_object(Bucket="deeplens-build-cache", Key=convert)["Body"].read())
    recorded["result"]["labels"] = str(canary)
    s3.put_object(Bucket="deeplens-build-cache", Key=convert, Body=json.dumps(recorded).encode())
    second = package_json(_machine(tmp_path, "b", onnx_model_dir))
    assert "convert" not in second["cached_stages"]
    assert any("a path outside the entry" in w for w in second["warnings"])
    assert second["sha256"] == first["sha256"], "the canary is not in the bundle"


def test_a_file_two_entries_hold_is_stored_and_fetched_once(aws: str, tmp_path: Path, onnx_model_dir: Path) -> None:
    """The converted weights and the optimized ones are the same bytes: one blob, uploaded and downloaded once."""
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="deeplens-build-cache")
    package_json(_machine(tmp_path, "a", onnx_model_dir))
    contents = s3.list_objects_v2(Bucket="deeplens-build-cache")["Contents"]
    results = [o["Key"] for o in contents if o["Key"].endswith(".json")]
    blobs = [o["Key"] for o in contents if o["Key"].split("/")[2] == "blobs"]
    held = [sha for key in results for sha in json.loads(
        s3.get_object(Bucket="deeplens-build-cache", Key=key)["Body"].read())["files"].values()]
    assert len(held) > len(set(held)) == len(blobs), "some file is held by two entries, stored once"


def test_an_unreachable_shared_cache_is_a_warning_and_a_local_build(tmp_path: Path, onnx_model_dir: Path) -> None:
    report = package_json(_machine(tmp_path, "a", onnx_model_dir))  # AWS_ENDPOINT_URL points at a closed port
    assert report["cached_stages"] == []
    [warning] = [w for w in report["warnings"] if w.startswith("shared cache")]  # said once, not per stage
    assert "shared cache s3://deeplens-build-cache/ci: cannot reach it" in warning
