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

from deeplens_build.errors import BundleError
from deeplens_build.report import Reporter
from deeplens_build.types import Runtime, RuntimeImage

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
