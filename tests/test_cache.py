"""Concurrent builds sharing a work folder, cache entries that changed on disk, and what killed builds leave."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli, error_line, package_json

from deeplens_build import locks, testing


def _package_process(config: Path, key: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "deeplens_build.cli", "package", "--config", str(config), "--signing-key",
               str(key), "--no-cache", "--json"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "DEEPLENS_BUILD_PLUGINS": "onnx"})


@pytest.mark.slow
def test_four_concurrent_no_cache_builds_in_three_rounds_all_succeed_with_identical_bytes(project: Path) -> None:
    key = testing.signing_key(project.parent)
    digests = set()
    for _ in range(3):
        builds = [_package_process(project, key) for _ in range(4)]
        for build in builds:
            out, err = build.communicate(timeout=300)
            assert build.returncode == 0, err
            assert "Traceback" not in err
            digests.add(json.loads(out)["sha256"])
    assert len(digests) == 1, "every build wrote the same bytes"
    bundle = next((project.parent / "dist").glob("*.tar.zst"))
    testing.verify(bundle)
    cache = project.parent / ".deeplens" / "cache"
    assert not list(cache.glob("*/.build-*")), "no scratch folder is left behind"
    assert not list((project.parent / "dist").glob(".*.partial"))


def test_an_edited_cache_entry_is_rebuilt_never_signed(project: Path) -> None:
    first = package_json(project)
    [cached_zip] = (project.parent / ".deeplens" / "cache" / "lambda").glob("*/*.zip")
    cached_zip.write_bytes(cached_zip.read_bytes() + b"appended by someone")
    second = package_json(project)
    assert "lambda" not in second["cached_stages"], "the edited entry was not reused"
    assert second["sha256"] == first["sha256"], "the rebuilt Lambda zip is the original one"
    third = package_json(project)
    assert "lambda" in third["cached_stages"], "the rebuilt entry replaced the damaged one"


def test_what_a_killed_build_left_is_removed_and_a_live_build_is_left_alone(project: Path) -> None:
    package_json(project)
    cache = project.parent / ".deeplens" / "cache" / "optimize"
    dist = project.parent / "dist"
    # a killed build holds no lock: its scratch folder and partial bundle are exactly these
    dead = cache / ".build-killed01"
    dead.mkdir()
    (dead / locks.OWNER).touch()
    (dead / "model.onnx").write_bytes(b"half")
    partial = dist / ".deeplens-test-model-1.0.0.tar.zst.killed01.partial"
    partial.write_bytes(b"half a bundle")
    with locks.owned_folder(cache, ".build-") as live:
        package_json(project, "--no-cache")
        assert live.is_dir(), "a folder whose builder is alive is not touched"
    assert not dead.exists() and not partial.exists()


def test_a_failed_build_removes_the_earlier_bundle_of_the_same_name(project: Path) -> None:
    first = Path(package_json(project)["bundle"])
    assert first.is_file()
    project.write_text(re.sub(r"shape = \[[^]]*\]", "shape = [1, 3, 32]", project.read_text()))
    key = testing.signing_key(project.parent)
    result = cli("package", "--config", project, "--signing-key", key, expect=3)
    assert "has 3 dimensions but the model's input" in error_line(result)
    assert not first.exists(), "no bundle from earlier inputs passes for this build's"


def test_cache_info_and_prune_keep_the_most_recently_used(project: Path) -> None:
    package_json(project)
    project.write_text(project.read_text().replace("[lambda]", "[parity]\nseed = 7\n\n[lambda]"))
    package_json(project)  # a second reference entry; the first is now the least recently used
    info = json.loads(cli("cache", "info", "--config", project, "--json").stdout)
    assert info["stages"]["reference"]["entries"] == 2 and info["bytes"] > 0
    reference_bytes = info["bytes"] - sum(f["bytes"] for s, f in info["stages"].items() if s != "reference")
    keep = info["bytes"] - reference_bytes // 2  # room for all but one reference entry
    out = cli("cache", "prune", "--config", project, "--max-size", str(keep)).stdout
    assert out.startswith("removed 1 entries")
    after = json.loads(cli("cache", "info", "--config", project, "--json").stdout)
    assert after["stages"]["reference"]["entries"] == 1 and after["bytes"] <= keep
    report = package_json(project)
    assert "parity" in report["cached_stages"], "the entry kept is the one the current settings use"
    assert "error: --max-size 'lots'" in error_line(cli("cache", "prune", "--config", project, "--max-size", "lots",
                                                        expect=2))


def test_a_killed_builds_scratch_folder_goes_even_when_every_stage_is_reused(project: Path) -> None:
    package_json(project)
    dead = project.parent / ".deeplens" / "cache" / "optimize" / ".build-killed02"
    dead.mkdir()
    (dead / locks.OWNER).touch()
    _touch(project)
    report = package_json(project)
    assert not report["up_to_date"] and "optimize" in report["cached_stages"], "a build from the cache"
    assert not dead.exists()


def _touch(config: Path) -> None:
    """A new modification time for the project file: the next package runs the pipeline (not up to date)."""
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def _entry(project: Path, stage: str) -> Path:
    [result] = (project.parent / ".deeplens" / "cache" / stage).glob("*/result.json")
    return result.parent


def test_no_cache_replaces_a_stale_entry_and_says_it_built_it(project: Path) -> None:
    """An entry valid in itself but not what its key would build now (something the key did not hold changed):
    --no-cache builds the stage, signs what it built, says so, and the entry holds the fresh result after."""
    first = package_json(project)
    entry = _entry(project, "lambda")
    [stale] = entry.glob("*.zip")
    stale.write_bytes(stale.read_bytes() + b"stale")  # consistent with its record: the cache cannot tell
    recorded = json.loads((entry / "result.json").read_text())
    recorded["files"][stale.name] = hashlib.sha256(stale.read_bytes()).hexdigest()
    (entry / "result.json").write_text(json.dumps(recorded))
    _touch(project)
    assert package_json(project)["sha256"] != first["sha256"], "a trusted entry is reused as it is"
    fresh = package_json(project, "--no-cache")
    assert fresh["sha256"] == first["sha256"] and fresh["cached_stages"] == []
    assert package_json(project)["sha256"] == first["sha256"], "the fresh result replaced the stale entry"


def test_an_entry_naming_a_file_it_does_not_hold_is_rebuilt(project: Path) -> None:
    """A result.json naming a file inside its entry that it does not list (a poisoned shared entry copied here)
    is a rebuild, with or without --no-cache, never a dead end."""
    first = package_json(project)
    entry = _entry(project, "optimize")
    recorded = json.loads((entry / "result.json").read_text())
    text = json.dumps(recorded["result"])
    recorded["result"] = json.loads(text.replace('"@entry/model.onnx"', '"@entry/unlisted.onnx"'))
    assert json.dumps(recorded["result"]) != text
    (entry / "result.json").write_text(json.dumps(recorded))
    _touch(project)
    second = package_json(project)
    assert "optimize" not in second["cached_stages"] and second["sha256"] == first["sha256"]
    assert package_json(project, "--no-cache")["sha256"] == first["sha256"]
