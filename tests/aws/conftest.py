"""What the deploy tests share: a published, signed bundle on moto, and a Greengrass v1 group with its core."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from deeplens_build import testing

BUCKET = "deeplens-greengrass-artifacts"


@pytest.fixture
def bundle(aws: str, tmp_path: Path, onnx_model_dir: Path) -> Path:
    return published_bundle(tmp_path, onnx_model_dir)


def published_bundle(tmp_path: Path, source: Path, **tables: object) -> Path:
    """A bundle with v1 and v2 documents and a Lambda published on moto, signed by a key beside the project."""
    role = boto3.client("iam").create_role(RoleName="r", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    greengrass = {"format": "both", "thing_name": "deeplens_abc", **tables.pop("greengrass", {})}
    config = testing.write_project(tmp_path / "project", source=source, greengrass=greengrass, **tables)
    config.write_text(config.read_text().replace('handler = "inference.handler"',
                                                 f'handler = "inference.handler"\nrole = "{role}"'))
    key = testing.signing_key(config.parent)
    return testing.build(config, key=key, publish=True).bundle


def group_with_core(name: str) -> str:
    """A Greengrass v1 group with a core, as a DeepLens registration leaves it."""
    iot, gg = boto3.client("iot"), boto3.client("greengrass")
    thing = iot.create_thing(thingName="deeplens_abc")["thingArn"]
    cert = iot.create_keys_and_certificate(setAsActive=True)["certificateArn"]
    core = gg.create_core_definition(InitialVersion={"Cores": [
        {"Id": "core", "ThingArn": thing, "CertificateArn": cert, "SyncShadow": False}]})
    group = gg.create_group(Name=name, InitialVersion={"CoreDefinitionVersionArn": core["LatestVersionArn"]})
    return group["Id"]
