"""The versioned Lambda and the Greengrass documents: moto as an HTTP server for Lambda, IAM, S3 and Greengrass
v1; botocore's Stubber (which validates request shapes against the real service model) for greengrassv2."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import boto3
import pytest
from helpers import open_bundle, package_json

from deeplens_build import testing
from deeplens_build.aws.greengrass import create_v1_group_version
from deeplens_build.aws.recipe import Recipe, checked
from deeplens_build.errors import BundleError

SCHEMA = Path(__file__).resolve().parents[3] / "shared" / "reference" / "greengrass-v2-recipe.schema.json"


def _lowercase_keys(value: Any) -> Any:
    """What the GDK CLI does before validating: recipe keys are case-insensitive, values are not."""
    if isinstance(value, dict):
        return {k.lower(): _lowercase_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_lowercase_keys(v) for v in value]
    return value


def _bundle_files(bundle: Path) -> dict[str, bytes]:
    with open_bundle(bundle) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _role() -> str:
    return boto3.client("iam").create_role(RoleName="deeplens-lambda", AssumeRolePolicyDocument="{}")["Role"]["Arn"]


def _project(tmp_path: Path, source: Path, **tables: Any) -> Path:
    return testing.write_project(tmp_path / "project", source=source, **tables)


def test_recipe_is_a_valid_recipe_and_its_digests_match_the_files(tmp_path: Path, onnx_model_dir: Path) -> None:
    report = package_json(_project(tmp_path, onnx_model_dir))
    files = _bundle_files(Path(report["bundle"]))
    recipe = json.loads(files["greengrass/recipe.json"])
    Recipe.model_validate(recipe)

    assert recipe["RecipeFormatVersion"] == "2020-01-25"
    assert recipe["ComponentName"] == "com.deeplens.deeplens-test-model" and recipe["ComponentVersion"] == "1.0.0"
    [manifest] = recipe["Manifests"]
    assert manifest["Platform"] == {"os": "linux", "architecture": "amd64"}
    by_name = {Path(n).name: data for n, data in files.items() if not n.startswith(("manifest", "greengrass/"))}
    artifacts = {a["Uri"].rsplit("/", 1)[-1]: a for a in manifest["Artifacts"]}
    assert set(artifacts) == {"model.onnx", "model.onnx.data", "labels.txt", "deeplens_model.py",
                              "deeplens-test-model.zip"}
    for name, artifact in artifacts.items():
        assert artifact["Algorithm"] == "SHA-256"
        assert artifact["Digest"] == base64.b64encode(hashlib.sha256(by_name[name]).digest()).decode()
        assert artifact["Uri"].startswith("s3://deeplens-greengrass-artifacts/components/")
    assert artifacts["deeplens-test-model.zip"]["Unarchive"] == "ZIP"
    assert "$aws/things/{iot:thingName}/infer" in json.dumps(recipe["ComponentConfiguration"])


@pytest.mark.skipif(not SCHEMA.is_file(), reason="an extra check: the GDK's schema lies in ../shared/, beside CI")
def test_recipe_also_passes_the_gdk_schema(tmp_path: Path, onnx_model_dir: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    report = package_json(_project(tmp_path, onnx_model_dir))
    recipe = json.loads(_bundle_files(Path(report["bundle"]))["greengrass/recipe.json"])
    jsonschema.validate(_lowercase_keys(recipe), json.loads(SCHEMA.read_text()))


def _valid_recipe() -> dict[str, Any]:
    digest = base64.b64encode(hashlib.sha256(b"model").digest()).decode()
    return {"RecipeFormatVersion": "2020-01-25", "ComponentName": "com.deeplens.x", "ComponentVersion": "1.0.0",
            "Manifests": [{"Platform": {"os": "linux", "architecture": "amd64"},
                           "Lifecycle": {"Run": {"Script": "python3 -u main.py"}},
                           "Artifacts": [{"Uri": "s3://deeplens-b/c/model.onnx", "Digest": digest}]}]}


def _broken(path: str, value: Any) -> dict[str, Any]:
    recipe = _valid_recipe()
    target: Any = recipe
    *parents, last = path.split(".")
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    target[last] = value
    return recipe


@pytest.mark.parametrize(("path", "value", "field"), [
    ("ComponentName", "com deeplens x", "ComponentName"),
    ("ComponentVersion", "1.0", "ComponentVersion"),
    ("RecipeFormatVersion", "2021-01-01", "RecipeFormatVersion"),
    ("Manifests.0.Artifacts.0.Digest", "not-a-digest", "Manifests.0.Artifacts.0.Digest"),
    ("Manifests.0.Artifacts.0.Unarchive", "TAR", "Manifests.0.Artifacts.0.Unarchive"),
    ("Manifests.0.Artifacts.0.Uri", "/local/model.onnx", "Manifests.0.Artifacts.0.Uri"),
    ("Manifests.0.Platform.architecture", "x86_64", "Manifests.0.Platform.architecture"),
    ("Manifests.0.Lifecycle.Startup", {"Script": "other"}, "Manifests.0.Lifecycle"),
    ("Manifests.0.Lifecycle.Run", {"Script": "x", "Timeout": "soon"}, "Manifests.0.Lifecycle.Run.Timeout"),
    ("Manifests.0.Lifecycle.Setenv", {"A B": "1"}, "Manifests.0.Lifecycle.Setenv"),
])
def test_the_recipe_model_refuses_what_a_core_would(path: str, value: Any, field: str) -> None:
    Recipe.model_validate(_valid_recipe())
    with pytest.raises(BundleError, match=f"Field `{field}"):
        checked(_broken(path, value))


def test_two_artifacts_of_one_name_are_refused() -> None:
    recipe = _valid_recipe()
    artifact = recipe["Manifests"][0]["Artifacts"][0]
    recipe["Manifests"][0]["Artifacts"].append({**artifact, "Uri": "s3://deeplens-b/other/model.onnx"})
    with pytest.raises(BundleError, match="two artifacts are named 'model.onnx'"):
        checked(recipe)


def test_a_component_name_a_core_would_refuse_is_a_config_error(tmp_path: Path, onnx_model_dir: Path) -> None:
    config = _project(tmp_path, onnx_model_dir, greengrass={"component": "com.deeplens/model one"})
    assert "Field `greengrass.component`" in package_json(config, expect=3)


def test_publish_references_the_published_version_never_latest(aws: str, tmp_path: Path,
                                                                onnx_model_dir: Path) -> None:
    config = _project(tmp_path, onnx_model_dir, **{"lambda": {"source": "lambda", "role": _role()}})
    (config.parent / "lambda").mkdir()
    (config.parent / "lambda" / "inference.py").write_text(testing.MINIMAL_LAMBDA)
    first = testing.verify(Path(package_json(config, "--publish")["bundle"])).manifest.to_dict()["lambda"]
    (config.parent / "lambda" / "inference.py").write_text(testing.MINIMAL_LAMBDA + "\n# v2\n")
    second = testing.verify(Path(package_json(config, "--publish")["bundle"])).manifest.to_dict()["lambda"]

    assert first["published_version"] == "1" and second["published_version"] == "2"
    assert second["arn"].endswith(":function:deeplens-test-model:2") and "$LATEST" not in second["arn"]
    client = boto3.client("lambda")
    alias = client.get_alias(FunctionName="deeplens-test-model", Name="live")
    assert alias["FunctionVersion"] == "2"
    function = client.get_function(FunctionName="deeplens-test-model", Qualifier="2")["Configuration"]
    assert function["Handler"] == "inference.handler" and function["Timeout"] == 900
    assert function["Environment"]["Variables"]["DEEPLENS_MODEL_DIR"] == "/greengrass-machine-learning/model"


def test_publish_without_a_role_names_the_key(aws: str, tmp_path: Path, onnx_model_dir: Path) -> None:
    message = package_json(_project(tmp_path, onnx_model_dir), "--publish", expect=3)
    assert "publishing the Lambda needs `lambda.role`" in message


def test_v1_documents_create_definitions_and_a_group_version(aws: str, tmp_path: Path, onnx_model_dir: Path) -> None:
    config = _project(tmp_path, onnx_model_dir, greengrass={"format": "both", "thing_name": "deeplens_abc"})
    text = config.read_text().replace('handler = "inference.handler"',
                                      f'handler = "inference.handler"\nrole = "{_role()}"')
    config.write_text(text)
    files = _bundle_files(Path(package_json(config, "--publish")["bundle"]))
    definitions = {name: json.loads(files[f"greengrass/v1/{name}.json"])
                   for name in ("function-definition", "resource-definition", "subscription-definition")}
    function = definitions["function-definition"]["Functions"][0]
    assert function["FunctionArn"].endswith(":1") and function["FunctionConfiguration"]["Pinned"] is True
    assert definitions["subscription-definition"]["Subscriptions"][0]["Subject"] == "$aws/things/deeplens_abc/infer"
    assert "greengrass/v1/model.zip" in files

    client = boto3.client("greengrass")
    group = client.create_group(Name="deeplens-group")
    version, reused = create_v1_group_version(client, definitions, group["Id"])
    stored = client.get_group_version(GroupId=group["Id"], GroupVersionId=version)["Definition"]
    assert {"FunctionDefinitionVersionArn", "ResourceDefinitionVersionArn",
            "SubscriptionDefinitionVersionArn"} <= set(stored) and not reused
    assert create_v1_group_version(client, definitions, group["Id"]) == (version, True), "the same bundle again"


def test_v1_without_a_published_lambda_is_a_clear_error(tmp_path: Path, onnx_model_dir: Path) -> None:
    config = _project(tmp_path, onnx_model_dir, greengrass={"format": "v1", "thing_name": "deeplens_abc"})
    assert "Greengrass v1 documents reference a published Lambda version" in package_json(config, expect=3)


@pytest.mark.parametrize(("loop", "code"), [("pass", 0), ("raise RuntimeError('camera unplugged')", 1)])
def test_the_recipe_run_script_runs_the_lambda_as_a_nucleus_would(tmp_path: Path, onnx_model_dir: Path,
                                                                   loop: str, code: int) -> None:
    lambda_dir = tmp_path / "lambda"
    lambda_dir.mkdir()
    (lambda_dir / "inference.py").write_text(
        "import threading\n\nimport deeplens_publish\n\n\ndef _loop():\n"
        "    for frame in (1, 2):\n        deeplens_publish.publish({'frame': frame})\n"
        f"    {loop}\n\n\nthreading.Thread(target=_loop).start()\n\n\ndef handler(event, context):\n    return None\n")
    config = _project(tmp_path, onnx_model_dir, **{"lambda": {"source": str(lambda_dir)}})
    files = _bundle_files(Path(package_json(config)["bundle"]))
    recipe = json.loads(files["greengrass/recipe.json"])
    artifacts = tmp_path / "artifacts"
    with zipfile.ZipFile(io.BytesIO(files["lambda/deeplens-test-model.zip"])) as archive:
        archive.extractall(artifacts / "deeplens-test-model")  # what Unarchive: ZIP leaves on the device
    script = recipe["Manifests"][0]["Lifecycle"]["Run"]["Script"]
    assert script.startswith("exec {work:path}/venv/bin/python -u "), "the runtime's environment's interpreter"
    script = script.replace("{artifacts:decompressedPath}", str(artifacts)).replace(
        "{work:path}/venv/bin/python", sys.executable, 1)
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "AWS_IOT_THING_NAME": "deeplens_abc"})
    assert done.returncode == code, done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines()] == [{"frame": 1}, {"frame": 2}]
    assert ("camera unplugged" in done.stderr) == bool(code)


def test_a_configuration_error_publishes_nothing(aws: str, tmp_path: Path, onnx_model_dir: Path) -> None:
    """--publish is the build's one side effect: a problem of deeplens.toml alone fails before it, not after."""
    role = boto3.client("iam").create_role(RoleName="r", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    config = testing.write_project(tmp_path / "project", source=onnx_model_dir, greengrass={"format": "both"})
    config.write_text(config.read_text().replace('handler = "inference.handler"',
                                                 f'handler = "inference.handler"\nrole = "{role}"'))
    message = package_json(config, "--publish", expect=3)
    assert boto3.client("lambda").list_functions()["Functions"] == [], "nothing was published"
    assert "Field `greengrass` includes v1, whose subscriptions name the device" in message, message
