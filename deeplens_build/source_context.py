"""The service source plugins receive (:class:`SourceContext`): downloads cached once per key, and training
outputs read from a folder or a fetched file, archives extracted safely.

Archives are extracted by :mod:`deeplens_build.archive` (regular files and folders only, plain relative
paths, no link ever followed) under size and member-count limits checked before each member is written, into
a cache folder that is renamed into place only when complete. Nothing is ever written outside the work folder.
"""

from __future__ import annotations

import itertools
import lzma
import shutil
import tarfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deeplens_build.archive import (
    Extractor,
    UnsafeMember,
    check_end,
    header_bytes,
    member_parts,
    open_tar,
)
from deeplens_build.cache import Cache
from deeplens_build.config import FetchConfig
from deeplens_build.digest import file_sha256, tree_sha256
from deeplens_build.errors import SourceError
from deeplens_build.report import Reporter
from deeplens_build.types import SageMakerJob, TrainingOutput


@dataclass(frozen=True)
class SourceContext:
    """What a source plugin's fetch function gets from the core (see ``deeplens_build_sources``).

    :param cache: the build's stage cache; use it through :meth:`stored`.
    :param limits: the user's ``[fetch]`` limits, which :meth:`from_file` enforces.
    :param reporter: for progress bars (``reporter.progress``), steps and warnings.
    """

    cache: Cache
    limits: FetchConfig
    reporter: Reporter

    def stored(self, name: str, key: Mapping[str, Any], download: Callable[[Path], Path]) -> tuple[Path, bool]:
        """A file fetched once per ``key``: ``download(folder)`` writes it into an empty folder and returns its
        path; the next build with the same key gets the stored file without calling it.

        :param name: names the cache folder, e.g. ``"download"``.
        :param key: everything the file's bytes depend on (e.g. the URI and the object's ETag or version).
        :return: the file, and whether it came from the cache.
        """
        return self.cache.stage(name, key, Path, download)

    def from_file(self, path: Path, *, origin: str, kind: str | None = None, sagemaker: SageMakerJob | None = None,
                  companions: tuple[str, ...] = ()) -> TrainingOutput:
        """The training output in a fetched file: an archive is extracted (safely, under the limits) into the
        cache; any other file is a one-file output, with the ``companions`` it needs.

        :param origin: names the source in messages and the manifest (never an absolute local path).
        :param kind: the manifest's ``source.kind``; None: ``"archive"`` for a tar archive, else ``"file"``.
        :param companions: files beside a model file that belong to it (an ONNX model's external data), as
            plain relative paths from its folder; they are part of the output and of its digest.
        :raises SourceError: for an archive that is damaged, mislabelled or unsafe to extract.
        """
        if kind is None:
            kind = "archive" if _is_tar(path) else "file"
        return _from_file(path, kind=kind, origin=origin, context=self, job=sagemaker, companions=companions)

    def from_folder(self, path: Path, *, origin: str) -> TrainingOutput:
        """The training output in a folder, read in place (never written); ``origin`` names it.

        :raises SourceError: for a folder without files.
        """
        return _from_directory(path, origin)


def _from_directory(path: Path, origin: str) -> TrainingOutput:
    files = tuple(sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                         if p.is_file() and not p.is_symlink()))
    if not files:
        raise SourceError(f"source {origin} holds no files; point it at the training output")
    return TrainingOutput(root=path.resolve(), files=files, sha256=tree_sha256(path, files),
                          size=sum((path / f).stat().st_size for f in files), kind="directory", origin=origin)


def _from_file(path: Path, *, kind: str, origin: str, context: SourceContext,
               job: SageMakerJob | None = None, companions: tuple[str, ...] = ()) -> TrainingOutput:
    archive = _is_tar(path)
    sha256 = tree_sha256(path.parent, (path.name, *companions)) if companions else file_sha256(path)

    def unpack(scratch: Path) -> TrainingOutput:
        tree = scratch / "tree"
        if not archive:
            tree.mkdir()
            for name in (path.name, *companions):
                (tree / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path.parent / name, tree / name)
        else:
            extract(path, tree, limits=context.limits, reporter=context.reporter, origin=origin)
        unpacked = _from_directory(tree, origin)
        return TrainingOutput(root=tree, files=unpacked.files, sha256=sha256, size=path.stat().st_size,
                              kind=kind, origin=origin)

    # a lone model file's name is part of what it is (plugins recognise it by its suffix); an archive's members
    # are named inside its bytes
    key = {"sha256": sha256, "limits": context.limits.model_dump(), "archive": archive,
           "name": None if archive else path.name, "companions": companions}
    output, cached = context.cache.stage("source", key, TrainingOutput, unpack)
    if cached:
        context.reporter.step(f"source: {origin} already extracted (cache)")
    # the cache stores the first origin it saw for these bytes; this build names its own
    return TrainingOutput(root=output.root, files=output.files, sha256=sha256, size=output.size,
                          kind=kind, origin=origin, sagemaker=job)


_ARCHIVE_NAMES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def _is_tar(path: Path) -> bool:
    """Whether ``path`` is a tar archive; one that says it is (by name or compression) but is not is damaged.

    :raises SourceError: for a damaged or mislabelled archive, which no plugin could recognise either.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(6)
        with open_tar(path):  # not tarfile.is_tarfile: it would read a hostile first header whole
            return True
    except UnsafeMember:
        return True  # a tar archive with a hostile first header: extract() names the problem
    except (OSError, EOFError, zlib.error, lzma.LZMAError, tarfile.TarError):
        pass
    named = path.name.lower().endswith(_ARCHIVE_NAMES)
    if head.startswith(b"PK\x03\x04") and named:
        raise SourceError(f"{path.name} is a zip file, not a tar archive; pass the extracted folder, or "
                          "re-pack it with `tar -czf model.tar.gz -C FOLDER .`")
    if named or head.startswith(_COMPRESSED_MAGIC):
        raise SourceError(f"archive {path.name} is damaged or not a tar archive ({path.stat().st_size} bytes); "
                          "download it again or pass the extracted folder")
    return False


def extract(archive: Path, dest: Path, *, limits: FetchConfig, reporter: Reporter, origin: str) -> None:
    """Extract ``archive`` into ``dest`` (which must not exist), refusing anything unsafe (see :mod:`archive`).

    Header bytes count against ``fetch.max_bytes`` like file contents do, checked before each member is read.

    :raises SourceError: naming the member and the problem; ``dest`` is then removed.
    """
    total = 0
    member: tarfile.TarInfo | None = None
    try:
        with open_tar(archive) as tar, Extractor(dest) as out, \
                reporter.progress(total=None, desc=f"extract {origin}", unit="file") as bar:
            for count in itertools.count(1):
                member = None  # while the next header is read, a problem is the archive's, not the last member's
                member = tar.next()
                if member is None:
                    break
                total += header_bytes(member) + (member.size if member.isreg() else 0)
                if count > limits.max_members:
                    raise SourceError(f"archive {origin} has more than {limits.max_members} members; refusing to "
                                      "extract it (raise `fetch.max_members` if the archive is trusted)")
                if total > limits.max_bytes:
                    raise SourceError(f"archive {origin} expands to more than {limits.max_bytes} bytes; refusing "
                                      "to extract it (raise `fetch.max_bytes` if the archive is trusted)")
                out.add(tar, member, member_parts(member))
                bar.update(1)
            member = None
            check_end(tar)
    except UnsafeMember as exc:
        shutil.rmtree(dest, ignore_errors=True)
        which = f"member {member.name!r}" if member is not None and member.name else "the archive"
        raise SourceError(f"archive {origin}: {which} {exc}; refusing to extract it. Re-create the archive from the "
                          "training output folder with relative paths (`tar -czhf` stores files, not links).") from exc
    except OSError as exc:
        shutil.rmtree(dest, ignore_errors=True)
        if exc.errno is not None:  # the file system's refusal (disk full, read-only, ...), not the archive's fault
            raise SourceError(f"cannot extract archive {origin} into the work folder: {exc.strerror}; free space "
                              "or point `build.work_dir` elsewhere") from exc
        raise SourceError(f"archive {origin} is damaged or not a tar archive ({exc}); download it again or pass "
                          "the extracted folder") from exc
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise SourceError(f"archive {origin} is damaged or not a tar archive ({exc}); download it again or pass "
                          "the extracted folder") from exc
    except SourceError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
