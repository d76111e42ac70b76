"""Tiny real PyTorch models saved in each layout SageMaker's PyTorch jobs leave, packed as SageMaker packs them.

Used by the test suite and the benchmarks; handy for anyone testing code around this plugin. Imports torch.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import torch

from deeplens_build_pytorch import INFERENCE, networks

MODEL_FN = '''import os

import torch
from networks import {network}


def model_fn(model_dir):
    model = {network}()
    model.load_state_dict(torch.load(os.path.join(model_dir, "model.pth"), map_location="cpu", weights_only=True))
    return model.eval()
'''


def torchscript(folder: Path, module: torch.nn.Module, name: str = "model.pt") -> Path:
    """``module`` scripted and saved with ``torch.jit.save``."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(module.eval()), str(folder / name))
    return folder / name


def exported(folder: Path, module: torch.nn.Module, shape: tuple[int, ...], name: str = "model.pt2") -> Path:
    """``module`` exported for inputs of ``shape`` and saved with ``torch.export.save``."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.export.save(torch.export.export(module.eval(), (torch.zeros(shape),)), folder / name)
    return folder / name


def inference_layout(folder: Path, module: torch.nn.Module, model_fn: str | None = None) -> Path:
    """SageMaker's inference layout: ``model.pth`` (a state dict) and ``code/inference.py`` whose ``model_fn``
    builds ``module``'s class from ``code/networks.py``; ``model_fn`` replaces that inference.py."""
    (folder / "code").mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), folder / "model.pth")
    shutil.copyfile(networks.__file__, folder / "code" / "networks.py")
    (folder / INFERENCE).write_text(model_fn or MODEL_FN.format(network=type(module).__name__))
    return folder


def model_tar(folder: Path, archive: Path) -> Path:
    """``folder``'s files in a ``model.tar.gz``, at its top as SageMaker writes it."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    return archive
