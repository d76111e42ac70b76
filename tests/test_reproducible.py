"""Same inputs, same bytes; and an unchanged rebuild reuses every stage."""

from __future__ import annotations

import shutil
from pathlib import Path

from helpers import package_json

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
    assert second["cached_stages"] == ["convert", "optimize", "parity", "lambda", "greengrass"]


def test_no_cache_rebuilds_every_stage_to_the_same_bytes(project: Path) -> None:
    first = package_json(project)
    forced = package_json(project, "--no-cache")
    assert forced["cached_stages"] == []
    assert forced["sha256"] == first["sha256"]


def test_changed_setting_rebuilds_only_what_depends_on_it(project: Path) -> None:
    package_json(project)
    project.write_text(project.read_text().replace('[lambda]', '[parity]\nseed = 7\n\n[lambda]'))
    report = package_json(project)
    assert report["cached_stages"] == ["convert", "optimize", "lambda", "greengrass"]


def test_changed_lambda_source_gets_a_new_content_version(project: Path) -> None:
    from deeplens_build.bundle import read_manifest

    first = read_manifest(Path(package_json(project)["bundle"])).to_dict()["lambda"]["version"]
    handler = project.parent / "lambda" / "inference.py"
    handler.write_text(handler.read_text() + "\n# changed\n")
    second = read_manifest(Path(package_json(project)["bundle"])).to_dict()["lambda"]["version"]
    assert first != second and first.startswith("1.0.0+") and second.startswith("1.0.0+")


def test_source_date_epoch_sets_the_archive_timestamps(project: Path, monkeypatch) -> None:
    import tarfile

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    bundle = Path(package_json(project)["bundle"])
    with tarfile.open(bundle) as tar:
        assert {m.mtime for m in tar.getmembers()} == {1700000000}
        assert {(m.uid, m.gid, m.uname, m.gname, m.mode) for m in tar.getmembers()} == {(0, 0, "", "", 0o644)}
