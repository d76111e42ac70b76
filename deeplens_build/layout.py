"""The project file: its name, the default work folder, and reading it once. The up-to-date check needs them
before the config's model (pydantic) is imported, and the config uses the same."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from deeplens_build.errors import ConfigError

CONFIG_NAME = "deeplens.toml"
WORK_DIR = ".deeplens"
"""``build.work_dir`` unless set, relative to the project."""


def config_file(path: Path | None) -> Path:
    """The project file ``--config`` names, else ``deeplens.toml`` in the working folder."""
    return (path or Path.cwd() / CONFIG_NAME).resolve()


def read_document(path: Path) -> dict[str, Any]:
    """The project file's TOML document, parsed (once per command: the up-to-date check and the config share it).

    :raises ConfigError: when it is missing, not UTF-8, not TOML, or nested too deeply to parse.
    """
    if not path.is_file():
        raise ConfigError(f"no {path.name} at {path.parent}: pass --config PATH, or create one "
                          "(see README.md, 'Configuration')")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    except RecursionError as exc:  # tomllib parses nested arrays and tables recursively
        raise ConfigError(f"{path} nests arrays or tables too deeply to read; a project file needs a few levels "
                          "at most") from exc
