"""Detect stage: which framework plugin owns the training output, and which of its files make the model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from deeplens_build.types import TrainingOutput
from deeplens_build.values import Detection

if TYPE_CHECKING:
    from deeplens_build.build import Build


def run(b: Build, training: TrainingOutput) -> Detection:
    detection = b.manager.detect(training, b.config.model.framework, b.settings)
    b.reporter.step(f"detect: {detection.plugin.framework.name} model ({', '.join(detection.model.files)}) "
                    f"claimed by plugin {detection.plugin.name}")
    for note in detection.model.notes:
        b.reporter.note(note)
    return detection
