"""The device box: a bundle's Greengrass v2 recipe run the way the nucleus runs it, in a real Linux root file
system, as the component user, and publishing through the real ``awsiotsdk`` client.

The root file systems are Debian's own (``debootstrap --variant=minbase``, with ``python3`` and
``python3-venv``): bookworm, the base of Raspberry Pi OS Bookworm (Python 3.11, PEP 668), and trixie (Python
3.13). They are built once from the Debian archive this machine's apt configuration names and kept in the user's
cache folder; every box runs on an overlay of one, so the cached tree is never written.

What the box does as the nucleus does (Greengrass v2 developer guide, "Component recipe reference"; the nucleus's
``/greengrass/v2`` layout): verify the bundle as ``deeplens-build run`` does; pick the recipe's manifest for this
machine's platform; put each artifact, its digest checked, in ``packages/artifacts/<component>/<version>/``
(owned by the component user, with the artifact's ``Permission``), each ``Unarchive: ZIP`` one unpacked into
``packages/artifacts-unarchived/<component>/<version>/<name>/``, and give the component a private
``work/<component>/``; replace the recipe variables (``{artifacts:path}``, ``{artifacts:decompressedPath}``,
``{work:path}``, ``{kernel:rootPath}``, ``{iot:thingName}``, ``{configuration:/json/pointer}``; any other is left
as written, as the nucleus leaves it); run ``Install`` (its ``Timeout``, 120 s by default) and then ``Run`` with
``sh -c`` as ``ggc_user`` (root with ``RequiresPrivilege``), with the lifecycle's and the step's ``Setenv`` and
the variables the nucleus gives every component (``SVCUID``, the IPC socket, ``AWS_IOT_THING_NAME``,
``AWS_REGION``). Greengrass IPC is :mod:`deeplens_build.device.ipc`, enforcing the recipe's ``accessControl``.

Offline (the default) the box has no network at all, not even loopback: a vendored bundle proves it installs
from its own artifacts. Needs root (a mount namespace, an overlay and ``chroot``), and ``debootstrap`` to build
a root file system the cache does not hold yet.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deeplens_build.aws.greengrass import digest_b64
from deeplens_build.device.ipc import MQTT_PROXY, IpcServer, Policy, policies
from deeplens_build.device.mqtt import publisher
from deeplens_build.device.run import install_bundle
from deeplens_build.errors import DeviceError
from deeplens_build.manifest import RECIPE, infer_topic
from deeplens_build.report import Reporter

SUITES = {"bookworm": "3.11", "trixie": "3.13"}
"""The Debian releases a box is built from, and their Python."""
NUCLEUS_ROOT = "/greengrass/v2"
USER, UID = "ggc_user", 9901
"""The component user the nucleus's installer creates (``--component-default-user ggc_user:ggc_group``)."""
GROUP = "ggc_group"
INSTALL_TIMEOUT = 120
"""The nucleus's default for a step without ``Timeout``."""
ARCHITECTURES = {"x86_64": "amd64", "aarch64": "aarch64"}
VARIABLE = re.compile(r"\{(artifacts:path|artifacts:decompressedPath|work:path|kernel:rootPath|iot:thingName|"
                      r"configuration:(/[^}]*))\}")
APT_SOURCES = Path("/etc/apt/sources.list.d")


class BoxError(DeviceError):
    """The box could not be set up (not a problem of the bundle)."""


def archive(sources: Path = APT_SOURCES) -> str:
    """The Debian archive this machine installs its own packages from (its first ``.sources`` entry, or
    ``.list`` line, whose address ends in ``/debian``)."""
    for path in sorted(sources.glob("*.sources")) + sorted(sources.glob("*.list")):
        for match in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+)", path.read_text(errors="replace"),
                                 re.MULTILINE):
            if match.group(1).rstrip("/").endswith("/debian"):
                return match.group(1)
    raise BoxError(f"no Debian archive in this machine's apt configuration ({sources}): a box's root file system "
                   "is built from one")


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deeplens-build" / "rootfs"


def _architecture() -> str:
    """This machine's architecture as recipes name it."""
    return ARCHITECTURES.get(platform.machine(), platform.machine())


def _cache_entry(suite: str) -> Path:
    return cache_folder() / f"{suite}-{_architecture()}"


def cached_root_filesystem(suite: str) -> Path | None:
    root = _cache_entry(suite)
    return root if (root / "usr" / "bin" / "python3").exists() else None


def root_filesystem(suite: str, log: Callable[[str], None] = print) -> Path:
    """The cached root file system of ``suite``, built first when the cache does not hold it (about 3 minutes).

    :raises BoxError: when it cannot be built here (not root, no debootstrap, the archive unreachable).
    """
    if suite not in SUITES:
        raise BoxError(f"no box for {suite!r}: the boxes are {', '.join(SUITES)}")
    if found := cached_root_filesystem(suite):
        return found
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        raise BoxError(f"the {suite} root file system is not in {cache_folder()} and cannot be built here: that "
                       "needs root and debootstrap (apt install debootstrap; .ci/run installs it)")
    target = _cache_entry(suite)
    scratch = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.parent.mkdir(parents=True, exist_ok=True)
    log(f"box: building the {suite} root file system with debootstrap (about 3 minutes, once)")
    done = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv", suite,
                           str(scratch), archive()], capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise BoxError(f"debootstrap could not build {suite}: {(done.stdout + done.stderr).strip()[-400:]}")
    try:
        os.replace(scratch, target)  # whole or not at all: a half-built tree is never taken for the cache
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)
        if cached_root_filesystem(suite) is None:
            raise BoxError(f"cannot keep the {suite} root file system in {target}: something else is there; "
                           "remove it") from None
    return target  # built here, or by a concurrent build that finished first


def interpolate(text: str, variables: Mapping[str, str], configuration: Mapping[str, Any]) -> str:
    def value(match: re.Match[str]) -> str:
        if pointer := match.group(2):
            found: Any = configuration
            for part in pointer.strip("/").split("/"):
                part = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(found, Mapping) or part not in found:
                    return match.group(0)  # the nucleus leaves an unknown key as written
                found = found[part]
            return found if isinstance(found, str) else json.dumps(found)
        return variables[match.group(1)]

    return VARIABLE.sub(value, text)


class Box:
    """One device: a verified, unpacked bundle (``bundle_dir``) laid out as the nucleus lays out a component, on an
    overlay of ``rootfs`` kept in ``scratch``. A context manager: the IPC stand-in serves while it is open.

    :param forward: where the IPC stand-in hands what the policy allowed (see :func:`mqtt.publisher`).
    :param network: give the box this machine's network (an Install resolving pins from a package index);
        without it the box has none.
    """

    def __init__(self, rootfs: Path, bundle_dir: Path, scratch: Path, *, forward: Callable[[str, bytes], None],
                 thing: str = "deeplens-box", network: bool = False):
        self.rootfs, self.scratch, self.thing, self.network = rootfs, scratch, thing, network
        recipe = json.loads((bundle_dir / RECIPE).read_text(encoding="utf-8"))
        self.component, version = recipe["ComponentName"], recipe["ComponentVersion"]
        architecture = _architecture()
        manifest = next((m for m in recipe["Manifests"] if m["Platform"].get("os") == "linux"
                         and m["Platform"].get("architecture", architecture) == architecture), None)
        if manifest is None:
            raise DeviceError(f"the recipe has no manifest for linux {architecture}: this box cannot run it")
        self.lifecycle: dict[str, Any] = manifest["Lifecycle"]
        self.configuration = recipe.get("ComponentConfiguration", {}).get("DefaultConfiguration", {})
        self.greengrass = scratch / "greengrass"
        artifacts = f"packages/artifacts/{self.component}/{version}"
        unarchived = f"packages/artifacts-unarchived/{self.component}/{version}"
        work = f"work/{self.component}"
        self.variables = {"artifacts:path": f"{NUCLEUS_ROOT}/{artifacts}",
                          "artifacts:decompressedPath": f"{NUCLEUS_ROOT}/{unarchived}",
                          "work:path": f"{NUCLEUS_ROOT}/{work}", "kernel:rootPath": NUCLEUS_ROOT,
                          "iot:thingName": thing}
        self._layout(bundle_dir, manifest.get("Artifacts", ()), artifacts, unarchived, work)
        # the nucleus replaces the recipe variables ({iot:thingName}) in a policy's resources
        rules = [Policy(p.operations, tuple(interpolate(r, self.variables, {}) for r in p.resources))
                 for p in policies(self.configuration.get("accessControl", {}), MQTT_PROXY)]
        # a Unix socket's path has at most 107 bytes: the server's is short, and mounted where the nucleus has it
        self._socket_dir = Path(tempfile.mkdtemp(prefix="deeplens-ipc-"))
        (self.greengrass / "ipc.socket").touch()
        self.ipc = IpcServer(self._socket_dir / "ipc.socket", self.component, rules, forward)
        self._running: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Box:
        self.ipc.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.ipc.__exit__(*exc)
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _layout(self, bundle_dir: Path, artifacts: Any, artifact_dir: str, unarchived_dir: str, work: str) -> None:
        files: dict[str, list[Path]] = {}
        for path in sorted(bundle_dir.rglob("*")):
            if path.is_file():
                files.setdefault(path.name, []).append(path)
        (self.greengrass / artifact_dir).mkdir(parents=True)
        for artifact in artifacts:
            name = artifact["Uri"].rsplit("/", 1)[-1]
            # as the nucleus checks a download: the file of that name whose digest is the recipe's
            found = next((path for path in files.get(name, ()) if digest_b64(path) == artifact["Digest"]), None)
            if found is None:
                raise DeviceError(f"the bundle holds no {name} with the recipe's digest; the nucleus would refuse "
                                  "the deployment")
            target = self.greengrass / artifact_dir / name
            shutil.copyfile(found, target)
            mode = _mode(artifact.get("Permission") or {})
            _own(target, mode)
            if artifact.get("Unarchive") == "ZIP":
                folder = self.greengrass / unarchived_dir / Path(name).stem
                with zipfile.ZipFile(target) as archive:
                    archive.extractall(folder)
                for path in folder.rglob("*"):
                    _own(path, 0o755 if path.is_dir() else mode)
        (self.greengrass / work).mkdir(parents=True)
        _own(self.greengrass / work, 0o700)
        upper = self.scratch / "upper"
        (upper / "etc").mkdir(parents=True)
        for table, line in (("passwd", f"{USER}:x:{UID}:{UID}::/home/{USER}:/bin/sh\n"),
                            ("group", f"{GROUP}:x:{UID}:\n")):
            (upper / "etc" / table).write_text((self.rootfs / "etc" / table).read_text() + line)
        (upper / "home" / USER).mkdir(parents=True)  # useradd --system --create-home, as the setup guide does
        _own(upper / "home" / USER, 0o755)
        for name in ("root", "overlay-work"):
            (self.scratch / name).mkdir()

    def environment(self, step: Mapping[str, Any] | None) -> dict[str, str]:
        """What the component's processes get: the nucleus's variables, then the lifecycle's and the step's
        ``Setenv``, interpolated."""
        environment = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": f"/home/{USER}", "LANG": "C.UTF-8",
                       "SVCUID": self.ipc.token, "AWS_IOT_THING_NAME": self.thing, "AWS_REGION": "us-east-1",
                       "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT": f"{NUCLEUS_ROOT}/ipc.socket",
                       "GG_ROOT_CA_PATH": f"{NUCLEUS_ROOT}/rootCA.pem"}
        for setenv in (self.lifecycle.get("Setenv") or {}, (step or {}).get("Setenv") or {}):
            environment.update({k: interpolate(v, self.variables, self.configuration) for k, v in setenv.items()})
        return environment

    def add_file(self, path: str, text: str, mode: int = 0o755) -> None:
        """Put a file on the device's disk (a tool the device has, such as a GStreamer element's stand-in)."""
        target = self.scratch / "upper" / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def command(self, step_name: str) -> list[str]:
        """The host command running one lifecycle step in the box."""
        step = self.lifecycle[step_name]
        script = interpolate(step["Script"], self.variables, self.configuration)
        environment = self.environment(step)
        user = "0:0" if step.get("RequiresPrivilege") else f"{UID}:{UID}"
        root, greengrass = self.scratch / "root", self.scratch / "root" / NUCLEUS_ROOT.lstrip("/")
        q = shlex.quote
        mounts = " && ".join([
            "mount -t overlay overlay -o " + q(f"lowerdir={self.rootfs},upperdir={self.scratch / 'upper'},"
                                               f"workdir={self.scratch / 'overlay-work'}") + f" {q(str(root))}",
            f"mount -t proc proc {q(str(root / 'proc'))}", f"mkdir -p {q(str(greengrass))}",
            f"mount --bind {q(str(self.greengrass))} {q(str(greengrass))}",
            f"mount --bind {q(str(self.ipc.path))} {q(str(greengrass / 'ipc.socket'))}"])
        # the nucleus starts every step in the component's work folder
        chroot = ["chroot", f"--userspec={user}", f"--groups={user.split(':')[1]}", str(root), "/usr/bin/env", "-i",
                  f"--chdir={self.variables['work:path']}", *(f"{k}={v}" for k, v in environment.items()),
                  "/bin/sh", "-c", script]
        return ["unshare", "--mount", "--propagation", "private", *(() if self.network else ("--net",)), "--fork",
                "--kill-child", "sh", "-c", f"{mounts} && exec {shlex.join(chroot)}"]

    def install(self) -> subprocess.CompletedProcess[str]:
        """Run the Install step to its end (or its timeout); its output is the component's log."""
        step = self.lifecycle.get("Install")
        if step is None:
            return subprocess.CompletedProcess([], 0, "", "")
        timeout = step.get("Timeout") or INSTALL_TIMEOUT
        process = subprocess.Popen(self.command("Install"), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _terminate(process)
            output, _ = process.communicate()
            output += f"\nbox: Install did not finish within its timeout of {timeout} s\n"
            return subprocess.CompletedProcess(process.args, 124, output, "")
        return subprocess.CompletedProcess(process.args, process.returncode, output, "")

    def start(self, log: Path) -> subprocess.Popen[bytes]:
        """Start the Run step, its output going to ``log``; :meth:`stop` (or leaving the box) stops it."""
        self.stop()
        with log.open("ab") as out:
            self._running = subprocess.Popen(self.command("Run"), stdout=out, stderr=subprocess.STDOUT,
                                             start_new_session=True)
        return self._running

    def stop(self) -> int | None:
        """Stop the running component as the nucleus does (SIGTERM, then SIGKILL); its exit status."""
        if self._running is None:
            return None
        process, self._running = self._running, None
        return _terminate(process)


def _terminate(process: subprocess.Popen[Any]) -> int:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    return process.wait()


def _mode(permission: Mapping[str, str]) -> int:
    read = {"NONE": 0, "OWNER": 0o400, "ALL": 0o444}[permission.get("Read", "OWNER")]
    execute = {"NONE": 0, "OWNER": 0o100, "ALL": 0o111}[permission.get("Execute", "NONE")]
    return read | execute


def _own(path: Path, mode: int) -> None:
    os.chown(path, UID, UID, follow_symlinks=False)
    if not path.is_symlink():
        path.chmod(mode)


def _tail(text: str, lines: int = 6) -> str:
    """The last lines of a component's log, on one line for an error message."""
    return " | ".join(text.strip().splitlines()[-lines:])


@dataclass(frozen=True)
class BoxSummary:
    suite: str
    installed: str
    """The Install step's own account of what it found and did (its ``deeplens:`` lines)."""
    published: int
    topic: str


def run_box(bundle: Path, *, suite: str, work: Path, host: str, port: int, thing: str, results: int,
            public_key: Path | None, network: bool, stop: threading.Event, reporter: Reporter,
            stall_seconds: float = 120.0) -> BoxSummary:
    """``deeplens-build box``: verify ``bundle``, then install and run it in the ``suite`` box until ``results``
    results reached the broker at ``host:port``.

    :raises DeviceError: when the Install fails, the component exits or stalls first, or a publish is refused.
    """
    if os.geteuid() != 0:
        raise BoxError("the device box needs root: a mount namespace, an overlay and chroot (sudo, or a CI job)")
    rootfs = root_filesystem(suite, reporter.step)
    work.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"box-{suite}-", dir=work))
    try:
        root, manifest = install_bundle(bundle, scratch / "device", public_key)
        topic = infer_topic(thing)
        with publisher(host, port) as forward, \
                Box(rootfs, root, scratch / "box", forward=forward, thing=thing, network=network) as box:
            reporter.step(f"box: {manifest.name} {manifest.version} in {suite} as {USER}, "
                          f"{'with' if network else 'without'} network, publishing to {host}:{port} {topic}")
            done = box.install()
            said = "\n".join(line for line in done.stdout.splitlines() if line.startswith("deeplens:"))
            if done.returncode != 0:
                raise DeviceError(f"the recipe's Install failed in the {suite} box (exit {done.returncode}): "
                                  + _tail(done.stdout))
            for line in said.splitlines():
                reporter.step(f"  {line}")
            log = scratch / "run.log"
            process = box.start(log)
            seen, last = 0, time.monotonic()
            while len(box.ipc.published) < results and not stop.is_set():
                if box.ipc.refused:
                    raise DeviceError(f"a publish was refused in the {suite} box: {box.ipc.refused[0][1]} (the "
                                      "recipe's accessControl allows the thing's infer topic only)")
                if process.poll() is not None:
                    raise DeviceError(f"the component's Run exited with code {process.returncode} after "
                                      f"{len(box.ipc.published)} of {results} results: "
                                      + _tail(log.read_text(errors="replace")))
                if len(box.ipc.published) > seen:
                    seen, last = len(box.ipc.published), time.monotonic()
                elif time.monotonic() - last > stall_seconds:
                    raise DeviceError(f"the component published nothing new for {stall_seconds:g} s: "
                                      + _tail(log.read_text(errors="replace")))
                stop.wait(0.2)
            box.stop()
            return BoxSummary(suite=suite, installed=said, published=len(box.ipc.published), topic=topic)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
