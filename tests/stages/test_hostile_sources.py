"""The hostile corpus through the command line: each source gets one error line and harms nothing.

For every case: a non-zero exit, exactly one ``error:`` line, no traceback, nothing written outside the
project's work folder (a canary folder beside the project is unchanged), nothing at the output path.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import files_under, package_json
from hostile import CORPUS, realpath_chain

from deeplens_build import testing

LIMITS = {"max_bytes": 16 << 20, "max_members": 200}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p: (folder / p).read_bytes() for p in files_under(folder) if (folder / p).is_file()}


def _package_refused(tmp_path: Path, source: Path | str, expected: str) -> None:
    canary = tmp_path / "canary"
    canary.mkdir(exist_ok=True)
    (canary / "flag").write_text("original")
    before = _snapshot(canary)
    config = testing.write_project(tmp_path / "project", source=source, fetch=LIMITS)
    line = package_json(config, expect=4)
    assert expected in line, line
    assert _snapshot(canary) == before, "the canary folder beside the project was touched"
    project_files = files_under(config.parent)
    outside_work = {p for p in project_files if not p.startswith(".deeplens")}
    assert outside_work == {"deeplens.toml", "lambda", "lambda/inference.py", "signing-key.pem",
                            "signing-key.pub.pem"}, outside_work


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_hostile_archive_is_one_error_and_harms_nothing(tmp_path: Path, case: str) -> None:
    build, expected = CORPUS[case]
    _package_refused(tmp_path, build(tmp_path / "model.tar.gz"), expected)


def test_path_max_chain_through_the_cli(tmp_path: Path) -> None:
    # sized for the scratch folder the cache extracts into, as an attacker who knows the tool would
    scratch = tmp_path / "project" / ".deeplens" / "cache" / "source" / ".build-xxxxxxxx" / "tree"
    archive = realpath_chain(tmp_path / "model.tar.gz", scratch, target=tmp_path / "canary" / "flag")
    _package_refused(tmp_path, archive, "is a link; training outputs and bundles need none")


@pytest.mark.parametrize("special", ["fifo", "/dev/zero", "/dev/null"])
def test_special_file_source_is_named_as_such(tmp_path: Path, special: str) -> None:
    source = special
    if special == "fifo":
        source = str(tmp_path / "model.tar.gz")
        os.mkfifo(source)
    _package_refused(tmp_path, source, "is not a regular file or folder")


def test_error_line_names_the_source_not_a_scratch_folder(tmp_path: Path) -> None:
    build, _ = CORPUS["empty tar"]
    config = testing.write_project(tmp_path / "project", source=build(tmp_path / "model.tar.gz"))
    line = package_json(config, expect=4)
    assert "source model.tar.gz holds no files" in line and ".deeplens" not in line, line
