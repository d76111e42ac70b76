"""Hostile sources, built on disk by each test: what an attacker or a damaged download hands to ``package``.

Each builder writes one file at ``path`` (named ``model.tar.gz`` unless the case is about the name) and returns
the text the single ``error:`` line must contain.
"""

from __future__ import annotations

import gzip
import io
import os
import random
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path


def member(name: str, *, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "",
           pax: dict[str, str] | None = None) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o777 if kind == tarfile.DIRTYPE else 0o644
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.pax_headers = pax or {}
    return info, data


def write_tar(path: Path, *members: tuple[tarfile.TarInfo, bytes], mode: str = "w:gz",
              fmt: int = tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, mode, format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


ONNX = member("model/model.onnx", data=b"onnx")


def realpath_chain(path: Path, dest: Path, target: Path) -> Path:
    """CVE-2025-4517: symlinks through folders whose real path passes PATH_MAX, so ``os.path.realpath`` stops
    resolving and tarfile's ``data`` filter checks another path than the kernel follows. Extracted into
    ``dest`` by an unpatched Python, it overwrites the file ``target`` and creates ``new`` beside it.
    """
    outside = next(p for p in target.parents if dest.is_relative_to(p))
    ups = [".."] * len(dest.relative_to(outside).parts)
    relative = target.relative_to(outside).as_posix()
    steps = "abcdefghijklmnop"
    path_max = os.pathconf(dest.parent if dest.parent.exists() else "/", "PC_PATH_MAX")
    component = "d" * ((path_max - len(str(dest)) - 1) // (len(steps) + 1))
    members, parent = [], ""
    for step in steps:
        members.append(member(os.path.join(parent, component), kind=tarfile.DIRTYPE))
        members.append(member(os.path.join(parent, step), kind=tarfile.SYMTYPE, link=component))
        parent = os.path.join(parent, component)
    linkpath = os.path.join(*steps, "l" * 254)
    members.append(member(linkpath, kind=tarfile.SYMTYPE, link=os.path.join(*[".."] * len(steps))))
    members.append(member("escape", kind=tarfile.SYMTYPE, link=os.path.join(linkpath, *ups)))
    members.append(member("flaglink", kind=tarfile.LNKTYPE, link=f"escape/{relative}"))
    members.append(member("flaglink", data=b"overwritten by the archive"))
    members.append(member(f"escape/{os.path.dirname(relative)}/new", data=b"new"))
    return write_tar(path, *members)


def _raw_header(name: str, kind: bytes, size: int) -> bytes:
    """A ustar header claiming ``size`` bytes of content that never follow (tarfile trusts the claim)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _declared_header_bomb(path: Path, kind: bytes) -> Path:
    raw = _raw_header("././@LongHeader", kind, 1 << 30) + b"x" * 4096
    path.write_bytes(gzip.compress(raw, mtime=0))
    return path


def _chained_headers(path: Path, kind: bytes, count: int = 5000) -> Path:
    """``count`` extended headers in a row before one small file: tarfile reads each chained one by recursion."""
    content = b"18 path=model/a.x\n" if kind in (tarfile.XHDTYPE, tarfile.XGLTYPE) else b"model/long-name.onnx\0"
    padded = content + bytes(-len(content) % 512)
    name = "././@PaxHeader" if kind in (tarfile.XHDTYPE, tarfile.XGLTYPE) else "././@LongLink"
    chain = (_raw_header(name, kind, len(content)) + padded) * count
    info, data = ONNX
    path.write_bytes(gzip.compress(chain + info.tobuf(format=tarfile.USTAR_FORMAT) + data + bytes(512 - len(data))
                                   + bytes(1024), mtime=0))
    return path


def _not_utf8_name(path: Path) -> Path:
    """A member whose name is Latin-1 bytes, as an old archiver on a non-UTF-8 system writes it."""
    with tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for info, data in (ONNX, member(b"model/caf\xe9.txt".decode("utf-8", "surrogateescape"), data=b"x")):
            tar.addfile(info, io.BytesIO(data))
    return path


def _pax_bomb_after_a_member(path: Path) -> Path:
    """An oversized PAX header after a good member: the problem is the archive's, not that member's."""
    return write_tar(path, ONNX, member("model/b.onnx", data=b"onnx", pax={"comment": "x" * (8 << 20)}))


def _pax_bomb(path: Path) -> Path:
    """A real 8 MiB PAX header (it compresses to a few KiB) in front of a small file."""
    return write_tar(path, member("model/model.onnx", data=b"onnx", pax={"comment": "x" * (8 << 20)}))


def _gzip_flipped(path: Path) -> Path:
    write_tar(path, ONNX, member("model/weights.bin", data=random.Random(1).randbytes(64 << 10)))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _truncated(path: Path) -> Path:
    write_tar(path, ONNX, member("model/weights.bin", data=random.Random(2).randbytes(64 << 10)))
    path.write_bytes(path.read_bytes()[:-20000])
    return path


def _zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model.onnx", b"onnx")
    return path


def _bytes(data: bytes) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        path.write_bytes(data)
        return path
    return build


def _tar(*members: tuple[tarfile.TarInfo, bytes], mode: str = "w:gz") -> Callable[[Path], Path]:
    return lambda path: write_tar(path, *members, mode=mode)


DAMAGED = "is damaged or not a tar archive"
OUTSIDE = "would be written outside the extraction folder"
LINK = "is a link; training outputs and bundles need none"
SPECIAL = "is a device, FIFO or other special file"

CORPUS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "parent path": (_tar(ONNX, member("../evil.txt", data=b"x")), OUTSIDE),
    "nested parent path": (_tar(ONNX, member("model/../../evil.txt", data=b"x")), OUTSIDE),
    "dot parent path": (_tar(ONNX, member("./../evil.txt", data=b"x")), OUTSIDE),
    "absolute path": (_tar(ONNX, member("/tmp/deeplens-evil.txt", data=b"x")), "has an absolute path"),
    "backslash absolute path": (_tar(ONNX, member("\\evil.txt", data=b"x")), "has an absolute path"),
    "symlink escape": (_tar(ONNX, member("model/escape", kind=tarfile.SYMTYPE, link="../../../etc/passwd")), LINK),
    "absolute symlink": (_tar(ONNX, member("model/escape", kind=tarfile.SYMTYPE, link="/etc/passwd")), LINK),
    "internal symlink": (_tar(ONNX, member("model/alias.onnx", kind=tarfile.SYMTYPE, link="model.onnx")), LINK),
    "hardlink escape": (_tar(ONNX, member("model/escape", kind=tarfile.LNKTYPE, link="../../outside.txt")), LINK),
    "internal hardlink": (_tar(ONNX, member("model/copy.onnx", kind=tarfile.LNKTYPE, link="model/model.onnx")),
                          LINK),
    "character device": (_tar(ONNX, member("model/tty", kind=tarfile.CHRTYPE)), SPECIAL),
    "block device": (_tar(ONNX, member("model/disk", kind=tarfile.BLKTYPE)), SPECIAL),
    "fifo": (_tar(ONNX, member("model/fifo", kind=tarfile.FIFOTYPE)), SPECIAL),
    "NUL in path": (_tar(ONNX, member("model/evil.onnx", data=b"x", pax={"path": "model/ev\0il.onnx"})),
                    "has a NUL byte in its path"),
    "path past the length bound": (_tar(ONNX, member("/".join(["model"] + ["d" * 200] * 10) + "/x", data=b"x")),
                                   "has a path of"),
    "component past NAME_MAX": (_tar(ONNX, member("model/" + "n" * 300, data=b"x")),
                                "has a path component longer than 255 bytes"),
    "PAX header bomb": (_pax_bomb, "extended (PAX/GNU) header of"),
    "declared PAX bomb": (lambda p: _declared_header_bomb(p, tarfile.XHDTYPE), "extended (PAX/GNU) header of"),
    "declared GNU long-name bomb": (lambda p: _declared_header_bomb(p, tarfile.GNUTYPE_LONGNAME),
                                    "extended (PAX/GNU) header of"),
    "chained PAX headers": (lambda p: _chained_headers(p, tarfile.XHDTYPE), "extended (PAX/GNU) headers in a row"),
    "chained PAX global headers": (lambda p: _chained_headers(p, tarfile.XGLTYPE),
                                   "extended (PAX/GNU) headers in a row"),
    "chained GNU long names": (lambda p: _chained_headers(p, tarfile.GNUTYPE_LONGNAME),
                               "extended (PAX/GNU) headers in a row"),
    "name that is not UTF-8": (_not_utf8_name, "has a path that is not UTF-8 (b'model/caf\\xe9.txt')"),
    "PAX header bomb after a member": (_pax_bomb_after_a_member,
                                       "model.tar.gz: the archive has an extended (PAX/GNU) header of"),
    "duplicate member": (_tar(ONNX, member("model/model.onnx", data=b"again")), "appears twice"),
    "file then folder of the same name": (_tar(member("model", data=b"x"), ONNX),
                                          "below a path that is a file, not a folder"),
    "decompression bomb": (_tar(ONNX, member("model/zeros.bin", data=bytes(24 << 20))), "expands to more than"),
    "too many members": (_tar(*(member(f"model/f{i}.bin", data=b"x") for i in range(300))), "more than 200 members"),
    "truncated gzip": (_truncated, DAMAGED),
    "flipped gzip byte": (_gzip_flipped, DAMAGED),
    "empty file": (_bytes(b""), DAMAGED),
    "random bytes": (_bytes(random.Random(3).randbytes(4096)), DAMAGED),
    "gzip of zeros": (_bytes(gzip.compress(bytes(1 << 16), mtime=0)), "holds no files"),
    "zip named model.tar.gz": (_zip, "is a zip file, not a tar archive"),
    "bzip2 garbage": (_bytes(b"BZh91AY&SY" + random.Random(4).randbytes(512)), DAMAGED),
    "xz garbage": (_bytes(b"\xfd7zXZ\x00" + random.Random(5).randbytes(512)), DAMAGED),
    "empty tar": (_tar(), "holds no files"),
}
"""Each hostile source: its builder, and what the error must say. Limits used: max_bytes 16 MiB, 200 members."""
