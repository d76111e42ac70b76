"""The fetch stage: safe extraction of hostile archives, and every kind of local source."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import cli, error_line, files_under
from hostile import CORPUS, member, realpath_chain, write_tar

from deeplens_build import testing
from deeplens_build.cache import Cache
from deeplens_build.config import FetchConfig
from deeplens_build.errors import SourceError
from deeplens_build.report import Reporter
from deeplens_build.builtin.sources import local
from deeplens_build.source_context import SourceContext


def _archive(path: Path, *members: tuple[str, bytes]) -> Path:
    return write_tar(path, *(member(name, data=data) for name, data in members))


def _fetch(source: Path, work: Path, **limits: int):
    context = SourceContext(cache=Cache(work / "cache"), limits=FetchConfig(**limits), reporter=Reporter(quiet=True))
    return local(str(source), context)


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_rejects_hostile_archive_and_writes_nothing_outside(tmp_path: Path, case: str) -> None:
    build, expected = CORPUS[case]
    archive = build(tmp_path / "model.tar.gz")
    work = tmp_path / "work"
    before = files_under(tmp_path)
    with pytest.raises(SourceError) as error:
        _fetch(archive, work, max_bytes=16 << 20, max_members=200)
    assert expected in str(error.value)
    assert "model.tar.gz" in str(error.value)
    assert str(work) not in str(error.value), "no internal scratch path in the message"
    assert {p for p in files_under(tmp_path) if p.split("/")[0] != "work"} == before, "nothing beside the work folder"
    assert not any(p.name == "tree" for p in work.rglob("*")), "no half-extracted tree is left in the cache"
    assert not Path("/tmp/deeplens-evil.txt").exists()


def test_path_max_symlink_chain_cannot_overwrite_a_file_outside(tmp_path: Path) -> None:
    """CVE-2025-4517: this archive gets past Python 3.11.7's own ``data`` filter; it must not get past ours."""
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "flag").write_text("original")
    work = tmp_path / "work"
    # the chain is sized for the folder it is extracted into: the cache's scratch folder for this archive
    archive = realpath_chain(tmp_path / "model.tar.gz", work / "cache" / "source" / ".build-xxxxxxxx" / "tree",
                             target=canary / "flag")
    with pytest.raises(SourceError, match="is a link; training outputs and bundles need none"):
        _fetch(archive, work)
    assert (canary / "flag").read_text() == "original"
    assert sorted(p.name for p in canary.iterdir()) == ["flag"]


def test_rejects_archive_with_too_many_members(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "model.tar.gz", *((f"f{i}", b"") for i in range(20)))
    with pytest.raises(SourceError, match=r"more than 10 members.*fetch.max_members"):
        _fetch(archive, tmp_path / "work", max_members=10)


def test_counts_declared_sizes_before_writing_anything(tmp_path: Path) -> None:
    # 64 MiB of zeros compresses to ~64 KiB: the declared size trips the limit before a byte is written
    archive = _archive(tmp_path / "bomb.tar.gz", ("model/zeros.bin", bytes(64 << 20)))
    assert archive.stat().st_size < 1 << 20
    with pytest.raises(SourceError, match=r"expands to more than 1048576 bytes.*fetch.max_bytes"):
        _fetch(archive, tmp_path / "work", max_bytes=1 << 20)
    assert not [p for p in (tmp_path / "work").rglob("zeros.bin")]


def test_extracts_a_safe_archive_once(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "model.tar.gz", ("model/a.onnx", b"onnx"), ("model/sub/b.txt", b"b"))
    first = _fetch(archive, tmp_path / "work")
    assert first.files == ("model/a.onnx", "model/sub/b.txt")
    assert first.kind == "archive" and first.size == archive.stat().st_size
    second = _fetch(archive, tmp_path / "work")
    assert second.root == first.root and second.sha256 == first.sha256


def test_folder_source_is_read_in_place_and_never_written(onnx_model_dir: Path, tmp_path: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in onnx_model_dir.rglob("*")}
    output = _fetch(onnx_model_dir, tmp_path / "work")
    assert output.root == onnx_model_dir.resolve()
    assert output.files == ("labels.txt", "model.onnx")
    assert {p: p.stat().st_mtime_ns for p in onnx_model_dir.rglob("*")} == before


def test_single_model_file_is_a_source(tmp_path: Path, onnx_model_dir: Path) -> None:
    output = _fetch(onnx_model_dir / "model.onnx", tmp_path / "work")
    assert output.files == ("model.onnx",) and output.kind == "file"


def test_missing_source_is_one_clear_error(tmp_path: Path) -> None:
    config = testing.write_project(tmp_path / "project", source=tmp_path / "nowhere")
    testing.signing_key(config.parent)
    result = cli("package", "--config", config, "--signing-key", config.parent / "signing-key.pem", expect=4)
    assert "does not exist; give a folder, a model.tar.gz, an s3://BUCKET/KEY URI" in error_line(result)
    assert not (config.parent / "dist").exists()


def test_hostile_archive_through_the_cli_leaves_no_output(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "model.tar.gz", ("../../evil.onnx", b"x"))
    config = testing.write_project(tmp_path / "project", source=archive)
    testing.signing_key(config.parent)
    result = cli("package", "--config", config, "--signing-key", config.parent / "signing-key.pem", expect=4)
    assert "'../../evil.onnx' would be written outside the extraction folder" in error_line(result)
    assert not (config.parent / "dist").exists()
    assert "Traceback" not in result.output
