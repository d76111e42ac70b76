"""The project file's name and the default work folder: the up-to-date check needs them before the config's
model (pydantic) is imported, and the config uses the same."""

CONFIG_NAME = "deeplens.toml"
WORK_DIR = ".deeplens"
"""``build.work_dir`` unless set, relative to the project."""
