"""The Greengrass v2 component recipe format, as typed classes: what a core accepts, checked before a bundle ships.

From the AWS IoT Greengrass v2 developer guide's "Component recipe reference" (RecipeFormatVersion 2020-01-25).
Recipe keys are case-insensitive for a core; deeplens-build writes the reference's spelling and holds itself to
it. Every recipe the pipeline writes is validated here, so a malformed one fails the build, not the deployment.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from deeplens_build import names
from deeplens_build.errors import BundleError

RECIPE_FORMAT = "2020-01-25"
"""What the recipe reference allows in a component name."""
ComponentNameText = Annotated[str, StringConstraints(pattern=names.COMPONENT_NAME)]
ArtifactUri = Annotated[str, StringConstraints(pattern=r"^(s3|greengrass|docker)://\S+$")]
Access = Literal["NONE", "OWNER", "ALL"]


def _sha256_b64(value: str) -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise ValueError("is not base64") from exc
    if len(raw) != 32:
        raise ValueError("is not a SHA-256 digest (32 bytes, base64)")
    return value


class _Part(BaseModel):
    # built on first use: most builds take their recipe from the cache, and verify never reads one
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class RecipePlatform(_Part):
    os: Literal["linux", "windows", "darwin"]
    architecture: Literal["amd64", "aarch64", "armv7l", "arm", "x86"]


class Step(_Part):
    """One lifecycle step: a shell script the core runs, with its limits."""

    Script: Annotated[str, StringConstraints(min_length=1)]
    Timeout: Annotated[int, Field(ge=1)] | None = None
    RequiresPrivilege: bool | None = None
    SkipIf: Annotated[str, StringConstraints(pattern=r"^(onpath|exists)\s+\S")] | None = None
    Setenv: dict[Annotated[str, AfterValidator(names.check_variable)], str] | None = None


class RecipeLifecycle(_Part):
    Setenv: dict[Annotated[str, AfterValidator(names.check_variable)], str] = Field(default_factory=dict)
    Bootstrap: Step | None = None
    Install: Step | None = None
    Startup: Step | None = None
    Run: Step | None = None
    Shutdown: Step | None = None
    Recover: Step | None = None

    @model_validator(mode="after")
    def _run_or_startup(self) -> RecipeLifecycle:
        if self.Run is not None and self.Startup is not None:
            raise ValueError("a lifecycle has Run or Startup, not both")
        return self


class ArtifactPermission(_Part):
    Read: Access = "OWNER"
    Execute: Access = "NONE"


class Artifact(_Part):
    Uri: ArtifactUri
    Digest: Annotated[str, AfterValidator(_sha256_b64)]
    Algorithm: Literal["SHA-256"] = "SHA-256"
    Unarchive: Literal["ZIP", "NONE"] = "NONE"
    Permission: ArtifactPermission | None = None


class RecipeManifest(_Part):
    Platform: RecipePlatform
    Lifecycle: RecipeLifecycle
    Artifacts: tuple[Artifact, ...] = ()

    @model_validator(mode="after")
    def _distinct_names(self) -> RecipeManifest:
        # a core puts every artifact of a component in one folder: a second file of the same name replaces the first
        seen: set[str] = set()
        for artifact in self.Artifacts:
            name = artifact.Uri.rsplit("/", 1)[-1]
            if name in seen:
                raise ValueError(f"two artifacts are named {name!r}; on the device one would replace the other")
            seen.add(name)
        return self


class Dependency(_Part):
    VersionRequirement: Annotated[str, StringConstraints(min_length=1)]
    DependencyType: Literal["HARD", "SOFT"] = "HARD"


class Configuration(_Part):
    DefaultConfiguration: dict[str, Any] = Field(default_factory=dict)


class Recipe(_Part):
    RecipeFormatVersion: Literal["2020-01-25"]
    ComponentName: ComponentNameText
    ComponentVersion: Annotated[str, AfterValidator(names.check_version)]
    ComponentDescription: str = ""
    ComponentPublisher: str = ""
    ComponentConfiguration: Configuration | None = None
    ComponentDependencies: dict[ComponentNameText, Dependency] = Field(default_factory=dict)
    Manifests: Annotated[tuple[RecipeManifest, ...], Field(min_length=1)]


def checked(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` itself, once it is a valid recipe.

    :raises BundleError: naming the first field that is not.
    """
    try:
        Recipe.model_validate(document)
    except ValidationError as exc:
        raise BundleError(f"the Greengrass recipe is invalid: {names.first_problem(exc)}; the bundle was not "
                          "written") from exc
    return document
