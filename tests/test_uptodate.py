"""A ``package`` whose bundle is already built says so without running the pipeline, and anything it was built
from that changes (the config, the model, a new file beside it, the bundle itself, an option, a variable, the code
that ran) runs the pipeline again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import package_json

from deeplens_build import testing, uptodate

STAGES = ["convert", "optimize", "reference", "target-check", "parity", "lambda", "greengrass", "attest"]


def _process(config: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``package --json`` in a new process, with ``-X importtime``: its stderr lists every module imported."""
    key = testing.signing_key(config.parent)
    command = [sys.executable, "-X", "importtime", "-m", "deeplens_build.cli", "package", "--config", str(config),
               "--signing-key", str(key), "--json", *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DEEPLENS_BUILD_PLUGINS": "deeplens-sources,deeplens-targets,onnx",
                               **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _imported(done: subprocess.CompletedProcess[str]) -> set[str]:
    return {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}


def test_a_no_change_rebuild_is_up_to_date_without_importing_the_pipeline(project: Path) -> None:
    first = _process(project)
    built = json.loads(first.stdout)
    assert not built["up_to_date"] and "pydantic" in _imported(first)
    again = _process(project)
    report = json.loads(again.stdout)
    assert report["up_to_date"] and report["sha256"] == built["sha256"]
    assert report["cached_stages"] == built["stages"] == STAGES, "every stage's result is the bundle's"
    assert not {"pydantic", "deeplens_build.pipeline", "onnx", "numpy"} & _imported(again)
    assert "fetch:" not in again.stderr


def test_the_up_to_date_summary_is_the_build_s(project: Path) -> None:
    first = package_json(project)
    second = package_json(project)
    assert second["up_to_date"]
    assert {k: v for k, v in second.items() if k not in ("up_to_date", "cached_stages")} == \
        {k: v for k, v in first.items() if k not in ("up_to_date", "cached_stages")}


def _touch(path: Path) -> None:
    stamp = time.time_ns() - 10**10
    os.utime(path, ns=(stamp, stamp))


def test_each_thing_a_bundle_was_built_from_runs_the_pipeline_when_it_changes(project: Path,
                                                                              onnx_model_dir: Path) -> None:
    first = package_json(project)
    bundle = Path(first["bundle"])

    _touch(project)  # same bytes, new times: the pipeline runs, its stages are all cached
    touched = package_json(project)
    assert not touched["up_to_date"] and touched["cached_stages"] == STAGES and touched["sha256"] == first["sha256"]
    assert package_json(project)["up_to_date"]

    (onnx_model_dir / "notes.md").write_text("a file beside the model\n")
    beside = package_json(project)
    assert not beside["up_to_date"], "a new file in the source folder"

    bundle.write_bytes(bundle.read_bytes()[:-1])
    mended = package_json(project)
    assert not mended["up_to_date"] and mended["sha256"] == beside["sha256"], "a damaged bundle is written again"

    assert not package_json(project, "--output", project.parent.parent / "elsewhere")["up_to_date"]
    assert package_json(project)["up_to_date"], "each request has its own record"

    model = onnx_model_dir / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0x01
    model.write_bytes(bytes(data))
    changed = package_json(project)
    assert not changed["up_to_date"] and "convert" not in changed["cached_stages"]
    assert changed["sha256"] != beside["sha256"]


def test_a_variable_the_build_reads_runs_the_pipeline(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package_json(project)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    stamped = package_json(project)
    assert not stamped["up_to_date"]
    assert package_json(project)["up_to_date"]


def test_code_that_ran_is_an_input(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin being developed (an editable install): its module changing runs the pipeline, as an upgrade
    would (which replaces the distribution's metadata the build read)."""
    module = tmp_path / "plugin_in_development.py"
    module.write_text("VERSION = 1\n")
    _touch(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__("plugin_in_development")
    monkeypatch.delitem(sys.modules, "plugin_in_development")
    import plugin_in_development  # noqa: F401  (loaded while the build runs)

    package_json(project)
    assert package_json(project)["up_to_date"]
    module.write_text("VERSION = 2\n")
    assert not package_json(project)["up_to_date"]


def test_no_cache_always_runs_the_pipeline(project: Path) -> None:
    package_json(project)
    forced = package_json(project, "--no-cache")
    assert not forced["up_to_date"] and forced["cached_stages"] == []


@pytest.mark.parametrize("change", [None, "open({input!r}, 'a').write('after')",
                                    "open({folder!r} + '/labels.txt', 'w').write('cat')"])
def test_an_input_changed_while_the_build_ran_leaves_no_record(tmp_path: Path, change: str | None) -> None:
    """Which state the bundle holds is unknown: the next package runs the pipeline. A change by another process
    (not one of the build's own writes) to the input, or to the folder it lies in, while the build makes sure of
    a folder beside it that is already there (as it does of its work folder, in the project folder)."""
    source = tmp_path / "training-output" / "input.txt"
    (source.parent / "scratch").mkdir(parents=True)
    source.write_text("before\n")
    bundle = tmp_path / "dist" / "bundle.tar.zst"
    bundle.parent.mkdir()
    bundle.write_bytes(b"bundle")
    config = tmp_path / "deeplens.toml"
    config.write_text("")
    request = uptodate.Request.of(config=config, source=None, output=None, signing_key=None, shared_cache=None)
    time.sleep(0.05)  # older than the 10 ms a change must be before it is trusted
    with uptodate.recording() as observed:
        source.read_text()
        (source.parent / "scratch").mkdir(exist_ok=True)  # there already: changes nothing
        if change:
            subprocess.run([sys.executable, "-c", change.format(input=str(source), folder=str(source.parent))],
                           check=True)
        observed.save(request, work_dir=tmp_path / ".deeplens", bundle=bundle,
                      replay=uptodate.Replay(text="up to date", json="{}", stderr=""))
    assert (uptodate.check(request) is not None) is (change is None)


def test_a_damaged_record_runs_the_pipeline(project: Path) -> None:
    package_json(project)
    [stamp] = (project.parent / ".deeplens" / uptodate.STAMPS).glob("*.json")
    recorded = json.loads(stamp.read_text())
    for damaged in ("{not json", json.dumps({**recorded, "replay": {"text": 1}}), json.dumps({**recorded, "paths": 7}),
                    json.dumps([recorded])):
        stamp.write_text(damaged)
        report = package_json(project)
        assert not report["up_to_date"] and report["cached_stages"] == STAGES


def test_a_thread_running_before_the_build_is_not_the_build(project: Path, tmp_path: Path) -> None:
    """What other threads of the process do (a test runner's servers, what an earlier command left running) is
    neither input nor output of the build: a file such a thread reads while it changes does not spoil the stamp."""
    noise = tmp_path / "noise.txt"
    noise.write_text("0")
    appender = os.open(noise, os.O_WRONLY | os.O_APPEND)  # opened before: its writes raise no audit event
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            noise.read_bytes()
            os.write(appender, b"x")

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        package_json(project)
        assert package_json(project)["up_to_date"]
    finally:
        stop.set()
        thread.join()
        os.close(appender)
