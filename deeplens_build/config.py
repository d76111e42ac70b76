"""``deeplens.toml``: frozen, validated settings that forbid unknown keys.

Relative paths are resolved against the folder holding the config file, so a project builds the same from
any working directory.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from deeplens_build.errors import ConfigError

CONFIG_NAME = "deeplens.toml"
MODEL_PREFIX = "deeplens-"
_SEMVER = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?$")
_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def _resolve(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base")
    return (base / value).resolve() if base is not None and not value.is_absolute() else value


ProjectPath = Annotated[Path, AfterValidator(_resolve)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class InputConfig(_Strict):
    shape: tuple[PositiveInt, ...] | None = None
    layout: Literal["NCHW", "NHWC"] | None = None


class ModelConfig(_Strict):
    name: str
    version: str = "1.0.0"
    framework: str = "auto"
    source: str | None = None
    precision: Literal["fp32", "fp16"] = "fp32"
    task: Literal["classification", "detection", "other"] = "classification"
    labels: ProjectPath | None = None
    inputs: dict[str, InputConfig] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _deeplens_prefix(cls, name: str) -> str:
        if not name.startswith(MODEL_PREFIX):
            raise ValueError(f"model names must start with {MODEL_PREFIX!r}, because the default DeepLens service "
                             f"policies only allow such names; rename it, e.g. {MODEL_PREFIX + name!r}")
        if not _MODEL_NAME.match(name):
            raise ValueError("use lowercase letters, digits and '-' only")
        return name

    @field_validator("version")
    @classmethod
    def _semver(cls, version: str) -> str:
        if not _SEMVER.match(version):
            raise ValueError(f"{version!r} is not a semantic version such as 1.0.0")
        return version


class ParityConfig(_Strict):
    tolerance: PositiveFloat | None = None
    seed: int = 0
    random_samples: PositiveInt = 4
    samples: tuple[ProjectPath, ...] = ()

    def tolerance_for(self, precision: str) -> float:
        """The configured tolerance, else one that FP16 rounding (about 1e-3 relative) stays within."""
        if self.tolerance is not None:
            return self.tolerance
        return 1e-2 if precision == "fp16" else 1e-4


class LambdaConfig(_Strict):
    source: ProjectPath
    handler: str = "inference.handler"
    name: str | None = None
    version: str = "1.0.0"
    role: str | None = None
    runtime: str = "python3.11"
    memory_size: Annotated[int, Field(ge=128, le=10240)] = 1536
    timeout: Annotated[int, Field(ge=1, le=900)] = 900
    alias: str = "live"
    environment: dict[str, str] = Field(default_factory=dict)

    @field_validator("version")
    @classmethod
    def _semver(cls, version: str) -> str:
        return ModelConfig._semver(version)


class FetchConfig(_Strict):
    max_bytes: PositiveInt = 8 * 1024**3
    max_members: PositiveInt = 10_000


class TargetConfig(_Strict):
    platform: Literal["linux-x86_64", "linux-aarch64"] = "linux-x86_64"
    accelerator: Literal["cpu", "gpu"] = "cpu"


class RuntimeConfig(_Strict):
    name: str = "auto"
    definitions: ProjectPath | None = None
    vendor: bool = False
    image: bool = False
    find_links: tuple[ProjectPath, ...] = ()
    index: bool = True


class GreengrassConfig(_Strict):
    format: Literal["v2", "v1", "both"] = "v2"
    bucket: str = "deeplens-greengrass-artifacts"
    prefix: str = "components"
    component: str | None = None
    thing_name: str | None = None
    model_path: str = "/greengrass-machine-learning/model"


class BuildConfig(_Strict):
    work_dir: ProjectPath = Path(".deeplens")
    output: ProjectPath = Path("dist")


class ProjectConfig(_Strict):
    model: ModelConfig
    lambda_: LambdaConfig = Field(alias="lambda")
    parity: ParityConfig
    fetch: FetchConfig
    target: TargetConfig
    runtime: RuntimeConfig
    build: BuildConfig
    greengrass: GreengrassConfig
    plugins: dict[str, dict[str, Any]] = Field(default_factory=dict)
    root: Path = Field(default=Path("."), exclude=True)
    """The folder holding ``deeplens.toml``."""

    @model_validator(mode="before")
    @classmethod
    def _sections_default_to_empty(cls, data: Any) -> Any:
        # validated from {} rather than given as instances, so their relative paths resolve against the project
        if isinstance(data, dict):
            return {section: {} for section in _OPTIONAL_SECTIONS} | data
        return data


_OPTIONAL_SECTIONS = ("parity", "fetch", "target", "runtime", "build", "greengrass")


def load_config(path: Path | None) -> ProjectConfig:
    """Read and validate ``deeplens.toml``; every problem is a ``ConfigError`` quoting the key path."""
    path = (path or Path.cwd() / CONFIG_NAME).resolve()
    if not path.is_file():
        raise ConfigError(f"no {path.name} at {path.parent}: pass --config PATH, or create one "
                          "(see README.md, 'Configuration')")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    if "root" in data:
        raise ConfigError(f"{path}: `root` is not a setting")
    return parse_config(data, root=path.parent, where=str(path))


def parse_config(data: dict[str, Any], *, root: Path, where: str = CONFIG_NAME) -> ProjectConfig:
    try:
        return ProjectConfig.model_validate({**data, "root": root}, context={"base": root})
    except ValidationError as exc:
        raise ConfigError(f"{where}: {_first_problem(exc)}") from exc


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"Field `{key}` is required"
    if error["type"] == "extra_forbidden":
        return f"Field `{key}` is not a known setting; check its spelling against README.md"
    more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
    return f"Field `{key}` {message[0].lower() + message[1:]}{more}"
