"""Reading tar archives from untrusted hands: training outputs (fetch) and bundles (verify, deploy, run).

Nothing here relies on tarfile's extraction filters. Python 3.11.7's ``data`` filter is bypassable
(CVE-2025-4517: a chain of symlinks whose path passes PATH_MAX makes ``os.path.realpath`` stop resolving, so
its "stays inside" check looks at another path than the kernel then follows), and a fix depends on the
interpreter's patch level. Training outputs and bundles need no links, so:

- only regular files and folders are accepted; links, devices, FIFOs and anything else are refused;
- member names are plain relative paths (no ``..``, no absolute path, no NUL, bounded length), checked before
  anything is written;
- files are written component by component through folder descriptors opened with ``O_NOFOLLOW``, and created
  with ``O_EXCL``: even a link planted by someone else could not redirect a write;
- PAX and GNU long-name headers past :data:`MAX_HEADER`, or more than :data:`MAX_CHAINED_HEADERS` in a row, are
  refused before tarfile reads them (into memory, by recursion), and header bytes count against the caller's byte
  limit, so a small archive cannot claim gigabytes of RAM or the interpreter's stack;
- member names must be UTF-8 (they become file names here and manifest entries everywhere).
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import IO

MAX_HEADER = 64 * 1024
"""Bytes a PAX or GNU long-name header may hold: a long path needs a few KiB, never more."""
MAX_CHAINED_HEADERS = 8
"""Extended headers in a row before a member (a PAX global and a PAX header, or GNU long name and long link)."""
MAX_NAME = 1024
"""Bytes a member's path may hold: far below PATH_MAX (4096) even under a deep work folder."""
MAX_COMPONENT = 255
"""Bytes one path component may hold (NAME_MAX on Linux and macOS)."""
MAX_PADDING = 1 << 20
"""Zero bytes allowed after the end-of-archive blocks (writers pad to their record size)."""
_CHUNK = 1 << 20
_EXTENDED_HEADERS = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                     tarfile.GNUTYPE_LONGLINK)


class UnsafeMember(Exception):
    """A member that must not be extracted; the message says what is wrong with it (callers add the archive)."""


class _BoundedTarInfo(tarfile.TarInfo):
    # _proc_member is where tarfile dispatches on the header type, before it reads an extended header whole and
    # before it reads, recursively, the header the extended one applies to; a public hook for this does not exist.
    def _proc_member(self, tarfile_: tarfile.TarFile):  # type: ignore[override]
        if self.type not in _EXTENDED_HEADERS:
            return super()._proc_member(tarfile_)
        if self.size > MAX_HEADER:
            raise UnsafeMember(f"has an extended (PAX/GNU) header of {self.size} bytes, more than the "
                               f"{MAX_HEADER} a real archive needs")
        depth = _chained.get(id(tarfile_), 0) + 1
        if depth > MAX_CHAINED_HEADERS:
            raise UnsafeMember(f"has more than {MAX_CHAINED_HEADERS} extended (PAX/GNU) headers in a row; a real "
                               "archive needs two at most")
        _chained[id(tarfile_)] = depth
        try:
            return super()._proc_member(tarfile_)
        finally:
            if depth == 1:
                del _chained[id(tarfile_)]
            else:
                _chained[id(tarfile_)] = depth - 1


_chained: dict[int, int] = {}
"""Extended headers being read in a row, per open archive: tarfile reads each chained header by recursion, so
an archive of thousands of them would otherwise end in RecursionError."""


def open_tar(path: Path | None = None, *, fileobj: IO[bytes] | None = None, mode: str = "r:*") -> tarfile.TarFile:
    """Open a tar archive for reading with bounded extended headers.

    :raises UnsafeMember: for an oversized header; tarfile's own errors for anything else.
    """
    return tarfile.open(path, mode=mode, fileobj=fileobj, tarinfo=_BoundedTarInfo)


def header_bytes(member: tarfile.TarInfo) -> int:
    """The bytes the member's headers (its own, plus any PAX or GNU ones before it) took in the archive."""
    return member.offset_data - member.offset


def member_parts(member: tarfile.TarInfo) -> tuple[str, ...]:
    """The member's path components, after checking that the member is a file or folder with a plain path.

    :raises UnsafeMember: naming what is wrong.
    """
    name = member.name
    if member.issym() or member.islnk():
        raise UnsafeMember("is a link; training outputs and bundles need none, so links are refused")
    if not (member.isreg() or member.isdir()):
        raise UnsafeMember("is a device, FIFO or other special file")
    if "\0" in name:
        raise UnsafeMember("has a NUL byte in its path")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:  # tarfile kept the undecodable bytes as surrogates
        raise UnsafeMember(f"has a path that is not UTF-8 ({name.encode('utf-8', 'surrogateescape')[:80]!r})") \
            from None
    if len(encoded) > MAX_NAME:
        raise UnsafeMember(f"has a path of {len(encoded)} bytes, more than {MAX_NAME}")
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute():
        raise UnsafeMember("has an absolute path")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise UnsafeMember("would be written outside the extraction folder")
    if any(len(part.encode("utf-8")) > MAX_COMPONENT for part in parts):
        raise UnsafeMember(f"has a path component longer than {MAX_COMPONENT} bytes")
    if not parts and not member.isdir():
        raise UnsafeMember("has an empty path")
    return parts


class Extractor:
    """Writes checked members under a folder this process created, never following a link."""

    def __init__(self, dest: Path):
        dest.mkdir(parents=True)
        self.dest = dest
        self._root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)

    def __enter__(self) -> Extractor:
        return self

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        os.close(self._root)
        if error is not None:
            shutil.rmtree(self.dest, ignore_errors=True)

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        """Write ``member`` (a folder, or a regular file streamed from ``tar``) at ``parts`` under the folder."""
        if member.isdir():
            os.close(self._folder(parts))
            return
        source = tar.extractfile(member)
        assert source is not None  # a regular file, checked by member_parts
        self.add_stream(source, parts)

    def add_stream(self, source: IO[bytes], parts: tuple[str, ...]) -> None:
        """Write the file at ``parts`` (creating its folders) from ``source``; it must not exist yet."""
        folder = self._folder(parts[:-1])
        try:
            try:
                fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=folder)
            except FileExistsError:
                raise UnsafeMember("appears twice, or as both a file and a folder") from None
            with os.fdopen(fd, "wb") as target:
                for block in iter(lambda: source.read(_CHUNK), b""):
                    target.write(block)
        finally:
            os.close(folder)

    def _folder(self, parts: tuple[str, ...]) -> int:
        fd = os.dup(self._root)
        for part in parts:
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError:
                os.close(fd)
                raise UnsafeMember("is below a path that is a file, not a folder") from None
            os.close(fd)
            fd = child
        return fd


def check_end(tar: tarfile.TarFile) -> None:
    """Read the archive to the end of its compressed stream, once every member has been read.

    tarfile stops at the end-of-archive blocks, so without this a damaged checksum or length in the gzip (or
    bzip2, xz) trailer goes unnoticed, and so does a second compressed stream appended after the archive
    (``tar -tzi`` lists its members). Only the zero padding that writers leave (a record, 10 KiB, for GNU tar;
    at most :data:`MAX_PADDING` here) may follow the last member.

    :raises UnsafeMember: for data after the end; the decompressor's own errors for a damaged trailer.
    """
    stream = tar.fileobj
    if stream.tell() < tar.offset:
        stream.seek(tar.offset)
    # else tarfile already read past the end-of-archive blocks (zeros, by definition); a compressed stream would
    # only seek back by decompressing again from the start
    padding, data = 0, False
    for block in iter(lambda: stream.read(_CHUNK), b""):
        padding += len(block)
        data = data or block.count(0) != len(block)
        if padding > MAX_PADDING:
            raise UnsafeMember("has data after the end of the archive (another archive appended to it?)")
    if data:  # said once the stream has ended: a damaged checksum, found there, is the truer cause
        raise UnsafeMember("has data after the end of the archive (another archive appended to it?)")
