"""`deploy --wait`: each device's state as it changes, success and failure with their reasons, and time limits.

The states a device reports come from a Greengrass core running the deployment, which has no local stand-in:
greengrassv2 and the IoT job-execution calls are botocore Stubbers (they check each request against the service
model); v1 is moto's HTTP server for the deploy itself.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber
from conftest import group_with_core
from helpers import cli

from deeplens_build.aws.deploy import Clients, Deployment, Target
from deeplens_build.aws.rollout import follow
from deeplens_build.errors import RolloutError
from deeplens_build.report import Reporter

ARN = "arn:aws:iot:us-east-1:123456789012:thing/{}"


def _deployment(fmt: str = "v2", **extra) -> Deployment:
    target = Target("thing-group", "deeplens-fleet")
    return Deployment(deployment_id="deployment-1", format=fmt, target=target, topic=target.topic, uploaded=(),
                      skipped=(), extra=extra)


def _executions(*states: tuple[str, str]) -> dict:
    return {"executionSummaries": [{"thingArn": ARN.format(thing), "jobExecutionSummary": {"status": status}}
                                   for thing, status in states]}


def _job(queued: int = 0, in_progress: int = 0) -> dict:
    return {"job": {"jobId": "job-1", "jobProcessDetails": {"numberOfQueuedThings": queued,
                                                            "numberOfInProgressThings": in_progress}}}


def _clients(polls: list[tuple[dict, dict]], failures: dict[str, dict] | None = None) -> tuple[Clients, list[Stubber]]:
    v2 = boto3.client("greengrassv2", region_name="us-east-1")
    iot = boto3.client("iot", region_name="us-east-1")
    v2_stub, iot_stub = Stubber(v2), Stubber(iot)
    v2_stub.add_response("get_deployment", {"deploymentId": "deployment-1"})  # the job is not created yet
    for executions, job in polls:
        v2_stub.add_response("get_deployment", {"deploymentId": "deployment-1", "iotJobId": "job-1"})
        iot_stub.add_response("list_job_executions_for_job", executions, {"jobId": "job-1"})
        for thing, details in (failures or {}).items():
            if any(s["thingArn"].endswith(thing) and s["jobExecutionSummary"]["status"] == "FAILED"
                   for s in executions["executionSummaries"]):
                execution = {"execution": {"statusDetails": {"detailsMap": details}}}
                iot_stub.add_response("describe_job_execution", execution, {"jobId": "job-1", "thingName": thing})
                failures = {k: v for k, v in failures.items() if k != thing}  # asked once per device
        iot_stub.add_response("describe_job", job, {"jobId": "job-1"})
    v2_stub.activate()
    iot_stub.activate()
    return Clients(greengrassv2=v2, iot=iot), [v2_stub, iot_stub]


def test_wait_follows_every_device_to_success(capsys: pytest.CaptureFixture) -> None:
    clients, stubs = _clients([
        (_executions(("core-a", "QUEUED")), _job(queued=2)),
        (_executions(("core-a", "IN_PROGRESS"), ("core-b", "QUEUED")), _job(queued=1, in_progress=1)),
        (_executions(("core-a", "SUCCEEDED"), ("core-b", "SUCCEEDED")), _job()),
    ])
    outcome = follow(_deployment(), clients, timeout=60, interval=0, reporter=Reporter(), sleep=lambda _: None)
    for stub in stubs:
        stub.assert_no_pending_responses()
    assert [(d.device, d.status) for d in outcome.devices] == [("core-a", "SUCCEEDED"), ("core-b", "SUCCEEDED")]
    progress = capsys.readouterr().err
    order = [progress.index(f"core-a: {status}") for status in ("QUEUED", "IN_PROGRESS", "SUCCEEDED")]
    assert order == sorted(order), "each change is printed as it happens"


def test_a_failed_device_is_named_with_its_reason() -> None:
    clients, _ = _clients([
        (_executions(("core-a", "IN_PROGRESS"), ("core-b", "FAILED")), _job(in_progress=1)),
        (_executions(("core-a", "SUCCEEDED"), ("core-b", "FAILED")), _job()),
    ], failures={"core-b": {"detailed-deployment-status": "FAILED_ROLLBACK_COMPLETE",
                            "deployment-failure-cause": "Install script exited with 1"}})
    with pytest.raises(RolloutError) as error:
        follow(_deployment(), clients, timeout=60, interval=0, reporter=Reporter(quiet=True), sleep=lambda _: None)
    assert "failed on 1 of 2 device(s): core-b FAILED (Install script exited with 1, FAILED_ROLLBACK_COMPLETE)" \
        in str(error.value)
    assert error.value.exit_code == 12


def test_a_rollout_that_does_not_finish_in_time_says_where_it_is() -> None:
    clients, _ = _clients([(_executions(("core-a", "IN_PROGRESS")), _job(in_progress=1))])
    # polls: job not created yet, then core-a in progress; each wait outlasts the 0.2 s limit
    with pytest.raises(RolloutError, match=r"had not finished after 0.2 s: core-a IN_PROGRESS"):
        follow(_deployment(), clients, timeout=0.2, interval=1, reporter=Reporter(quiet=True),
               sleep=lambda _: time.sleep(0.25))


def test_v1_group_deployment_status_is_followed() -> None:
    gg = boto3.client("greengrass", region_name="us-east-1")
    stub = Stubber(gg)
    request = {"GroupId": "group-1", "DeploymentId": "deployment-1"}
    stub.add_response("get_deployment_status", {"DeploymentStatus": "Building"}, request)
    stub.add_response("get_deployment_status", {"DeploymentStatus": "Failure",
                                                "ErrorMessage": "Lambda arn has no published version"}, request)
    stub.activate()
    with pytest.raises(RolloutError, match=r"group deeplens-fleet FAILED \(Lambda arn has no published version\)"):
        follow(_deployment("v1", group_id="group-1"), Clients(greengrass=gg), timeout=60, interval=0,
               reporter=Reporter(quiet=True), sleep=lambda _: None)
    stub.assert_no_pending_responses()


def test_cli_wait_reports_devices_as_json_and_exits_non_zero_when_unfinished(bundle: Path, tmp_path: Path,
                                                                              monkeypatch) -> None:
    group_with_core("deeplens-group")  # on moto a v1 deployment stays InProgress
    monkeypatch.chdir(tmp_path)
    result = cli("deploy", bundle, "--target", "thing-group:deeplens-group", "--format", "v1", "--public-key",
                 tmp_path / "project" / "signing-key.pub.pem", "--wait", "--timeout", "1", "--json", expect=12)
    report = json.loads(result.stdout)
    assert report["succeeded"] is False
    assert report["devices"] == [{"device": "group deeplens-group", "status": "IN_PROGRESS", "reason": None}]
    assert "had not finished after 1 s" in result.output
