"""The fetch stage: safe extraction of hostile archives, and every kind of local source."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from helpers import cli, error_line, files_under

from deeplens_build import testing
from deeplens_build.cache import Cache
from deeplens_build.config import FetchConfig
from deeplens_build.errors import SourceError
from deeplens_build.fetch import fetch
from deeplens_build.report import Reporter


def _archive(path: Path, *members: tarfile.TarInfo | tuple[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            if isinstance(member, tuple):
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(member)
    return path


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _fetch(source: Path, work: Path, **limits: int):
    return fetch(str(source), cache=Cache(work / "cache"), limits=FetchConfig(**limits), reporter=Reporter(quiet=True))


HOSTILE = {
    "parent path": (("../evil.txt", b"x"),),
    "nested parent path": (("model/../../evil.txt", b"x"),),
    "absolute path": (("/tmp/deeplens-evil.txt", b"x"),),
    "symlink escape": (_link("model/escape", "../../../etc/passwd", tarfile.SYMTYPE),),
    "absolute symlink": (_link("model/escape", "/etc/passwd", tarfile.SYMTYPE),),
    "hardlink escape": (_link("model/escape", "../../outside.txt", tarfile.LNKTYPE),),
    "device file": (_link("model/dev", "", tarfile.CHRTYPE),),
    "fifo": (_link("model/fifo", "", tarfile.FIFOTYPE),),
}
EXPECTED = {
    "parent path": "would be written outside the extraction folder",
    "nested parent path": "would be written outside the extraction folder",
    "absolute path": "has an absolute path",
    "symlink escape": "is a link pointing outside the extraction folder",
    "absolute symlink": "is a link to an absolute path",
    "hardlink escape": "outside the extraction folder",
    "device file": "is a device, FIFO or other special file",
    "fifo": "is a device, FIFO or other special file",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_rejects_hostile_archive_and_writes_nothing_outside(tmp_path: Path, case: str) -> None:
    archive = _archive(tmp_path / "model.tar.gz", ("model/model.onnx", b"onnx"), *HOSTILE[case])
    work = tmp_path / "work"
    before = files_under(tmp_path)
    with pytest.raises(SourceError) as error:
        _fetch(archive, work)
    assert EXPECTED[case] in str(error.value)
    assert "model.tar.gz" in str(error.value)
    assert {p for p in files_under(tmp_path) if p.split("/")[0] != "work"} == before, "nothing beside the work folder"
    assert not any(p.name == "tree" for p in work.rglob("*")), "no half-extracted tree is left in the cache"
    assert not Path("/tmp/deeplens-evil.txt").exists()


def test_rejects_archive_with_too_many_members(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "model.tar.gz", *((f"f{i}", b"") for i in range(20)))
    with pytest.raises(SourceError, match=r"more than 10 members.*fetch.max_members"):
        _fetch(archive, tmp_path / "work", max_members=10)


def test_rejects_decompression_bomb_before_writing_it(tmp_path: Path) -> None:
    # 64 MiB of zeros compresses to ~64 KiB: the declared size trips the limit before a byte is written
    archive = _archive(tmp_path / "bomb.tar.gz", ("model/zeros.bin", bytes(64 << 20)))
    assert archive.stat().st_size < 1 << 20
    with pytest.raises(SourceError, match=r"expands to more than 1048576 bytes.*fetch.max_bytes"):
        _fetch(archive, tmp_path / "work", max_bytes=1 << 20)
    assert not [p for p in (tmp_path / "work").rglob("zeros.bin")]


def test_rejects_damaged_archive(tmp_path: Path, onnx_model_dir: Path) -> None:
    good = _archive(tmp_path / "good.tar.gz", ("model.onnx", (onnx_model_dir / "model.onnx").read_bytes()))
    damaged = tmp_path / "model.tar.gz"
    damaged.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SourceError, match=r"model.tar.gz is damaged or not a tar archive"):
        _fetch(damaged, tmp_path / "work")


def test_extracts_safe_archive_with_internal_symlink_once(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "model.tar.gz", ("model/a.onnx", b"onnx"), _link("model/b", "a.onnx", tarfile.SYMTYPE))
    first = _fetch(archive, tmp_path / "work")
    assert first.files == ("model/a.onnx",), "links are not model files"
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
