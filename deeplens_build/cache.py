"""Content-addressed stage cache: an unchanged input is never rebuilt.

An entry is ``<root>/<stage>/<key>/``: the files the stage wrote plus ``result.json``, its typed result and the
sha256 of every file it holds. The key is the sha256 of everything the stage's output depends on (input
digests, settings, tool versions). Paths inside an entry are stored relative to it, so a cache folder can be
copied between machines.

Builds sharing a work folder run concurrently, so a published entry is never changed in place: it is built in a
scratch folder and renamed into place only if no valid entry is there yet (the loser of that race uses the
winner's entry, under a lock per stage, and reports it reused); an entry whose files no longer match their
digests (edited, truncated) or whose result names a file it does not hold is rebuilt, never reused; under
``--no-cache`` a fresh result that differs from the entry of its key replaces it (the entry was stale: something
the key does not hold had changed); scratch folders of a killed build are removed by the next build of the stage.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from deeplens_build import locks
from deeplens_build.clients import aws_client
from deeplens_build.digest import file_sha256, json_sha256, linked, stat_identity, written
from deeplens_build.names import check_bundle_path
from deeplens_build.types import TrainingOutput

if TYPE_CHECKING:
    from deeplens_build.signing import Signer

T = TypeVar("T")

_RESULT = "result.json"
_ENTRY_PREFIX = "@entry/"
_SCRATCH = ".build-"
_TRASH = ".trash-"
_PUBLISH_LOCK = ".publish.lock"
CACHE_FORMAT = 3
"""Bump when a stage's result type changes shape, so old entries are ignored instead of misread."""
MAX_SHARED_RESULT = 16 << 20
MAX_SIGNATURE = 4096
"""Bytes a shared entry's ``result.json`` may hold: read whole, so bounded."""


TOOL_CACHE_VARIABLES = ("XDG_CACHE_HOME", "KERAS_HOME")
"""Where the tools we drive write on their own: onnxruntime's telemetry keeps a device id under
$XDG_CACHE_HOME (else ~/.cache) at import, and Keras writes $KERAS_HOME/keras.json (else ~/.keras)."""


def tool_cache_environment(work_dir: Path) -> dict[str, str]:
    """Point the tools' own caches into the work folder, unless the user already chose where they go."""
    return {name: os.environ.get(name) or str(work_dir / "tool-cache" / name.lower()) for name in TOOL_CACHE_VARIABLES}


class Cache:
    def __init__(self, root: Path, *, reuse: bool = True, shared: SharedCache | None = None, code: str = ""):
        """:param reuse: False (``--no-cache``) rebuilds every stage, and its fresh result replaces the entry.
        :param shared: a cache other machines fill too (CI), asked after this one and before building.
        :param code: the digest of the core's own code, part of every key (the stages are its code)."""
        self.root = root
        self.reuse = reuse
        self.shared = shared
        self.code = code
        self._by_digest: dict[str, Path] = {}
        """With a shared cache: files of the entries this build used, by sha256, so a shared entry holding one of
        them links it here instead of downloading it again (a conversion's weights, kept by the optimizer)."""

    def key(self, stage: str, material: Mapping[str, Any]) -> str:
        return json_sha256({"stage": stage, "format": CACHE_FORMAT, "code": self.code, "material": material})

    def stage(self, stage: str, material: Mapping[str, Any], result_type: type[T],
              build: Callable[[Path], T]) -> tuple[T, bool]:
        """Return the cached result of ``stage`` for ``material``, or ``build`` it into a fresh folder.

        :return: the result, and whether it came from the cache.
        """
        folder = self.root / stage
        entry = folder / self.key(stage, material)
        adapter = TypeAdapter(result_type)
        if folder.is_dir():  # what a killed build left, whether this build reuses the entry or builds it
            locks.remove_abandoned_folders(folder, _SCRATCH)
            for trash in folder.glob(f"{_TRASH}*"):  # only ever left by a build killed while discarding an entry
                shutil.rmtree(trash, ignore_errors=True)
        if self.reuse and (cached := _load(adapter, entry)) is not None:
            self._index(entry)
            return cached, True
        folder.mkdir(parents=True, exist_ok=True)
        key = entry.name
        with locks.owned_folder(folder, _SCRATCH) as scratch:
            # a shared entry counts only once every file matches the digests its result.json records
            fetched = (self.reuse and self.shared is not None
                       and self.shared.fetch(stage, key, scratch, self._by_digest.get))
            shared = fetched and _load(adapter, scratch) is not None
            if fetched and not shared:
                self.shared.warn(f"shared cache {self.shared.uri}: the {stage} entry {key[:16]}… is not a result "
                                 "this build can use (wrong shape, or a path outside the entry); building it here")
            if not shared:
                result = build(_emptied(scratch))
                data = _relative(adapter.dump_python(result, mode="json"), f"{scratch}{os.sep}")
                files = {rel: file_sha256(scratch / rel) for rel in _files(scratch)}
                (scratch / _RESULT).write_text(json.dumps({"result": data, "files": files}, indent=1,
                                                          sort_keys=True), encoding="utf-8")
            with locks.held(folder / _PUBLISH_LOCK):
                if (there := _load(adapter, entry)) is not None and (self.reuse or _same(entry, scratch)):
                    # a concurrent build published this entry first (reused, so the report says cached), or,
                    # under --no-cache, the entry already holds what this build made: kept, since a concurrent
                    # build may be reading its files
                    self._index(entry)
                    return there, self.reuse
                if entry.exists():  # damaged, or stale (--no-cache built other bytes for its key): moved aside in
                    trash = Path(tempfile.mkdtemp(prefix=_TRASH, dir=folder))  # one step, so no reader sees half
                    os.replace(entry, trash / "entry")
                    shutil.rmtree(trash, ignore_errors=True)
                os.replace(scratch, entry)
        loaded = _load(adapter, entry)
        assert loaded is not None, f"cache entry {entry} vanished after publishing"
        self._index(entry)
        if not shared and self.shared is not None:
            self.shared.store(stage, key, entry)
        return loaded, bool(shared)

    def _index(self, entry: Path) -> None:
        if self.shared is None:  # only a shared entry asks: a local build does not read its results twice
            return
        files = json.loads((entry / _RESULT).read_text(encoding="utf-8"))["files"]
        self._by_digest.update({sha256: entry / rel for rel, sha256 in files.items()})


def _same(entry: Path, scratch: Path) -> bool:
    """Whether two entries hold the same result and files (their ``result.json`` name files by relative path)."""
    try:
        return (json.loads((entry / _RESULT).read_text(encoding="utf-8"))
                == json.loads((scratch / _RESULT).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return False


def _emptied(scratch: Path) -> Path:
    """``scratch`` without what a rejected shared entry left in it (its owner file stays)."""
    for path in scratch.iterdir():
        if path.name != locks.OWNER:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return scratch


class SharedCache:
    """Stage entries shared between machines in S3 (``[build] cache = "s3://BUCKET/PREFIX"`` or ``--cache``),
    content-addressed like a remote build cache.

    An entry is its ``result.json`` (``PREFIX/v<format>/<stage>/<key>.json``) plus one blob per file, named by the
    file's sha256 (``PREFIX/v<format>/blobs/<sha256>``). A file several entries hold — the weights a conversion
    wrote and the optimizer kept as they were — is uploaded once, downloaded once, and a blob the bucket already
    has is not uploaded again. A result is uploaded after its blobs, once the entry is complete here. A download
    is used only when every file matches the digest its result records: a corrupt, truncated or missing blob (or
    a result that is not one) is discarded with a warning, the stage is built here, and its blobs are uploaded
    again. A shared cache never fails a build: an unreachable bucket is a warning and a local build.

    Trust: whoever can write the prefix could write a result and blobs whose digests agree (a Lambda zip of their
    own, say), so digests alone vouch for nothing. Each entry a build uploads carries a signature
    (``PREFIX/v<format>/signatures/<stage>/<key>.json``) by the build's cache key over its stage, its key and its
    result — which lists every file's digest — and a build takes an entry only when a key it trusts signed it,
    as Nix takes a binary cache's store path only with a trusted signature. Unsigned, wrongly signed or signed by
    a key it does not trust: a warning and a local build, never used. The check comes before any blob is read.

    :param signer: signs the entries this build uploads (``[build] cache_key``, else the signing key).
    :param trusted: the PEM public keys whose entries this build takes (``[build] cache_trust``, else the public
        half of ``signer``).
    """

    def __init__(self, uri: str, warn: Callable[[str], None], *, signer: Signer, trusted: Iterable[str],
                 client: Any = None):
        from deeplens_build.signing import fingerprint

        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        self.uri, self.bucket, self.prefix, self.warn = uri, bucket, prefix.strip("/"), warn
        self.signer = signer
        self.trusted = {fingerprint(pem): pem for pem in trusted}
        self.unreachable = False  # said once, then the rest of the build does without it
        self._present: set[str] = set()  # blobs known to be in the bucket
        self._damaged: set[str] = set()  # blobs found corrupt there: uploaded again, whatever the bucket says
        self._client = client

    @property
    def client(self) -> Any:
        """Made when first needed (boto3 takes 0.4 s to import and set up): a build whose stages are all in the
        local cache never asks."""
        if self._client is None:
            self._client = aws_client("s3")
        return self._client

    def _name(self, *parts: str) -> str:
        return "/".join(part for part in (self.prefix, f"v{CACHE_FORMAT}", *parts) if part)

    def fetch(self, stage: str, key: str, scratch: Path, local: Callable[[str], Path | None]) -> bool:
        """Put the entry's files and ``result.json`` into ``scratch``; whether it was there, whole.

        :param local: a file this machine already holds with a given sha256, linked instead of downloaded.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        if self.unreachable:
            return False
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._name(stage, f"{key}.json"))["Body"].read(
                MAX_SHARED_RESULT + 1)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey"):
                self.warn(f"shared cache {self.uri}: cannot read the {stage} entry ({exc}); building it here")
            return False
        except BotoCoreError as exc:
            self.unreachable = True
            self.warn(f"shared cache {self.uri}: cannot reach it ({exc}); building without it")
            return False
        if not self._signed(stage, key, body):
            return False
        try:
            files = _shared_files(body)
            for rel, sha256 in sorted(files.items()):
                target = scratch / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if not _copied(local(sha256), target):
                    self._download(sha256, target)
                if file_sha256(target) != sha256:
                    self._damaged.add(sha256)
                    raise ValueError(f"blob {sha256[:16]}… ({rel}) does not match its digest")
                self._present.add(sha256)
        except BotoCoreError as exc:
            self.unreachable = True
            self.warn(f"shared cache {self.uri}: cannot reach it ({exc}); building without it")
            return False
        except (ClientError, ValueError, OSError) as exc:  # a blob missing, truncated or changed; a bad result
            self.warn(f"shared cache {self.uri}: the {stage} entry {key[:16]}… is damaged ({exc}); building it here")
            return False
        (scratch / _RESULT).write_bytes(body)
        return True

    def store(self, stage: str, key: str, entry: Path) -> None:
        """Upload a complete entry (never a half one: ``entry`` was published here first): the blobs the bucket
        lacks, then the result."""
        from botocore.exceptions import BotoCoreError, ClientError

        if self.unreachable:
            return
        from deeplens_build.errors import AwsError
        from deeplens_build.signing import ALGORITHM, fingerprint

        result = (entry / _RESULT).read_bytes()
        try:
            for rel, sha256 in sorted(json.loads(result)["files"].items()):
                if sha256 in self._damaged or not (sha256 in self._present or self._has(sha256)):
                    self.client.upload_file(str(entry / rel), self.bucket, self._name("blobs", sha256))
                    self._damaged.discard(sha256)
                self._present.add(sha256)
            signature = {"key": fingerprint(self.signer.public_key_pem), "algorithm": ALGORITHM,
                         "signature": base64.b64encode(self.signer.sign(_statement(stage, key, result))).decode()}
            self.client.put_object(Bucket=self.bucket, Key=self._name("signatures", stage, f"{key}.json"),
                                   Body=json.dumps(signature).encode())
            self.client.put_object(Bucket=self.bucket, Key=self._name(stage, f"{key}.json"), Body=result)
        except (ClientError, BotoCoreError, AwsError) as exc:  # AwsError: a KMS key that could not sign
            self.warn(f"shared cache {self.uri}: cannot store the {stage} entry ({exc}); other machines will build it")

    def _signed(self, stage: str, key: str, result: bytes) -> bool:
        """Whether a key this build trusts signed the entry; says why not."""
        from botocore.exceptions import BotoCoreError, ClientError

        from deeplens_build.errors import VerificationError
        from deeplens_build.signing import verify

        where = f"shared cache {self.uri}: the {stage} entry {key[:16]}…"
        try:
            raw = self.client.get_object(Bucket=self.bucket, Key=self._name("signatures", stage, f"{key}.json"))[
                "Body"].read(MAX_SIGNATURE + 1)
        except (ClientError, BotoCoreError) as exc:
            self.warn(f"{where} is not signed ({exc}); building it here (entries are taken only when signed by a "
                      "key in [build] cache_trust)")
            return False
        try:
            signature = json.loads(raw)
            pem = self.trusted.get(signature["key"])
            if pem is None:
                self.warn(f"{where} is signed by key {str(signature['key'])[:16]}…, which this build does not trust; "
                          "building it here (add its public key to [build] cache_trust to take that machine's "
                          "entries)")
                return False
            verify(pem, _statement(stage, key, result), base64.b64decode(signature["signature"], validate=True))
        except (ValueError, KeyError, TypeError, VerificationError):
            self.warn(f"{where} has a signature that does not verify: it was changed after signing; building it "
                      "here")
            return False
        return True

    def _download(self, sha256: str, target: Path) -> None:
        """One streamed GET, hashed as it is written, so checking the blob does not read it again."""
        body = self.client.get_object(Bucket=self.bucket, Key=self._name("blobs", sha256))["Body"]
        digest = hashlib.sha256()
        with open(target, "wb") as out:
            for block in body.iter_chunks(1 << 20):
                digest.update(block)
                out.write(block)
        written(target, digest.hexdigest())

    def _has(self, sha256: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._name("blobs", sha256))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True


def _statement(stage: str, key: str, result: bytes) -> bytes:
    """What an entry's signature covers: its stage and key as well as its result (every file's digest), so a signed
    result cannot stand in for another entry."""
    return f"deeplens-build shared cache v{CACHE_FORMAT}\n{stage}\n{key}\n".encode() + result


def _shared_files(body: bytes) -> dict[str, str]:
    """A shared ``result.json``'s file list, checked: it comes from a bucket, and names paths to write.

    :raises ValueError: for anything but relative paths without ``..`` mapped to sha256 digests.
    """
    if len(body) > MAX_SHARED_RESULT:
        raise ValueError(f"its result is larger than {MAX_SHARED_RESULT} bytes")
    recorded = json.loads(body)
    files = recorded.get("files") if isinstance(recorded, dict) else None
    if not isinstance(files, dict):
        raise ValueError("its result lists no files")
    for rel, sha256 in files.items():
        check_bundle_path(rel)
        if rel == _RESULT or not (isinstance(sha256, str) and len(sha256) == 64
                                  and all(c in "0123456789abcdef" for c in sha256)):
            raise ValueError(f"its result lists {rel!r} with digest {sha256!r}")
    return files


def _copied(source: Path | None, target: Path) -> bool:
    """``source`` (a file of a published entry) at ``target`` too, or False when it was pruned meanwhile."""
    if source is None:
        return False
    try:
        link(source, target)
    except OSError:  # pruned meanwhile: download it
        return False
    return True


def link(source: Path, target: Path) -> None:
    """``target`` a second name for ``source``, a file of a published entry, never changed again (or a copy
    across file systems): its digest stays known, so checking it reads nothing."""
    before = stat_identity(os.stat(source))
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
        return
    linked(before, stat_identity(os.stat(target)))


def unlink(path: Path) -> None:
    """Remove ``path``, a second name of an entry's file: the entry's digest stays known under the change time the
    removal gives the file (the stat index would otherwise take it for a change and read it again)."""
    with open(path, "rb") as file:
        before = stat_identity(os.fstat(file.fileno()))
        os.unlink(path)
        linked(before, stat_identity(os.fstat(file.fileno())))


def _load(adapter: TypeAdapter[T], entry: Path) -> T | None:
    """The entry's result, or None when it is missing, unreadable, a file no longer matches its digest, or a path
    in it is neither a file the entry lists nor a folder holding one (a result from a shared bucket could
    otherwise make a build read, and sign into a bundle, any file of this machine, or name a file that is not
    there, and fail every later build). A loaded entry's ``result.json`` gets a new modification time:
    ``prune`` removes the least recently used."""
    try:
        recorded = json.loads((entry / _RESULT).read_text(encoding="utf-8"))
        files = recorded["files"]
        if any(file_sha256(entry / rel) != sha256 for rel, sha256 in files.items()):
            return None
        result = adapter.validate_python(_absolute(recorded["result"], entry))
        held = {entry / rel for rel in files}
        folders = {folder for path in held for folder in path.parents if folder.is_relative_to(entry)}
        if not all(".." not in path.parts and (path in held or path in folders) for path in _paths(result)):
            return None
        os.utime(entry / _RESULT)
        return result
    except (OSError, ValueError, KeyError, TypeError, ValidationError):
        return None


def _paths(value: Any) -> Iterator[Path]:
    """Every path in a stage's result (dataclasses, tuples and mappings of them; a training output's files)."""
    if isinstance(value, Path):
        yield value
    elif isinstance(value, TrainingOutput):
        yield value.root
        yield from (value.root / rel for rel in value.files)
    elif dataclasses.is_dataclass(value):
        for item in dataclasses.fields(value):
            yield from _paths(getattr(value, item.name))
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _paths(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _paths(item)


@dataclass(frozen=True)
class EntryInfo:
    stage: str
    path: Path
    size: int
    used: float
    """When it was last built or reused (seconds since the epoch)."""


def entries(root: Path) -> list[EntryInfo]:
    """Every published entry of the cache at ``root``, least recently used first."""
    found = []
    for result in root.glob(f"*/*/{_RESULT}"):
        entry = result.parent
        if entry.name.startswith("."):
            continue
        size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
        found.append(EntryInfo(stage=entry.parent.name, path=entry, size=size, used=result.stat().st_mtime))
    return sorted(found, key=lambda e: e.used)


def prune(root: Path, max_size: int) -> list[EntryInfo]:
    """Remove the least recently used entries until the cache holds at most ``max_size`` bytes.

    Each removal is a rename out of sight under the stage's publish lock, so a build never sees half an entry;
    a build that was about to reuse a removed entry builds it again. :return: what was removed.
    """
    found = entries(root)
    total = sum(e.size for e in found)
    removed = []
    for entry in found:
        if total <= max_size:
            break
        with locks.held(entry.path.parent / _PUBLISH_LOCK):
            trash = Path(tempfile.mkdtemp(prefix=_TRASH, dir=entry.path.parent))
            os.replace(entry.path, trash / "entry")
            shutil.rmtree(trash, ignore_errors=True)
        total -= entry.size
        removed.append(entry)
    return removed


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != locks.OWNER)


def _relative(value: Any, prefix: str) -> Any:
    if isinstance(value, str) and value.startswith(prefix):
        return _ENTRY_PREFIX + value[len(prefix):]
    if isinstance(value, dict):
        return {k: _relative(v, prefix) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v, prefix) for v in value]
    return value


def _absolute(value: Any, entry: Path) -> Any:
    if isinstance(value, str) and value.startswith(_ENTRY_PREFIX):
        return str(entry / value[len(_ENTRY_PREFIX):])
    if isinstance(value, dict):
        return {k: _absolute(v, entry) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolute(v, entry) for v in value]
    return value
