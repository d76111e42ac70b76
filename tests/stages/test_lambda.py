"""The Lambda zip: deterministic, content-versioned, and never carrying a secret."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from deeplens_build.config import LambdaConfig
from deeplens_build.errors import ConfigError
from deeplens_build.stages.lambda_package import package_lambda


def _source(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "inference.py").write_text("def handler(event, context):\n    return None\n")
    (root / "pkg" / "post.py").write_text("X = 1\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "inference.cpython-311.pyc").write_bytes(b"\0")
    return root


def test_zip_is_deterministic_and_skips_bytecode(tmp_path: Path) -> None:
    source = _source(tmp_path / "src")
    a = package_lambda(LambdaConfig(source=source), default_name="deeplens-x", workdir=_dir(tmp_path / "a"))
    (source / "inference.py").touch()  # a new mtime must not change the bytes
    b = package_lambda(LambdaConfig(source=source), default_name="deeplens-x", workdir=_dir(tmp_path / "b"))
    assert a.path.read_bytes() == b.path.read_bytes() and a.version == b.version
    with zipfile.ZipFile(a.path) as z:
        assert z.namelist() == ["deeplens_preprocess.py", "deeplens_publish.py", "deeplens_runner.py", "inference.py",
                                "pkg/post.py"], "the preprocessing, the publisher and the runner ship beside"
        assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}


@pytest.mark.parametrize("secret", [
    ".env", "credentials", "deploy-key.pem", "config/.aws/config", "my_secret.json", "id_dsa", ".git-credentials",
    ".npmrc", ".pgpass", ".ssh/known_hosts", "home/.docker/config.json", "service-account.json", "prod.tfstate",
    ".htpasswd", "putty.ppk", "kubeconfig", "keystore.jks"])
def test_refuses_files_that_look_like_secrets(tmp_path: Path, secret: str) -> None:
    source = _source(tmp_path / "src")
    (source / secret).parent.mkdir(parents=True, exist_ok=True)
    (source / secret).write_text("AKIA...")
    with pytest.raises(ConfigError, match=rf"look like secrets: {secret}"):
        package_lambda(LambdaConfig(source=source), default_name="deeplens-x", workdir=_dir(tmp_path / "out"))
    assert not list((tmp_path / "out").iterdir())


PRIVATE_KEY = ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtz\n"
               "-----END OPENSSH PRIVATE KEY-----\n")


@pytest.mark.parametrize(("name", "content", "kind"), [
    ("notes.txt", PRIVATE_KEY, "Private Key"),
    ("settings.py", 'KEY = "AKIAIOSFODNN7EXAMPLE"\n', "AWS Access Key"),
    ("client.py", 'TOKEN = "ghp_' + "a1B2c3D4e5" * 3 + 'abcdef"\n', "GitHub Token"),
])
def test_refuses_a_secret_saved_under_an_innocent_name(tmp_path: Path, name: str, content: str, kind: str) -> None:
    source = _source(tmp_path / "src")
    (source / name).write_text(content)
    with pytest.raises(ConfigError, match=rf"look like secrets: {name} \(holds {kind}\)"):
        package_lambda(LambdaConfig(source=source), default_name="deeplens-x", workdir=_dir(tmp_path / "out"))


def test_ordinary_code_with_hashes_and_password_prompts_is_not_a_secret(tmp_path: Path) -> None:
    source = _source(tmp_path / "src")
    (source / "util.py").write_text('DIGEST = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"\n'
                                    'password = input("password: ")\n')
    package_lambda(LambdaConfig(source=source), default_name="deeplens-x", workdir=_dir(tmp_path / "out"))


def test_refuses_a_hard_link_to_a_file_outside_the_folder(tmp_path: Path) -> None:
    source = _source(tmp_path / "src")
    outside = tmp_path / "home-notes.txt"
    outside.write_text("nothing secret-looking, but not the Lambda's")
    os.link(outside, source / "notes.txt")
    with pytest.raises(ConfigError, match=r"notes.txt \(a hard link to a file outside the folder\)"):
        package_lambda(LambdaConfig(source=source), default_name="deeplens-x", workdir=_dir(tmp_path / "out"))
    os.unlink(outside)
    (source / "copy.txt").unlink(missing_ok=True)
    os.link(source / "notes.txt", source / "copy.txt")  # both links inside: harmless
    package_lambda(LambdaConfig(source=source), default_name="deeplens-x", workdir=_dir(tmp_path / "out2"))


def test_a_lambda_module_named_like_the_shipped_publisher_is_refused(tmp_path: Path) -> None:
    source = _source(tmp_path / "src")
    (source / "deeplens_publish.py").write_text("def publish(result):\n    print(result)\n")
    with pytest.raises(ConfigError, match="holds deeplens_publish.py, which deeplens-build ships beside every Lambda"):
        package_lambda(LambdaConfig(source=source), default_name="deeplens-x", workdir=_dir(tmp_path / "out"))


def test_handler_module_must_exist(tmp_path: Path) -> None:
    source = _source(tmp_path / "src")
    with pytest.raises(ConfigError, match=r"`lambda.handler` is 'main.handler', but .* has no main.py"):
        package_lambda(LambdaConfig(source=source, handler="main.handler"), default_name="deeplens-x",
                       workdir=_dir(tmp_path / "out"))


def _dir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_refuses_a_link_to_a_file_outside_the_source(tmp_path: Path) -> None:
    source = _source(tmp_path / "src")
    outside = tmp_path / "home-config"
    outside.write_text("token")
    (source / "settings.json").symlink_to(outside)
    with pytest.raises(ConfigError, match=r"settings.json \(a link to .*home-config\)"):
        package_lambda(LambdaConfig(source=source), default_name="deeplens-x", workdir=_dir(tmp_path / "out"))


DEEPLENS_ERA = {
    "a Python 2 print statement": ("helpers/log.py", "def log(x):\n    print 'frame', x\n", "helpers/log.py:2:"),
    "tabs and spaces mixed": ("inference.py", "def handler(event, context):\n    x = 1\n\treturn x\n",
                              "inference.py:3: inconsistent use of tabs and spaces in indentation"),
    "a handler that is not there": ("inference.py", "def lambda_handler(event, context):\n    return None\n",
                                    "inference.py defines no handler at its top level"),
}


@pytest.mark.parametrize("case", sorted(DEEPLENS_ERA))
def test_lambda_code_the_device_cannot_run_fails_the_build_before_any_model_work(
        tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import package_json

    from deeplens_build import testing

    rel, text, expected = DEEPLENS_ERA[case]
    code = _source(tmp_path / "lambda")
    (code / rel).parent.mkdir(parents=True, exist_ok=True)
    (code / rel).write_text(text)
    # a source that does not exist: the error must come before fetching it
    config = testing.write_project(tmp_path / "p", source=tmp_path / "no-model-yet", **{"lambda": {
        "source": str(code), "handler": "inference.handler"}})
    assert expected in package_json(config, expect=3)


def test_a_v1_lambda_is_parsed_as_python_3_8(tmp_path: Path) -> None:
    from deeplens_build.stages.lambda_package import check_code

    code = _source(tmp_path / "lambda")
    (code / "util.py").write_text("def first(xs):\n    if (n := len(xs)) > 0:\n        return xs[0]\n"
                                  "    match xs:\n        case _:\n            return None\n")
    with pytest.raises(ConfigError, match=r"util.py:6: Pattern matching is only supported in Python 3.10 .*Python 3.8"):
        check_code(LambdaConfig(source=code), (3, 8))
    check_code(LambdaConfig(source=code), (3, 11))


def test_a_handler_module_with_a_dash_in_its_file_name_is_accepted(tmp_path: Path) -> None:
    code = _source(tmp_path / "lambda")
    (code / "inference-lambda.py").write_text("def handler(event, context):\n    return None\n")
    package = package_lambda(LambdaConfig(source=code, handler="inference-lambda.handler"), default_name="x",
                             workdir=tmp_path)
    assert package.handler == "inference-lambda.handler"
