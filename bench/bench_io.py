"""Packaging at the I/O limit: every figure a ratio against what `tar --zstd` and `openssl dgst` do with the same
bytes on this machine, in the same run.

    .venv/bin/python bench/bench_io.py        (`make bench` runs it; figures also in bench/results.json)

Models: ONNX files of float32 MatMul weights (incompressible, as trained weights are, and scaled as theirs are), FP32
and FP16, one random parity sample, the real command line in a fresh process each time. Each figure and its baseline run
interleaved (A B A B …, ``BENCH_REPEAT`` rounds, 3 by default), so a machine whose load drifts shifts both alike;
each ratio is printed with its range over the rounds (the slowest A over the fastest B and back), and the verdict
is "met" or "NOT met" only when the whole range is on one side of the goal, else "unsafe: spread". Sizes:
``BENCH_SIZES`` (MB, default 50,500,2500).

- bundle stage: a rebuild whose every stage is cached but whose bundle was deleted, minus a rebuild through the
  pipeline that finds the bundle in place (what is left is writing, hashing and signing the bundle), vs
  `tar --zstd -cf` of the same payload;
- cold `package --no-cache` of each model vs `tar --zstd -cf` of the source; the same at `precision = "fp16"` vs
  the FP32 build;
- no-change rebuild of each model (goal ≤ 0.3 s, and flat: 500 MB within 1.5× of 50 MB): `package` again, which
  finds nothing it was built from changed (deeplens_build/uptodate.py); also shown, without a goal, the same
  rebuild through the pipeline (the config touched: every stage cached, the bundle left in place);
- `verify` vs `openssl dgst -sha256` of the bundle;
- peak RSS of the cold builds (FP32, FP16) / the model's size;
- shared cache (moto as an S3 server): machine B, a fresh work folder, vs machine A's cold build;
- small commands on the example bundle (``examples/classifier``), every plugin installed as a user has them:
  ``verify``, ``inspect``, ``plugins`` and the time to ``run``'s first line (goal ≤ 0.12 s), each interleaved
  with ``python -c pass``, whose start is shown beside them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from deeplens_build import testing
from deeplens_build.bundle import unpack_bundle

CLI = [sys.executable, "-m", "deeplens_build.cli"]
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))
SIZES = tuple(int(size) for size in os.environ.get("BENCH_SIZES", "50,500,2500").split(","))
GOALS = {"bundle_vs_tar": 1.3, "cold_vs_tar": 4.0, "cold_vs_tar_small": 5.0, "fp16_vs_fp32": 1.2, "rebuild_s": 0.3,
         "rebuild_flat": 1.5, "verify_vs_openssl": 1.3, "rss_vs_model": 2.0, "shared_vs_cold": 0.3, "small_s": 0.12}
SMALL_REPEAT = 15
"""Rounds for the small commands: a tenth of a second varies by more than a build does."""
SMALL = 100
"""Below this many MB a cold build's fixed start (imports, sessions) weighs more: its goal is cold_vs_tar_small."""


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def interleaved(*fns: Callable[[], object], repeat: int = REPEAT) -> list[list[float]]:
    """Each of ``fns`` timed ``repeat`` times, in turn within each round: one list of times per function."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, kept in zip(fns, times):
            kept.append(timed(fn))
    return times


def ratio(a: list[float], b: list[float]) -> dict[str, float]:
    """median(a) / median(b), and its range over the rounds."""
    return {"value": statistics.median(a) / statistics.median(b), "low": min(a) / max(b), "high": max(a) / min(b)}


def spread(times: list[float]) -> dict[str, float]:
    return {"value": statistics.median(times), "low": min(times), "high": max(times)}


def model(path: Path, megabytes: int) -> Path:
    """MatMul layers of 4096x(N) float32 weights adding up to ``megabytes`` (from 2000 MB on in external data),
    written by a child process: a child forked from a process that held the weights would count them in its own
    peak RSS."""
    subprocess.run([sys.executable, __file__, "model", str(path), str(megabytes)], check=True)
    return path


def _write_model(path: Path, megabytes: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    side = 4096
    columns = [side] * (megabytes * 2**20 // (side * side * 4))
    rest = megabytes * 2**20 - sum(columns) * side * 4
    if rest:
        columns.append(rest // (side * 4))
    rng = np.random.default_rng(0)
    weights, nodes, width = [], [], side
    for index, cols in enumerate(columns):
        # scaled as a trained layer's are, so activations stay near 1 and half precision keeps parity
        layer = (rng.standard_normal((width, cols)) / np.sqrt(width)).astype(np.float32)
        weights.append(numpy_helper.from_array(layer, f"w{index}"))
        nodes.append(helper.make_node("MatMul", ["x" if index == 0 else f"h{index - 1}", f"w{index}"], [f"h{index}"]))
        width = cols
    graph = helper.make_graph(nodes, "weights", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, side])],
                              [helper.make_tensor_value_info(f"h{len(columns) - 1}", TensorProto.FLOAT, [1, width])],
                              initializer=weights)
    path.parent.mkdir(parents=True)
    # protobuf holds 2 GB at most: a larger model keeps its weights in external data, as exporters write it
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
              save_as_external_data=megabytes >= 2000, location=f"{path.name}.data")


def run(command: list[str], env: dict[str, str]) -> int:
    """Run ``command``; its peak RSS in bytes."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss * 1024


def tar_zstd(out: Path, folder: Path) -> Callable[[], object]:
    """``tar --zstd`` (zstd's default level, 3) of everything in ``folder``, to run."""
    names = sorted(p.name for p in folder.iterdir())
    return lambda: subprocess.run(["tar", "--zstd", "-cf", str(out), "-C", str(folder), *names], check=True)


def moto_server() -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", "0"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if "Running on http://" in line:
            # it logs every request: read on, or a full pipe would stall it mid-request
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, line.split("Running on ", 1)[1].split()[0].rstrip("/")
    raise SystemExit("moto's server did not start")


def measure(root: Path, megabytes: int, env: dict[str, str], figures: dict) -> None:
    source = model(root / "out" / "model.onnx", megabytes)
    size = sum(path.stat().st_size for path in source.parent.iterdir())  # with its external data
    config = testing.write_project(root / "p", source=source.parent, model={"task": "other"},
                                   parity={"random_samples": 1})
    half = testing.write_project(root / "p16", source=source.parent, model={"task": "other", "precision": "fp16"},
                                 parity={"random_samples": 1})
    key = testing.signing_key(config.parent)
    package = [*CLI, "package", "--config", str(config), "--signing-key", str(key)]
    bundle = config.parent / "dist" / "deeplens-test-model-1.0.0.tar.zst"

    peaks: list[int] = []
    half_peaks: list[int] = []
    cold, cold_half, tar_source = interleaved(
        lambda: peaks.append(run([*package, "--no-cache"], env)),
        lambda: half_peaks.append(run([*CLI, "package", "--config", str(half), "--signing-key", str(key),
                                       "--no-cache"], env)),
        tar_zstd(root / "source.tar.zst", source.parent))
    payload = root / "payload"
    unpack_bundle(bundle, payload)
    rewrite, pipeline, tar_payload = interleaved(lambda: (bundle.unlink(), run(package, env)),
                                                 lambda: (os.utime(config), run(package, env)),
                                                 tar_zstd(root / "payload.tar.zst", payload))
    [rebuild] = interleaved(lambda: run(package, env))
    verify, openssl = interleaved(lambda: run([*CLI, "verify", str(bundle)], env),
                                  lambda: subprocess.run(["openssl", "dgst", "-sha256", str(bundle)], check=True,
                                                         capture_output=True))
    stage = [r - p for r, p in zip(rewrite, pipeline)]  # what is left is writing, hashing and signing the bundle
    figures[f"{megabytes}MB"] = {
        "model_bytes": size, "bundle_bytes": bundle.stat().st_size,
        "cold_s": spread(cold), "tar_zstd_source_s": spread(tar_source), "cold_vs_tar": ratio(cold, tar_source),
        "rebuild_s": spread(rebuild), "pipeline_rebuild_s": spread(pipeline),
        "bundle_stage_s": spread(stage), "tar_zstd_payload_s": spread(tar_payload),
        "bundle_vs_tar": ratio(stage, tar_payload),
        "verify_s": spread(verify), "openssl_s": spread(openssl), "verify_vs_openssl": ratio(verify, openssl),
        "peak_rss_bytes": max(peaks), "rss_vs_model": {"value": max(peaks) / size, "low": min(peaks) / size,
                                                       "high": max(peaks) / size},
        "fp16_cold_s": spread(cold_half), "fp16_vs_fp32": ratio(cold_half, cold),
        "fp16_peak_rss_bytes": max(half_peaks),
        "fp16_rss_vs_model": {"value": max(half_peaks) / size, "low": min(half_peaks) / size,
                              "high": max(half_peaks) / size},
    }


def shared_cache(root: Path, megabytes: int, env: dict[str, str], figures: dict) -> None:
    """Machine A builds cold and fills the S3 cache; machine B (a fresh work folder) builds the same inputs. A new
    moto server each time: A's cache is empty, and moto, which keeps objects in memory, starts empty too."""
    import boto3

    source = model(root / "out" / "model.onnx", megabytes)
    times: dict[str, list[float]] = {"a": [], "b": []}
    for attempt in range(REPEAT):
        server, endpoint = moto_server()
        try:
            s3 = {**env, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                  "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                         aws_secret_access_key="bench").create_bucket(Bucket="deeplens-bench-cache")
            for machine in ("a", "b"):
                config = testing.write_project(root / f"{machine}{attempt}", source=source.parent,
                                               model={"task": "other"}, parity={"random_samples": 1},
                                               build={"cache": "s3://deeplens-bench-cache/ci"})
                key = testing.signing_key(root / "ci-key")  # one CI key: each machine trusts the other's entries
                started = time.perf_counter()
                run([*CLI, "package", "--config", str(config), "--signing-key", str(key)], s3)
                times[machine].append(time.perf_counter() - started)
        finally:
            server.terminate()
            server.wait()
    figures[f"{megabytes}MB"].update({"shared_machine_a_s": spread(times["a"]), "shared_machine_b_s":
                                      spread(times["b"]), "shared_vs_cold": ratio(times["b"], times["a"])})


def first_line(command: list[str], env: dict[str, str]) -> Callable[[], object]:
    """Start ``command`` and stop it once it printed its first line (to run)."""
    def until_first_line() -> None:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        line = process.stdout.readline()
        process.kill()
        process.wait()
        if not line:
            raise SystemExit(f"{' '.join(command)} printed nothing")
    return until_first_line


def small_commands(root: Path, env: dict[str, str], figures: dict) -> None:
    example = root / "example" / "deeplens.toml"  # a copy: its work folder is the bench's
    shutil.copytree(Path(__file__).resolve().parents[1] / "examples" / "classifier", example.parent,
                    ignore=shutil.ignore_patterns(".deeplens"))
    key = testing.signing_key(root / "key")
    run([*CLI, "package", "--config", str(example), "--signing-key", str(key), "--output", str(root / "dist")], env)
    [bundle] = (root / "dist").glob("*.tar.zst")
    with socket.socket() as closed:  # run's first line comes before it connects: a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    device = ["--public-key", str(key.with_suffix(".pub.pem")), "--mqtt", f"127.0.0.1:{port}",
              "--device-dir", str(root / "device")]
    commands = {"verify": lambda: run([*CLI, "verify", str(bundle)], env),
                "inspect": lambda: run([*CLI, "inspect", str(bundle)], env),
                "plugins": lambda: run([*CLI, "plugins"], env),
                "run, first line": first_line([*CLI, "run", str(bundle), *device], env),
                "python -c pass": lambda: run([sys.executable, "-c", "pass"], env)}
    times = interleaved(*commands.values(), repeat=SMALL_REPEAT)
    figures["small"] = {name: spread(kept) for name, kept in zip(commands, times)}


def main() -> None:
    env = {**os.environ, "DEEPLENS_BUILD_PLUGINS": "deeplens-sources,deeplens-targets,onnx"}
    # measured as installed: pip compiles an installed package's bytecode, and an editable checkout gets it on
    # its first run, unless PYTHONDONTWRITEBYTECODE is set (as on the machine these figures come from), when
    # every start would compile the tool's modules again
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(root / "deeplens_build"), str(root / "plugins")],
                   check=True, stdout=subprocess.DEVNULL)
    figures: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        # every plugin, as installed: what `plugins` lists and `inspect` reads is the user's whole set
        small_commands(Path(tmp) / "small", {k: v for k, v in env.items() if k != "DEEPLENS_BUILD_PLUGINS"}, figures)
        for megabytes in SIZES:
            measure(Path(tmp) / f"m{megabytes}", megabytes, env, figures)
            shutil.rmtree(Path(tmp) / f"m{megabytes}")
            shared_cache(Path(tmp) / f"shared{megabytes}", megabytes, env, figures)
            shutil.rmtree(Path(tmp) / f"shared{megabytes}")
    smallest, largest = figures[f"{min(SIZES)}MB"], figures[f"{max(SIZES)}MB"]
    rows = [(f"no-change rebuild / {min(SIZES)} MB's, {max(SIZES)} MB",
             ratio([largest["rebuild_s"]["value"]], [smallest["rebuild_s"]["value"]]), GOALS["rebuild_flat"], "×")]
    for megabytes in SIZES:
        f = figures[f"{megabytes}MB"]
        rows += [(f"bundle stage vs tar --zstd, {megabytes} MB", f["bundle_vs_tar"], GOALS["bundle_vs_tar"], "×"),
                 (f"cold package vs tar --zstd, {megabytes} MB", f["cold_vs_tar"],
                  GOALS["cold_vs_tar_small" if megabytes < SMALL else "cold_vs_tar"], "×"),
                 (f"cold FP16 vs cold FP32, {megabytes} MB", f["fp16_vs_fp32"], GOALS["fp16_vs_fp32"], "×"),
                 (f"no-change rebuild, {megabytes} MB", f["rebuild_s"], GOALS["rebuild_s"], " s"),
                 (f"  through the pipeline, {megabytes} MB", f["pipeline_rebuild_s"], None, " s"),
                 (f"verify vs openssl dgst, {megabytes} MB", f["verify_vs_openssl"], GOALS["verify_vs_openssl"], "×"),
                 (f"peak RSS / model, {megabytes} MB", f["rss_vs_model"], GOALS["rss_vs_model"], "×"),
                 (f"  FP16 peak RSS / model, {megabytes} MB", f["fp16_rss_vs_model"], GOALS["rss_vs_model"], "×"),
                 (f"shared cache: machine B / A, {megabytes} MB", f["shared_vs_cold"], GOALS["shared_vs_cold"], "×")]
    small = figures["small"]
    rows += [(f"{name}, example bundle", small[name], GOALS["small_s"], " s") for name in small
             if name != "python -c pass"]
    rows.append(("  python -c pass", small["python -c pass"], None, " s"))
    print(f"{'figure':44} {'measured':>9} {'range':>15} {'goal':>7}")
    for name, figure, goal, unit in rows:
        low, value, high = figure["low"], figure["value"], figure["high"]
        verdict = "" if goal is None else f"≤ {goal:g}  " + (
            "met" if high <= goal else "NOT met" if low > goal else "unsafe: spread")
        print(f"{name:44} {value:8.2f}{unit:2} {f'{low:.2f}–{high:.2f}':>14} {verdict}")
    for megabytes in SIZES:
        f = figures[f"{megabytes}MB"]
        print(f"baselines, {megabytes} MB: tar --zstd of the source {f['tar_zstd_source_s']['value']:.2f} s, of its "
              f"payload {f['tar_zstd_payload_s']['value']:.2f} s; openssl dgst of its bundle "
              f"{f['openssl_s']['value']:.2f} s; cold package {f['cold_s']['value']:.1f} s")
    Path(os.environ.get("BENCH_RESULTS", Path(__file__).parent / "results.json")).write_text(
        json.dumps({"figures": figures, "goals": GOALS}, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["model"]:
        _write_model(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
