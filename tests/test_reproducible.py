"""Same inputs, same bytes; and an unchanged rebuild reuses every stage."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from helpers import open_bundle, package_json

from deeplens_build import testing


def _copy_project(src: Path, dst: Path) -> Path:
    shutil.copytree(src.parent, dst, ignore=shutil.ignore_patterns("dist", ".deeplens"))
    return dst / src.name


def test_two_folders_build_the_same_bundle_bytes(tmp_path: Path, onnx_model_dir: Path) -> None:
    first = testing.write_project(tmp_path / "a" / "project", source=onnx_model_dir, model={"precision": "fp16"})
    testing.signing_key(first.parent)
    second = _copy_project(first, tmp_path / "b" / "elsewhere")
    model_copy = tmp_path / "b" / "training-output"
    shutil.copytree(onnx_model_dir, model_copy)
    text = second.read_text().replace(str(onnx_model_dir), str(model_copy))
    second.write_text(text)

    one, two = package_json(first), package_json(second)
    assert one["bundle"] != two["bundle"]
    assert one["sha256"] == two["sha256"]
    assert Path(one["bundle"]).read_bytes() == Path(two["bundle"]).read_bytes()
    assert one["cached_stages"] == two["cached_stages"] == []


def test_unchanged_rebuild_hits_the_cache_and_says_so(project: Path) -> None:
    first = package_json(project)
    second = package_json(project)
    assert first["sha256"] == second["sha256"]
    assert second["cached_stages"] == ["convert", "optimize", "reference", "target-check", "parity", "lambda",
                                       "greengrass", "attest"]


def test_no_cache_rebuilds_every_stage_to_the_same_bytes(project: Path) -> None:
    first = package_json(project)
    forced = package_json(project, "--no-cache")
    assert forced["cached_stages"] == []
    assert forced["sha256"] == first["sha256"]


def test_changed_setting_rebuilds_only_what_depends_on_it(project: Path) -> None:
    package_json(project)
    project.write_text(project.read_text().replace('[lambda]', '[parity]\nseed = 7\n\n[lambda]'))
    report = package_json(project)
    assert report["cached_stages"] == ["convert", "optimize", "target-check", "lambda", "greengrass"]


def test_changed_lambda_source_gets_a_new_content_version(project: Path) -> None:
    from deeplens_build.bundle import read_manifest

    first = read_manifest(Path(package_json(project)["bundle"])).to_dict()["lambda"]["version"]
    handler = project.parent / "lambda" / "inference.py"
    handler.write_text(handler.read_text() + "\n# changed\n")
    second = read_manifest(Path(package_json(project)["bundle"])).to_dict()["lambda"]["version"]
    assert first != second and first.startswith("1.0.0+") and second.startswith("1.0.0+")


def test_source_date_epoch_sets_the_archive_timestamps(project: Path, monkeypatch) -> None:

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    bundle = Path(package_json(project)["bundle"])
    with open_bundle(bundle) as tar:
        assert {m.mtime for m in tar.getmembers()} == {1700000000}
        assert {(m.uid, m.gid, m.uname, m.gname, m.mode) for m in tar.getmembers()} == {(0, 0, "", "", 0o644)}


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file whose bytes are hashed, as a new process would see it (nothing known but the stat index)."""
    from deeplens_build import digest

    seen: list[Path] = []
    original = digest._read_sha256

    def counting(path: Path) -> str:
        seen.append(Path(path))
        return original(path)

    monkeypatch.setattr(digest, "_read_sha256", counting)
    monkeypatch.setattr(digest, "RACY_SECONDS", 0.0)  # the test's files are seconds old; a real index waits 2 s
    monkeypatch.setattr(digest, "_KNOWN", {})
    return seen


def test_a_no_change_rebuild_reads_no_input_and_leaves_the_bundle_alone(project: Path, reads: list[Path]) -> None:
    from deeplens_build import digest

    first = package_json(project)
    before = Path(first["bundle"]).stat()
    digest._KNOWN.clear()  # a new process: only the stat index remembers
    reads.clear()
    os.utime(project)  # the pipeline runs (test_uptodate: what else does), and finds nothing to do
    second = package_json(project)
    assert not second["up_to_date"]
    assert reads == [], "every digest came from the stat index"
    after = Path(second["bundle"]).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "the bundle was not rewritten"
    assert second["sha256"] == first["sha256"]


def test_a_touched_input_is_read_again_and_a_changed_one_rebuilds(project: Path, onnx_model_dir: Path,
                                                                  reads: list[Path]) -> None:
    from deeplens_build import digest

    first = package_json(project)
    model = onnx_model_dir / "model.onnx"
    os.utime(model, ns=(time.time_ns() - 10**10, time.time_ns() - 10**10))  # touched: same bytes, new times
    digest._KNOWN.clear()
    reads.clear()
    touched = package_json(project)
    assert [p.name for p in reads] == ["model.onnx"], "only the touched file is read, once"
    assert touched["sha256"] == first["sha256"] and "convert" in touched["cached_stages"]
    data = bytearray(model.read_bytes())
    data[-1] ^= 0x01  # one byte of the model
    model.write_bytes(bytes(data))
    changed = package_json(project)
    assert "convert" not in changed["cached_stages"] and changed["sha256"] != first["sha256"]


def test_a_new_source_date_epoch_rewrites_a_bundle_whose_manifest_is_unchanged(project: Path, monkeypatch) -> None:
    """The manifest does not hold the members' time: a bundle of the same manifest at another epoch is another
    bundle, and is written again."""
    package_json(project)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    bundle = Path(package_json(project)["bundle"])
    with open_bundle(bundle) as tar:
        assert {m.mtime for m in tar.getmembers()} == {1700000000}


def test_a_source_date_epoch_that_is_no_number_is_one_error(project: Path, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    assert "SOURCE_DATE_EPOCH is 'yesterday', not a number of seconds" in package_json(project, expect=7)
