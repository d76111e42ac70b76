"""Small helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import shutil
import socket
import subprocess
import tarfile
import time
import traceback
import zipfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from deeplens_build.cli import main


EXAMPLE = Path(__file__).parents[1] / "examples" / "classifier"
"""The embedded example `make package` builds."""


BUILTIN_PLUGINS = "deeplens-sources,deeplens-targets,onnx,mxnet,tensorflow,caffe,openvino,tensorrt,pytorch"
"""The plugins every test sees: the built-in ones only, not whatever else this environment has installed."""

def example_project(root: Path, **target: object) -> Path:
    """A copy of the example under ``root`` (without its build outputs), ``[target]`` settings added; its
    deeplens.toml."""
    project = shutil.copytree(EXAMPLE, root / "classifier", ignore=shutil.ignore_patterns(".deeplens", "dist"))
    config = project / "deeplens.toml"
    lines = "".join(f"{key} = {json.dumps(value)}\n" for key, value in target.items())
    config.write_text(config.read_text().replace("[target]\n", f"[target]\n{lines}"))
    return config


def files_under(root: Path) -> set[str]:
    """Every path under ``root``, relative; empty when ``root`` does not exist."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")} if root.exists() else set()


def cli(*args: str | Path, expect: int = 0) -> Result:
    """Run ``deeplens-build ARGS`` in-process and check its exit code."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    if result.exit_code != expect:
        trace = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
        raise AssertionError(f"exit {result.exit_code} (expected {expect})\n{result.output}\n{trace}")
    return result


def package_json(config: Path, *extra: str | Path, expect: int = 0) -> Any:
    """Run ``package --json`` on ``config`` with a key made beside it.

    :return: the JSON report; or, with a non-zero ``expect``, the one ``error:`` line, after checking that no
        traceback was printed and nothing was left at the output path.
    """
    from deeplens_build import testing

    key = testing.signing_key(config.parent)
    result = cli("package", "--config", config, "--signing-key", key, "--json", *extra, expect=expect)
    if expect:
        assert "Traceback" not in result.output
        assert not (config.parent / "dist").exists()
        return error_line(result)
    return json.loads(result.stdout)


def error_line(result: Result) -> str:
    """The one ``error:`` line a failing command printed."""
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


def package_project(workdir: Path, source: Path | str, *, expect: int = 0, **tables: Any) -> Any:
    """Write a project under ``workdir`` for ``source`` and run :func:`package_json` on it."""
    from deeplens_build import testing

    return package_json(testing.write_project(workdir / "project", source=source, **tables), expect=expect)


def wheel(wheelhouse: Path, name: str, version: str, requires: tuple[str, ...] = (),
          tag: str = "py3-none-any") -> Path:
    """A real, installable wheel, written by hand (PEP 427); ``tag`` is what pip matches (e.g.
    ``cp310-cp310-manylinux2014_aarch64``)."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
            name, version, "".join(f"Requires-Dist: {r}\n" for r in requires)),
        f"{dist}/WHEEL": f"Wheel-Version: 1.0\nGenerator: deeplens-tests\nRoot-Is-Purelib: true\nTag: {tag}\n",
    }
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for path, text in files.items()]
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    path = wheelhouse / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def runtime_definition(root: Path, name: str, requirements: list[str], platforms=("linux-x86_64", "linux-aarch64"),
                       python: str = "3.10", pythons: dict[str, list[str]] | None = None) -> Path:
    """A runtime definition under ``root/name``; ``pythons`` adds pins for other device Pythons."""
    from deeplens_build.testing import to_toml

    folder = root / name
    folder.mkdir(parents=True)
    definition = {"name": name, "summary": "test runtime", "formats": ["onnx"], "accelerator": "cpu",
                  "python": python, "platforms": list(platforms),
                  "requirements": {p: requirements for p in platforms},
                  "pythons": {v: {"requirements": {p: reqs for p in platforms}} for v, reqs in (pythons or {}).items()}}
    (folder / "runtime.toml").write_text(to_toml(definition))
    return root


class Broker:
    """Debian's mosquitto on a free port of 127.0.0.1, for the device tests (.ci/run installs it)."""

    def __init__(self, workdir: Path):
        if shutil.which("mosquitto") is None:
            pytest.skip("mosquitto is not installed; .ci/run installs it")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(["mosquitto", "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.process:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


def open_bundle(path: Path | str) -> tarfile.TarFile:
    """A bundle opened for reading in a test, whatever its compression (zstd, or the gzip of older bundles)."""
    import zstandard

    data = Path(path).read_bytes()
    if data.startswith(b"\x28\xb5\x2f\xfd"):
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    else:
        data = gzip.decompress(data)
    return tarfile.open(fileobj=io.BytesIO(data))
