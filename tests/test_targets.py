"""Target backends: opsets a device accepts, FP16 that keeps parity, OpenVINO IR, TensorRT on the device, profiles.

The older runtime is real: onnxruntime 1.16.3 (what many Jetson images carry) installed from the package index
into a virtual environment of its own. TensorRT needs an NVIDIA GPU, which this machine has not: what can be
checked without one is (the opset, the operator list, the on-device build step the recipe runs, and that
``run`` says clearly what is missing); ``bench/bench_tensorrt.py`` builds and times engines on a GPU machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import cli, example_project, open_bundle, package_json, package_project
from onnx import TensorProto, helper, numpy_helper

from deeplens_build import onnxtools, testing

OLD_ONNXRUNTIME = "1.16.3"


def _unpack(bundle: Path, into: Path) -> Path:
    """The bundle's files, after it verifies."""
    testing.verify(bundle)
    with open_bundle(bundle) as tar:
        tar.extractall(into, filter="data")
    return into


def fp16_sensitive_model(path: Path) -> Path:
    """An MLP whose logits sit near 70000 before a Softmax, as when a large per-class bias (a prior) feeds it: past
    half precision's largest value (65504), so plain FP16 clamps the bias and loses the prior, and FP16 logits
    overflow. The big weights (the first two layers) are FP16-safe: the last layer, kept in FP32, costs little."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((64, 256)).astype(np.float32) / 8, "w1"),
               numpy_helper.from_array(rng.standard_normal((256, 256)).astype(np.float32) / 16, "w2"),
               numpy_helper.from_array(rng.standard_normal((256, 10)).astype(np.float32), "w3"),
               numpy_helper.from_array(7e4 + 2 * np.arange(10, dtype=np.float32), "prior")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"]), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "w3"], ["l0"]), helper.make_node("Add", ["l0", "prior"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["prob"], axis=-1)]
    graph = helper.make_graph(nodes, "shifted", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 10])], initializer=weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.filterwarnings("ignore:the float32 number:UserWarning")  # the plain conversion clamps, as it should
def test_fp16_keeps_parity_by_keeping_in_fp32_only_the_nodes_that_need_it(tmp_path: Path) -> None:
    source = fp16_sensitive_model(tmp_path / "out" / "model.onnx")
    from onnxconverter_common import float16

    plain = tmp_path / "plain.onnx"
    onnx.save(float16.convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), str(plain))
    x = {"x": np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)}
    wrong = np.abs(onnxtools.run(plain, x)["prob"] - onnxtools.run(source, x)["prob"]).max()
    assert wrong > 1e-2, "plain FP16 fails parity at the FP16 tolerance"

    config = testing.write_project(tmp_path / "project", source=source.parent, model={"precision": "fp16",
                                                                                       "task": "other"})
    result = testing.build(config)
    manifest = testing.verify(result.bundle).manifest
    assert result.parity.passed and result.parity.max_abs_diff <= result.parity.tolerance == 1e-2
    # onnxruntime's optimizer fused the last MatMul and the Add into one Gemm: it reads the prior, so it goes first
    assert manifest.optimization.fp32_nodes == ("/MatMulAddFusion",)
    assert manifest.optimization.size_after <= 0.6 * manifest.optimization.size_before
    assert "fp16-mixed" in manifest.optimization.passes
    assert any("kept 1 of 6 nodes in float" in note for note in result.notes), result.notes


@pytest.fixture(scope="session")
def old_onnxruntime(tmp_path_factory) -> Path:
    """A real onnxruntime 1.16.3 in a virtual environment of its own, from the package index."""
    venv = tmp_path_factory.mktemp("ort116") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    f"onnxruntime=={OLD_ONNXRUNTIME}", "numpy<2"], check=True, timeout=600)
    return python


@pytest.mark.slow
def test_example_capped_at_opset_17_loads_and_matches_in_onnxruntime_1_16(tmp_path: Path,
                                                                          old_onnxruntime: Path) -> None:
    """MXNet's exporter writes the installed onnx's newest opset (23); at `target.opset = 17` it is steered to 17,
    and the artifact imports the standard domain only, at the IR version opset 17 needs."""
    config = example_project(tmp_path, opset=17)
    result = testing.build(config)
    assert result.manifest.optimization.opset == 17
    folder = _unpack(result.bundle, tmp_path / "bundle")
    model = onnx.load(str(folder / "model" / "model.onnx"))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)] and model.ir_version == 8
    reference = next((config.parent / ".deeplens" / "cache" / "reference").glob("*/reference.npz"))
    script = ("import sys, numpy as np, onnxruntime as ort\n"
              "assert ort.__version__ == sys.argv[3], ort.__version__\n"
              "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
              "ref = np.load(sys.argv[2])\n"
              "worst = 0.0\n"
              "for key in [k for k in ref.files if k.startswith('in/')]:\n"
              "    got = s.run(None, {key.split('/')[2]: ref[key]})[0]\n"
              "    want = ref['out/' + key.split('/')[1] + '/prob']\n"
              "    worst = max(worst, float(np.abs(got - want).max()))\n"
              "print(worst)\n")
    done = subprocess.run([str(old_onnxruntime), "-c", script, str(folder / "model" / "model.onnx"), str(reference),
                           OLD_ONNXRUNTIME], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) <= result.parity.tolerance, "onnxruntime 1.16 computes what the original MXNet does"


def test_openvino_target_compiles_the_example_to_ir_and_checks_parity_on_openvino(tmp_path: Path) -> None:
    result = testing.build(example_project(tmp_path, backend="openvino"))
    manifest = testing.verify(result.bundle).manifest
    assert manifest.model.format == "openvino-ir"
    assert manifest.model.files == ("model/model.xml", "model/model.bin")
    assert result.parity.passed and result.parity.runtime == "openvino"
    assert manifest.target.backend == "openvino" and manifest.target.compiled_on == "build"
    assert manifest.runtime.name == "openvino" and "openvino==2026.4.1" in manifest.runtime.requirements
    folder = _unpack(result.bundle, tmp_path / "bundle")
    recipe = json.loads((folder / "greengrass" / "recipe.json").read_text())
    assert "openvino==2026.4.1" in recipe["Manifests"][0]["Lifecycle"]["Install"]["Script"]
    uris = {a["Uri"].rsplit("/", 1)[-1] for a in recipe["Manifests"][0]["Artifacts"]}
    assert {"model.xml", "model.bin", "deeplens_model.py"} <= uris
    # the IR keeps the ONNX's FP16 weights
    assert "f16" in (folder / "model" / "model.xml").read_text()


def test_tensorrt_target_ships_onnx_at_opset_17_and_builds_the_engine_at_install(tmp_path: Path) -> None:
    result = testing.build(example_project(tmp_path, backend="tensorrt", accelerator="gpu"))
    manifest = testing.verify(result.bundle).manifest
    assert manifest.model.format == "onnx" and manifest.optimization.opset == 17
    assert manifest.target.compiled_on == "device" and manifest.target.max_opset == 17
    assert manifest.runtime.name == "tensorrt"
    assert result.parity.runtime.startswith("onnxruntime")
    assert any("tensorrt does not run on this machine" in note for note in result.notes)
    folder = _unpack(result.bundle, tmp_path / "bundle")
    lifecycle = json.loads((folder / "greengrass" / "recipe.json").read_text())["Manifests"][0]["Lifecycle"]
    assert lifecycle["Install"]["Script"].endswith(
        "\n{work:path}/venv/bin/python {artifacts:path}/deeplens_compile.py {artifacts:path} {work:path} 0.01 0.001\n")
    assert lifecycle["Setenv"]["DEEPLENS_WORK_DIR"] == "{work:path}"
    model = onnx.load(str(folder / "model" / "model.onnx"))
    from deeplens_build_tensorrt import OPERATORS

    assert {n.op_type for n in model.graph.node} <= OPERATORS
    assert (folder / "model" / "deeplens_reference.npz").is_file(), "the device checks its engine's parity"


def test_the_on_device_step_checks_parity_against_the_original(tmp_path: Path) -> None:
    """After building the engine, deeplens_compile.py runs the parity samples through the bundle's own loader
    and fails the install beyond the tolerance. No GPU here: onnxruntime's loader stands in for TensorRT's (the
    one boundary mocked), so the check itself — samples, outputs, tolerance, message — is what runs."""
    import importlib.util

    from deeplens_build.device import support

    result = testing.build(example_project(tmp_path, backend="tensorrt", accelerator="gpu"))
    model_dir = _unpack(result.bundle, tmp_path / "bundle") / "model"
    shutil.copyfile(support.ONNXRUNTIME_MODEL, model_dir / "deeplens_model.py")
    spec = importlib.util.spec_from_file_location("deeplens_compile", model_dir / "deeplens_compile.py")
    step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step)
    try:
        assert step.check_parity(str(model_dir), 0.01) <= 0.01
        reference = dict(np.load(model_dir / "deeplens_reference.npz"))
        reference = {k: (v + 0.5 if k.startswith("out/") else v) for k, v in reference.items()}
        np.savez(model_dir / "deeplens_reference.npz", **reference)
        with pytest.raises(SystemExit, match=r"the model fails parity on onnxruntime CPUExecutionProvider: max abs "
                                             r"diff 0.5\d*, beyond tolerance 0.01 \+ rtol 0 x \|original\| over 8 "
                                             r"samples"):
            step.check_parity(str(model_dir), 0.01)
    finally:
        sys.path.remove(str(model_dir))
        sys.modules.pop("deeplens_model", None)


def test_tensorrt_refuses_an_operator_its_parser_lacks_on_the_build_machine(tmp_path: Path) -> None:
    source = tmp_path / "out" / "model.onnx"
    source.parent.mkdir()
    graph = helper.make_graph([helper.make_node("Hardmax", ["x"], ["y"])], "hardmax",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
    message = package_project(tmp_path, source.parent, expect=5, target={"backend": "tensorrt", "accelerator": "gpu"},
                              model={"task": "other"})
    assert "tensorrt's ONNX parser does not support operator(s) Hardmax; replace those layers" in message
    assert not list((tmp_path / "project" / "dist").glob("*.tar.zst")), "nothing at the output path"


def test_a_backend_is_chosen_by_name_and_must_serve_the_device(tmp_path: Path, onnx_model_dir: Path) -> None:
    message = package_project(tmp_path / "a", onnx_model_dir, expect=3, target={"backend": "coreml"})
    assert "`target.backend` is 'coreml', which no installed plugin provides" in message
    assert "onnxruntime" in message and "openvino" in message and "tensorrt" in message
    message = package_project(tmp_path / "b", onnx_model_dir, expect=3, target={"backend": "tensorrt"})
    assert "tensorrt serves" in message and 'not a linux-x86_64 device with `target.accelerator = "cpu"`' in message
    message = package_project(tmp_path / "c", onnx_model_dir, expect=3, target={"backend": "tensorrt",
                                                                                "accelerator": "gpu"},
                              greengrass={"format": "v1", "thing_name": "deeplens_abc"})
    assert "compiles on the device, in a Greengrass v2 recipe's Install phase; a v1 core has none" in message


def test_profile_records_latency_of_the_original_and_each_runtime_and_inspect_shows_it(tmp_path: Path) -> None:
    config = example_project(tmp_path, backend="openvino")
    config.write_text(config.read_text() + "\n[profile]\nruns = 5\n")
    report = package_json(config)
    profile = testing.verify(Path(report["bundle"])).manifest.profile
    assert [p.runtime for p in profile] == ["original (mxnet)", "onnxruntime", "openvino"]
    assert all(p.runs == 5 and 0 < p.median_ms <= p.p95_ms for p in profile)
    shown = cli("inspect", report["bundle"]).stdout
    assert "latency openvino: median" in shown and "target  openvino (compiled on: build" in shown


def test_plugins_lists_target_backends_with_frameworks() -> None:
    listed = json.loads(cli("plugins", "--json").stdout)
    targets = {t["name"]: t for t in listed["targets"]}
    assert set(targets) == {"onnxruntime", "openvino", "tensorrt"}
    assert targets["tensorrt"]["compiles_on"] == "device" and targets["tensorrt"]["max_opset"] == 17
    assert targets["openvino"]["compiles_on"] == "build" and targets["openvino"]["builtin"]
    text = cli("plugins").stdout
    assert "target openvino" in text and "mxnet" in text


def test_a_backend_that_crashes_is_named_with_the_cause(tmp_path: Path, onnx_model_dir: Path) -> None:
    from deeplens_build import CompileError, TargetBackend, hookimpl

    class Broken:
        @hookimpl
        def deeplens_build_targets(self):
            def compile_badly(artifact, workdir, precision):
                raise RuntimeError("the compiler crashed")

            return [TargetBackend(name="broken", summary="a backend written in a test", accelerators=("cpu",),
                                  platforms=("linux-x86_64",), device_module=Path(onnxtools.__file__),
                                  compile=compile_badly)]

    config = testing.write_project(tmp_path / "p", source=onnx_model_dir, target={"backend": "broken"})
    with pytest.raises(CompileError, match="target backend 'broken' failed to compile the artifact: RuntimeError: "
                                           "the compiler crashed"):
        testing.build(config, plugins=[Broken()])
