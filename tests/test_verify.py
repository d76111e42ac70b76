"""`deeplens-build verify`: any changed, added or missing file, or a bad signature, fails naming the problem."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest
from helpers import cli, error_line, package_json

from deeplens_build import testing
from deeplens_build.bundle import MANIFEST, SIGNATURE


@pytest.fixture
def bundle(project: Path) -> Path:
    return Path(package_json(project)["bundle"])


def _members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _rewrite(bundle: Path, members: dict[str, bytes]) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    target = bundle.with_name("tampered.tar.gz")
    target.write_bytes(gzip.compress(raw.getvalue()))
    return target


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def test_untouched_bundle_verifies_with_its_trusted_key(bundle: Path, project: Path) -> None:
    out = cli("verify", bundle, "--public-key", project.parent / "signing-key.pub.pem").stdout
    assert out.startswith("verified: ")


def test_without_a_trusted_key_it_says_integrity_only(bundle: Path) -> None:
    assert cli("verify", bundle).stdout.startswith("verified integrity only:")


@pytest.mark.parametrize("name", ["model/model.onnx", "model/labels.txt", "lambda/deeplens-test-model.zip",
                                  "runtime/onnxruntime/runtime.toml", "greengrass/recipe.json"])
def test_one_changed_byte_in_any_payload_file_fails(bundle: Path, name: str) -> None:
    members = _members(bundle)
    members[name] = _flip(members[name], len(members[name]) // 2)
    result = cli("verify", _rewrite(bundle, members), expect=8)
    assert f"{name} was changed" in error_line(result)


def test_changed_manifest_fails_the_signature(bundle: Path) -> None:
    members = _members(bundle)
    members[MANIFEST] = members[MANIFEST].replace(b'"version": "1.0.0"', b'"version": "1.0.1"')
    result = cli("verify", _rewrite(bundle, members), expect=8)
    assert "signature does not match" in error_line(result)


def test_added_file_fails(bundle: Path) -> None:
    members = _members(bundle) | {"model/extra.bin": b"surprise"}
    assert "model/extra.bin is in the bundle but not in the manifest" in error_line(
        cli("verify", _rewrite(bundle, members), expect=8))


def test_removed_file_fails(bundle: Path) -> None:
    members = _members(bundle)
    del members["model/labels.txt"]
    assert "model/labels.txt is listed in the manifest but missing" in error_line(
        cli("verify", _rewrite(bundle, members), expect=8))


def test_swapped_signature_fails(bundle: Path, tmp_path: Path, onnx_model_dir: Path) -> None:
    other_project = testing.write_project(tmp_path / "other", source=onnx_model_dir, name="deeplens-other")
    other = Path(package_json(other_project)["bundle"])
    members = _members(bundle)
    members[SIGNATURE] = _members(other)[SIGNATURE]
    assert "signature does not match" in error_line(cli("verify", _rewrite(bundle, members), expect=8))


def test_missing_or_damaged_signature_fails(bundle: Path) -> None:
    members = _members(bundle)
    members[SIGNATURE] = _flip(members[SIGNATURE], 10)
    assert "signature does not match" in error_line(cli("verify", _rewrite(bundle, members), expect=8))
    del members[SIGNATURE]
    assert "the bundle is unsigned" in error_line(cli("verify", _rewrite(bundle, members), expect=8))


def test_wrong_public_key_fails(bundle: Path, tmp_path: Path) -> None:
    stranger = testing.signing_key(tmp_path / "stranger")
    result = cli("verify", bundle, "--public-key", stranger.with_name("signing-key.pub.pem"), expect=8)
    assert "not by the trusted key" in error_line(result)


def test_duplicate_member_and_link_are_refused(bundle: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(bundle) as src, tarfile.open(fileobj=raw, mode="w") as tar:
        for member in src.getmembers():
            tar.addfile(member, src.extractfile(member))
        link = tarfile.TarInfo("model/link")
        link.type, link.linkname = tarfile.SYMTYPE, "model.onnx"
        tar.addfile(link)
    target = bundle.with_name("linked.tar.gz")
    target.write_bytes(gzip.compress(raw.getvalue()))
    assert "'model/link' is not a regular file" in error_line(cli("verify", target, expect=8))


def test_truncated_or_foreign_file_is_a_clear_error(bundle: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(bundle.read_bytes()[:-200])
    assert "is damaged" in error_line(cli("verify", truncated, expect=8))
    foreign = tmp_path / "notes.txt"
    foreign.write_text("hello")
    assert "is not a bundle archive" in error_line(cli("verify", foreign, expect=8))
    assert "does not exist" in error_line(cli("verify", tmp_path / "nope.tar.gz", expect=8))
