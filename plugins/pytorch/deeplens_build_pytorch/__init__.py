"""The PyTorch framework plugin: what SageMaker's PyTorch jobs leave, to a parity-checked ONNX artifact.

Accepts, anywhere in the training output:

- TorchScript (``model.pt``/``model.pth`` written by ``torch.jit.save``);
- ``torch.export`` programs (``.pt2``, ``torch.export.save``), which carry their input shapes;
- SageMaker's inference layout: model files plus ``code/inference.py``, whose ``model_fn(model_dir)`` builds the
  module (e.g. from a ``model.pth`` state dict). It is the owner's code: it runs in a child process with a clean
  environment (no signing key, no AWS credentials) in a scratch folder, as SageMaker's serving container runs it.

Of several checkpoints (``model_epoch_N.pth``, a ``checkpoints/`` folder) the final one is packaged. Every model
is loaded, exported and run in that child (``worker.py``): the build's process never imports torch. Exported with
``torch.onnx.export``: the dynamo exporter where the target takes opset 18, the TorchScript-based exporter for a
lower ceiling (and for TorchScript modules). The parity reference is the model itself, eager, without gradients.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from deeplens_build import (
    Artifact,
    ConversionError,
    Framework,
    ModelFiles,
    PluginSettings,
    TrainingOutput,
    choose_one,
    hookimpl,
    onnxtools,
)

INSTALL = "pip install deeplens-build-pytorch  (torch==2.13.0, its CPU build: see the README's \"PyTorch\")"
SUFFIXES = (".pt", ".pth", ".pt2")
INFERENCE = "code/inference.py"
DYNAMO_OPSET = 18
"""The opset the dynamo exporter writes, whatever it is asked for (torch 2.13)."""
TORCHSCRIPT_MAX_OPSET = 17
"""The highest opset the TorchScript-based exporter is used at here (it honours 13 and 17)."""
WORKER = Path(__file__).with_name("worker.py")
PASSED_VARIABLES = ("PATH", "LANG", "LC_ALL", "TZ")
"""What the child gets from the build's environment: nothing secret."""
_NUMBERED = re.compile(r"(?:^|[-_.])(?:epoch|ep|step|iter|ckpt|checkpoint)?[-_]?(\d+)\.(?:pt|pth|pt2)$",
                       re.IGNORECASE)
"""A checkpoint's name: a number after a separator (``model_epoch_3.pth``, ``model-0003.pt``; not ``resnet18.pth``)."""
_CHECKPOINT_FOLDERS = {"checkpoint", "checkpoints"}

Kind = Literal["torchscript", "export", "inference"]


class PyTorchSettings(PluginSettings):
    """``[plugins.pytorch]``."""

    file: str | None = None
    """Which model file to package when the output holds several that are not checkpoints of one another."""
    opset: Annotated[int, Field(ge=7)] = DYNAMO_OPSET
    """The ONNX opset to export; lowered to the target's ceiling when that is lower (below 18 the TorchScript-based
    exporter is used, at most 17)."""


@hookimpl
def deeplens_build_framework() -> Framework:
    return Framework(name="pytorch", summary="PyTorch: TorchScript, torch.export (.pt2), model.pth + code/inference.py",
                     requires=("torch", "onnxscript"), install=INSTALL, settings=PyTorchSettings)


@hookimpl
def deeplens_build_detect(source: TrainingOutput, settings: PyTorchSettings) -> ModelFiles | None:
    models = [f for f in source.matching(*SUFFIXES) if not f.startswith("code/")]
    if not models:
        return None
    if INFERENCE in source.files:  # model_fn chooses what it loads: every model file is part of the model
        return ModelFiles(files=(INFERENCE, *models), notes=(
            f"{INFERENCE}'s model_fn builds the model from the training output, in a child process with a clean "
            "environment, as SageMaker's PyTorch serving runs it",))
    chosen, notes = _final(models, settings)
    if _kind(source, chosen) == "inference":
        raise ConversionError(f"{chosen} holds weights without the module's code (a state dict, or a pickled "
                              f"module, which would run arbitrary code to load): add {INFERENCE} with "
                              "model_fn(model_dir), as SageMaker's PyTorch serving needs, or save the model with "
                              "torch.jit.save or torch.export.save")
    return ModelFiles(files=(chosen,), notes=notes)


@hookimpl
def deeplens_build_convert(source: TrainingOutput, model: ModelFiles, workdir: Path,
                           shapes: Mapping[str, tuple[int, ...]], settings: PyTorchSettings,
                           opset: int | None) -> Artifact:
    wanted = min(settings.opset, opset or settings.opset)
    kind = _kind(source, model.files[0])
    scratch = workdir / "scratch"
    with _Worker(kind, source.root, model.files[0], scratch) as worker:
        inputs = _input_shapes(worker.inputs, shapes, kind, model.files[0])
        dynamo = wanted >= DYNAMO_OPSET and kind != "torchscript"
        exported = scratch / "export" / "model.onnx"
        exported.parent.mkdir(parents=True)
        worker.export(exported, inputs, DYNAMO_OPSET if dynamo else min(wanted, TORCHSCRIPT_MAX_OPSET), dynamo)
    files = onnxtools.save(onnxtools.load(exported), workdir / "model.onnx")  # the weights as the core keeps them
    shutil.rmtree(scratch)
    layouts = {name: "NCHW" if len(shape) == 4 else None for name, shape in inputs.items()}
    specs, outputs = onnxtools.interface(onnxtools.load(files[0], weights=False), layouts)
    return Artifact(format="onnx", path=files[0], extra_files=files[1:], inputs=specs, outputs=outputs,
                    labels=source.copy_labels(workdir))


@hookimpl
def deeplens_build_reference_run(source: TrainingOutput, model: ModelFiles, converted: Artifact,
                                 inputs: Mapping[str, Any], scratch: Path) -> Mapping[str, Any]:
    worker = _reference_worker(_kind(source, model.files[0]), source.root, model.files[0], scratch)
    names = [spec.name for spec in converted.inputs]
    outputs = worker.run([inputs[name] for name in names], names)
    if len(outputs) != len(converted.outputs):
        raise ConversionError(f"{model.files[0]} gave {len(outputs)} outputs on a parity sample, its export "
                              f"{len(converted.outputs)}")
    return {spec.name: value for spec, value in zip(converted.outputs, outputs)}


def _final(models: list[str], settings: PyTorchSettings) -> tuple[str, tuple[str, ...]]:
    """The model to package, and a note when checkpoints were left out: a file in a checkpoints folder or named
    with a number (``model_epoch_3.pth``) is a checkpoint; the final model is the one that is not, else the
    checkpoint with the highest number."""
    if settings.file is not None:
        return choose_one(models, settings.file, setting="plugins.pytorch.file", what="PyTorch models"), ()
    checkpoints = [m for m in models if _number(m) >= 0 or _CHECKPOINT_FOLDERS & set(m.split("/")[:-1])]
    finals = [m for m in models if m not in checkpoints]
    if finals:
        chosen = choose_one(finals, None, setting="plugins.pytorch.file", what="PyTorch models")
    else:
        chosen = max(checkpoints, key=lambda m: (_number(m), m))
    skipped = [m for m in checkpoints if m != chosen]
    if not skipped:
        return chosen, ()
    return chosen, (f"{len(skipped) + (chosen in checkpoints)} checkpoints found ({', '.join(sorted(checkpoints))}"
                    f"{'' if chosen in checkpoints else ' and ' + chosen}): packaging only the final one, {chosen}. "
                    "Save only the final model into SageMaker's model folder to keep the training output small, "
                    "or set [plugins.pytorch] file to package another.",)


def _number(name: str) -> int:
    match = _NUMBERED.search(name.rsplit("/", 1)[-1])
    return int(match[1]) if match else -1


def _kind(source: TrainingOutput, file: str) -> Kind:
    """What a model file is, from its archive's entries (nothing is unpickled to tell)."""
    if INFERENCE in source.files:
        return "inference"
    if file.lower().endswith(".pt2"):
        return "export"
    try:
        with zipfile.ZipFile(source.path(file)) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return "inference"  # a legacy torch.save file: weights, not a module
    return "torchscript" if any(n.endswith("/constants.pkl") for n in names) else "inference"


def _input_shapes(carried: list[list[Any]] | None, shapes: Mapping[str, tuple[int, ...]], kind: Kind,
                  file: str) -> dict[str, tuple[int, ...]]:
    """The export's input names and shapes: ``[model.inputs]`` in deeplens.toml, or what an exported program
    carries."""
    if carried is None:
        if not shapes:
            subject = f"{file} (TorchScript)" if kind == "torchscript" else f"the module {file}'s model_fn builds"
            raise ConversionError(f"{subject} does not carry its input shapes: set [model.inputs.NAME] shape = "
                                  "[1, 3, 224, 224] in deeplens.toml, one table per input in forward()'s order")
        return dict(shapes)
    unknown = sorted(set(shapes) - {name for name, _ in carried})
    if unknown:
        raise ConversionError(f"[model.inputs] names {', '.join(unknown)}, which {file} does not take; its inputs "
                              f"are {', '.join(name for name, _ in carried)}")
    found = {name: tuple(shapes.get(name) or shape or ()) for name, shape in carried}
    dynamic = [name for name, shape in found.items() if not shape]
    if dynamic:
        raise ConversionError(f"{file}'s input {dynamic[0]} has a dynamic shape: set [model.inputs.{dynamic[0]}] "
                              "shape in deeplens.toml")
    return found


@dataclass
class _Worker:
    """The child process of ``worker.py`` for one model, started with a clean environment in ``folder``."""

    kind: Kind
    root: Path
    file: str
    folder: Path

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._log = tempfile.TemporaryFile(dir=self.folder)
        environment = {name: os.environ[name] for name in PASSED_VARIABLES if name in os.environ}
        environment.update(HOME=str(self.folder), TMPDIR=str(self.folder))
        self._process = subprocess.Popen([sys.executable, "-I", str(WORKER), self.kind, str(self.root), self.file],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                         cwd=self.folder, env=environment)
        try:
            self.inputs = self._receive()[0]["inputs"]
        except BaseException:
            self.close()
            raise

    def export(self, path: Path, inputs: Mapping[str, tuple[int, ...]], opset: int, dynamo: bool) -> None:
        self._send({"op": "export", "path": str(path), "inputs": list(inputs), "shapes": list(inputs.values()),
                    "opset": opset, "dynamo": dynamo})
        self._receive()

    def run(self, arrays: list[Any], names: list[str]) -> list[Any]:
        import numpy as np

        buffer = io.BytesIO()
        np.savez(buffer, **dict(zip(names, arrays)))
        self._send({"op": "run", "inputs": names}, buffer.getvalue())
        return self._receive()[1]

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process.stdout.close()
        self._log.close()

    def __enter__(self) -> _Worker:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        try:
            self._process.stdin.write(json.dumps({**header, "size": len(payload)}).encode() + b"\n" + payload)
            self._process.stdin.flush()
        except BrokenPipeError:
            self._receive()  # says why the child ended

    def _receive(self) -> tuple[dict[str, Any], list[Any]]:
        import numpy as np

        line = self._process.stdout.readline()
        if not line:
            raise ConversionError(f"the PyTorch child process ended (exit {self._process.wait()}) on {self.file}"
                                  f"{self._last_words()}")
        header = json.loads(line)
        payload = self._process.stdout.read(header["size"])
        if not header["ok"]:
            raise ConversionError(header["error"])
        if not payload:
            return header, []
        with np.load(io.BytesIO(payload), allow_pickle=False) as data:
            return header, [data[f"arr_{i}"] for i in range(len(data.files))]

    def _last_words(self) -> str:
        self._log.seek(0)
        lines = self._log.read().decode(errors="replace").strip().splitlines()
        return f"; its last output: {lines[-1]}" if lines else ""


_reference: dict[tuple[Kind, Path, str, Path], _Worker] = {}


def _reference_worker(kind: Kind, root: Path, file: str, scratch: Path) -> _Worker:
    """One child for every sample of a reference run (torch starts once, model_fn runs once); the child of the
    previous run ends when the next begins, the last with the build's process."""
    key = (kind, root, file, scratch)
    if key not in _reference:
        for old in _reference.values():
            old.close()
        _reference.clear()
        _reference[key] = _Worker(kind, root, file, scratch)
    return _reference[key]


atexit.register(lambda: [worker.close() for worker in _reference.values()])
