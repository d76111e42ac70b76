"""The bundle archive and its inverse: a deterministic, signed archive, and the checks that verify one.

Layout: ``manifest.json`` (every other file's path, size and sha256, plus what the bundle was built from),
``manifest.sig`` (DER ECDSA P-256/SHA-256 over the manifest's bytes), then the payload files in sorted order.
The archive is bit-reproducible: fixed timestamps (``SOURCE_DATE_EPOCH``, else 0), owner 0/0 with empty
names, mode 0644, sorted entries.

It is compressed with zstd (one frame, level -1, one thread, with its checksum and without a content size, so
the bytes depend on nothing but the content). Float weights hardly compress: zlib spent 15 s of a 17 s rebuild
of a 512 MB model on them; zstd's level 3 gains 7.5% on them at 0.35 GB/s and decompresses at 0.6 GB/s, its
level -1 stores them as they are at 1.1 GB/s and decompresses at 1.3 GB/s (measured here on float32 weights).
Text and JSON still compress (1.1% of their size vs 0.8% at level 3); wheels and zips are compressed already.
Bundles from before (``.tar.gz``) are still read, verified and deployed.
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

import zstandard
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from deeplens_build import attest, locks, signing
from deeplens_build.archive import (
    Extractor,
    UnsafeMember,
    check_end,
    member_parts,
    open_tar,
)
from deeplens_build.digest import BackgroundSha256, file_sha256, stat_identity
from deeplens_build.digest import written as digest_written
from deeplens_build.files import write_atomic
from deeplens_build.errors import (
    BundleError,
    SigningError,
    UsageError,
    VerificationError,
)
from deeplens_build.manifest import (
    MANIFEST,
    MAX_MANIFEST,
    MODEL_DIR,
    MAX_SIGNATURE,
    SIGNATURE,
    BuildRecord,
    FileEntry,
    Manifest,
    SigningRecord,
    build_manifest,
    parse_manifest,
)
from deeplens_build.names import check_bundle_path
from deeplens_build.report import Reporter

SUFFIX = ".tar.zst"
GZIP_SUFFIX = ".tar.gz"
"""The bundles deeplens-build wrote before zstd: still read."""
ZSTD_LEVEL = -1
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_WINDOW = 1 << 27
"""The largest zstd window a bundle may ask for (libzstd's own default limit, 128 MiB; the bundles written here
use a few MiB): a decompressor holds one window, so no frame can make a reader hold more."""
_GZIP_MAGIC = b"\x1f\x8b"
PARTIAL = ".partial"


@dataclass(frozen=True)
class Verified:
    """A bundle whose signature and every file checked out."""

    manifest: Manifest
    trusted: bool
    """True when the signature was checked against a key the user trusts, not only the bundle's own."""
    fingerprint: str
    """sha256 of the key that signed it, computed from the key itself (never taken from the manifest)."""


def bundle_name(name: str, version: str) -> str:
    return f"{name}-{version}{SUFFIX}"


def remove_partials(output_dir: Path) -> None:
    """Remove half-written bundles that a killed build left in ``output_dir`` (hidden ``*.partial`` files)."""
    if output_dir.is_dir():
        locks.remove_abandoned_files(output_dir, f".*{PARTIAL}")


def write_bundle(payload: Mapping[str, Path], record: BuildRecord, signer: signing.Signer,
                 output_dir: Path, *, written: Path | None = None, reuse: bool = True) -> tuple[Path, str, Manifest]:
    """Write ``<name>-<version>.tar.zst`` into ``output_dir`` atomically; return its path, sha256 and manifest.

    :param payload: archive path → file on disk, for every file but the manifest and its signature.
    :param written: where to remember what was written (the manifest's digest and the file's stat): when the
        bundle at the output path is still the one written for the same manifest, it is not written again.
    :param reuse: False (``--no-cache``) writes the bundle whatever is there, and still remembers it.
    """
    for arcname in payload:
        try:
            check_bundle_path(arcname)
        except ValueError as exc:
            raise BundleError(f"bundle member name {exc}") from exc
    files = tuple(FileEntry(path=arc, size=payload[arc].stat().st_size, sha256=file_sha256(payload[arc]))
                  for arc in sorted(payload))
    manifest = build_manifest(record, files, SigningRecord(
        algorithm=signing.ALGORITHM, public_key=signer.public_key_pem,
        fingerprint=signing.fingerprint(signer.public_key_pem)))
    manifest_bytes = manifest.to_json()
    target = output_dir / bundle_name(manifest.name, manifest.version)
    epoch = source_date_epoch()
    if written is not None and reuse and (sha256 := _unchanged(target, manifest_bytes, epoch, written)):
        return target, sha256, manifest
    signature = signer.sign(manifest_bytes)

    output_dir.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PARTIAL, dir=output_dir)
    # in use until renamed: remove_partials leaves it alone; the lock lives on a second descriptor, since
    # writing closes the first before the rename
    lock = os.dup(fd)
    try:
        locks.hold(lock)
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0, write_checksum=True,
                                              write_content_size=False)
        digest = BackgroundSha256()  # the bundle's own sha256, as it is written: never read back
        with os.fdopen(fd, "wb") as raw, compressor.stream_writer(_HashingWriter(raw, digest), closefd=False) as zst, \
                tarfile.open(fileobj=zst, mode="w", format=tarfile.PAX_FORMAT) as tar:
            _add(tar, MANIFEST, io.BytesIO(manifest_bytes), len(manifest_bytes), epoch)
            _add(tar, SIGNATURE, io.BytesIO(signature), len(signature), epoch)
            for arc in sorted(payload):
                with open(payload[arc], "rb") as f:
                    _add(tar, arc, f, payload[arc].stat().st_size, epoch)
        sha256 = digest.hexdigest()
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    finally:
        os.close(lock)
    digest_written(target, sha256)
    if written is not None:
        _remember(target, manifest_bytes, epoch, sha256, written)
    return target, sha256, manifest


def source_date_epoch() -> int:
    """Every member's modification time: ``SOURCE_DATE_EPOCH`` (reproducible-builds.org), else 0.

    :raises BundleError: when it is set to anything but a whole number of seconds.
    """
    value = os.environ.get("SOURCE_DATE_EPOCH", "0").strip() or "0"
    if not value.isdigit() or int(value) >= 8 ** 11:  # a tar header holds 11 octal digits
        raise BundleError(f"SOURCE_DATE_EPOCH is {value[:40]!r}, not a number of seconds since 1970; set it to "
                          "one (e.g. $(git log -1 --format=%ct)) or unset it")
    return int(value)


def _unchanged(target: Path, manifest_bytes: bytes, epoch: int, written: Path) -> str | None:
    """The bundle's sha256 when ``target`` is still what was written for this manifest and member time, else
    None (the manifest does not hold the time: a bundle of another ``SOURCE_DATE_EPOCH`` has other bytes)."""
    try:
        remembered = json.loads(written.read_text())
        stat = target.stat()
    except (OSError, ValueError):
        return None
    now = {"manifest": hashlib.sha256(manifest_bytes).hexdigest(), "epoch": epoch, "stat": list(stat_identity(stat))}
    return remembered.get("sha256") if {k: remembered.get(k) for k in now} == now else None


def _remember(target: Path, manifest_bytes: bytes, epoch: int, sha256: str, written: Path) -> None:
    write_atomic(written, json.dumps({"manifest": hashlib.sha256(manifest_bytes).hexdigest(), "epoch": epoch,
                                      "sha256": sha256, "stat": list(stat_identity(target.stat()))}))


def _add(tar: tarfile.TarFile, name: str, data: io.IOBase, size: int, epoch: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = epoch
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, data)


def require_signer(action: str, trusted_key: Path | None, allow_any_signer: bool, reporter: Reporter) -> None:
    """Refuse to act on a bundle nobody vouched for, unless the user says so out loud.

    :param action: what is about to happen, e.g. "run executes the bundle's code on this machine".
    """
    if trusted_key is None and not allow_any_signer:
        raise UsageError(f"{action}: pass --public-key with the signer's public key (`make package` makes "
                         ".deeplens/dev-signing-key.pub.pem), or --allow-any-signer to accept whoever signed it")
    if trusted_key is None:
        reporter.warn("--allow-any-signer: the signature is checked against the bundle's own key only; anyone "
                      "could have built this bundle")


def read_manifest(path: Path) -> Manifest:
    """The bundle's manifest, validated but its signature unchecked (for ``inspect``)."""
    with _open(path) as tar, _damage_is_a_verification_error(path):
        for member in tar:
            if member.name == MANIFEST and member.isreg():
                return parse_manifest(_small(tar, member, MAX_MANIFEST, path), path.name)
    raise VerificationError(f"{path.name} has no {MANIFEST}; it is not a deeplens-build bundle")


def verify_bundle(path: Path, trusted_key: Path | None = None) -> Verified:
    """Check the manifest's signature, then every file's size and sha256; nothing is written to disk.

    :raises VerificationError: naming the first problem found.
    """
    return _read_bundle(path, trusted_key, None)


def unpack_bundle(path: Path, dest: Path, trusted_key: Path | None = None) -> Verified:
    """Verify the bundle while extracting it into ``dest`` (which must not exist), in one pass over the file.

    One pass, so what is extracted is exactly what was verified, even if the file changes meanwhile; on any
    problem ``dest`` is removed. A device or a deploy only ever uses what verified.

    :return: the verified manifest; every file it lists is then at ``dest / entry.path``.
    """
    with Extractor(dest) as out:
        return _read_bundle(path, trusted_key, out)


def _read_bundle(path: Path, trusted_key: Path | None, out: Extractor | None) -> Verified:
    seen: dict[str, tuple[int, str]] = {}
    attestations: dict[str, bytes] = {}
    manifest_bytes = signature = None
    with _open(path) as tar, _damage_is_a_verification_error(path):
        for member in tar:
            try:
                parts = member_parts(member)
            except UnsafeMember as exc:
                raise VerificationError(f"{path.name}: member {member.name!r} {exc}; bundles hold regular files "
                                        "only") from exc
            if not member.isreg() or "/".join(parts) != member.name:
                raise VerificationError(f"{path.name}: {member.name!r} is not a regular file with a plain "
                                        "relative path; bundles hold nothing else")
            if member.name in seen:
                raise VerificationError(f"{path.name}: {member.name!r} appears twice")
            if member.name in (MANIFEST, SIGNATURE):
                content = _small(tar, member, MAX_MANIFEST if member.name == MANIFEST else MAX_SIGNATURE, path)
                seen[member.name] = (len(content), "")
                manifest_bytes, signature = ((content, signature) if member.name == MANIFEST
                                             else (manifest_bytes, content))
                continue
            if member.name in (attest.MODEL_SIGNATURE, attest.PROVENANCE):  # checked below, once listed files are
                content = _small(tar, member, attest.MAX_ATTESTATION, path)
                attestations[member.name] = content
                seen[member.name] = (len(content), hashlib.sha256(content).hexdigest())
                if out is not None:
                    out.add_stream(io.BytesIO(content), parts)
                continue
            digest = BackgroundSha256()
            data = _MemberData(tar, member, digest)
            if out is not None:
                out.add_stream(data, parts)
            else:
                for _ in iter(lambda: data.read(1 << 20), b""):
                    pass
            seen[member.name] = (member.size, digest.hexdigest())
        check_end(tar)
    if manifest_bytes is None:
        raise VerificationError(f"{path.name} has no {MANIFEST}; it is not a deeplens-build bundle")
    if signature is None:
        raise VerificationError(f"{path.name} has no {SIGNATURE}: the bundle is unsigned")
    manifest = parse_manifest(manifest_bytes, path.name)
    embedded = manifest.signing.public_key
    try:
        signer = signing.fingerprint(embedded)
    except SigningError as exc:
        raise VerificationError(f"{path.name}: the manifest's signing key is unusable ({exc})") from exc
    if signer != manifest.signing.fingerprint:
        raise VerificationError(f"{path.name}: the manifest's fingerprint {manifest.signing.fingerprint[:16]}… is "
                                f"not its key's ({signer[:16]}…); the bundle was tampered with")
    key = embedded
    if trusted_key is not None:
        key = _trusted(trusted_key)
        if signing.fingerprint(key) != signer:
            raise VerificationError(f"{path.name} was signed by key {signer[:16]}…, not by the trusted key "
                                    f"{trusted_key.name} ({signing.fingerprint(key)[:16]}…)")
    signing.verify(key, manifest_bytes, signature)
    listed = {entry.path: entry for entry in manifest.files}
    if len(listed) != len(manifest.files) or set(listed) & {MANIFEST, SIGNATURE}:
        raise VerificationError(f"{path.name}: {MANIFEST} lists a file twice, or lists itself")
    for name, entry in listed.items():
        if name not in seen:
            raise VerificationError(f"{path.name}: {name} is listed in the manifest but missing from the bundle")
        size, sha256 = seen[name]
        if size != entry.size or sha256 != entry.sha256:
            raise VerificationError(f"{path.name}: {name} was changed (sha256 {sha256[:16]}…, the manifest says "
                                    f"{entry.sha256[:16]}…)")
    extra = sorted(set(seen) - set(listed) - {MANIFEST, SIGNATURE})
    if extra:
        raise VerificationError(f"{path.name}: {extra[0]} is in the bundle but not in the manifest")
    _check_attestations(path, attestations, manifest, key)
    return Verified(manifest=manifest, trusted=trusted_key is not None, fingerprint=signer)


def _check_attestations(path: Path, attestations: Mapping[str, bytes], manifest: Manifest, key: str) -> None:
    """What other tools verify, verified here too with their libraries (bundles built before them have none)."""
    model = f"{MODEL_DIR}/"
    try:
        if content := attestations.get(attest.MODEL_SIGNATURE):
            attest.check_model_signature(content, key, {e.path.removeprefix(model): e.sha256 for e in manifest.files
                                                        if e.path.startswith(model)})
        if content := attestations.get(attest.PROVENANCE):
            attest.check_provenance(content, key, {e.path: e.sha256 for e in manifest.files
                                                   if e.path != attest.PROVENANCE})
    except VerificationError as exc:
        raise VerificationError(f"{path.name}: {exc}") from exc


def _trusted(key: Path) -> str:
    try:
        text = key.read_text(encoding="ascii")
        signing.fingerprint(text)
    except (OSError, UnicodeDecodeError, SigningError) as exc:
        raise VerificationError(f"--public-key {key} is not a PEM public key ({exc})") from exc
    return text


class _HashingWriter(io.RawIOBase):
    """A file that hashes what is written to it."""

    def __init__(self, target: IO[bytes], digest: BackgroundSha256):
        self._target, self._digest = target, digest

    def writable(self) -> bool:
        return True

    def write(self, block: bytes) -> int:
        block = bytes(block)  # the compressor reuses its buffer: hash a copy that stays as it is
        self._digest.update(block)
        return self._target.write(block)


class _MemberData(io.RawIOBase):
    """A regular member's bytes, read straight from the archive's decompressed stream (tarfile's own member
    reader adds two layers of buffering and copies) and hashed as they are read, so extracting and checking take
    one read."""

    def __init__(self, tar: tarfile.TarFile, member: tarfile.TarInfo, digest: BackgroundSha256):
        self._stream, self._left, self._digest = tar.fileobj, member.size, digest
        self._stream.seek(member.offset_data)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = self._left if size < 0 else min(size, self._left)
        block = self._stream.read(size)
        if len(block) != size:
            raise tarfile.ReadError("unexpected end of data")
        self._left -= size
        self._digest.update(block)
        return block


def _small(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int, path: Path) -> bytes:
    if member.size > limit:
        raise VerificationError(f"{path.name}: {member.name} is {member.size} bytes, more than the {limit} it may "
                                "hold")
    source = tar.extractfile(member)
    assert source is not None
    return source.read()


@contextlib.contextmanager
def _damage_is_a_verification_error(path: Path) -> Iterator[None]:
    try:
        yield
    except UnsafeMember as exc:
        raise VerificationError(f"{path.name}: a member {exc}; it is not a bundle deeplens-build wrote") from exc
    except (tarfile.TarError, EOFError, OSError, zlib.error, zstandard.ZstdError) as exc:
        raise VerificationError(f"{path.name} is damaged ({exc}); build or download it again") from exc


class _ZstdStream(io.RawIOBase):
    """The decompressed bytes of a bundle's one zstd frame, for tarfile (forward seeks only), in bounded memory.

    Before a byte is decompressed the frame is walked, block header by block header (zstandard has no call that
    gives a frame's compressed size): it must end where the file ends, so nothing appended after it (a second
    frame, or a skippable one, which decompressors pass over in silence) is taken for part of the bundle; it may
    ask for a window of :data:`MAX_WINDOW` at most; a frame cut short is refused. zstandard's ``stream_reader``
    then hands out what tarfile asks for and no more, whatever the compression ratio.
    """

    def __init__(self, raw: IO[bytes]):
        _check_frame(raw)
        raw.seek(0)
        self._reader = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).stream_reader(
            raw, read_size=1 << 20, read_across_frames=False, closefd=False)
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self._position + offset
        if whence not in (io.SEEK_SET, io.SEEK_CUR) or target < self._position:
            raise OSError("a bundle is read front to back")
        while self._position < target and self.read(min(target - self._position, 1 << 20)):
            pass
        return self._position

    def read(self, size: int = -1) -> bytes:
        """``size`` bytes (all that is left with -1), fewer only at the end: tarfile takes a short read for a
        truncated archive."""
        parts = []
        need = size if size >= 0 else 1 << 62
        while need:
            part = self._reader.read(min(need, 1 << 20))
            if not part:
                break
            parts.append(part)
            need -= len(part)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._position += len(data)
        return data


def _check_frame(raw: IO[bytes]) -> None:
    """Raise ``ZstdError`` unless ``raw`` is one whole zstd frame with a window of at most MAX_WINDOW, and
    ``UnsafeMember`` when something follows the frame."""
    head = raw.read(18)  # the longest frame header
    try:
        offset = zstandard.frame_header_size(head)
        frame = zstandard.get_frame_parameters(head)
    except zstandard.ZstdError as exc:
        raise zstandard.ZstdError(f"its zstd frame header is damaged: {exc}") from exc
    if frame.window_size > MAX_WINDOW:
        raise zstandard.ZstdError(f"its zstd frame asks for a {frame.window_size}-byte window, more than the "
                                  f"{MAX_WINDOW} a bundle may use")
    end = raw.seek(0, io.SEEK_END)
    while True:
        raw.seek(offset)
        block = raw.read(3)
        if len(block) < 3:
            raise zstandard.ZstdError("the file ends inside its zstd frame (truncated)")
        header = int.from_bytes(block, "little")
        kind, size = (header >> 1) & 3, header >> 3
        if kind == 3:
            raise zstandard.ZstdError(f"its zstd frame holds a block of the reserved type at byte {offset}")
        offset += 3 + (1 if kind == 1 else size)  # an RLE block stores its one byte
        if header & 1:  # the frame's last block
            break
    offset += 4 if frame.has_checksum else 0
    if offset > end:
        raise zstandard.ZstdError("the file ends inside its zstd frame (truncated)")
    if offset < end:
        raw.seek(offset)
        tail = raw.read(4)
        if not (tail == _ZSTD_MAGIC or tail[1:] == b"\x2a\x4d\x18" and tail[0] & 0xF0 == 0x50):  # not a frame
            raise zstandard.ZstdError(f"{end - offset} bytes that are no zstd frame follow its frame")
        raise UnsafeMember(f"has data after the end of the archive ({end - offset} bytes after its zstd frame: "
                           "another archive, or a skippable frame, appended to it?)")


@contextlib.contextmanager
def _open(path: Path) -> Iterator[tarfile.TarFile]:
    """The bundle as a tar archive over a decompressed stream this module owns (zstd, or the gzip of older
    bundles), so its trailer can be checked."""
    if not path.exists():
        raise VerificationError(f"bundle {path} does not exist")
    if not path.is_file():
        raise VerificationError(f"bundle {path} is not a regular file (a folder, device or FIFO); give the "
                                f"{SUFFIX} file that `deeplens-build package` wrote")
    with open(path, "rb") as raw, _damage_is_a_verification_error(path):
        magic = raw.read(4)
        raw.seek(0)
        if magic.startswith(_ZSTD_MAGIC):
            stream = _ZstdStream(raw)
        elif magic.startswith(_GZIP_MAGIC):
            stream = gzip.GzipFile(fileobj=raw, mode="rb")
        else:
            raise VerificationError(f"{path.name} is not a bundle archive (neither a {SUFFIX} nor a {GZIP_SUFFIX} "
                                    "file)")
        try:
            tar = open_tar(fileobj=stream, mode="r:")
        except tarfile.TarError as exc:
            _decompress_on(stream)
            raise VerificationError(f"{path.name} is not a bundle archive ({exc})") from exc
        with tar, stream:
            try:
                yield tar
            except (tarfile.TarError, UnsafeMember, VerificationError):
                _decompress_on(stream)
                raise


_DAMAGE_WINDOW = 64 << 20
"""Decompressed bytes read past a malformed header to learn whether the compressed stream itself is damaged."""


def _decompress_on(stream: IO[bytes]) -> None:
    """Read on (``_DAMAGE_WINDOW`` bytes at most) so that a damaged stream says so: zstd checks a frame's content
    at its end, while the bytes it produced before, garbled by the damage, already failed to parse as tar. Raises
    the decompressor's error when it finds one; else returns, and the parse error stands."""
    left = _DAMAGE_WINDOW
    while left > 0 and (block := stream.read(min(left, 1 << 20))):
        left -= len(block)
