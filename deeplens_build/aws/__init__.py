"""What talks to AWS or writes for it: Lambda publishing, the Greengrass documents and recipe format, deploy.
(S3 and SageMaker sources are the built-in source plugin, :mod:`deeplens_build.sources`; KMS signing is in
:mod:`deeplens_build.signing`.)"""

from __future__ import annotations

from typing import Any


def client(service: str, *, attempts: int = 5) -> Any:
    """A boto3 client for ``service`` with standard retries (throttling and 5xx). boto3 finds the credentials and
    region through its standard chain and reads ``AWS_ENDPOINT_URL`` itself (boto3 >= 1.28); imported here, when
    first needed, since it takes 0.4 s to import and set up."""
    import boto3
    from botocore.config import Config

    return boto3.client(service, config=Config(retries={"mode": "standard", "max_attempts": attempts}))
