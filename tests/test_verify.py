"""`deeplens-build verify`: any changed, added or missing file, or a bad signature, fails naming the problem."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
from helpers import cli, error_line, open_bundle, package_json

from deeplens_build import signing, testing
from deeplens_build.device.run import DeviceOptions, run_device
from deeplens_build.errors import VerificationError
from deeplens_build.manifest import MANIFEST, SIGNATURE
from deeplens_build.report import Reporter
from deeplens_build.signing import load_signer


@pytest.fixture
def bundle(project: Path) -> Path:
    return Path(package_json(project)["bundle"])


def _members(bundle: Path) -> dict[str, bytes]:
    with open_bundle(bundle) as tar:
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
    with open_bundle(bundle) as src, tarfile.open(fileobj=raw, mode="w") as tar:
        for member in src.getmembers():
            tar.addfile(member, src.extractfile(member))
        link = tarfile.TarInfo("model/link")
        link.type, link.linkname = tarfile.SYMTYPE, "model.onnx"
        tar.addfile(link)
    target = bundle.with_name("linked.tar.gz")
    target.write_bytes(gzip.compress(raw.getvalue()))
    assert "'model/link' is a link" in error_line(cli("verify", target, expect=8))


def test_truncated_or_foreign_file_is_a_clear_error(bundle: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(bundle.read_bytes()[:-200])
    assert "is damaged" in error_line(cli("verify", truncated, expect=8))
    foreign = tmp_path / "notes.txt"
    foreign.write_text("hello")
    assert "is not a bundle archive" in error_line(cli("verify", foreign, expect=8))
    assert "does not exist" in error_line(cli("verify", tmp_path / "nope.tar.gz", expect=8))


def _resigned(bundle: Path, key: Path, change) -> Path:
    """The bundle with its manifest changed by ``change(dict)`` and validly signed again by ``key``: what a
    holder of any key (or of the signer's, with --allow-any-signer) can hand to verify, inspect, run or deploy."""
    members = _members(bundle)
    manifest = json.loads(members[MANIFEST])
    change(manifest)
    members[MANIFEST] = json.dumps(manifest).encode()
    members[SIGNATURE] = load_signer(str(key)).sign(members[MANIFEST])
    return _rewrite(bundle, members)


def _set(path: str, value: object):
    def change(manifest: dict) -> None:
        *parents, last = path.split(".")
        target = manifest
        for part in parents:
            target = target[part]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value
    return change


_DELETE = object()
HOSTILE_MANIFESTS = {
    "name with parent parts": ("name", "deeplens-../../victim", "Field `name`"),
    "name without prefix": ("name", "victim", "Field `name`"),
    "handler as code": ("lambda.handler", "os;import os;os.system('id').x", "Field `lambda.handler`"),
    "lambda file outside": ("lambda.file", "../evil.zip", "Field `lambda.file`"),
    "missing fingerprint": ("signing.fingerprint", _DELETE, "Field `signing.fingerprint` is required"),
    "missing model": ("model", _DELETE, "Field `model` is required"),
    "size as a string": ("optimization.size_after", "12", "Field `optimization.size_after`"),
    "version as a number": ("version", 1, "Field `version`"),
    "environment with a bad name": ("lambda.environment", {"A B": "x"}, "Field `lambda.environment"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_MANIFESTS))
def test_malformed_signed_manifest_is_a_verification_error_naming_the_field(bundle: Path, project: Path,
                                                                            case: str) -> None:
    path, value, expected = HOSTILE_MANIFESTS[case]
    hostile = _resigned(bundle, project.parent / "signing-key.pem", _set(path, value))
    for command in (("verify", hostile), ("inspect", hostile)):
        line = error_line(cli(*command, expect=8))
        assert "manifest.json is malformed" in line and expected in line, line


def test_fingerprint_is_computed_from_the_key_never_taken_from_the_manifest(bundle: Path, project: Path,
                                                                           tmp_path: Path) -> None:
    other = testing.signing_key(tmp_path / "other")
    claimed = signing.fingerprint(other.with_name("signing-key.pub.pem").read_text())
    hostile = _resigned(bundle, project.parent / "signing-key.pem", _set("signing.fingerprint", claimed))
    assert "is not its key's" in error_line(cli("verify", hostile, expect=8))
    own = signing.fingerprint((project.parent / "signing-key.pub.pem").read_text())
    assert own[:16] in cli("verify", bundle).stdout


def test_run_never_builds_a_path_from_an_unvalidated_name(bundle: Path, project: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep")
    hostile = _resigned(bundle, project.parent / "signing-key.pem", _set("name", "../../victim"))
    with pytest.raises(VerificationError, match="Field `name`"):
        run_device(hostile, DeviceOptions(device_dir=tmp_path / "a" / "b"), reporter=Reporter(quiet=True),
                   stop=threading.Event(), public_key=project.parent / "signing-key.pub.pem")
    assert (victim / "precious.txt").read_text() == "keep"


def test_oversized_manifest_or_signature_is_refused_unread(bundle: Path) -> None:
    members = _members(bundle)
    members[MANIFEST] = b" " * (17 << 20)
    assert "manifest.json is 17825792 bytes, more than" in error_line(cli("verify", _rewrite(bundle, members),
                                                                          expect=8))
    members = _members(bundle)
    members[SIGNATURE] = b"\0" * 4096
    assert "manifest.sig is 4096 bytes, more than the 1024" in error_line(cli("verify", _rewrite(bundle, members),
                                                                             expect=8))


def test_pax_header_bomb_in_a_bundle_is_refused(bundle: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in _members(bundle).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if name == "model/labels.txt":
                info.pax_headers = {"comment": "x" * (8 << 20)}
            tar.addfile(info, io.BytesIO(data))
    target = bundle.with_name("bomb.tar.gz")
    target.write_bytes(gzip.compress(raw.getvalue()))
    assert "extended (PAX/GNU) header of" in error_line(cli("verify", target, expect=8))


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_damaged_trailer_or_truncation_is_refused(bundle: Path, tmp_path: Path, compression: str) -> None:
    data = bundle.read_bytes() if compression == "zstd" else _rewrite(bundle, _members(bundle)).read_bytes()
    for offset, what in ((-8, "last block"), (-3, "checksum or length")):
        damaged = tmp_path / f"{compression}-{offset}.bundle"
        damaged.write_bytes(_flip(data, len(data) + offset))
        assert "is damaged" in error_line(cli("verify", damaged, expect=8)), what
    truncated = tmp_path / f"{compression}-truncated.bundle"
    truncated.write_bytes(data[:-5])
    assert "is damaged" in error_line(cli("verify", truncated, expect=8))


def test_a_bundle_of_the_earlier_gzip_format_still_verifies_and_unpacks(bundle: Path, project: Path,
                                                                        tmp_path: Path) -> None:
    older = _rewrite(bundle, _members(bundle))  # the same members, compressed as bundles were before zstd
    assert older.read_bytes()[:2] == b"\x1f\x8b"
    assert cli("verify", older, "--public-key", project.parent / "signing-key.pub.pem").stdout.startswith("verified:")


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_a_second_compressed_stream_appended_is_refused(bundle: Path, tmp_path: Path, compression: str) -> None:
    import zstandard

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("lambda/evil.py")
        payload = b"import os\n"
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    compress = zstandard.compress if compression == "zstd" else gzip.compress
    data = bundle.read_bytes() if compression == "zstd" else _rewrite(bundle, _members(bundle)).read_bytes()
    appended = tmp_path / "appended.bundle"
    appended.write_bytes(data + compress(raw.getvalue()))  # `tar -tif` would list lambda/evil.py
    assert "has data after the end of the archive" in error_line(cli("verify", appended, expect=8))
    garbage = tmp_path / "garbage.bundle"
    garbage.write_bytes(data + b"trailing bytes")
    assert "is damaged" in error_line(cli("verify", garbage, expect=8))


@pytest.mark.parametrize("special", ["folder", "/dev/zero", "fifo"])
def test_verify_of_something_not_a_file_says_so(tmp_path: Path, special: str) -> None:
    path = {"folder": tmp_path, "/dev/zero": Path("/dev/zero"), "fifo": tmp_path / "b.tar.gz"}[special]
    if special == "fifo":
        os.mkfifo(path)
    assert "is not a regular file" in error_line(cli("verify", path, expect=8))


def test_inspect_into_a_reader_that_stops_ends_quietly(bundle: Path) -> None:
    """``inspect B | head -1``: the reader is gone before the manifest is printed; no error, no traceback."""
    process = subprocess.Popen([sys.executable, "-m", "deeplens_build.cli", "inspect", str(bundle)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # as head does once it has its lines
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141, stderr
    assert stderr == ""


def test_debug_works_after_the_command_name_too(tmp_path: Path) -> None:
    missing = tmp_path / "missing.tar.zst"
    assert "error: " in error_line(cli("inspect", missing, expect=8))
    result = cli("inspect", missing, "--debug", expect=1)
    assert isinstance(result.exception, VerificationError), "the traceback, not the one line"


def _zstd_frame(blocks: int, *, window_exponent: int = 13) -> bytes:
    """A hand-made zstd frame of ``blocks`` RLE blocks of 128 KiB of zeros each: 4 bytes apiece, so 32 KiB of
    file expand to 1 GiB (the memory bomb)."""
    header = b"\x28\xb5\x2f\xfd" + bytes([0x00, window_exponent << 3])  # no content size, no checksum
    rle = [(1 << 1) | (128 << 10 << 3), (1 << 1) | (128 << 10 << 3) | 1]  # the last block's bit set
    return header + b"".join((rle[i == blocks - 1]).to_bytes(3, "little") + b"\0" for i in range(blocks))


def test_a_zstd_bomb_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.tar.zst"
    bomb.write_bytes(_zstd_frame(8192))
    assert bomb.stat().st_size < 40_000
    # the peak of this process's own memory (VmHWM): getrusage's would count the pytest process it forked from
    code = ("import sys\nfrom pathlib import Path\nfrom deeplens_build.bundle import verify_bundle\n"
            "from deeplens_build.errors import VerificationError\ntry:\n    verify_bundle(Path(sys.argv[1]))\n"
            "except VerificationError as exc:\n    print(exc)\n"
            "status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
            "print(int(status['VmHWM'].split()[0]) // 1024)\n")
    done = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=300,
                          check=True)
    message, peak_mib = done.stdout.splitlines()
    assert "bomb.tar.zst" in message
    assert int(peak_mib) < 400, f"{peak_mib} MiB to reject 32 KiB (before: 1 GiB and more)"


def test_a_frame_asking_for_a_huge_window_is_refused(tmp_path: Path) -> None:
    greedy = tmp_path / "greedy.tar.zst"
    greedy.write_bytes(_zstd_frame(1, window_exponent=21))  # a 2 GiB window
    assert "window" in error_line(cli("verify", greedy, expect=8))


def test_a_skippable_frame_appended_is_refused(bundle: Path, tmp_path: Path) -> None:
    """A zstd skippable frame of arbitrary bytes, which decompressors pass over in silence."""
    hidden = b"any bytes at all"
    skippable = b"\x50\x2a\x4d\x18" + len(hidden).to_bytes(4, "little") + hidden
    appended = tmp_path / "appended.tar.zst"
    appended.write_bytes(bundle.read_bytes() + skippable)
    key = bundle.parent.parent / "signing-key.pub.pem"
    assert "has data after the end of the archive" in error_line(
        cli("verify", appended, *(["--public-key", key] if key.exists() else []), expect=8))


@pytest.mark.parametrize("case", ["chained PAX headers", "chained GNU long names", "name that is not UTF-8"])
def test_hostile_headers_in_a_bundle_are_one_error_for_every_reader(tmp_path: Path, case: str) -> None:
    import zstandard

    from hostile import CORPUS

    build, _ = CORPUS[case]
    archive = gzip.decompress(build(tmp_path / "model.tar.gz").read_bytes())
    hostile = tmp_path / "hostile.tar.zst"
    hostile.write_bytes(zstandard.ZstdCompressor().compress(archive))
    for command in ("verify", "inspect"):
        line = error_line(cli(command, hostile, expect=8))
        assert "hostile.tar.zst" in line and "internal error" not in line, line
