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


def reason(exc: BaseException) -> str:
    """What an AWS call's failure says, in one line: the service's code and message. An endpoint that is not the
    service (a proxy, a local stand-in without it) answers with an HTML page, which is said as such, not shown."""
    text = " ".join(str(exc).split())
    if "<html" in text.lower() or "<!doctype" in text.lower():
        operation = getattr(exc, "operation_name", None) or "the request"
        return (f"the endpoint answered {operation} with an HTML page, not the service's API (check AWS_ENDPOINT_URL "
                "and the region: the service may not be there)")
    return text[:300] + ("…" if len(text) > 300 else "")
