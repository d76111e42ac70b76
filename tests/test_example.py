"""The embedded example that `make package` builds on a fresh machine."""

from __future__ import annotations

from pathlib import Path

from helpers import example_project

from deeplens_build import testing


def test_example_builds_a_verified_mxnet_bundle_from_its_final_checkpoint(tmp_path: Path) -> None:
    result = testing.build(example_project(tmp_path))
    manifest = testing.verify(result.bundle).manifest.to_dict()
    assert result.framework == "mxnet" and result.parity.passed
    assert manifest["source"]["model_files"] == ["model-symbol.json", "model-0003.params", "model-shapes.json"]
    assert manifest["model"]["labels"] == "model/labels.txt" and manifest["model"]["precision"] == "fp16"
    assert any("epoch 3" in note for note in result.notes)
