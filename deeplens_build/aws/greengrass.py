"""The Greengrass documents a bundle carries: what a core needs to run the model, its runtime and the Lambda.

- v2: a component recipe (RecipeFormatVersion 2020-01-25) whose artifacts carry the sha256 (base64) of the
  bundle's files, and whose lifecycle (:mod:`.lifecycle`) installs the runtime in a virtual environment of the
  component's work folder and runs the Lambda's loop there.
- v1 (DeepLens-era cores): function, resource (the model as an S3 machine-learning resource) and subscription
  definitions, which :func:`create_v1_group_version` registers and ties into a group version.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deeplens_build.aws import lifecycle
from deeplens_build.aws import recipe as recipe_format
from deeplens_build.config import PreprocessConfig, ProjectConfig
from deeplens_build.device import support
from deeplens_build.digest import file_sha256, json_sha256
from deeplens_build.manifest import (
    DEVICE_BUILD,
    MODEL_DIR_VARIABLE,
    PREPROCESS_VARIABLE,
    WORK_DIR_VARIABLE,
    infer_topic,
)
from deeplens_build.values import LambdaPackage, PublishedLambda, Runtime

ARCHITECTURES = {"linux-x86_64": "amd64", "linux-aarch64": "aarch64"}
MODEL_RESOURCE_ID = "deeplens-model"
TOKEN_EXCHANGE = "aws.greengrass.TokenExchangeService"
"""The nucleus component that hands a component AWS credentials (for the KVS producer)."""


def component_name(config: ProjectConfig) -> str:
    return config.greengrass.component or f"com.deeplens.{config.model.name}"


def lambda_environment(config: ProjectConfig) -> dict[str, str]:
    """The Lambda's environment wherever it runs: where the model is, plus the project's own variables."""
    return {MODEL_DIR_VARIABLE: config.greengrass.model_path, **project_environment(config)}


def project_environment(config: ProjectConfig) -> dict[str, str]:
    """The variables the project gives its Lambda: ``[lambda] environment``, after ``DEEPLENS_PREPROCESS`` when
    ``[calibration.preprocess]`` is not ``deeplens_preprocess``'s default (the device then feeds the model as it
    was calibrated)."""
    preprocess = config.calibration.preprocess
    own = {} if preprocess == PreprocessConfig() else {
        PREPROCESS_VARIABLE: json.dumps(preprocess.model_dump(mode="json"), sort_keys=True)}
    return {**own, **config.lambda_.environment}


def artifact_uri(config: ProjectConfig, name: str) -> str:
    """Where ``deeplens-build deploy`` uploads a bundle file: one S3 prefix per component version."""
    g = config.greengrass
    return f"s3://{g.bucket}/{g.prefix}/{component_name(config)}/{config.model.version}/{name}"


def recipe(config: ProjectConfig, *, artifacts: Mapping[str, Path], runtime: Runtime,
           pins: Mapping[str, tuple[str, ...]], vendored: bool, lambda_pkg: LambdaPackage,
           environment: Mapping[str, str]) -> dict[str, Any]:
    """A v2 component recipe running the inference Lambda's code as a plain, long-lived component.

    :param artifacts: file name on the device → file, for every artifact (names are flat on the device).
    :param pins: the runtime's exact requirements per device Python the bundle supports (see :mod:`lifecycle`).
    """
    name = component_name(config)
    topic = infer_topic("{iot:thingName}")
    device_build = DEVICE_BUILD.rsplit("/", 1)[-1]
    compiles = device_build in artifacts
    # the target backend compiles on the device, into the work folder that outlives deployments
    bounds = config.parity.bounds_for(config.model.precision)[None]
    steps = lifecycle.scripts(
        pins=pins, vendored=vendored, code_dir="{artifacts:decompressedPath}/" + lambda_pkg.path.stem,
        module=lambda_pkg.handler.rsplit(".", 1)[0], runner=support.RUNNER.name,
        compile_step=f"{{artifacts:path}}/{device_build} {{artifacts:path}} {{work:path}} {bounds.tolerance!r} "
                     f"{bounds.rtol!r}" if compiles else None, kvs_stream=config.device.kinesis_video_stream)
    setenv = {MODEL_DIR_VARIABLE: "{artifacts:path}", WORK_DIR_VARIABLE: "{work:path}", **environment}
    dependencies = {}
    if stream := config.device.kinesis_video_stream:
        # DeepLens_Kinesis_Video streams through the KVS producer's GStreamer element, with the core's credentials
        setenv["DEEPLENS_KVS_STREAM"] = stream
        dependencies[TOKEN_EXCHANGE] = {"VersionRequirement": ">=2.0.0", "DependencyType": "HARD"}
    return recipe_format.checked({
        "RecipeFormatVersion": recipe_format.RECIPE_FORMAT,
        "ComponentName": name,
        "ComponentVersion": config.model.version,
        "ComponentDescription": f"{config.model.name}: {runtime.summary} and its inference loop",
        "ComponentPublisher": "deeplens-build",
        **({"ComponentDependencies": dependencies} if dependencies else {}),
        "ComponentConfiguration": {"DefaultConfiguration": {
            "topic": topic,
            "accessControl": {"aws.greengrass.ipc.mqttproxy": {f"{name}:mqttproxy:1": {
                "policyDescription": "Publish inference results to the device's infer topic",
                "operations": ["aws.greengrass#PublishToIoTCore"],
                "resources": [topic],
            }}},
        }},
        "Manifests": [{
            "Platform": {"os": "linux", "architecture": ARCHITECTURES[config.target.platform]},
            "Lifecycle": {
                "Setenv": setenv,
                "Install": {"Script": steps.install, "Timeout": 3600 if compiles else 900},
                "Run": {"Script": steps.run},
            },
            "Artifacts": [{
                "Uri": artifact_uri(config, file_name),
                "Digest": digest_b64(path),
                "Algorithm": "SHA-256",
                "Unarchive": "ZIP" if path == lambda_pkg.path else "NONE",
            } for file_name, path in sorted(artifacts.items())],
        }],
    })


def v1_definitions(config: ProjectConfig, published: PublishedLambda, *,
                   model_archive: Path) -> dict[str, dict[str, Any]]:
    """Function, resource and subscription definitions for a Greengrass v1 (DeepLens-era) group."""
    thing = config.greengrass.thing_name  # required with v1 by the config itself
    return {
        "function-definition": {"Functions": [{
            "Id": published.name,
            "FunctionArn": published.arn,
            "FunctionConfiguration": {
                "Pinned": True,  # long-lived: the loop runs for as long as the core does
                "Timeout": config.lambda_.timeout,
                "MemorySize": config.lambda_.memory_size * 1024,  # v1 counts in KB
                "EncodingType": "json",
                "Environment": {
                    "Variables": lambda_environment(config),
                    "AccessSysfs": True,
                    "ResourceAccessPolicies": [{"ResourceId": MODEL_RESOURCE_ID, "Permission": "ro"}],
                },
            },
        }]},
        "resource-definition": {"Resources": [{
            "Id": MODEL_RESOURCE_ID,
            "Name": config.model.name,
            "ResourceDataContainer": {"S3MachineLearningModelResourceData": {
                "S3Uri": artifact_uri(config, model_archive.name),
                "DestinationPath": config.greengrass.model_path,
            }},
        }]},
        "subscription-definition": {"Subscriptions": [{
            "Id": "inference-to-cloud",
            "Source": published.arn,
            "Subject": infer_topic(thing),
            "Target": "cloud",
        }]},
    }


def create_v1_group_version(client: Any, definitions: Mapping[str, Mapping[str, Any]],
                            group_id: str) -> tuple[str, bool]:
    """Register the v1 definitions with ``client`` (boto3 greengrass) and tie them into a new group version, or
    reuse the group's latest version when it was built from these same definitions (a redeploy).

    The group's current core, device, logger and connector definitions are carried over: a group version
    replaces every definition, and a group without its core cannot be deployed. The function definition is
    named after the definitions' digest, which is how a later deploy recognises them.

    :return: the group version, and whether it was reused.
    """
    marker = f"deeplens-build-{json_sha256(definitions)[:32]}"
    kept: dict[str, str] = {}
    latest = client.get_group(GroupId=group_id).get("LatestVersion")
    if latest:
        current = client.get_group_version(GroupId=group_id, GroupVersionId=latest).get("Definition", {})
        functions = current.get("FunctionDefinitionVersionArn", "")
        if "/functions/" in functions:
            function_id = functions.split("/functions/", 1)[1].split("/", 1)[0]
            if client.get_function_definition(FunctionDefinitionId=function_id).get("Name") == marker:
                return latest, True
        kept = {k: v for k, v in current.items() if k in (
            "CoreDefinitionVersionArn", "DeviceDefinitionVersionArn", "LoggerDefinitionVersionArn",
            "ConnectorDefinitionVersionArn")}
    function = client.create_function_definition(Name=marker, InitialVersion=definitions["function-definition"])
    resource = client.create_resource_definition(InitialVersion=definitions["resource-definition"])
    subscription = client.create_subscription_definition(InitialVersion=definitions["subscription-definition"])
    version = client.create_group_version(
        GroupId=group_id,
        **kept,
        FunctionDefinitionVersionArn=function["LatestVersionArn"],
        ResourceDefinitionVersionArn=resource["LatestVersionArn"],
        SubscriptionDefinitionVersionArn=subscription["LatestVersionArn"],
    )
    return version["Version"], False


def digest_b64(path: Path) -> str:
    """The artifact digest Greengrass checks: base64 of the raw sha256."""
    return base64.b64encode(bytes.fromhex(file_sha256(path))).decode()
