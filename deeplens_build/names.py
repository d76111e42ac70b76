"""The rules for names that become paths, AWS resource names or code: one place, for config and manifest alike.

Each ``check_*`` returns the value or raises ``ValueError`` with the reason, so pydantic (``deeplens.toml``) or
:mod:`strict` (a bundle's manifest) turns it into a message that quotes the key path or the field.
"""

from __future__ import annotations

import keyword
import re
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError

MODEL_PREFIX = "deeplens-"
MAX_MODEL_NAME = 64
"""A model name is also the default Lambda function name, which AWS caps at 64 characters."""
_SEMVER = re.compile(r"^\d{1,9}\.\d{1,9}\.\d{1,9}(?:-[0-9A-Za-z.-]{1,64})?$")
_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_LAMBDA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MODULE_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
_RUNTIME_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
MAX_BUNDLE_PATH = 1024
PYTHON_VERSION = r"^3\.\d{1,2}$"
"""A device's Python, as ``target.python`` and runtime definitions name it: ``"3.10"``."""
KVS_STREAM = r"^[a-zA-Z0-9_.-]{1,256}$"
"""A Kinesis Video stream name, as the service allows it."""
COMPONENT_NAME = r"^[a-zA-Z0-9_.-]{1,128}$"
"""A Greengrass v2 component name (``greengrass.component``, a recipe's ``ComponentName``)."""
PLUGIN_NAME = r"^[a-z][a-z0-9_-]*$"
"""A framework's or a target backend's name (``model.framework``, ``target.backend``, the manifest's record)."""


def check_model_name(name: str) -> str:
    if not name.startswith(MODEL_PREFIX):
        raise ValueError(f"model names must start with {MODEL_PREFIX!r}, because the default DeepLens service "
                         f"policies only allow such names; rename it, e.g. {MODEL_PREFIX + name[:40]!r}")
    if not _MODEL_NAME.match(name):
        raise ValueError("use lowercase letters, digits and '-' only")
    if len(name) > MAX_MODEL_NAME:
        raise ValueError(f"is {len(name)} characters long; use at most {MAX_MODEL_NAME} (the Lambda function "
                         "name limit)")
    return name


def check_version(version: str) -> str:
    if not _SEMVER.match(version):
        raise ValueError(f"{version[:40]!r} is not a semantic version such as 1.0.0")
    return version


def check_lambda_name(name: str) -> str:
    if not _LAMBDA_NAME.match(name):
        raise ValueError(f"{name[:80]!r} is not a Lambda function name: use 1 to 64 letters, digits, '-' or '_'")
    return name


def check_handler(handler: str) -> str:
    # the module is a file name Lambda and importlib take (``inference-lambda``); the function an identifier
    *module, function = handler.split(".")
    if not module or len(handler) > 256 or not all(_MODULE_FILE.match(p) for p in module) or not (
            _IDENTIFIER.match(function) and not keyword.iskeyword(function)):
        raise ValueError(f"{handler[:80]!r} is not MODULE.FUNCTION (a module file name of letters, digits, '_' "
                         "and '-', then a Python identifier), e.g. inference.handler")
    return handler


def check_runtime_name(name: str) -> str:
    if not _RUNTIME_NAME.match(name):
        raise ValueError(f"{name[:80]!r} is not a runtime name: lowercase letters, digits, '.', '_' and '-'")
    return name


def check_variable(name: str) -> str:
    if not _VARIABLE.match(name):
        raise ValueError(f"{name[:80]!r} is not an environment variable name")
    return name


_SHARED_CACHE = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?$")


def check_shared_cache(uri: str) -> str:
    """A shared cache's address, ``build.cache`` or ``--cache``: an S3 bucket name and an optional prefix."""
    if not _SHARED_CACHE.match(uri):
        raise ValueError(f"{uri[:80]!r} is not s3://BUCKET/PREFIX")
    return uri


def check_bundle_path(name: str) -> str:
    """A path inside a bundle: relative, no ``..``, no empty or ``.`` parts, no NUL, bounded."""
    pure = PurePosixPath(name)
    if (not name or "\0" in name or "\\" in name or len(name.encode("utf-8", "surrogateescape")) > MAX_BUNDLE_PATH
            or pure.is_absolute() or ".." in pure.parts or str(pure) != name):
        raise ValueError(f"{name[:80]!r} is not a plain relative path")
    return name


def first_problem(exc: ValidationError, prefix: tuple[str, ...] = ()) -> str:
    """The first problem pydantic found, as ``Field `a.b` <what is wrong>``, plus how many more there are.

    :param prefix: the key path of what was validated, when it is a table inside a larger document.
    """
    error = exc.errors()[0]
    key = ".".join(str(part) for part in (*prefix, *error["loc"]))
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"Field `{key}` is required"
    if error["type"] == "extra_forbidden":
        return f"Field `{key}` is not a known setting; check its spelling against README.md"
    more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
    if not key:  # a check across tables: its message names the fields itself
        return f"{message}{more}"
    return f"Field `{key}` {message[0].lower() + message[1:]}{more}"
