"""Publish the inference Lambda: create or update the function, publish a version, point an alias at it.

Greengrass must reference a *published version* (``...:function:NAME:N``), never ``$LATEST``; the bundle records
that versioned ARN. The function is configured for a long-lived, pinned Greengrass Lambda: the handler returns
at once and the work runs in the module's loop.
"""

from __future__ import annotations

from collections.abc import Mapping

from deeplens_build.clients import aws_client, reason
from deeplens_build.config import LambdaConfig
from deeplens_build.errors import AwsError, ConfigError
from deeplens_build.report import Reporter
from deeplens_build.values import LambdaPackage, PublishedLambda


def require_role(config: LambdaConfig) -> str:
    """The Lambda's execution role, which publishing needs: checked before a build starts, not after it.

    :raises ConfigError: naming the setting.
    """
    if not config.role:
        raise ConfigError("publishing the Lambda needs `lambda.role`, the ARN of its execution role")
    return config.role


def publish_lambda(package: LambdaPackage, config: LambdaConfig, *, environment: Mapping[str, str],
                   reporter: Reporter) -> PublishedLambda:
    """Create or update ``package.name`` from the zip, publish a version, and move ``config.alias`` to it."""
    from botocore.exceptions import BotoCoreError, ClientError

    role = require_role(config)
    client = aws_client("lambda")
    code = package.path.read_bytes()
    settings = {"Role": role, "Handler": package.handler, "Runtime": config.runtime,
                "MemorySize": config.memory_size, "Timeout": config.timeout,
                "Environment": {"Variables": dict(environment)},
                "Description": f"deeplens-build {package.version}"}
    try:
        try:
            client.get_function(FunctionName=package.name)
        except client.exceptions.ResourceNotFoundException:
            reporter.step(f"lambda: creating {package.name}")
            client.create_function(FunctionName=package.name, Code={"ZipFile": code}, Publish=False, **settings)
        else:
            reporter.step(f"lambda: updating {package.name}")
            client.update_function_code(FunctionName=package.name, ZipFile=code, Publish=False)
            client.get_waiter("function_updated_v2").wait(FunctionName=package.name)
            client.update_function_configuration(FunctionName=package.name, **settings)
        client.get_waiter("function_updated_v2").wait(FunctionName=package.name)
        published = client.publish_version(FunctionName=package.name, Description=package.version)
        version = published["Version"]
        try:
            alias = client.update_alias(FunctionName=package.name, Name=config.alias, FunctionVersion=version)
        except client.exceptions.ResourceNotFoundException:
            alias = client.create_alias(FunctionName=package.name, Name=config.alias, FunctionVersion=version)
    except (ClientError, BotoCoreError) as exc:
        raise AwsError(f"publishing Lambda {package.name} failed: {reason(exc)}") from exc
    # built from the version number, so the bundle can never reference $LATEST
    arn = f"{published['FunctionArn'].split(':function:')[0]}:function:{package.name}:{version}"
    reporter.step(f"lambda: published {arn} (alias {config.alias})")
    return PublishedLambda(name=package.name, version=version, arn=arn, alias=config.alias,
                           alias_arn=alias["AliasArn"])
