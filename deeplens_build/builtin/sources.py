"""The built-in source kinds: local paths, ``s3://BUCKET/KEY`` and ``sagemaker-job:NAME``.

A source plugin like any third party's: it imports only the package's public face, and the core's own
distribution registers it through the ``deeplens_build`` entry-point group. S3 and SageMaker use boto3's
standard credential chain and honour ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import re
from pathlib import Path

from deeplens_build import (
    AwsError,
    ConversionError,
    SageMakerJob,
    SourceContext,
    SourceError,
    SourceKind,
    TrainingOutput,
    aws_client,
    hookimpl,
    onnxtools,
)

BUCKET_PREFIX = "deeplens"
SAGEMAKER_PREFIX = "sagemaker-job:"
_S3_URI = re.compile(r"^s3://(?P<bucket>[^/]+)/(?P<key>.+)$")
_FRAMEWORK_HINTS = ("mxnet", "tensorflow", "pytorch", "caffe", "onnx", "xgboost", "sklearn")


def local(source: str, context: SourceContext) -> TrainingOutput:
    """A folder, an archive or a single model file on this machine."""
    path = Path(source).expanduser()
    if path.is_dir():
        return context.from_folder(path, origin=path.name)
    if path.is_file():
        return context.from_file(path, origin=path.name, companions=_external_data(path))
    if path.exists():
        raise SourceError(f"source {source!r} is not a regular file or folder (a device, FIFO or socket); "
                          "give a folder, a model.tar.gz or a model file")
    raise SourceError(f"source {source!r} does not exist; give a folder, a model.tar.gz, an s3://BUCKET/KEY URI "
                      "or sagemaker-job:NAME")


def _external_data(path: Path) -> tuple[str, ...]:
    """The data files an ONNX model file's weights live in (``torch.onnx.export(dynamo=True)`` writes
    ``model.onnx.data`` beside ``model.onnx``): a lone model file brings them along, from its own folder only."""
    if path.suffix.lower() != ".onnx":
        return ()
    try:
        locations = onnxtools.external_locations(onnxtools.load(path, weights=False, check=False))
    except ConversionError:
        return ()  # not a model: the plugin that claims it says what is wrong
    folder = path.parent.resolve()
    for location in locations:
        found = (path.parent / location).resolve()
        if not found.is_relative_to(folder) or Path(location).is_absolute():
            raise SourceError(f"{path.name} keeps its weights in {location!r}, outside its folder; put the data "
                              "file beside the model (torch.onnx.export writes it there)")
        if not found.is_file():
            raise SourceError(f"{path.name} keeps its weights in {location}, which is not beside it: copy that "
                              f"file next to {path.name}, or give their folder as the source")
    return tuple(locations)


@hookimpl
def deeplens_build_sources() -> list[SourceKind]:
    return [
        SourceKind(name="local", prefixes=(), summary="a folder, a model.tar.gz or a model file", fetch=local),
        SourceKind(name="s3", prefixes=("s3://",), summary="s3://BUCKET/KEY (a model.tar.gz or a model file)",
                   fetch=_s3_object),
        SourceKind(name="sagemaker-job", prefixes=(SAGEMAKER_PREFIX,),
                   summary="sagemaker-job:NAME (the job's ModelArtifacts.S3ModelArtifacts)", fetch=_training_job),
    ]


def _s3_object(source: str, context: SourceContext) -> TrainingOutput:
    match = _S3_URI.match(source)
    if not match:
        raise SourceError(f"{source!r} is not an S3 object URI; use s3://BUCKET/KEY")
    path = _download(match["bucket"], match["key"], context)
    return context.from_file(path, kind="s3", origin=source)


def _download(bucket: str, key: str, context: SourceContext) -> Path:
    from botocore.exceptions import BotoCoreError, ClientError

    reporter = context.reporter
    if not bucket.startswith(BUCKET_PREFIX):
        reporter.warn(f"bucket {bucket!r} does not start with {BUCKET_PREFIX!r}: the default DeepLens service "
                      "policies cannot read it, so a device deploy from it needs extra permissions")
    s3 = aws_client("s3")
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

    path, cached = context.stored("download", {"uri": uri, "etag": head.get("ETag"), "size": head["ContentLength"]},
                                  download)
    if cached:
        reporter.step(f"source: {uri} already downloaded (cache, same ETag)")
    return path


def _training_job(source: str, context: SourceContext) -> TrainingOutput:
    from botocore.exceptions import BotoCoreError, ClientError

    name = source.removeprefix(SAGEMAKER_PREFIX)
    try:
        job = aws_client("sagemaker").describe_training_job(TrainingJobName=name)
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
    context.reporter.step(f"source: training job {name} → {artifact}")
    path = _download(match["bucket"], match["key"], context)
    return context.from_file(path, kind="sagemaker-job", origin=source, sagemaker=record)

