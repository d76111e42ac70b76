"""Deploy a verified bundle: upload its artifacts to S3, then register and deploy the Greengrass component.

Nothing is registered until every upload has succeeded, so a failed deploy never leaves a component (or a v1
group version) pointing at missing artifacts; the error says what was uploaded. Objects already in S3 with the
same sha256 are skipped. S3 transfers are boto3's managed multipart uploads with its standard retry mode.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deeplens_build.aws import greengrass
from deeplens_build.bundle import require_signer, unpack_bundle
from deeplens_build.clients import aws_client, reason
from deeplens_build.digest import file_sha256
from deeplens_build.errors import AwsError, UsageError
from deeplens_build.manifest import (
    GREENGRASS_DIR,
    RECIPE,
    V1_DEFINITIONS,
    V1_MODEL_ARCHIVE,
    infer_topic,
    v1_definition,
)
from deeplens_build.report import Reporter

_TARGET = re.compile(r"^(?P<kind>thing|thing-group):(?P<name>[A-Za-z0-9_:.-]+)$")
SHA256_METADATA = "sha256"
RECIPE_DIGEST_TAG = "deeplens-build:recipe-sha256"
"""The tag on a component version that records its recipe's sha256 (see :func:`_register_component`)."""


@dataclass(frozen=True)
class Target:
    kind: str
    name: str

    @property
    def topic(self) -> str:
        return infer_topic(self.name if self.kind == "thing" else "+")


@dataclass(frozen=True)
class Rollout:
    """The IoT job rollout of a v2 deployment: how fast, and when to stop."""

    maximum_per_minute: int = 10
    abort_failure_percent: float = 10.0
    abort_min_executed: int = 1


@dataclass(frozen=True)
class Deployment:
    deployment_id: str
    format: str
    target: Target
    topic: str
    uploaded: tuple[str, ...]
    skipped: tuple[str, ...]
    component: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Clients:
    """The AWS clients a deploy uses; tests replace one (greengrassv2, which moto lacks) with a stubbed client."""

    s3: Any = None
    iot: Any = None
    greengrass: Any = None
    greengrassv2: Any = None
    sts: Any = None
    kinesisvideo: Any = None

    def __post_init__(self) -> None:
        for name in ("s3", "iot", "greengrass", "greengrassv2", "sts", "kinesisvideo"):
            if getattr(self, name) is None:
                setattr(self, name, aws_client(name, attempts=8))


def parse_target(text: str) -> Target:
    match = _TARGET.match(text)
    if not match:
        raise UsageError(f"--target {text!r} is not thing:NAME or thing-group:NAME")
    return Target(match["kind"], match["name"])


def deploy(bundle: Path, target: Target, *, fmt: str, rollout: Rollout, clients: Clients, reporter: Reporter,
           public_key: Path | None = None, allow_any_signer: bool = False, workdir: Path) -> Deployment:
    """Verify ``bundle``, upload what ``fmt`` needs, then register and deploy it to ``target``.

    :param allow_any_signer: deploy a bundle verified against its own embedded key only; without it, and
        without ``public_key``, the bundle is refused.
    """
    require_signer("deploy sends the bundle's code to devices", public_key, allow_any_signer, reporter)
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="deploy-", dir=workdir) as scratch:
        # refuses a changed, unsigned or foreign bundle before anything is uploaded
        manifest = unpack_bundle(bundle, Path(scratch) / "bundle", public_key).manifest
        needed = RECIPE if fmt == "v2" else v1_definition(V1_DEFINITIONS[0])
        if needed not in manifest.greengrass.documents:
            raise UsageError(f"{bundle.name} has no Greengrass {fmt} documents (it was built with greengrass.format "
                             f"= {manifest.greengrass.format!r}); rebuild it or deploy with --format "
                             f"{'v1' if fmt == 'v2' else 'v2'}")
        files = {entry.path: Path(scratch) / "bundle" / entry.path for entry in manifest.files}
        if manifest.kinesis is not None:
            _ensure_stream(clients, manifest.kinesis.stream, manifest.kinesis.retention_hours, reporter)
        if fmt == "v2":
            recipe = json.loads(files[RECIPE].read_text())
            uploads = {a["Uri"]: _by_name(files, a["Uri"]) for a in recipe["Manifests"][0]["Artifacts"]}
            uploaded, skipped = _upload_all(clients.s3, uploads, reporter)
            return _deploy_v2(clients, recipe, files[RECIPE], target, rollout, uploaded, skipped)
        definitions = {name: json.loads(files[v1_definition(name)].read_text()) for name in V1_DEFINITIONS}
        uri = definitions["resource-definition"]["Resources"][0]["ResourceDataContainer"][
            "S3MachineLearningModelResourceData"]["S3Uri"]
        uploaded, skipped = _upload_all(clients.s3, {uri: files[V1_MODEL_ARCHIVE]}, reporter)
        return _deploy_v1(clients, definitions, target, uploaded, skipped)


def _ensure_stream(clients: Clients, name: str, retention_hours: int, reporter: Reporter) -> None:
    """Create the Kinesis Video stream the device streams to, unless it exists (a redeploy keeps it)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        clients.kinesisvideo.describe_stream(StreamName=name)
        reporter.step(f"kinesis video: stream {name} exists")
        return
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
            raise AwsError(f"cannot look up Kinesis Video stream {name}: {reason(exc)}") from exc
    except BotoCoreError as exc:
        raise AwsError(f"cannot look up Kinesis Video stream {name}: {reason(exc)}") from exc
    try:
        clients.kinesisvideo.create_stream(StreamName=name, DataRetentionInHours=retention_hours)
    except (ClientError, BotoCoreError) as exc:
        raise AwsError(f"cannot create Kinesis Video stream {name}: {reason(exc)}") from exc
    reporter.step(f"kinesis video: created stream {name} ({retention_hours} h retention)")


def _by_name(files: Mapping[str, Path], uri: str) -> Path:
    name = uri.rsplit("/", 1)[-1]
    return next(path for arc, path in files.items() if path.name == name and not arc.startswith(GREENGRASS_DIR))


def _upload_all(s3: Any, uploads: Mapping[str, Path], reporter: Reporter) -> tuple[tuple[str, ...], tuple[str, ...]]:
    from boto3.exceptions import S3UploadFailedError
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    transfer = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20)
    uploaded: list[str] = []
    skipped: list[str] = []
    for uri, path in sorted(uploads.items()):
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        sha256 = file_sha256(path)
        try:
            try:
                head = s3.head_object(Bucket=bucket, Key=key)
                if head.get("Metadata", {}).get(SHA256_METADATA) == sha256:
                    skipped.append(uri)
                    continue
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                    raise
            with reporter.progress(total=path.stat().st_size, desc=f"upload {path.name}") as bar:
                s3.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {SHA256_METADATA: sha256}},
                               Config=transfer, Callback=bar.update)
        except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
            done = ", ".join(uploaded) or "nothing"
            if "NoSuchBucket" in str(exc):
                raise AwsError(f"bucket {bucket!r} does not exist; create it (aws s3 mb s3://{bucket}), or set "
                               "`greengrass.bucket` to one that does and build again (the recipe holds its artifacts' "
                               f"S3 addresses). Uploaded so far: {done}; nothing was registered") from exc
            raise AwsError(f"uploading {uri} failed ({reason(exc)}); uploaded so far: {done}. Nothing was registered; "
                           "run deploy again (uploaded files are skipped)") from exc
        uploaded.append(uri)
        reporter.step(f"uploaded {uri}")
    return tuple(uploaded), tuple(skipped)


def _target_arn(iot: Any, target: Target) -> str:
    from botocore.exceptions import ClientError

    try:
        if target.kind == "thing":
            return iot.describe_thing(thingName=target.name)["thingArn"]
        return iot.describe_thing_group(thingGroupName=target.name)["thingGroupArn"]
    except ClientError as exc:
        raise AwsError(f"{target.kind} {target.name!r} was not found in AWS IoT ({reason(exc)}); "
                       "check --target") from exc


def _deploy_v2(clients: Clients, recipe: Mapping[str, Any], recipe_file: Path, target: Target, rollout: Rollout,
               uploaded: tuple[str, ...], skipped: tuple[str, ...]) -> Deployment:
    from botocore.exceptions import BotoCoreError, ClientError

    target_arn = _target_arn(clients.iot, target)
    name, version = recipe["ComponentName"], recipe["ComponentVersion"]
    try:
        reused = _register_component(clients, name, version, recipe_file)
        answer = clients.greengrassv2.create_deployment(
            targetArn=target_arn,
            deploymentName=f"{name}-{version}",
            components={name: {"componentVersion": version}},
            iotJobConfiguration={
                "jobExecutionsRolloutConfig": {"maximumPerMinute": rollout.maximum_per_minute},
                "abortConfig": {"criteriaList": [{
                    "failureType": "FAILED", "action": "CANCEL",
                    "thresholdPercentage": rollout.abort_failure_percent,
                    "minNumberOfExecutedThings": rollout.abort_min_executed}]},
            },
        )
    except (ClientError, BotoCoreError) as exc:
        raise AwsError(f"registering or deploying component {name} {version} failed: {reason(exc)}") from exc
    return Deployment(deployment_id=answer["deploymentId"], format="v2", target=target, topic=target.topic,
                      uploaded=uploaded, skipped=skipped, component=f"{name} {version}",
                      extra={"component_reused": reused})


def _register_component(clients: Clients, name: str, version: str, recipe_file: Path) -> bool:
    """Create the component version, or reuse it when the same recipe is already registered under it.

    Greengrass refuses a second ``create_component_version`` for an existing version (ConflictException), so a
    redeploy (another thing group, a retry after a failed rollout) looks it up first. The recipe's sha256 is
    recorded in a tag when the version is created and compared when it exists: the same recipe is reused, a
    different one under the same version is the owner's mistake to fix.

    :return: whether an existing version was reused.
    """
    from botocore.exceptions import ClientError

    digest = file_sha256(recipe_file)
    arn = _component_version_arn(clients, name, version)
    try:
        existing = clients.greengrassv2.describe_component(arn=arn)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
            raise
        clients.greengrassv2.create_component_version(inlineRecipe=recipe_file.read_bytes(),
                                                      tags={RECIPE_DIGEST_TAG: digest})
        return False
    if existing.get("tags", {}).get(RECIPE_DIGEST_TAG) != digest:
        raise AwsError(f"component {name} version {version} is already registered with a different recipe; "
                       "component versions cannot change: bump `model.version` in deeplens.toml and build again")
    return True


def _component_version_arn(clients: Clients, name: str, version: str) -> str:
    identity = clients.sts.get_caller_identity()
    partition = identity["Arn"].split(":")[1]
    region = clients.greengrassv2.meta.region_name
    return f"arn:{partition}:greengrass:{region}:{identity['Account']}:components:{name}:versions:{version}"


def _deploy_v1(clients: Clients, definitions: Mapping[str, Any], target: Target, uploaded: tuple[str, ...],
               skipped: tuple[str, ...]) -> Deployment:
    from botocore.exceptions import BotoCoreError, ClientError

    if target.kind != "thing-group":
        raise UsageError("Greengrass v1 deploys to a group: use --target thing-group:GROUP_NAME")
    try:
        groups = clients.greengrass.list_groups().get("Groups", [])
        group = next((g for g in groups if g.get("Name") == target.name), None)
        if group is None:
            raise AwsError(f"Greengrass v1 group {target.name!r} was not found; create it with its core first")
        version, reused = greengrass.create_v1_group_version(clients.greengrass, definitions, group["Id"])
        answer = clients.greengrass.create_deployment(GroupId=group["Id"], GroupVersionId=version,
                                                      DeploymentType="NewDeployment")
    except (ClientError, BotoCoreError) as exc:
        raise AwsError(f"deploying to Greengrass v1 group {target.name!r} failed: {reason(exc)}") from exc
    subject = definitions["subscription-definition"]["Subscriptions"][0]["Subject"]
    return Deployment(deployment_id=answer["DeploymentId"], format="v1", target=target, topic=subject,
                      uploaded=uploaded, skipped=skipped,
                      extra={"group_id": group["Id"], "group_version": version, "group_version_reused": reused})
