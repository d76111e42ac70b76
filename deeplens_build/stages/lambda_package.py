"""Lambda stage: the inference Lambda's source as a deterministic zip, versioned by its content.

Same source, same bytes: sorted entries, a fixed timestamp, normalized permissions, no ``__pycache__``.
Files that look like secrets are refused, never silently dropped: the user must see that they were there.
"""

from __future__ import annotations

import ast
import fnmatch
import zipfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from deeplens_build.config import LambdaConfig, ProjectConfig
from deeplens_build.device import support
from deeplens_build.digest import file_sha256, json_sha256
from deeplens_build.errors import ConfigError
from deeplens_build.values import LambdaPackage

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
"""The earliest time a zip entry can hold."""

_SKIPPED_DIRS = {"__pycache__", ".git", ".pytest_cache", ".mypy_cache"}
_SKIPPED_FILES = ("*.pyc", "*.pyo", ".DS_Store")
# File names that hold credentials, after the sensitive-file signatures of gitrob and shhgit (no maintained
# Python package ships such a list); matched case-insensitively against each path component, and, for the
# patterns with a "/", against the path itself. Contents are scanned too (detect-secrets), so a key saved
# under an innocent name is caught as well.
_SECRET_NAMES = (
    ".env", ".env.*", "*.pem", "*.key", "*.p12", "*.pfx", "*.p8", "*.ppk", "*.jks", "*.keystore", "*.kdbx",
    "id_rsa*", "id_dsa*", "id_ed25519*", "id_ecdsa*", ".ssh", "credentials", "*.credentials", "credentials.json",
    ".aws", ".netrc", "_netrc", ".pypirc", ".npmrc", ".yarnrc", ".pgpass", ".my.cnf", ".git-credentials",
    ".gitconfig", ".htpasswd", ".s3cfg", ".boto", ".dockercfg", ".docker", ".kube", "kubeconfig",
    "*.tfstate", "*.tfstate.backup", "*.tfvars", "service-account*.json", "client_secret*.json", "*secret*",
    "terraform.rc", ".terraformrc", "*.ovpn", ".bash_history", ".zsh_history", ".python_history",
)
_SECRET_PATHS = (".docker/config.json", "*/.docker/config.json", ".kube/config", "*/.kube/config")
_CONTENT_DETECTORS = (
    "PrivateKeyDetector", "AWSKeyDetector", "AzureStorageKeyDetector", "GitHubTokenDetector",
    "GitLabTokenDetector", "SlackDetector", "StripeDetector", "TwilioKeyDetector", "SendGridDetector",
    "MailchimpDetector", "NpmDetector", "PypiTokenDetector", "OpenAIDetector", "JwtTokenDetector",
    "BasicAuthDetector", "DiscordBotTokenDetector", "TelegramBotTokenDetector", "SquareOAuthDetector",
)


if TYPE_CHECKING:
    from deeplens_build.build import Build
"""detect-secrets' detectors of credentials with a recognisable shape; its entropy and keyword detectors are left
out, since hashes and ``password = input()`` in ordinary code would stop every build."""


def package_lambda(config: LambdaConfig, *, default_name: str, workdir: Path) -> LambdaPackage:
    source = config.source
    if not source.is_dir():
        raise ConfigError(f"Field `lambda.source` points to {source}, which is not a folder; point it at the "
                          "folder holding the inference Lambda's code")
    files = lambda_files(source)
    _refuse_secrets(source, files)
    entries = _with_support(source, files, compat=config.deeplens_compat)
    module = config.handler.rsplit(".", 1)[0].replace(".", "/") + ".py"
    if "." not in config.handler or module not in entries:
        raise ConfigError(f"Field `lambda.handler` is {config.handler!r}, but {source} has no {module}; "
                          "use MODULE.FUNCTION, e.g. inference.handler")
    name = config.name or default_name
    target = write_zip(entries, workdir / f"{name}.zip")
    sha256 = file_sha256(target)
    content = json_sha256({rel: file_sha256(path) for rel, path in sorted(entries.items())})
    return LambdaPackage(path=target, name=name, handler=config.handler,
                         version=f"{config.version}+{content[:12]}", sha256=sha256)


def lambda_entries(source: Path, *, compat: bool) -> dict[str, Path]:
    """Everything the Lambda zip holds, zip path → file: the Lambda's own files, and beside them the device-side
    modules deeplens-build ships with every Lambda (``deeplens_publish``, ``deeplens_runner``), plus the DeepLens
    compatibility modules in ``deeplens_compat/`` when ``compat`` (the runner puts that folder last on the import
    path).

    Listing only, for the cache key: the secret checks run when the zip is built (:func:`package_lambda`), so a
    no-change rebuild neither imports detect-secrets nor scans again files whose digests have not changed."""
    return _with_support(source, lambda_files(source), compat=compat)


def _with_support(source: Path, files: list[str], *, compat: bool) -> dict[str, Path]:
    shipped = support.lambda_files(compat)
    clash = sorted(rel for rel in files if rel in shipped or rel.split("/")[0] == support.COMPAT_DIR)
    if clash:
        raise ConfigError(f"`lambda.source` holds {', '.join(clash)}, which deeplens-build ships beside every Lambda; "
                          "rename yours")
    return {**{rel: source / rel for rel in files}, **shipped}


def lambda_files(source: Path) -> list[str]:
    """The files to package (bytecode and tool folders left out), sorted POSIX paths relative to ``source``."""
    files = [p.relative_to(source).as_posix() for p in sorted(source.rglob("*"))
             if p.is_file() and not _skipped(p.relative_to(source))]
    if not files:
        raise ConfigError(f"`lambda.source` ({source}) holds no files to package")
    return files


def _refuse_secrets(source: Path, files: list[str]) -> None:
    """Raise ``ConfigError`` naming every file that looks like, or holds, a secret, and every link (symbolic or
    hard) to a file outside the folder."""
    secrets, clean = [], []
    inside = Counter(_identity(source / rel) for rel in files)
    for rel in files:
        path = source / rel
        if path.is_symlink() and not path.resolve().is_relative_to(source.resolve()):
            secrets.append(f"{rel} (a link to {path.resolve()})")
        elif not path.is_symlink() and path.stat().st_nlink > inside[_identity(path)]:
            secrets.append(f"{rel} (a hard link to a file outside the folder)")
        elif _secret_name(Path(rel)):
            secrets.append(rel)
        else:
            clean.append(rel)
    secrets += [f"{rel} (holds {kind})" for rel, kind in _secret_contents(source, clean)]
    if secrets:
        raise ConfigError(f"`lambda.source` holds files that look like secrets: {', '.join(secrets)}; move them "
                          "out of the Lambda's folder (pass secrets through the Lambda's environment or AWS "
                          "Secrets Manager), they must never be deployed")


def _skipped(rel: Path) -> bool:
    return (any(part in _SKIPPED_DIRS for part in rel.parts)
            or any(fnmatch.fnmatch(rel.name, pattern) for pattern in _SKIPPED_FILES))


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def _secret_name(rel: Path) -> bool:
    lowered = rel.as_posix().lower()
    return (any(fnmatch.fnmatch(part.lower(), pattern) for part in rel.parts for pattern in _SECRET_NAMES)
            or any(fnmatch.fnmatch(lowered, pattern) for pattern in _SECRET_PATHS))


def _secret_contents(source: Path, files: list[str]) -> list[tuple[str, str]]:
    """(file, kind of secret) for every file whose contents hold a credential, by detect-secrets."""
    from detect_secrets import SecretsCollection
    from detect_secrets.settings import transient_settings

    found = SecretsCollection(root=str(source))
    with transient_settings({"plugins_used": [{"name": name} for name in _CONTENT_DETECTORS]}):
        for rel in files:
            found.scan_file(rel)
    return sorted({(rel, secret.type) for rel, secrets in found.data.items() for secret in secrets})


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


def check_code(config: LambdaConfig, python: tuple[int, int] | None) -> None:
    """Parse every ``.py`` of the Lambda folder as the device's Python would, and find the handler's function at
    its module's top level, without running anything: a DeepLens-era file (a print statement, tabs and spaces
    mixed) fails the build here, naming its file and line, not the device three restarts later.

    :param python: the oldest device Python the Lambda runs on (``(3, 8)`` for a v1 core); None: this one's.
    :raises ConfigError: naming the file and line, or the missing function.
    """
    source = config.source
    if not source.is_dir():
        return  # package_lambda says what is wrong with the folder
    *module, function = config.handler.split(".")
    handler_file = "/".join(module) + ".py"
    for rel in lambda_files(source):
        if not rel.endswith(".py"):
            continue
        try:
            tree = ast.parse((source / rel).read_bytes(), filename=rel, feature_version=python)
        except SyntaxError as exc:  # TabError, IndentationError included
            version = f"Python {python[0]}.{python[1]}" if python else "Python 3"
            raise ConfigError(f"{source / rel}:{exc.lineno}: {exc.msg} (the Lambda's code must be {version}, "
                              "which the device runs)") from exc
        except ValueError as exc:  # a NUL byte
            raise ConfigError(f"{source / rel}: {exc}; the Lambda's code must be Python source") from exc
        if rel == handler_file and function not in _top_level_names(tree):
            raise ConfigError(f"Field `lambda.handler` is {config.handler!r}, but {rel} defines no {function} at its "
                              "top level; name the function Lambda calls (def handler(event, context))")


def oldest_python(config: ProjectConfig) -> tuple[int, int] | None:
    """The oldest Python the Lambda's code runs on: the v1 Lambda runtime's (``python3.8``) with a v1 format, else
    the oldest of ``target.python`` (None when unset: the runtime definition's, known only later)."""
    versions = [config.lambda_.runtime.removeprefix("python")] if config.greengrass.format != "v2" else []
    versions += list(config.target.python or ())
    parsed = [(int(v.split(".")[0]), int(v.split(".")[1])) for v in versions if v.count(".") == 1]
    return min(parsed, default=None)


def _top_level_names(tree: ast.Module) -> set[str]:
    found = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update((a.asname or a.name).split(".")[0] for a in node.names)
    return found


def run(b: Build) -> LambdaPackage:
    """The Lambda stage: its zip, cached by the digests of every file it holds."""
    config = b.config
    source = config.lambda_.source
    entries = lambda_entries(source, compat=config.lambda_.deeplens_compat) if source.is_dir() else {}
    key = {"config": config.lambda_.model_dump(mode="json", exclude={"source"}),
           "files": {rel: file_sha256(path) for rel, path in entries.items()}, "default_name": config.model.name}
    return b.stage("lambda", key, LambdaPackage,
                   lambda workdir: package_lambda(config.lambda_, default_name=config.model.name, workdir=workdir))
