"""Fetch stage: turn a source (folder, archive, ``s3://`` URI, ``sagemaker-job:NAME``) into a TrainingOutput.

Archives are extracted by :mod:`deeplens_build.archive` (regular files and folders only, plain relative
paths, no link ever followed) under size and member-count limits checked before each member is written, into
a cache folder that is renamed into place only when complete. Nothing is ever written outside the work folder.
"""

from __future__ import annotations

import lzma
import re
import shutil
import tarfile
import zlib
from pathlib import Path

from deeplens_build.archive import Extractor, UnsafeMember, check_end, header_bytes, member_parts, open_tar
from deeplens_build.cache import Cache
from deeplens_build.config import FetchConfig
from deeplens_build.digest import file_sha256, tree_sha256
from deeplens_build.errors import AwsError, SourceError
from deeplens_build.report import Reporter
from deeplens_build.types import SageMakerJob, TrainingOutput

BUCKET_PREFIX = "deeplens"
SAGEMAKER_PREFIX = "sagemaker-job:"
_S3_URI = re.compile(r"^s3://(?P<bucket>[^/]+)/(?P<key>.+)$")
_FRAMEWORK_HINTS = ("mxnet", "tensorflow", "pytorch", "caffe", "onnx", "xgboost", "sklearn")


def fetch(source: str, *, cache: Cache, limits: FetchConfig, reporter: Reporter) -> TrainingOutput:
    """Acquire ``source`` and return it as a read-only training output."""
    if source.startswith(SAGEMAKER_PREFIX):
        return _fetch_training_job(source[len(SAGEMAKER_PREFIX):], cache=cache, limits=limits, reporter=reporter)
    if match := _S3_URI.match(source):
        path = _download(match["bucket"], match["key"], cache=cache, reporter=reporter)
        return _from_file(path, kind="s3", origin=source, cache=cache, limits=limits, reporter=reporter)
    if source.startswith("s3://"):
        raise SourceError(f"{source!r} is not an S3 object URI; use s3://BUCKET/KEY")
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_directory(path)
    if path.is_file():
        return _from_file(path, kind="archive" if _is_tar(path) else "file", origin=path.name,
                          cache=cache, limits=limits, reporter=reporter)
    if path.exists():
        raise SourceError(f"source {source!r} is not a regular file or folder (a device, FIFO or socket); "
                          "give a folder, a model.tar.gz or a model file")
    raise SourceError(f"source {source!r} does not exist; give a folder, a model.tar.gz, an s3://BUCKET/KEY URI "
                      f"or {SAGEMAKER_PREFIX}NAME")


def _from_directory(path: Path, origin: str | None = None) -> TrainingOutput:
    """:param origin: how to name the source in messages, when ``path`` is an internal extraction folder."""
    files = tuple(sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                         if p.is_file() and not p.is_symlink()))
    if not files:
        raise SourceError(f"source {origin or path} holds no files; point it at the training output")
    return TrainingOutput(root=path.resolve(), files=files, sha256=tree_sha256(path, files),
                          size=sum((path / f).stat().st_size for f in files), kind="directory", origin=path.name)


def _from_file(path: Path, *, kind: str, origin: str, cache: Cache, limits: FetchConfig,
               reporter: Reporter, job: SageMakerJob | None = None) -> TrainingOutput:
    sha256 = file_sha256(path)
    archive = _is_tar(path)

    def unpack(scratch: Path) -> TrainingOutput:
        tree = scratch / "tree"
        if not archive:
            tree.mkdir()
            shutil.copyfile(path, tree / path.name)
        else:
            extract(path, tree, limits=limits, reporter=reporter, origin=origin)
        unpacked = _from_directory(tree, origin)
        return TrainingOutput(root=tree, files=unpacked.files, sha256=sha256, size=path.stat().st_size,
                              kind=kind, origin=origin)

    output, cached = cache.stage("source", {"sha256": sha256, "limits": limits.model_dump(), "archive": archive},
                                 TrainingOutput, unpack)
    if cached:
        reporter.step(f"source: {origin} already extracted (cache)")
    # the cache stores the first origin it saw for these bytes; this build names its own
    return TrainingOutput(root=output.root, files=output.files, sha256=sha256, size=output.size,
                          kind=kind, origin=origin, sagemaker=job)


_ARCHIVE_NAMES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def _is_tar(path: Path) -> bool:
    """Whether ``path`` is a tar archive; one that says it is (by name or compression) but is not is damaged.

    :raises SourceError: for a damaged or mislabelled archive, which no plugin could recognise either.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(6)
        with open_tar(path):  # not tarfile.is_tarfile: it would read a hostile first header whole
            return True
    except UnsafeMember:
        return True  # a tar archive with a hostile first header: extract() names the problem
    except (OSError, EOFError, zlib.error, lzma.LZMAError, tarfile.TarError):
        pass
    named = path.name.lower().endswith(_ARCHIVE_NAMES)
    if head.startswith(b"PK\x03\x04") and named:
        raise SourceError(f"{path.name} is a zip file, not a tar archive; pass the extracted folder, or "
                          "re-pack it with `tar -czf model.tar.gz -C FOLDER .`")
    if named or head.startswith(_COMPRESSED_MAGIC):
        raise SourceError(f"archive {path.name} is damaged or not a tar archive ({path.stat().st_size} bytes); "
                          "download it again or pass the extracted folder")
    return False


def extract(archive: Path, dest: Path, *, limits: FetchConfig, reporter: Reporter, origin: str) -> None:
    """Extract ``archive`` into ``dest`` (which must not exist), refusing anything unsafe (see :mod:`archive`).

    Header bytes count against ``fetch.max_bytes`` like file contents do, checked before each member is read.

    :raises SourceError: naming the member and the problem; ``dest`` is then removed.
    """
    total = 0
    member: tarfile.TarInfo | None = None
    try:
        with open_tar(archive) as tar, Extractor(dest) as out, \
                reporter.progress(total=None, desc=f"extract {origin}", unit="file") as bar:
            for count, member in enumerate(tar, start=1):
                total += header_bytes(member) + (member.size if member.isreg() else 0)
                if count > limits.max_members:
                    raise SourceError(f"archive {origin} has more than {limits.max_members} members; refusing to "
                                      "extract it (raise `fetch.max_members` if the archive is trusted)")
                if total > limits.max_bytes:
                    raise SourceError(f"archive {origin} expands to more than {limits.max_bytes} bytes; refusing "
                                      "to extract it (raise `fetch.max_bytes` if the archive is trusted)")
                out.add(tar, member, member_parts(member))
                bar.update(1)
            member = None
            check_end(tar)
    except UnsafeMember as exc:
        shutil.rmtree(dest, ignore_errors=True)
        which = f"member {member.name!r}" if member is not None and member.name else "the archive"
        raise SourceError(f"archive {origin}: {which} {exc}; refusing to extract it. Re-create the archive from "
                          "the training output folder with relative paths (`tar -czhf` stores files, not links).") from exc
    except OSError as exc:
        shutil.rmtree(dest, ignore_errors=True)
        if exc.errno is not None:  # the file system's refusal (disk full, read-only, ...), not the archive's fault
            raise SourceError(f"cannot extract archive {origin} into the work folder: {exc.strerror}; free space "
                              "or point `build.work_dir` elsewhere") from exc
        raise SourceError(f"archive {origin} is damaged or not a tar archive ({exc}); download it again or pass "
                          "the extracted folder") from exc
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise SourceError(f"archive {origin} is damaged or not a tar archive ({exc}); download it again or pass "
                          "the extracted folder") from exc
    except SourceError:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _aws_client(service: str):
    import boto3
    from botocore.config import Config

    # boto3 >= 1.28 reads AWS_ENDPOINT_URL itself; standard retries cover throttling and 5xx
    return boto3.client(service, config=Config(retries={"mode": "standard", "max_attempts": 5}))


def _download(bucket: str, key: str, *, cache: Cache, reporter: Reporter) -> Path:
    from botocore.exceptions import BotoCoreError, ClientError

    if not bucket.startswith(BUCKET_PREFIX):
        reporter.warn(f"bucket {bucket!r} does not start with {BUCKET_PREFIX!r}: the default DeepLens service "
                      "policies cannot read it, so a device deploy from it needs extra permissions")
    s3 = _aws_client("s3")
    uri = f"s3://{bucket}/{key}"
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NoSuchBucket"):
            raise SourceError(f"{uri} does not exist; check the bucket and key") from exc
        raise AwsError(f"cannot read {uri}: {code or exc} (check your AWS credentials and permissions)") from exc
    except BotoCoreError as exc:
        raise AwsError(f"cannot read {uri}: {exc} (check your AWS credentials, region and AWS_ENDPOINT_URL)") from exc

    def download(scratch: Path) -> Path:
        target = scratch / Path(key).name
        with reporter.progress(total=head["ContentLength"], desc=f"download {Path(key).name}") as bar:
            try:
                s3.download_file(bucket, key, str(target), Callback=bar.update)
            except (ClientError, BotoCoreError) as exc:
                raise AwsError(f"download of {uri} failed: {exc}") from exc
        return target

    path, cached = cache.stage("download", {"uri": uri, "etag": head.get("ETag"), "size": head["ContentLength"]},
                               Path, download)
    if cached:
        reporter.step(f"source: {uri} already downloaded (cache, same ETag)")
    return path


def _fetch_training_job(name: str, *, cache: Cache, limits: FetchConfig, reporter: Reporter) -> TrainingOutput:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        job = _aws_client("sagemaker").describe_training_job(TrainingJobName=name)
    except ClientError as exc:
        raise SourceError(f"SageMaker training job {name!r} could not be described: "
                          f"{exc.response.get('Error', {}).get('Message', exc)}") from exc
    except BotoCoreError as exc:
        raise AwsError(f"cannot reach SageMaker for job {name!r}: {exc}") from exc
    status = job.get("TrainingJobStatus")
    if status != "Completed":
        raise SourceError(f"SageMaker training job {name!r} is {status}, not Completed; wait for it to finish")
    artifact = job.get("ModelArtifacts", {}).get("S3ModelArtifacts", "")
    match = _S3_URI.match(artifact)
    if not match:
        raise SourceError(f"SageMaker training job {name!r} records no model artifact in S3 (got {artifact!r})")
    image = job.get("AlgorithmSpecification", {}).get("TrainingImage", "")
    record = SageMakerJob(
        name=name,
        arn=job.get("TrainingJobArn", ""),
        training_image=image,
        framework_hint=next((f for f in _FRAMEWORK_HINTS if f in image.lower()), None),
        hyperparameters=dict(job.get("HyperParameters") or {}),
    )
    reporter.step(f"source: training job {name} → {artifact}")
    path = _download(match["bucket"], match["key"], cache=cache, reporter=reporter)
    return _from_file(path, kind="sagemaker-job", origin=f"{SAGEMAKER_PREFIX}{name}", cache=cache,
                      limits=limits, reporter=reporter, job=record)

