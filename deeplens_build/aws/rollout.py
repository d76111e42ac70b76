"""Following a deployment to its devices (``deploy --wait``), as the console showed each device's state.

v2: the IoT job behind the Greengrass deployment (``get_deployment`` names it): one job execution per core
device, its status, and for a failed one the reason Greengrass recorded in the execution's details. v1: the
group deployment's status (``get_deployment_status``), its error message on failure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from deeplens_build.aws.deploy import Clients, Deployment
from deeplens_build.clients import reason as aws_reason
from deeplens_build.errors import AwsError, RolloutError
from deeplens_build.report import Reporter

SUCCEEDED = "SUCCEEDED"
TERMINAL = frozenset({SUCCEEDED, "FAILED", "REJECTED", "TIMED_OUT", "REMOVED", "CANCELED"})
_V1_STATUS = {"Success": SUCCEEDED, "Failure": "FAILED", "InProgress": "IN_PROGRESS", "Building": "IN_PROGRESS"}
_Reasons = dict[str, str | None]
"""Why each failed device failed: asked once per device."""
_REASON_KEYS = ("deployment-failure-cause", "detailed-deployment-status", "reason")


@dataclass(frozen=True)
class DeviceState:
    device: str
    status: str
    reason: str | None = None


@dataclass(frozen=True)
class Outcome:
    """Every device's final state."""

    devices: tuple[DeviceState, ...]

    @property
    def failed(self) -> tuple[DeviceState, ...]:
        return tuple(d for d in self.devices if d.status != SUCCEEDED)


def follow(deployment: Deployment, clients: Clients, *, timeout: float, interval: float, reporter: Reporter,
           sleep: Callable[[float], None] = time.sleep) -> Outcome:
    """Poll until every device of ``deployment`` is done, printing each state as it changes.

    :raises RolloutError: naming the failed devices and their reasons, or the states when ``timeout`` passed.
    """
    poll = _v2_states if deployment.format == "v2" else _v1_states
    reasons: _Reasons = {}
    deadline = time.monotonic() + timeout
    shown: dict[str, str] = {}
    with reporter.progress(total=None, desc="devices done", unit="device") as bar:
        while True:
            states, finished = poll(deployment, clients, reasons)
            for state in states:
                if shown.get(state.device) != state.status:
                    reporter.step(f"{state.device}: {state.status}" + (f" ({state.reason})" if state.reason else ""))
                    if state.status in TERMINAL:
                        bar.update(1)
                    shown[state.device] = state.status
            if finished:
                outcome = Outcome(tuple(sorted(states, key=lambda s: s.device)))
                if outcome.failed:
                    raise RolloutError(f"deployment {deployment.deployment_id} failed on "
                                       f"{len(outcome.failed)} of {len(outcome.devices)} device(s): "
                                       f"{_describe(outcome.failed)}", outcome)
                return outcome
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                now = _describe(states) if states else "no device has picked it up yet"
                raise RolloutError(f"deployment {deployment.deployment_id} had not finished after {timeout:g} s: "
                                   f"{now}; follow it in the console or wait longer (--timeout)",
                                   Outcome(tuple(states)))
            sleep(min(interval, remaining))


def _describe(states: Any) -> str:
    return "; ".join(f"{s.device} {s.status}" + (f" ({s.reason})" if s.reason else "") for s in states)


def _v2_states(deployment: Deployment, clients: Clients, reasons: _Reasons) -> tuple[list[DeviceState], bool]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        job_id = clients.greengrassv2.get_deployment(deploymentId=deployment.deployment_id).get("iotJobId")
        if not job_id:
            return [], False  # Greengrass has not created the job yet
        summaries: list[Mapping[str, Any]] = []
        for page in clients.iot.get_paginator("list_job_executions_for_job").paginate(jobId=job_id):
            summaries += page.get("executionSummaries", [])
        states = []
        for summary in summaries:
            thing = summary["thingArn"].rsplit("/", 1)[-1]
            status = summary["jobExecutionSummary"]["status"]
            reason = None
            if status in TERMINAL - {SUCCEEDED}:
                if thing not in reasons:
                    execution = clients.iot.describe_job_execution(jobId=job_id, thingName=thing)["execution"]
                    details = execution.get("statusDetails", {}).get("detailsMap", {})
                    reasons[thing] = ", ".join(details[k] for k in _REASON_KEYS if details.get(k)) or None
                reason = reasons[thing]
            states.append(DeviceState(thing, status, reason))
        process = clients.iot.describe_job(jobId=job_id)["job"].get("jobProcessDetails", {})
    except (ClientError, BotoCoreError) as exc:
        raise AwsError(f"following deployment {deployment.deployment_id} failed: {aws_reason(exc)}") from exc
    waiting = process.get("numberOfQueuedThings", 0) + process.get("numberOfInProgressThings", 0)
    return states, bool(states) and not waiting and all(s.status in TERMINAL for s in states)


def _v1_states(deployment: Deployment, clients: Clients, reasons: _Reasons) -> tuple[list[DeviceState], bool]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        answer = clients.greengrass.get_deployment_status(GroupId=deployment.extra["group_id"],
                                                          DeploymentId=deployment.deployment_id)
    except (ClientError, BotoCoreError) as exc:
        raise AwsError(f"following deployment {deployment.deployment_id} failed: {aws_reason(exc)}") from exc
    status = _V1_STATUS.get(answer.get("DeploymentStatus", ""), answer.get("DeploymentStatus", "UNKNOWN"))
    reason = answer.get("ErrorMessage") if status != SUCCEEDED else None
    return [DeviceState(f"group {deployment.target.name}", status, reason)], status in TERMINAL
