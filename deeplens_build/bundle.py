"""Bundle stage and its inverse: a deterministic, signed archive, and the checks that verify one.

Layout: ``manifest.json`` (every other file's path, size and sha256, plus what the bundle was built from),
``manifest.sig`` (DER ECDSA P-256/SHA-256 over the manifest's bytes), then the payload files in sorted order.
The archive is bit-reproducible: fixed timestamps (``SOURCE_DATE_EPOCH``, else 0), owner 0/0 with empty
names, mode 0644, sorted entries, and a gzip header without name or time.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from deeplens_build import signing
from deeplens_build.digest import file_sha256
from deeplens_build.errors import BundleError, VerificationError

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
SCHEMA = "deeplens-build/bundle@1"
SUFFIX = ".tar.gz"


@dataclass(frozen=True)
class Verified:
    """A bundle whose signature and every file checked out."""

    manifest: Mapping[str, Any]
    trusted: bool
    """True when the signature was checked against a key the user trusts, not only the bundle's own."""


def bundle_name(name: str, version: str) -> str:
    return f"{name}-{version}{SUFFIX}"


def write_bundle(payload: Mapping[str, Path], manifest: Mapping[str, Any], signer: signing.Signer,
                 output_dir: Path) -> tuple[Path, str]:
    """Write ``<name>-<version>.tar.gz`` into ``output_dir`` atomically; return its path and sha256.

    :param payload: archive path → file on disk, for every file but the manifest and its signature.
    :param manifest: everything but ``files`` and ``signing``, which are added here.
    """
    for arcname in payload:
        _check_member_name(arcname, BundleError)
    files = [{"path": arc, "size": payload[arc].stat().st_size, "sha256": file_sha256(payload[arc])}
             for arc in sorted(payload)]
    full = {**manifest, "schema": SCHEMA, "files": files,
            "signing": {"algorithm": signing.ALGORITHM, "public_key": signer.public_key_pem,
                        "fingerprint": signing.fingerprint(signer.public_key_pem)}}
    manifest_bytes = (json.dumps(full, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
    signature = signer.sign(manifest_bytes)

    target = output_dir / bundle_name(full["name"], full["version"])
    output_dir.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=output_dir)
    try:
        with os.fdopen(fd, "wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            _add(tar, MANIFEST, io.BytesIO(manifest_bytes), len(manifest_bytes))
            _add(tar, SIGNATURE, io.BytesIO(signature), len(signature))
            for arc in sorted(payload):
                with open(payload[arc], "rb") as f:
                    _add(tar, arc, f, payload[arc].stat().st_size)
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return target, file_sha256(target)


def _add(tar: tarfile.TarFile, name: str, data: io.IOBase, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, data)


def read_manifest(path: Path) -> Mapping[str, Any]:
    """The bundle's manifest, unverified (for ``inspect``)."""
    with _open(path) as tar, _damage_is_a_verification_error(path):
        for member in tar:
            if member.name == MANIFEST and member.isreg():
                return _parse_manifest(tar.extractfile(member).read(), path)
    raise VerificationError(f"{path.name} has no {MANIFEST}; it is not a deeplens-build bundle")


def verify_bundle(path: Path, trusted_key: Path | None = None) -> Verified:
    """Check the manifest's signature, then every file's size and sha256; no file is extracted to disk.

    :raises VerificationError: naming the first problem found.
    """
    seen: dict[str, tuple[int, str]] = {}
    manifest_bytes = signature = None
    with _open(path) as tar, _damage_is_a_verification_error(path):
        for member in tar:
            _check_member_name(member.name, VerificationError)
            if not member.isreg():
                raise VerificationError(f"{path.name}: {member.name!r} is not a regular file; bundles hold "
                                        "regular files only")
            if member.name in seen:
                raise VerificationError(f"{path.name}: {member.name!r} appears twice")
            data = tar.extractfile(member)
            if member.name in (MANIFEST, SIGNATURE):
                content = data.read()
                seen[member.name] = (len(content), "")
                manifest_bytes, signature = ((content, signature) if member.name == MANIFEST
                                             else (manifest_bytes, content))
            else:
                digest = hashlib.sha256()
                for block in iter(lambda: data.read(1 << 20), b""):
                    digest.update(block)
                seen[member.name] = (member.size, digest.hexdigest())
    if manifest_bytes is None:
        raise VerificationError(f"{path.name} has no {MANIFEST}; it is not a deeplens-build bundle")
    if signature is None:
        raise VerificationError(f"{path.name} has no {SIGNATURE}: the bundle is unsigned")
    manifest = _parse_manifest(manifest_bytes, path)
    embedded = str(manifest.get("signing", {}).get("public_key", ""))
    key = embedded
    if trusted_key is not None:
        key = trusted_key.read_text(encoding="ascii")
        if signing.fingerprint(key) != signing.fingerprint(embedded):
            raise VerificationError(f"{path.name} was signed by key {signing.fingerprint(embedded)[:16]}…, not by "
                                    f"the trusted key {trusted_key.name} ({signing.fingerprint(key)[:16]}…)")
    signing.verify(key, manifest_bytes, signature)
    listed = {entry["path"]: entry for entry in manifest["files"]}
    for name, entry in listed.items():
        if name not in seen:
            raise VerificationError(f"{path.name}: {name} is listed in the manifest but missing from the bundle")
        size, sha256 = seen[name]
        if size != entry["size"] or sha256 != entry["sha256"]:
            raise VerificationError(f"{path.name}: {name} was changed (sha256 {sha256[:16]}…, the manifest says "
                                    f"{entry['sha256'][:16]}…)")
    extra = sorted(set(seen) - set(listed) - {MANIFEST, SIGNATURE})
    if extra:
        raise VerificationError(f"{path.name}: {extra[0]} is in the bundle but not in the manifest")
    return Verified(manifest=manifest, trusted=trusted_key is not None)


def unpack_bundle(path: Path, dest: Path, trusted_key: Path | None = None) -> Verified:
    """Verify the bundle, then extract it into ``dest``: a device or a deploy only ever uses what verified.

    :return: the verified manifest; every file it lists is then at ``dest / entry["path"]``.
    """
    verified = verify_bundle(path, trusted_key)
    with _open(path) as tar, _damage_is_a_verification_error(path):
        tar.extractall(dest, filter="data")  # verify checked: regular files with plain relative names only
    return verified


@contextlib.contextmanager
def _damage_is_a_verification_error(path: Path) -> Iterator[None]:
    try:
        yield
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise VerificationError(f"{path.name} is damaged ({exc}); build or download it again") from exc


def _open(path: Path) -> tarfile.TarFile:
    if not path.is_file():
        raise VerificationError(f"bundle {path} does not exist")
    try:
        return tarfile.open(path, mode="r:gz")
    except (tarfile.TarError, OSError) as exc:
        raise VerificationError(f"{path.name} is not a bundle archive ({exc})") from exc


def _parse_manifest(data: bytes, path: Path) -> Mapping[str, Any]:
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VerificationError(f"{path.name}: {MANIFEST} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA or not _valid_files(manifest.get("files")):
        raise VerificationError(f"{path.name}: {MANIFEST} is not a {SCHEMA} manifest")
    return manifest


def _valid_files(files: object) -> bool:
    return isinstance(files, list) and all(
        isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("size"), int)
        and isinstance(f.get("sha256"), str) for f in files)


def _check_member_name(name: str, error: type[Exception]) -> None:
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or str(pure) != name or not name:
        raise error(f"bundle member name {name!r} is not a plain relative path")
