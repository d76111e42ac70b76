"""The one boto3 client factory, on the ground floor: the shared cache, KMS signing, the built-in S3 and
SageMaker sources, Lambda publishing and deploy all make their clients here."""

from __future__ import annotations

from typing import Any


def aws_client(service: str, *, attempts: int = 5) -> Any:
    """A boto3 client for ``service`` with standard retries (throttling and 5xx). boto3 finds the credentials and
    region through its standard chain and reads ``AWS_ENDPOINT_URL`` itself (boto3 >= 1.28); imported here, when
    first needed, since it takes 0.4 s to import and set up."""
    import boto3
    from botocore.config import Config

    return boto3.client(service, config=Config(retries={"mode": "standard", "max_attempts": attempts}))
