"""A ``package`` whose bundle is already built is recognised before anything heavy is imported: the no-change
rebuild in a blink. Like make's and ninja's check, but with what the last build read instead of declared inputs.

While a build runs, Python's audit events (PEP 578) tell what it observed: every file it opened for reading,
every folder it listed, every file :func:`digest.file_sha256` identified from the stat index without opening it,
and the folder each of those lies in (a new checkpoint beside the model, a new module on the import path, a
labels file that was missing are changes too). What the build changed itself (the files it wrote, the folders
whose entries it changed, everything under a folder it moved or removed) is output, not input. After a build
whose inputs are all local files, those paths with their identities (device, inode, size, modification and
change times) are the stamp, kept in the work folder under the digest of the request: the command's options, the
working folder, the interpreter and its import path, and the ``DEEPLENS_*`` and ``SOURCE_DATE_EPOCH`` variables.

The next ``package`` with the same request is up to date when every recorded path has the same identity (or is
still missing), and the bundle and its folder are as that build left them. Anything else, or any doubt (no stamp,
an unreadable one, an input changed within the file system's time resolution of being read), runs the pipeline,
whose stage cache decides the rest. Builds that read more than local files (a source fetched from S3 or
SageMaker, a KMS key, ``--publish``) are never stamped.

Only the standard library is imported here: the check must cost less than importing pydantic would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deeplens_build.digest import IDENTIFIED, settled, stat_identity
from deeplens_build.files import write_atomic
from deeplens_build.errors import DeepLensBuildError
from deeplens_build.layout import WORK_DIR, config_file, read_document

STAMPS = "up-to-date"
FORMAT = 1

_Identity = list[int] | None
"""``digest.stat_identity`` as JSON has it; None for a path that did not exist."""
_READS = frozenset({"open", "os.listdir", "os.scandir", IDENTIFIED})
_WRITES = {"os.rename": ((0, 2), (1, 3)), "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
           "os.link": ((1, 3),), "os.symlink": ((1, 2),), "os.truncate": ((0, None),), "os.utime": ((0, 3),),
           "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "shutil.rmtree": ((0, 1),)}
"""Audit events that change a file system path: the positions of each path argument and of the folder
descriptor it may be relative to (-1 or None: the working folder)."""
_MOVES = frozenset({"os.rename", "os.rmdir", "shutil.rmtree"})
"""Of those, the ones that change everything under the path too (a folder moved or removed)."""
_PSEUDO = ("/proc/", "/sys/", "/dev/")


@dataclass(frozen=True)
class Replay:
    """What an up-to-date ``package`` prints: its build's report, as text and as ``--json``, and its stderr."""

    text: str
    json: str
    stderr: str


@dataclass(frozen=True)
class Request:
    """What one ``package`` command asks for, beyond the files it reads, as the digest that names its stamp."""

    config: Path
    key: str
    config_seen: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """The project file and its folder as they were when the command started, before it read the file: the
    command reads it once, before its recording begins, and the record must hold the state it read."""

    @classmethod
    def of(cls, *, config: Path | None, source: str | None, output: Path | None, signing_key: str | None,
           shared_cache: str | None) -> Request:
        """Taken when the command starts, before the build changes the environment or the import path."""
        path = config_file(config)
        # the signing key may be PEM text in $DEEPLENS_SIGNING_KEY: it is only ever hashed
        environment = {k: v for k, v in os.environ.items() if k.startswith("DEEPLENS_") or k == "SOURCE_DATE_EPOCH"}
        request = {"format": FORMAT, "config": str(path), "source": source,
                   "output": output and str(output.absolute()), "signing_key": signing_key,
                   "shared_cache": shared_cache, "cwd": os.getcwd(), "python": sys.executable, "path": sys.path,
                   "environment": environment}
        return cls(config=path, key=hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest(),
                   config_seen={name: _identity(name) for name in (str(path), str(path.parent))})


def check(request: Request, document: Mapping[str, Any] | None = None, *, no_cache: bool = False,
          publish: bool = False) -> Replay | None:
    """What the last build of ``request`` printed, when nothing it read has changed since; else None.

    :param document: the project file's TOML, when the caller has read it already.
    :param no_cache: ``--no-cache``, which always runs the pipeline.
    :param publish: ``--publish``, which always does too: publishing is a side effect no record replays.
    """
    if no_cache or publish:
        return None
    try:
        build = (read_document(request.config) if document is None else document).get("build", {})
        stamp = json.loads((request.config.parent / build.get("work_dir", WORK_DIR) / STAMPS /
                            f"{request.key}.json").read_text(encoding="utf-8"))
        paths: Mapping[str, _Identity] = stamp["paths"]
        if stamp["format"] != FORMAT or not paths:
            return None
        replay = Replay(**stamp["replay"])
        if all(isinstance(text, str) for text in (replay.text, replay.json, replay.stderr)) and \
                all(_identity(path) == identity for path, identity in paths.items()):
            return replay
    except (OSError, ValueError, KeyError, TypeError, AttributeError, DeepLensBuildError):
        pass  # no stamp, or one this check cannot read: the pipeline decides
    return None


class Recording:
    """What one build observed; see the module's docstring."""

    def __init__(self) -> None:
        self.seen: dict[str, _Identity] = {}
        self.written: set[str] = set()
        """Paths the build changed, and the folders whose entries it changed."""
        self.moved: set[str] = set()
        """Paths the build moved or removed, with everything under them."""
        self.broken = False
        """An event could not be understood: what the build read is not known, so nothing is stored."""
        self.foreign: frozenset[threading.Thread] = frozenset()
        """Threads whose events are not the build's."""

    def event(self, event: str, args: tuple[Any, ...]) -> None:
        if event in _READS:
            path = args[0] if args else None
            if event == "open" and _writes(args):
                # "open" does not say whether a relative path is relative to a folder's descriptor: such a
                # write is not attributed; were it to change a path this build read, save() would see a change
                # nobody announced, and store nothing
                if isinstance(path, (str, bytes, os.PathLike)) and os.path.isabs(os.fsdecode(path)):
                    self._wrote(path)
            elif path is None and event != "open":  # os.listdir() and os.scandir() of the working folder
                self._read(os.getcwd(), listed=True)
            elif isinstance(path, (str, bytes, os.PathLike)):  # not a descriptor: opened (and seen) by path
                self._read(path, listed=event in ("os.listdir", "os.scandir"))
        elif (positions := _WRITES.get(event)) is not None:
            if event == "os.mkdir" and args[2] in (-1, None) and os.path.lexists(args[0]):
                return  # makedirs(exist_ok=True) of a folder already there (the work folder, each build) writes nothing
            for position, folder in positions:
                if folder is None or args[folder] in (-1, None):
                    self._wrote(args[position], moved=event in _MOVES)

    def _read(self, path: str | bytes | os.PathLike[Any], *, listed: bool = False) -> None:
        """A folder listed is seen as itself; a file with the folder it lies in."""
        name = os.path.abspath(os.fsdecode(path))
        if name.startswith(_PSEUDO):
            return
        for observed in (name,) if listed else (name, os.path.dirname(name)):
            if observed not in self.seen:
                self.seen[observed] = _identity(observed)

    def _wrote(self, path: Any, *, moved: bool = False) -> None:
        if isinstance(path, (str, bytes, os.PathLike)):
            name = os.path.abspath(os.fsdecode(path))
            self.written.update((name, os.path.dirname(name)))
            if moved:
                self.moved.add(name)

    def _by_build(self, path: str) -> bool:
        """Whether the build changed ``path`` itself (or the entries of the folder it is), or moved or removed it
        or a folder holding it. Writing into a folder says nothing of the other files in it."""
        if path in self.written:
            return True
        while path not in self.moved:
            if (parent := os.path.dirname(path)) == path:
                return False
            path = parent
        return True

    def save(self, request: Request, *, work_dir: Path, bundle: Path, replay: Replay) -> None:
        """Store the stamp, unless an input changed during the build or too recently to be trusted."""
        if self.broken:
            return
        for module in list(sys.modules.values()):  # the code that ran, by its source (an import reads the .pyc)
            if isinstance(source := getattr(module, "__file__", None), str):
                self._read(source)
        paths, now = {}, time.time_ns()
        for path, before in self.seen.items():
            if _identity(path) == before:
                if before is not None and not settled(before, now) and not self._by_build(path):
                    return
                paths[path] = before
            elif not self._by_build(path):
                return  # changed while the build ran, by someone else: the bundle may hold either state
            # else changed by the build itself (the stat index, a folder it wrote into): an output
        paths |= {name: _identity(name) for name in map(os.path.abspath, (bundle, bundle.parent))}
        write_atomic(work_dir / STAMPS / f"{request.key}.json",
                     json.dumps({"format": FORMAT, "paths": paths, "replay": dataclasses.asdict(replay)}))


_recording: Recording | None = None
_hooked = False


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if (observed := _recording) is not None and threading.current_thread() not in observed.foreign:
        try:
            observed.event(event, args)
        except Exception:  # an audit hook runs inside whatever the build was doing: it must never break it
            observed.broken = True


@contextlib.contextmanager
def recording(request: Request | None = None) -> Iterator[Recording]:
    """Observe the file system reads and writes of what runs inside; one recording at a time per process.

    :param request: the command's request, whose project file counts as read (it was, before the recording).
    """
    global _recording, _hooked
    if not _hooked:  # an audit hook cannot be removed: one per process, idle between recordings
        sys.addaudithook(_hook)
        _hooked = True
    _recording = observed = Recording()
    # threads that were running before the build started are not the build's (a test runner's servers, the
    # leftovers of an earlier command in the same process): what they read or write is no input or output of it
    observed.foreign = frozenset(t for t in threading.enumerate() if t is not threading.current_thread())
    if request is not None:
        observed.seen.update(request.config_seen)
    try:
        yield observed
    finally:
        _recording = None


def _writes(args: tuple[Any, ...]) -> bool:
    mode, flags = (args + (None, None))[1:3]
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))


def _identity(path: str) -> _Identity:
    try:
        return list(stat_identity(os.stat(path)))
    except OSError:
        return None
