"""A bundle verified by other tools: the model folder by OpenSSF's `model_signing verify` (PyPI model-signing, its
own command line), the SLSA provenance by securesystemslib's DSSE verifier; neither with deeplens-build's code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli, open_bundle, package_json

from deeplens_build import attest, testing
from deeplens_build.errors import VerificationError

pytest.importorskip("model_signing")
securesystemslib = pytest.importorskip("securesystemslib")


@pytest.fixture
def unpacked(tmp_path: Path, project: Path) -> tuple[dict, Path, Path]:
    report = package_json(project)
    folder = tmp_path / "unpacked"
    with open_bundle(report["bundle"]) as tar:
        tar.extractall(folder, filter="data")
    return report, folder, project.parent / "signing-key.pub.pem"


def _model_signing_verify(model: Path, signature: Path, key: Path) -> subprocess.CompletedProcess:
    command = Path(sys.executable).with_name("model_signing")
    return subprocess.run([str(command), "verify", "key", str(model), "--signature", str(signature),
                           "--public_key", str(key)], capture_output=True, text=True)


def test_model_signing_verifies_the_unpacked_model_folder_and_rejects_a_changed_one(unpacked, tmp_path) -> None:
    _, folder, key = unpacked
    accepted = _model_signing_verify(folder / "model", folder / attest.MODEL_SIGNATURE, key)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    changed = tmp_path / "changed"
    shutil.copytree(folder / "model", changed)
    data = bytearray((changed / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (changed / "model.onnx").write_bytes(bytes(data))
    assert _model_signing_verify(changed, folder / attest.MODEL_SIGNATURE, key).returncode != 0
    other = testing.signing_key(tmp_path / "other").with_name("signing-key.pub.pem")
    assert _model_signing_verify(folder / "model", folder / attest.MODEL_SIGNATURE, other).returncode != 0


def test_the_provenance_verifies_with_securesystemslib_and_names_what_was_built(unpacked) -> None:
    from cryptography.hazmat.primitives import serialization
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    report, folder, key = unpacked
    envelope = Envelope.from_dict(json.loads((folder / attest.PROVENANCE).read_text()))
    public = SSlibKey.from_crypto(serialization.load_pem_public_key(key.read_bytes()))
    assert public.keyid in envelope.verify([public], 1)
    statement = json.loads(envelope.payload)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {s["name"]: s["digest"]["sha256"] for s in statement["subject"]} == {
        f["path"]: f["sha256"] for f in manifest["files"] if f["path"] != attest.PROVENANCE}
    definition = statement["predicate"]["buildDefinition"]
    assert definition["buildType"] == attest.BUILD_TYPE
    assert definition["externalParameters"]["source"]["digest"]["sha256"] == manifest["source"]["sha256"]
    assert len(definition["externalParameters"]["config"]["digest"]["sha256"]) == 64
    names = {d["name"] for d in definition["resolvedDependencies"]}
    assert {"deeplens-build-onnx", "onnx", "onnxruntime"} <= names


def test_verify_checks_both_with_the_bundle_key(unpacked, tmp_path: Path) -> None:
    report, folder, key = unpacked
    assert cli("verify", report["bundle"], "--public-key", key).exit_code == 0
    manifest = json.loads((folder / "manifest.json").read_text())
    model = {f["path"].removeprefix("model/"): f["sha256"] for f in manifest["files"] if f["path"].startswith("model/")}
    content = (folder / attest.MODEL_SIGNATURE).read_bytes()
    public = key.read_text()
    attest.check_model_signature(content, public, model)
    other = testing.signing_key(tmp_path / "other").with_name("signing-key.pub.pem").read_text()
    with pytest.raises(VerificationError, match="does not verify with the bundle's key"):
        attest.check_model_signature(content, other, model)
    with pytest.raises(VerificationError, match="signs other model files than the bundle holds"):
        attest.check_model_signature(content, public, {**model, "model.onnx": "0" * 64})
    provenance = (folder / attest.PROVENANCE).read_bytes()
    with pytest.raises(VerificationError, match="does not verify with the bundle's key"):
        attest.check_provenance(provenance, other, {})
    # a statement changed under its signature: the envelope's encoding covers every byte of the payload
    import base64

    for name, content, check in ((attest.PROVENANCE, provenance, attest.check_provenance),
                                 (attest.MODEL_SIGNATURE, content, attest.check_model_signature)):
        document = json.loads(content)
        envelope = document.get("dsseEnvelope", document)
        envelope["payload"] = base64.b64encode(base64.b64decode(envelope["payload"]).replace(b"sha256", b"sha512")
                                               ).decode()
        with pytest.raises(VerificationError, match=f"{name} does not verify with the bundle's key"):
            check(json.dumps(document).encode(), public, model)
    assert "attest  model.sig (OpenSSF model signing), provenance.intoto.json (SLSA v1 provenance)" in cli(
        "inspect", report["bundle"]).stdout
