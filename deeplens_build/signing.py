"""ECDSA P-256 / SHA-256 signatures over the bundle manifest (the scheme AWS Signer uses for IoT code signing).

Local keys sign deterministically (RFC 6979), so the same manifest always gets the same signature and the
bundle is bit-reproducible. AWS KMS signs with a random nonce: a KMS-signed bundle has a reproducible
manifest but a different signature each time (README, "Reproducible bundles").
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from deeplens_build.errors import AwsError, SigningError, VerificationError

ALGORITHM = "ECDSA_P256_SHA256"
KEY_ENV = "DEEPLENS_SIGNING_KEY"
KMS_PREFIX = "kms:"


class Signer(Protocol):
    public_key_pem: str
    description: str

    def sign(self, data: bytes) -> bytes:
        """A DER-encoded ECDSA signature of ``data``."""
        ...


@dataclass(frozen=True)
class LocalSigner:
    key: ec.EllipticCurvePrivateKey
    description: str

    @property
    def public_key_pem(self) -> str:
        return public_pem(self.key.public_key())

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))


@dataclass(frozen=True)
class KmsSigner:
    key_id: str
    public_key_pem: str
    description: str

    def sign(self, data: bytes) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = _kms().sign(KeyId=self.key_id, Message=data, MessageType="RAW",
                                 SigningAlgorithm="ECDSA_SHA_256")
        except (ClientError, BotoCoreError) as exc:
            raise AwsError(f"KMS could not sign with key {self.key_id}: {exc}") from exc
        return answer["Signature"]


def load_signer(spec: str | None) -> Signer:
    """The signer named by ``--signing-key`` (a PEM path or ``kms:KEY_ID``), else ``$DEEPLENS_SIGNING_KEY``."""
    if spec and spec.startswith(KMS_PREFIX):
        return _kms_signer(spec[len(KMS_PREFIX):])
    if spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise SigningError(f"signing key {spec} does not exist; create one with `deeplens-build keygen`")
        return LocalSigner(_private_key(path.read_bytes(), str(path)), description=f"key {path.name}")
    if text := os.environ.get(KEY_ENV):
        if text.startswith(KMS_PREFIX):
            return _kms_signer(text[len(KMS_PREFIX):])
        return LocalSigner(_private_key(text.encode(), f"${KEY_ENV}"), description=f"${KEY_ENV}")
    raise SigningError(f"no signing key: pass --signing-key PEM or kms:KEY_ID, or set {KEY_ENV} to a PEM "
                       "private key; `deeplens-build keygen` makes a key pair")


def generate_keypair(private_path: Path) -> Path:
    """Write a new P-256 private key (mode 0600) and its public key (0644) beside it, in folders made 0700;
    return the public key's path."""
    public_path = private_path.with_name(private_path.name.removesuffix(".pem") + ".pub.pem")
    for path in (private_path, public_path):
        if path.exists():
            raise SigningError(f"{path} already exists; choose another path or remove it first")
    key = ec.generate_private_key(ec.SECP256R1())
    # explicit modes, never the umask's: under umask 000 a folder or key would be writable by anyone
    for folder in reversed([p for p in private_path.absolute().parents if not p.exists()]):
        folder.mkdir(mode=0o700)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    _write_new(private_path, pem, 0o600)
    _write_new(public_path, public_pem(key.public_key()).encode("ascii"), 0o644)
    return public_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)


def verify(public_key_pem: str, data: bytes, signature: bytes) -> None:
    """:raises VerificationError: when ``signature`` is not ``public_key_pem``'s signature of ``data``."""
    try:
        key = load_public_key(public_key_pem.encode(), "the bundle's public key")
    except SigningError as exc:
        raise VerificationError(str(exc)) from exc
    try:
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise VerificationError("the manifest's signature does not match: the manifest was changed or signed by "
                                "another key") from exc


def load_public_key(pem: bytes, where: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise SigningError(f"{where} is not a PEM public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SigningError(f"{where} is not an ECDSA P-256 public key")
    return key


def public_pem(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def fingerprint(public_key_pem: str) -> str:
    """sha256 of the DER public key, as ``aws`` and ``openssl`` print it for a key."""
    der = load_public_key(public_key_pem.encode(), "public key").public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _private_key(pem: bytes, where: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{where} is not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SigningError(f"{where} is not an ECDSA P-256 key; make one with `deeplens-build keygen`")
    return key


def _kms():
    from deeplens_build.clients import aws_client

    return aws_client("kms")


def _kms_signer(key_id: str) -> KmsSigner:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        answer = _kms().get_public_key(KeyId=key_id)
    except (ClientError, BotoCoreError) as exc:
        raise AwsError(f"cannot read KMS key {key_id}: {exc}") from exc
    # the key itself is the authority: some KMS implementations leave KeySpec out of the answer
    key = serialization.load_der_public_key(answer["PublicKey"])
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1) \
            or "ECDSA_SHA_256" not in answer.get("SigningAlgorithms", ["ECDSA_SHA_256"]):
        kind = answer.get("KeySpec") or answer.get("CustomerMasterKeySpec") or type(key).__name__
        raise SigningError(f"KMS key {key_id} is {kind}; bundles are signed with an ECC_NIST_P256 key that "
                           "allows ECDSA_SHA_256")
    return KmsSigner(key_id=key_id, public_key_pem=public_pem(key), description=f"KMS key {key_id}")
