"""S3 and SageMaker sources, and KMS signing, against moto running as an HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import boto3
import pytest
from helpers import cli, error_line, package_json

from deeplens_build import testing


@pytest.fixture
def model_tar(tmp_path: Path, onnx_model_dir: Path) -> Path:
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("model.onnx", "labels.txt"):
            tar.add(onnx_model_dir / name, arcname=name)
    return archive


def _upload(bucket: str, key: str, path: Path) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(path), bucket, key)


def test_packages_an_s3_model_tar_gz(aws: str, tmp_path: Path, model_tar: Path) -> None:
    _upload("deeplens-models", "jobs/run-1/output/model.tar.gz", model_tar)
    config = testing.write_project(tmp_path / "p", source="s3://deeplens-models/jobs/run-1/output/model.tar.gz")
    report = package_json(config)
    manifest = testing.verify(Path(report["bundle"])).manifest.to_dict()
    assert manifest["source"]["kind"] == "s3"
    assert manifest["source"]["origin"] == "s3://deeplens-models/jobs/run-1/output/model.tar.gz"
    assert report["warnings"] == []

    again = package_json(config)
    assert again["sha256"] == report["sha256"]


def test_warns_about_a_bucket_the_deeplens_policies_cannot_read(aws: str, tmp_path: Path, model_tar: Path) -> None:
    _upload("team-models", "model.tar.gz", model_tar)
    config = testing.write_project(tmp_path / "p", source="s3://team-models/model.tar.gz")
    report = package_json(config)
    assert len(report["warnings"]) == 1 and "bucket 'team-models' does not start with 'deeplens'" in report["warnings"][0]


def test_missing_s3_object_is_a_clear_error(aws: str, tmp_path: Path) -> None:
    boto3.client("s3").create_bucket(Bucket="deeplens-models")
    config = testing.write_project(tmp_path / "p", source="s3://deeplens-models/missing/model.tar.gz")
    message = package_json(config, expect=4)
    assert "s3://deeplens-models/missing/model.tar.gz does not exist" in message
    assert not (config.parent / "dist").exists()


def _training_job(name: str, artifact_uri: str, image: str) -> None:
    iam = boto3.client("iam")
    role = iam.create_role(RoleName="sagemaker", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    boto3.client("sagemaker").create_training_job(
        TrainingJobName=name,
        HyperParameters={"epochs": "10", "checkpoint_frequency": "10"},
        AlgorithmSpecification={"TrainingImage": image, "TrainingInputMode": "File"},
        RoleArn=role,
        OutputDataConfig={"S3OutputPath": artifact_uri.rsplit("/", 2)[0]},
        ResourceConfig={"InstanceType": "ml.m5.large", "InstanceCount": 1, "VolumeSizeInGB": 10},
        StoppingCondition={"MaxRuntimeInSeconds": 3600},
    )


def test_packages_a_sagemaker_training_job_and_records_it(aws: str, tmp_path: Path, model_tar: Path) -> None:
    image = "763104351884.dkr.ecr.us-east-1.amazonaws.com/mxnet-training:1.9.0-cpu-py38"
    _training_job("deeplens-job-1", "s3://deeplens-out/x/y", image)
    job = boto3.client("sagemaker").describe_training_job(TrainingJobName="deeplens-job-1")
    artifact = job["ModelArtifacts"]["S3ModelArtifacts"]
    bucket, key = artifact.removeprefix("s3://").split("/", 1)
    _upload(bucket, key, model_tar)

    config = testing.write_project(tmp_path / "p", source="sagemaker-job:deeplens-job-1")
    report = package_json(config)
    manifest = testing.verify(Path(report["bundle"])).manifest.to_dict()
    assert manifest["source"]["kind"] == "sagemaker-job"
    recorded = manifest["source"]["sagemaker"]
    assert recorded["name"] == "deeplens-job-1" and recorded["framework_hint"] == "mxnet"
    assert recorded["hyperparameters"] == {"epochs": "10", "checkpoint_frequency": "10"}
    assert recorded["training_image"] == image


def test_unknown_training_job_is_a_clear_error(aws: str, tmp_path: Path) -> None:
    config = testing.write_project(tmp_path / "p", source="sagemaker-job:nope")
    assert "SageMaker training job 'nope' could not be described" in package_json(config, expect=4)


def test_signs_with_an_aws_kms_key_and_verifies_against_its_public_key(aws: str, tmp_path: Path,
                                                                     onnx_model_dir: Path) -> None:
    kms = boto3.client("kms")
    key_id = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    config = testing.write_project(tmp_path / "p", source=onnx_model_dir)
    report = json.loads(cli("package", "--config", config, "--signing-key", f"kms:{key_id}", "--json").stdout)

    from cryptography.hazmat.primitives import serialization

    public = serialization.load_der_public_key(kms.get_public_key(KeyId=key_id)["PublicKey"])
    pem = tmp_path / "kms.pub.pem"
    pem.write_bytes(public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert cli("verify", report["bundle"], "--public-key", pem).stdout.startswith("verified: ")


def test_kms_key_of_the_wrong_kind_is_refused(aws: str, tmp_path: Path, onnx_model_dir: Path) -> None:
    key_id = boto3.client("kms").create_key(KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    config = testing.write_project(tmp_path / "p", source=onnx_model_dir)
    result = cli("package", "--config", config, "--signing-key", f"kms:{key_id}", expect=9)
    assert "is RSA_2048; bundles are signed with an ECC_NIST_P256 key" in error_line(result)
