"""Lambda stage: the inference Lambda's source as a deterministic zip, versioned by its content.

Same source, same bytes: sorted entries, a fixed timestamp, normalized permissions, no ``__pycache__``.
Files that look like secrets are refused, never silently dropped: the user must see that they were there.
"""

from __future__ import annotations

import fnmatch
import zipfile
from collections.abc import Mapping
from pathlib import Path

from deeplens_build.config import LambdaConfig
from deeplens_build.digest import file_sha256, tree_sha256
from deeplens_build.errors import ConfigError
from deeplens_build.types import LambdaPackage

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
"""The earliest time a zip entry can hold."""

_SKIPPED_DIRS = {"__pycache__", ".git", ".pytest_cache", ".mypy_cache"}
_SKIPPED_FILES = ("*.pyc", "*.pyo", ".DS_Store")
_SECRETS = (".env", ".env.*", "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_ed25519*", "id_ecdsa*",
            "credentials", "*.credentials", ".aws", ".netrc", ".pypirc", "*secret*")


def package_lambda(config: LambdaConfig, *, default_name: str, workdir: Path) -> LambdaPackage:
    source = config.source
    if not source.is_dir():
        raise ConfigError(f"Field `lambda.source` points to {source}, which is not a folder; point it at the "
                          "folder holding the inference Lambda's code")
    files = lambda_files(source)
    module = config.handler.rsplit(".", 1)[0].replace(".", "/") + ".py"
    if "." not in config.handler or module not in files:
        raise ConfigError(f"Field `lambda.handler` is {config.handler!r}, but {source} has no {module}; "
                          "use MODULE.FUNCTION, e.g. inference.handler")
    name = config.name or default_name
    target = write_zip({rel: source / rel for rel in files}, workdir / f"{name}.zip")
    sha256 = file_sha256(target)
    content = tree_sha256(source, files)
    return LambdaPackage(path=target, name=name, handler=config.handler,
                         version=f"{config.version}+{content[:12]}", sha256=sha256)


def lambda_files(source: Path) -> list[str]:
    """The files to package, sorted; raises ``ConfigError`` naming any file that looks like a secret."""
    files, secrets = [], []
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if any(part in _SKIPPED_DIRS for part in rel.parts) or not path.is_file():
            continue
        if any(fnmatch.fnmatch(rel.name, pattern) for pattern in _SKIPPED_FILES):
            continue
        if path.is_symlink() and not path.resolve().is_relative_to(source.resolve()):
            secrets.append(f"{rel.as_posix()} (a link to {path.resolve()})")
            continue
        if any(fnmatch.fnmatch(part.lower(), pattern) for part in rel.parts for pattern in _SECRETS):
            secrets.append(rel.as_posix())
            continue
        files.append(rel.as_posix())
    if secrets:
        raise ConfigError(f"`lambda.source` holds files that look like secrets: {', '.join(secrets)}; move them "
                          "out of the Lambda's folder (pass secrets through the Lambda's environment or AWS "
                          "Secrets Manager), they must never be deployed")
    if not files:
        raise ConfigError(f"`lambda.source` ({source}) holds no files to package")
    return files


def write_zip(entries: Mapping[str, Path], target: Path) -> Path:
    """A zip whose bytes depend only on the entries' names and contents: sorted, fixed time, mode 0644."""
    with zipfile.ZipFile(target, "w") as archive:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # unix, whatever the build machine is
            archive.writestr(info, entries[name].read_bytes(), compresslevel=9)
    return target
