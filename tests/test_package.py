"""`deeplens-build package` end to end: a real ONNX model in, a signed bundle out."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

from helpers import cli, open_bundle, package_json

from deeplens_build import testing


def test_package_builds_a_verified_bundle_and_reports_json(project: Path) -> None:
    report = package_json(project)

    bundle = Path(report["bundle"])
    assert bundle.name == "deeplens-test-model-1.0.0.tar.zst"
    assert bundle.parent == project.parent / "dist"
    assert report["name"] == "deeplens-test-model" and report["version"] == "1.0.0"
    assert report["framework"] == "onnx"
    assert report["parity"]["passed"] is True
    assert 0 <= report["parity"]["max_abs_diff"] <= report["parity"]["tolerance"] == 1e-4
    assert report["sizes"]["bundle"] == bundle.stat().st_size
    assert report["sizes"]["source"] > 0 and report["sizes"]["artifact"] > 0
    assert report["sha256"] == hashlib.sha256(bundle.read_bytes()).hexdigest()
    verified = testing.verify(bundle, project.parent / "signing-key.pub.pem")
    assert verified.trusted
    with open_bundle(bundle) as tar:
        names = tar.getnames()
    assert names[:2] == ["manifest.json", "manifest.sig"]
    assert set(names[2:]) == {"model/model.onnx", "model/model.onnx.data", "model/labels.txt",
                              "model/deeplens_model.py", "lambda/deeplens-test-model.zip",
                              "runtime/onnxruntime/runtime.toml", "greengrass/recipe.json", "model.sig",
                              "provenance.intoto.json"}
    assert not any(name.endswith(".pem") for name in names), "the private key never enters a bundle"


def test_manifest_records_interface_parity_runtime_lambda_and_provenance(project: Path) -> None:
    report = package_json(project)
    manifest = json.loads(cli("inspect", report["bundle"], "--json").stdout)

    assert manifest["model"]["inputs"] == [{"name": "data", "shape": [1, 3, 32, 32], "dtype": "float32",
                                            "layout": "NCHW"}]
    assert manifest["model"]["outputs"] == [{"name": "prob", "shape": [1, 10], "dtype": "float32", "layout": None}]
    assert manifest["parity"]["outputs"][0]["top1_agreement"] == 1.0
    assert manifest["runtime"]["name"] == "onnxruntime"
    assert manifest["lambda"]["version"].startswith("1.0.0+")
    assert manifest["source"]["kind"] == "directory" and len(manifest["source"]["sha256"]) == 64
    assert manifest["provenance"]["plugin"]["distribution"] == "deeplens-build-onnx"
    assert set(manifest["provenance"]["tools"]) >= {"onnx", "onnxruntime", "numpy", "deeplens-build", "python"}
    for entry in manifest["files"]:
        assert len(entry["sha256"]) == 64 and entry["size"] > 0
    assert "/" not in manifest["source"]["origin"], "no absolute local path in the manifest"


def test_inspect_shows_the_manifest_for_people(project: Path) -> None:
    bundle = package_json(project)["bundle"]
    text = cli("inspect", bundle).stdout
    assert "deeplens-test-model 1.0.0" in text
    assert "input  data [1, 3, 32, 32] float32 NCHW" in text
    assert "runtime onnxruntime" in text and "parity  max abs diff" in text


def test_fp16_bundle_is_smaller_and_within_its_tolerance(tmp_path: Path, onnx_model_dir: Path) -> None:
    reports = {}
    for precision in ("fp32", "fp16"):
        config = testing.write_project(tmp_path / precision, source=onnx_model_dir, model={"precision": precision})
        reports[precision] = package_json(config)
    assert reports["fp16"]["sizes"]["artifact"] < reports["fp32"]["sizes"]["artifact"]
    assert reports["fp16"]["parity"]["tolerance"] == 1e-2
    assert reports["fp16"]["parity"]["max_abs_diff"] > 0


def test_packages_a_sagemaker_style_model_tar_gz(tmp_path: Path, onnx_model_dir: Path) -> None:
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(onnx_model_dir / "model.onnx", arcname="model.onnx")
        tar.add(onnx_model_dir / "labels.txt", arcname="labels.txt")
    config = testing.write_project(tmp_path / "project", source=archive)
    report = package_json(config)
    manifest = json.loads(cli("inspect", report["bundle"], "--json").stdout)
    assert manifest["source"]["kind"] == "archive" and manifest["source"]["origin"] == "model.tar.gz"
    assert report["sizes"]["source"] == archive.stat().st_size


def test_cli_source_overrides_the_configured_one(tmp_path: Path, onnx_model_dir: Path) -> None:
    config = testing.write_project(tmp_path / "project", source="does-not-exist")
    report = package_json(config, "--source", onnx_model_dir, "--output", tmp_path / "out")
    assert Path(report["bundle"]).parent == tmp_path / "out"


def test_user_sample_inputs_join_the_parity_check(tmp_path: Path, onnx_model_dir: Path) -> None:
    import numpy as np

    sample = tmp_path / "cat.npy"
    np.save(sample, np.full((1, 3, 32, 32), 0.5, dtype=np.float32))
    config = testing.write_project(tmp_path / "project", source=onnx_model_dir,
                                   parity={"samples": [str(sample)], "random_samples": 2})
    report = package_json(config)
    manifest = json.loads(cli("inspect", report["bundle"], "--json").stdout)
    assert manifest["parity"]["samples"] == 3


def test_nothing_is_written_outside_the_project_folders(tmp_path: Path, onnx_model_dir: Path) -> None:
    """A fresh process, as a user runs it: onnxruntime and keras caches land in the work folder, not in HOME."""
    import os
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    config = testing.write_project(tmp_path / "project", source=onnx_model_dir)
    key = testing.signing_key(tmp_path / "keys")
    before = {p for p in tmp_path.rglob("*") if "project" not in p.parts}
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "KERAS_HOME")} | {"HOME": str(home)}
    subprocess.run([sys.executable, "-m", "deeplens_build.cli", "package", "--config", str(config),
                    "--signing-key", str(key)], env=env, check=True, capture_output=True, cwd=tmp_path)
    assert not any(home.iterdir()), f"written to HOME: {sorted(home.rglob('*'))}"
    assert {p for p in tmp_path.rglob("*") if "project" not in p.parts} == before
    assert {p.name for p in config.parent.iterdir()} == {"deeplens.toml", "lambda", ".deeplens", "dist"}
