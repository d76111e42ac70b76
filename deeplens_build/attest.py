"""What tools other than deeplens-build verify in a bundle, signed with the build's key:

- ``model.sig``: the model folder signed in the OpenSSF model-signing format (OMS: a Sigstore bundle holding a
  DSSE envelope with an in-toto statement of every model file's sha256), written and read by the ``model-signing``
  library, so ``model_signing verify key MODEL_DIR --signature model.sig --public_key KEY.pub.pem`` accepts the
  unpacked ``model/`` folder;
- ``provenance.intoto.json``: SLSA v1 provenance, an in-toto statement (``predicateType``
  ``https://slsa.dev/provenance/v1``) whose subjects are the bundle's other files, in a DSSE envelope made and
  checked by ``securesystemslib``.

Both sign with the build's own :class:`~deeplens_build.signing.Signer` (a PEM key, deterministically, so bundles
stay reproducible; or KMS), adapted to each library's signer interface: the formats are the libraries' own.
model-signing 1.1.1 has no public way to sign with a key object, so its EC-key signer is given ours
(``_signing.sign_ec_key``, pinned in constraints.txt).

``verify`` checks both envelopes itself (:func:`_dsse_statement`: DSSE's pre-authentication encoding, one ECDSA
P-256 signature with the bundle's key), not through the libraries' verifiers: importing them takes 0.6 s of a
0.9 s verify of a small bundle (measured), for twenty lines of the DSSE specification. The tests check that the
libraries' own verifiers accept what this accepts.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from deeplens_build.errors import VerificationError
from deeplens_build.manifest import MODEL_DIR, MODEL_SIGNATURE, PROVENANCE
from deeplens_build.signing import Signer, load_public_key

if TYPE_CHECKING:
    from deeplens_build.manifest import BuildRecord

STATEMENT = "https://in-toto.io/Statement/v1"
SLSA = "https://slsa.dev/provenance/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
BUILD_TYPE = "urn:deeplens-build:package:v1"
"""The build type: ``deeplens-build package`` of a project; its parameters are the project file and the source."""
MAX_ATTESTATION = 8 << 20
TOOLS = ("model-signing", "securesystemslib")
"""The libraries that write the formats: their versions are part of the attestations' cache key."""


def sign_model(digests: Mapping[str, str], signer: Signer, scratch: Path) -> Path:
    """``scratch/model.sig``: OMS signature of the model folder, given as file name → sha256.

    The manifest is made from the digests the bundle already has, as model-signing's own hashing would make it
    for the unpacked folder (sha256 per file, symlinks allowed, no ignored paths): hashing the folder again read
    every weight a second time (0.8 s of a 500 MB build, measured). ``model_signing verify`` hashes the folder
    itself, so a digest that was wrong would fail there."""
    from model_signing import manifest as oms_manifest
    from model_signing._hashing.hashing import Digest
    from model_signing._signing import sign_ec_key
    from model_signing._signing import signing as oms

    # no ignored paths: the set of defaults would be written in a different order by each process, as would the
    # statement's keys, so its JSON is made with sorted keys: reproducible bundles
    serialization = oms_manifest._FileSerialization("sha256", allow_symlinks=True)
    items = [serialization.new_item(name, Digest("sha256", bytes.fromhex(sha256)))
             for name, sha256 in sorted(digests.items())]
    manifest = oms_manifest.Manifest(MODEL_DIR, items, serialization)
    with _sorted_json(sign_ec_key):
        signature = _oms_signer(sign_ec_key.Signer, signer).sign(oms.Payload(manifest))
    target = scratch / MODEL_SIGNATURE
    signature.write(target)
    return target


def check_model_signature(content: bytes, public_key_pem: str, files: Mapping[str, str]) -> None:
    """Check ``model.sig`` (a Sigstore bundle's DSSE envelope) against the key, and that what it signed is
    ``files`` (model file name → sha256, from the verified manifest) exactly.

    :raises VerificationError: naming what does not match.
    """
    try:
        envelope = json.loads(content)["dsseEnvelope"]
        statement = _dsse_statement(envelope, public_key_pem)
        digests = {r["name"]: r["digest"] for r in statement["predicate"]["resources"] if r["algorithm"] == "sha256"}
    except (ValueError, KeyError, TypeError) as exc:  # a malformed file, or a signature that does not verify
        raise VerificationError(f"{MODEL_SIGNATURE} does not verify with the bundle's key ({exc})") from exc
    if digests != dict(files):
        changed = sorted(set(digests.items()) ^ set(files.items()))
        raise VerificationError(f"{MODEL_SIGNATURE} signs other model files than the bundle holds "
                                f"({changed[0][0]} differs)")


def provenance(record: BuildRecord, subjects: Mapping[str, str], config_sha256: str, signer: Signer,
               scratch: Path) -> Path:
    """``scratch/provenance.intoto.json``: the signed SLSA v1 provenance of the files ``subjects`` (name →
    sha256)."""
    from securesystemslib.dsse import Envelope

    builder = record.provenance.tools.get("deeplens-build", "unknown")
    statement = {
        "_type": STATEMENT,
        "subject": [{"name": name, "digest": {"sha256": sha256}} for name, sha256 in sorted(subjects.items())],
        "predicateType": SLSA,
        "predicate": {"buildDefinition": _build_definition(record, config_sha256),
                      "runDetails": {"builder": {"id": f"urn:deeplens-build:{builder}"}, "metadata": {}}},
    }
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    envelope = Envelope(payload=payload, payload_type=PAYLOAD_TYPE, signatures={})
    envelope.sign(_DsseSigner(signer))
    target = scratch / PROVENANCE
    target.write_text(json.dumps(envelope.to_dict(), sort_keys=True, indent=1) + "\n")
    return target


def check_provenance(content: bytes, public_key_pem: str, subjects: Mapping[str, str]) -> dict[str, Any]:
    """Check the provenance's envelope with securesystemslib's verifier against the key, and that its subjects
    are ``subjects`` exactly; the statement.

    :raises VerificationError: naming what does not match.
    """
    try:
        statement = _dsse_statement(json.loads(content), public_key_pem)
    except (ValueError, KeyError, TypeError) as exc:
        raise VerificationError(f"{PROVENANCE} does not verify with the bundle's key ({exc})") from exc
    named = {s["name"]: s["digest"]["sha256"] for s in statement.get("subject", [])}
    if statement.get("predicateType") != SLSA or named != dict(subjects):
        raise VerificationError(f"{PROVENANCE} describes other files than the bundle holds")
    return statement


def _build_definition(record: BuildRecord, config_sha256: str) -> dict[str, Any]:
    source: dict[str, Any] = {"kind": record.source.kind, "origin": record.source.origin,
                              "digest": {"sha256": record.source.sha256}}
    if record.source.sagemaker is not None:
        source["sagemakerJob"] = {"name": record.source.sagemaker.name, "arn": record.source.sagemaker.arn}
    plugin = record.provenance.plugin
    dependencies = [{"name": plugin.distribution or plugin.name,
                     "uri": f"pkg:pypi/{plugin.distribution}@{plugin.version}" if plugin.distribution
                     else f"plugin:{plugin.name}"}]
    dependencies += [{"name": name, "uri": f"pkg:pypi/{name}@{version}"}
                     for name, version in sorted(record.provenance.tools.items())]
    dependencies += [{"name": wheel.file.rsplit("/", 1)[-1], "digest": {"sha256": wheel.sha256}}
                     for wheel in record.runtime.wheels]
    return {"buildType": BUILD_TYPE,
            "externalParameters": {"config": {"name": "deeplens.toml (settings, paths relative)",
                                              "digest": {"sha256": config_sha256}},
                                   "source": source},
            "internalParameters": {"framework": record.framework, "precision": record.model.precision,
                                   "target": record.target.backend if record.target else None,
                                   "runtime": record.runtime.name},
            "resolvedDependencies": dependencies}


@contextlib.contextmanager
def _sorted_json(module: Any) -> Iterator[None]:
    """``module``'s ``json_format.MessageToJson`` with sorted keys while the block runs (the statement it signs is
    a protobuf ``Struct``, whose keys come out in whatever order the process hashed them)."""
    from google.protobuf import json_format

    module.json_format = SimpleNamespace(MessageToJson=functools.partial(json_format.MessageToJson, sort_keys=True))
    try:
        yield
    finally:
        module.json_format = json_format


class _KeyOf:
    """A private key's face for model-signing's EC signer (``sign``, ``public_key``), signing with ours."""

    def __init__(self, signer: Signer):
        self._signer = signer

    def sign(self, data: bytes, _algorithm: object) -> bytes:
        return self._signer.sign(data)  # ECDSA P-256 with SHA-256, what model-signing asks of a P-256 key

    def public_key(self):
        return load_public_key(self._signer.public_key_pem.encode(), "the signing key")


def _oms_signer(base: type, signer: Signer):
    """model-signing's EC-key signer (``base``, imported late) over ``signer``: its ``__init__`` would load a key
    file; everything else is its own."""

    class OmsSigner(base):
        def __init__(self) -> None:
            self._private_key = _KeyOf(signer)

    return OmsSigner()


def _dsse_statement(envelope: Mapping[str, Any], public_key_pem: str) -> dict[str, Any]:
    """The in-toto statement ``envelope`` carries, once one of its signatures (base64, as payload) verifies with
    the key over DSSE's pre-authentication encoding (``DSSEv1 len(type) type len(body) body``).

    :raises ValueError: when the envelope is malformed, not an in-toto statement, or no signature verifies.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    if envelope["payloadType"] != PAYLOAD_TYPE:
        raise ValueError(f"payload type {envelope['payloadType']!r}, not {PAYLOAD_TYPE}")
    try:
        payload = base64.b64decode(envelope["payload"], validate=True)
    except binascii.Error as exc:
        raise ValueError(f"its payload is not base64: {exc}") from None
    kind = PAYLOAD_TYPE.encode()
    encoded = b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)
    key = load_public_key(public_key_pem.encode(), "the bundle's key")
    for signature in envelope["signatures"]:
        try:
            key.verify(base64.b64decode(signature["sig"], validate=True), encoded, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, binascii.Error, ValueError):
            continue
        statement = json.loads(payload)
        if not isinstance(statement, dict) or statement.get("_type") != STATEMENT:
            raise ValueError("its payload is not an in-toto statement")
        return statement
    raise ValueError("no signature in it verifies")


def _sslib_key(public_key_pem: str):
    from securesystemslib.signer import SSlibKey

    return SSlibKey.from_crypto(load_public_key(public_key_pem.encode(), "the bundle's key"))


class _DsseSigner:
    """securesystemslib's signer interface (``public_key``, ``sign``) over the build's signer."""

    def __init__(self, signer: Signer):
        self._signer = signer
        self.public_key = _sslib_key(signer.public_key_pem)

    def sign(self, payload: bytes):
        from securesystemslib.signer import Signature

        return Signature(self.public_key.keyid, self._signer.sign(payload).hex())
