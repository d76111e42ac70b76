"""The recipe's lifecycle scripts, generated in this one place and checked as shell before a bundle holds them.

The nucleus runs each script with ``sh`` as the component's user (``ggc_user``, not root), after replacing the
recipe variables (``{artifacts:path}``, ``{work:path}``, ...). So the Install script never touches the device's
system Python (Debian 12, Raspberry Pi OS Bookworm and Ubuntu 23.04+ refuse it, PEP 668, and the component user
could not write there anyway): it finds a Python the bundle has pins for (``python3`` first, then
``python3.X`` for each supported version), says in one line what it found, makes a virtual environment in the
component's work folder, installs the runtime there (offline from the artifacts when they are vendored), and
stamps it with the runtime's digest, so a restart or a redeploy of the same runtime installs nothing. Run starts
the Lambda runner with that environment's interpreter.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from deeplens_build.digest import json_sha256
from deeplens_build.errors import BundleError

VENV = "{work:path}/venv"
"""The runtime's virtual environment: the component's work folder outlives restarts and redeployments."""
STAMP = f"{VENV}/.deeplens-runtime"


@dataclass(frozen=True)
class Lifecycle:
    install: str
    run: str


def scripts(*, pins: Mapping[str, tuple[str, ...]], vendored: bool, code_dir: str, module: str, runner: str,
            compile_step: str | None = None, kvs_stream: str | None = None) -> Lifecycle:
    """The Install and Run scripts.

    :param pins: the exact requirements per device Python (``"3.11"``) the bundle supports, in preference order.
    :param vendored: the wheels are artifacts: install offline from ``{artifacts:path}``.
    :param code_dir: where the Lambda's zip is unarchived on the device; ``module`` its handler's module and
        ``runner`` the runner's file name there.
    :param compile_step: arguments after the interpreter for a step the Install runs last (an on-device compile).
    :param kvs_stream: the Kinesis Video stream the Lambda streams to: the device needs the ``kvssink`` element.
    :raises BundleError: when a script is not valid shell (never shipped: it would fail on every device).
    """
    versions = list(pins)
    supported = ", ".join(versions)
    stamp = json_sha256({"pins": dict(pins), "vendored": vendored})
    source = "--no-index --find-links {artifacts:path} " if vendored else ""
    lines = ["set -ef"]  # stop at the first failure; no globbing of the pins
    if kvs_stream:
        missing = (f"deeplens: streaming to Kinesis Video stream {kvs_stream} needs the KVS producer GStreamer "
                   "element kvssink on this device")
        lines += ["if ! gst-inspect-1.0 kvssink >/dev/null 2>&1; then", f"  echo {shlex.quote(missing)} >&2",
                  "  exit 1", "fi"]
    lines += [
        "python=''",
        f"for candidate in python3 {' '.join(f'python{v}' for v in versions)}; do",
        "  command -v \"$candidate\" >/dev/null 2>&1 || continue",
        "  version=$(\"$candidate\" -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])' 2>/dev/null) || continue",
        f"  case \"$version\" in {'|'.join(versions)}) python=$candidate; break;; esac",
        "done",
        "if [ -z \"$python\" ]; then",
        f"  echo \"deeplens: no Python this bundle supports ({supported}) on this device; python3 is"
        " $(python3 --version 2>&1 || echo missing)\" >&2",
        "  exit 1",
        "fi",
        f"echo \"deeplens: Python $version ($(command -v \"$python\")); the bundle supports {supported}\" >&2",
        "case \"$version\" in",
        *(f"  {v}) requirements={shlex.quote(' '.join(reqs))};;" for v, reqs in pins.items()),
        "esac",
        f"want=\"{stamp} $version\"",
        f"if [ -x {VENV}/bin/python ] && [ \"$(cat {STAMP} 2>/dev/null)\" = \"$want\" ]; then",
        f"  echo \"deeplens: the runtime is installed already in {VENV}\" >&2",
        "else",
        f"  rm -rf {VENV}",
        f"  \"$python\" -m venv {VENV} || {{ echo \"deeplens: $python cannot make a virtual environment; install its"
        " venv module (Debian, Ubuntu: apt install python3-venv)\" >&2; exit 1; }",
        f"  {VENV}/bin/python -m pip install --disable-pip-version-check --no-input {source}$requirements",
        f"  printf '%s\\n' \"$want\" > {STAMP}",
        "fi",
    ]
    if compile_step:
        lines.append(f"{VENV}/bin/python {compile_step}")
    install = "\n".join(lines) + "\n"
    run = f"exec {VENV}/bin/python -u {code_dir}/{runner} {module} {code_dir}\n"
    for what, script in (("Install", install), ("Run", run)):
        check_shell(script, what)
    return Lifecycle(install=install, run=run)


def check_shell(script: str, what: str) -> None:
    """Parse ``script`` as ``sh`` does (``sh -n``).

    :raises BundleError: naming the lifecycle step and what the shell said.
    """
    done = subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True)
    if done.returncode != 0:
        raise BundleError(f"the recipe's {what} script is not valid shell ({done.stderr.strip()}); this is a bug of "
                          "deeplens-build or of a target backend: please report it")
