"""`deeplens-build deploy`: S3, IoT, Lambda and Greengrass v1 on moto's HTTP server; greengrassv2 through
botocore's Stubber; an S3 endpoint that fails the first requests shows the retries and the no-half-registration
rule."""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest
from botocore.stub import ANY, Stubber
from conftest import BUCKET, group_with_core, published_bundle
from helpers import cli, error_line, open_bundle

from deeplens_build.aws.deploy import Clients, Rollout, Target, deploy
from deeplens_build.errors import AwsError, VerificationError
from deeplens_build.report import Reporter


def _v2_clients(stub_responses: bool = True) -> tuple[Clients, Stubber]:
    v2 = boto3.client("greengrassv2", region_name="us-east-1")
    stub = Stubber(v2)
    if stub_responses:
        stub.add_client_error("describe_component", "ResourceNotFoundException", http_status_code=404)
        stub.add_response("create_component_version", {
            "componentName": "com.deeplens.deeplens-test-model", "componentVersion": "1.0.0",
            "creationTimestamp": "2026-11-28T00:00:00Z", "status": {"componentState": "REQUESTED"}})
        stub.add_response("create_deployment", {"deploymentId": "deployment-1"})
    stub.activate()
    return Clients(greengrassv2=v2), stub


def _deploy(bundle: Path, target: Target, clients: Clients, tmp_path: Path, fmt: str = "v2"):
    return deploy(bundle, target, fmt=fmt, rollout=Rollout(maximum_per_minute=5, abort_failure_percent=20),
                  clients=clients, reporter=Reporter(quiet=True), workdir=tmp_path / "work",
                  public_key=tmp_path / "project" / "signing-key.pub.pem")


def test_v2_uploads_then_registers_and_deploys_to_a_thing(bundle: Path, tmp_path: Path) -> None:
    boto3.client("iot").create_thing(thingName="deeplens_abc")
    clients, stub = _v2_clients()
    result = _deploy(bundle, Target("thing", "deeplens_abc"), clients, tmp_path)
    stub.assert_no_pending_responses()
    assert result.deployment_id == "deployment-1" and result.topic == "$aws/things/deeplens_abc/infer"
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert {k.rsplit("/", 1)[-1] for k in keys} == {"model.onnx", "model.onnx.data", "labels.txt",
                                                    "deeplens_model.py", "deeplens-test-model.zip"}
    assert len(result.uploaded) == 5 and result.skipped == ()

    again, stub = _v2_clients()
    second = _deploy(bundle, Target("thing", "deeplens_abc"), again, tmp_path)
    assert second.uploaded == () and len(second.skipped) == 5, "same sha256 already in S3: skipped"


RECIPE_ARN = "arn:aws:greengrass:us-east-1:123456789012:components:com.deeplens.deeplens-test-model:versions:1.0.0"


def test_deploying_one_bundle_twice_to_two_targets_registers_one_component_version(bundle: Path,
                                                                                   tmp_path: Path) -> None:
    """greengrassv2 is a Stubber (moto has none): it checks each request's shape against the service model."""
    iot = boto3.client("iot")
    iot.create_thing(thingName="deeplens_abc")
    iot.create_thing_group(thingGroupName="deeplens-fleet")
    recipe = json.loads(_bundle_member(bundle, "greengrass/recipe.json"))
    digest = hashlib.sha256(_bundle_member(bundle, "greengrass/recipe.json")).hexdigest()
    v2 = boto3.client("greengrassv2", region_name="us-east-1")
    stub = Stubber(v2)
    stub.add_client_error("describe_component", "ResourceNotFoundException", http_status_code=404,
                          expected_params={"arn": RECIPE_ARN})
    stub.add_response("create_component_version", {
        "componentName": recipe["ComponentName"], "componentVersion": "1.0.0",
        "creationTimestamp": "2026-11-28T00:00:00Z", "status": {"componentState": "REQUESTED"}},
        expected_params={"inlineRecipe": ANY, "tags": {"deeplens-build:recipe-sha256": digest}})
    stub.add_response("create_deployment", {"deploymentId": "deployment-1"})
    for deployment in ("deployment-2", "deployment-3"):  # the second target, then a retry: no new version
        stub.add_response("describe_component", {"arn": RECIPE_ARN, "tags": {"deeplens-build:recipe-sha256": digest}},
                          expected_params={"arn": RECIPE_ARN})
        stub.add_response("create_deployment", {"deploymentId": deployment})
    stub.activate()
    clients = Clients(greengrassv2=v2)
    targets = (("thing", "deeplens_abc"), ("thing-group", "deeplens-fleet"), ("thing", "deeplens_abc"))
    results = [_deploy(bundle, Target(kind, name), clients, tmp_path) for kind, name in targets]
    stub.assert_no_pending_responses()
    assert [r.extra["component_reused"] for r in results] == [False, True, True]
    assert [r.deployment_id for r in results] == ["deployment-1", "deployment-2", "deployment-3"]


def test_a_different_recipe_under_the_same_version_says_to_bump_it(bundle: Path, tmp_path: Path) -> None:
    boto3.client("iot").create_thing(thingName="deeplens_abc")
    v2 = boto3.client("greengrassv2", region_name="us-east-1")
    stub = Stubber(v2)
    stub.add_response("describe_component", {"arn": RECIPE_ARN, "tags": {"deeplens-build:recipe-sha256": "0" * 64}})
    stub.activate()
    with pytest.raises(AwsError, match=r"version 1.0.0 is already registered with a different recipe.*bump "
                                       r"`model.version`"):
        _deploy(bundle, Target("thing", "deeplens_abc"), Clients(greengrassv2=v2), tmp_path)
    stub.assert_no_pending_responses()


def test_v1_twice_to_one_group_reuses_its_group_version(bundle: Path, tmp_path: Path) -> None:
    group_id = group_with_core("deeplens-group")
    first = _deploy(bundle, Target("thing-group", "deeplens-group"), Clients(), tmp_path, fmt="v1")
    second = _deploy(bundle, Target("thing-group", "deeplens-group"), Clients(), tmp_path, fmt="v1")
    assert second.extra["group_version"] == first.extra["group_version"] and second.extra["group_version_reused"]
    versions = boto3.client("greengrass").list_group_versions(GroupId=group_id)["Versions"]
    assert len(versions) == 2, "the registration's own version and ours: the redeploy added none"


def _bundle_member(bundle: Path, name: str) -> bytes:
    with open_bundle(bundle) as tar:
        return tar.extractfile(name).read()


def test_v1_creates_definitions_group_version_and_deployment(bundle: Path, tmp_path: Path) -> None:
    group_id = group_with_core("deeplens-group")
    result = _deploy(bundle, Target("thing-group", "deeplens-group"), Clients(), tmp_path, fmt="v1")
    assert result.deployment_id and result.topic == "$aws/things/deeplens_abc/infer"
    gg = boto3.client("greengrass")
    definition = gg.get_group_version(GroupId=group_id, GroupVersionId=result.extra["group_version"])["Definition"]
    assert {"CoreDefinitionVersionArn", "FunctionDefinitionVersionArn", "ResourceDefinitionVersionArn",
            "SubscriptionDefinitionVersionArn"} <= set(definition), "the core is carried over"


def test_cli_prints_deployment_and_topic_as_json(bundle: Path, tmp_path: Path, monkeypatch) -> None:
    group_with_core("deeplens-group")
    monkeypatch.chdir(tmp_path)
    out = json.loads(cli("deploy", bundle, "--target", "thing-group:deeplens-group", "--format", "v1",
                         "--public-key", tmp_path / "project" / "signing-key.pub.pem", "--json").stdout)
    assert out["topic"] == "$aws/things/deeplens_abc/infer" and out["deployment_id"]


def test_deploy_without_a_trusted_key_is_refused_unless_any_signer_is_allowed(bundle: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    refused = cli("deploy", bundle, "--target", "thing:deeplens_abc", "--format", "v1", expect=2)
    assert "pass --public-key with the signer's public key" in error_line(refused)
    assert "Contents" not in boto3.client("s3").list_objects_v2(Bucket=BUCKET), "nothing uploaded"
    group_with_core("deeplens-group")
    allowed = cli("deploy", bundle, "--target", "thing-group:deeplens-group", "--format", "v1",
                  "--allow-any-signer")
    assert "warning: --allow-any-signer" in allowed.output and "deployment" in allowed.stdout


def test_tampered_bundle_is_refused_before_any_upload(bundle: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered.tar.gz"
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    clients, stub = _v2_clients(stub_responses=False)
    with pytest.raises(VerificationError):
        _deploy(tampered, Target("thing", "x"), clients, tmp_path)
    assert "Contents" not in boto3.client("s3").list_objects_v2(Bucket=BUCKET)


class _FlakyS3:
    """A loopback proxy to moto that answers the first ``failures`` requests with 503 SlowDown."""

    def __init__(self, upstream: str, failures: int):
        self.failures, self.seen = failures, 0
        host, port = upstream.removeprefix("http://").split(":")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.seen += 1
                if proxy.seen <= proxy.failures:
                    error = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                upstream_conn = http.client.HTTPConnection(host, int(port), timeout=30)
                upstream_conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                answer = upstream_conn.getresponse()
                payload = answer.read()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.mark.slow
def test_s3_throttling_is_retried(bundle: Path, tmp_path: Path, aws: str) -> None:
    boto3.client("iot").create_thing(thingName="deeplens_abc")
    flaky = _FlakyS3(aws, failures=3)
    try:
        clients, stub = _v2_clients()
        clients.s3 = boto3.client("s3", endpoint_url=flaky.url, config=_retries())
        result = _deploy(bundle, Target("thing", "deeplens_abc"), clients, tmp_path)
    finally:
        flaky.close()
    assert result.deployment_id == "deployment-1" and len(result.uploaded) == 5
    assert flaky.seen > 3


@pytest.mark.slow
def test_failed_upload_registers_nothing_and_says_what_was_uploaded(bundle: Path, tmp_path: Path, aws: str) -> None:
    boto3.client("iot").create_thing(thingName="deeplens_abc")
    flaky = _FlakyS3(aws, failures=10_000)
    try:
        clients, stub = _v2_clients(stub_responses=False)  # any greengrassv2 call would fail the test
        clients.s3 = boto3.client("s3", endpoint_url=flaky.url, config=_retries())
        with pytest.raises(AwsError, match=r"uploading s3://.* failed .*uploaded so far: nothing\. Nothing was "
                                           r"registered"):
            _deploy(bundle, Target("thing", "deeplens_abc"), clients, tmp_path)
    finally:
        flaky.close()
    stub.assert_no_pending_responses()


def _retries():
    from botocore.config import Config

    return Config(retries={"mode": "standard", "max_attempts": 8})


def test_a_kinesis_video_stream_is_created_once_and_the_recipe_requires_the_producer(
        aws: str, tmp_path: Path, onnx_model_dir: Path) -> None:
    bundle = published_bundle(tmp_path, onnx_model_dir,
                              device={"kinesis_video_stream": "deeplens-stream", "retention_hours": 24})
    recipe = json.loads(_bundle_member(bundle, "greengrass/recipe.json"))
    lifecycle = recipe["Manifests"][0]["Lifecycle"]
    assert lifecycle["Setenv"]["DEEPLENS_KVS_STREAM"] == "deeplens-stream"
    assert "if ! gst-inspect-1.0 kvssink" in lifecycle["Install"]["Script"]
    assert recipe["ComponentDependencies"]["aws.greengrass.TokenExchangeService"]["DependencyType"] == "HARD"
    group_with_core("deeplens-group")
    for _ in range(2):
        _deploy(bundle, Target("thing-group", "deeplens-group"), Clients(), tmp_path, fmt="v1")
    streams = boto3.client("kinesisvideo").list_streams()["StreamInfoList"]
    assert [(s["StreamName"], s["DataRetentionInHours"]) for s in streams] == [("deeplens-stream", 24)]


def test_a_missing_bucket_is_one_error_naming_it_and_the_setting(aws: str, tmp_path: Path,
                                                                   onnx_model_dir: Path) -> None:
    bundle = published_bundle(tmp_path, onnx_model_dir, greengrass={"bucket": "deeplens-missing"})
    boto3.client("iot").create_thing(thingName="deeplens_abc")
    line = error_line(cli("deploy", bundle, "--target", "thing:deeplens_abc", "--public-key",
                          tmp_path / "project" / "signing-key.pub.pem", expect=10))
    assert "bucket 'deeplens-missing' does not exist" in line and "`greengrass.bucket`" in line, line


def test_an_endpoint_without_greengrass_v2_is_said_in_one_line(aws: str, bundle: Path, tmp_path: Path) -> None:
    """moto's server has no greengrassv2: it answers with an HTML page, as a wrong endpoint would."""
    boto3.client("iot").create_thing(thingName="deeplens_abc")
    result = cli("deploy", bundle, "--target", "thing:deeplens_abc", "--public-key",
                 tmp_path / "project" / "signing-key.pub.pem", expect=10)
    line = error_line(result)
    assert "answered DescribeComponent with an HTML page" in line and "<" not in line, line
    assert "doctype" not in result.output.lower(), "no page in the output"
