"""Runtime images for container devices: the runtime's vendored wheels, the artifact and the Lambda in one
image built by a real Docker engine and saved into the bundle as ``runtime/image.tar``.

There is no image registry to pull a base from, so images start ``FROM scratch`` (a data image a device loads
with ``docker load`` and mounts or copies from), unless the runtime's folder has a Dockerfile of its own.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from deeplens_build.digest import file_sha256
from deeplens_build.errors import BundleError
from deeplens_build.manifest import IMAGE, RUNTIME_DIR, WHEELS_DIR
from deeplens_build.report import Reporter
from deeplens_build.stages.runtime import DEFINITION
from deeplens_build.values import Runtime, RuntimeImage

if TYPE_CHECKING:
    from deeplens_build.build import Build

IMAGE_ROOT = "/opt/deeplens"
DEFAULT_DOCKERFILE = f"FROM scratch\nCOPY files/ {IMAGE_ROOT}/\n"


def build_image(runtime: Runtime, files: Mapping[str, Path], *, tag: str, workdir: Path,
                reporter: Reporter) -> RuntimeImage:
    """Build ``tag`` from ``files`` (path in the image under /opt/deeplens → file) and save it to image.tar."""
    import docker
    from docker.errors import APIError, BuildError, DockerException

    try:
        client = docker.from_env()
        client.ping()
    except DockerException as exc:
        raise BundleError(f"`runtime.image = true` needs a running Docker engine, and none answered ({exc}); "
                          "start dockerd (or set DOCKER_HOST), or set `runtime.image = false`") from exc
    context = workdir / "context"
    for name, source in files.items():
        target = context / "files" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        os.utime(target, (0, 0))  # layer contents depend on the files, not on when they were copied
    dockerfile = runtime.definition.parent / "Dockerfile"
    (context / "Dockerfile").write_text(dockerfile.read_text() if dockerfile.is_file() else DEFAULT_DOCKERFILE)
    reporter.step(f"runtime: building image {tag} ({'runtime Dockerfile' if dockerfile.is_file() else 'FROM scratch'})")
    try:
        image, _ = client.images.build(path=str(context), tag=tag, rm=True, forcerm=True)
        target = workdir / "image.tar"
        with open(target, "wb") as out:
            for chunk in image.save(named=True):
                out.write(chunk)
    except (BuildError, APIError) as exc:
        raise BundleError(f"building the runtime image {tag} failed: {exc}") from exc
    finally:
        client.close()
        shutil.rmtree(context, ignore_errors=True)
    return RuntimeImage(path=target, tag=tag, image_id=image.id)


def run(b: Build, payload: dict[str, Path], runtime: Runtime) -> RuntimeImage | None:
    """The runtime image (``runtime.image = true``), cached by its contents: an engine stamps each build with a
    new creation time. Added to ``payload``."""
    config = b.config
    if not config.runtime.image:
        return None
    files = {arc.removeprefix(f"{RUNTIME_DIR}/") if arc.startswith(f"{WHEELS_DIR}/") else
             (DEFINITION if arc.endswith(DEFINITION) else arc): path for arc, path in payload.items()}
    tag = f"{config.model.name}-runtime:{config.model.version}"
    image = b.stage("image", {"files": {name: file_sha256(p) for name, p in files.items()}, "tag": tag},
                    RuntimeImage, lambda workdir: build_image(runtime, files, tag=tag, workdir=workdir,
                                                              reporter=b.reporter))
    payload[IMAGE] = image.path
    return image
