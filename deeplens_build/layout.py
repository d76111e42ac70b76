"""The project file's name and the default work folder: the up-to-date check needs them before the config's
model (pydantic) is imported, and the config uses the same."""

from pathlib import Path

CONFIG_NAME = "deeplens.toml"
WORK_DIR = ".deeplens"
"""``build.work_dir`` unless set, relative to the project."""


def config_file(path: Path | None) -> Path:
    """The project file ``--config`` names, else ``deeplens.toml`` in the working folder."""
    return (path or Path.cwd() / CONFIG_NAME).resolve()
