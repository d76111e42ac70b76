"""DeepLens-era Lambdas, written against awscam, mo and greengrasssdk as the DeepLens samples are, run unchanged
under `run` and publish to a real broker (mosquitto)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import Broker
from onnx import TensorProto, helper, numpy_helper
from test_device import THING, _frames, _key, _subscribe

from deeplens_build import testing
from deeplens_build.device.run import DeviceOptions, run_device
from deeplens_build.report import Reporter

# Both in the shape of the DeepLens samples: module-level client and loop, started at import, `while True`.
CLASSIFIER = '''
import json
import os

import awscam
import cv2
import greengrasssdk
import mo

client = greengrasssdk.client("iot-data")
iot_topic = "$aws/things/{}/infer".format(os.environ["AWS_IOT_THING_NAME"])


def lambda_handler(event, context):
    return


def infinite_infer_run():
    input_width, input_height = 32, 32
    model_type = "classification"
    error, model_path = mo.optimize("image-classification", input_width, input_height)
    model = awscam.Model(model_path, {"GPU": 1})
    while True:
        ret, frame = awscam.getLastFrame()
        if not ret:
            raise Exception("Failed to get frame from the stream")
        frame_resize = cv2.resize(frame, (input_height, input_width))
        parsed_inference_results = model.parseResult(model_type, model.doInference(frame_resize))
        top_k = parsed_inference_results[model_type][0:5]
        print(top_k)
        client.publish(topic=iot_topic, payload=json.dumps({"class{}".format(obj["label"]): obj["prob"]
                                                            for obj in top_k}))


infinite_infer_run()
'''

DETECTOR = '''
import json
import os
import threading

import awscam
import cv2
import greengrasssdk
import mo


def lambda_handler(event, context):
    return


def infinite_infer_run():
    client = greengrasssdk.client("iot-data")
    iot_topic = "$aws/things/{}/infer".format(os.environ["AWS_IOT_THING_NAME"])
    input_width, input_height = 32, 32
    error, model_path = mo.optimize("ssd_mobilenet", input_width, input_height)
    model = awscam.Model(model_path, {"GPU": 1})
    while True:
        ret, frame = awscam.getLastFrame()
        if not ret:
            raise Exception("Failed to get frame from the stream")
        yscale = float(frame.shape[0]) / input_height
        xscale = float(frame.shape[1]) / input_width
        frame_resize = cv2.resize(frame, (input_height, input_width))
        parsed_inference_results = model.parseResult("ssd", model.doInference(frame_resize))
        cloud_output = {}
        for obj in parsed_inference_results["ssd"]:
            if obj["prob"] > 0.1:
                xmin, ymin = int(xscale * obj["xmin"]), int(yscale * obj["ymin"])
                xmax, ymax = int(xscale * obj["xmax"]), int(yscale * obj["ymax"])
                cv2.rectangle(frame, (xmin, ymin), (xmax, ymax), (255, 165, 20), 4)
                cloud_output["object{}".format(obj["label"])] = [obj["prob"], xmin, ymin, xmax, ymax]
        client.publish(topic=iot_topic, payload=json.dumps(cloud_output))


threading.Thread(target=infinite_infer_run).start()
'''


def _ssd_model(path: Path) -> Path:
    """A tiny real detector with the SSD output DeepLens parsed: [1, boxes, 6] rows of class, prob, corners."""
    rng = np.random.default_rng(4)
    weights = numpy_helper.from_array(rng.standard_normal((24, 3)).astype(np.float32) * 0.01, "w")
    shape = numpy_helper.from_array(np.array([1, 4, 6], dtype=np.int64), "shape")
    nodes = [helper.make_node("GlobalAveragePool", ["data"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w"], ["boxes"], transB=1),
             helper.make_node("Reshape", ["boxes", "shape"], ["rows"]),
             helper.make_node("Sigmoid", ["rows"], ["detections"])]
    graph = helper.make_graph(nodes, "tiny_ssd", [helper.make_tensor_value_info("data", TensorProto.FLOAT,
                                                                                [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("detections", TensorProto.FLOAT, [1, 4, 6])],
                              initializer=[weights, shape])
    path.parent.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path.parent



@pytest.mark.parametrize("kind", ["classifier", "detector"])
def test_a_deeplens_sample_lambda_runs_unchanged_and_publishes(broker: Broker, tmp_path: Path, kind: str) -> None:
    source = (testing.onnx_classifier(tmp_path / "model" / "model.onnx").parent if kind == "classifier"
              else _ssd_model(tmp_path / "model" / "model.onnx"))
    code = tmp_path / "lambda"
    code.mkdir()
    (code / "lambda_function.py").write_text(CLASSIFIER if kind == "classifier" else DETECTOR)
    config = testing.write_project(tmp_path / "project", source=source, model={"task": "other"}, **{"lambda": {
        "source": str(code), "handler": "lambda_function.lambda_handler", "deeplens_compat": True}})
    bundle = testing.build(config).bundle
    received, thread, _ = _subscribe(broker.port, 5)
    summary = run_device(bundle, DeviceOptions(device_dir=tmp_path / "device", mqtt_port=broker.port, thing=THING,
                                               frames=str(_frames(tmp_path / "frames", 3)), max_frames=5),
                         reporter=Reporter(quiet=True), stop=__import__("threading").Event(), public_key=_key(bundle))
    thread.join(timeout=20)
    assert summary.published == 5 and len(received) == 5, "a camera loop: three frames shown again and again"
    if kind == "classifier":
        for result in received:
            assert len(result) == 5 and 0.0 < sum(result.values()) <= 1.0 + 1e-5
            assert list(result.values()) == sorted(result.values(), reverse=True), "top-5, most probable first"
    else:
        for result in received:
            assert result and all(len(box) == 5 and box[0] > 0.1 for box in result.values())


KVS_LAMBDA = '''
import json
import os

import awscam
import DeepLens_Kinesis_Video as dkv
import greengrasssdk

client = greengrasssdk.client("iot-data")
iot_topic = "$aws/things/{}/infer".format(os.environ["AWS_IOT_THING_NAME"])


def lambda_handler(event, context):
    return


def infinite_infer_run():
    producer = dkv.createProducer("", "", "", "us-east-1")
    stream = producer.createStream("deeplens-stream", 2)
    stream.start()
    for count in range(1, 6):
        ret, frame = awscam.getLastFrame()
        client.publish(topic=iot_topic, payload=json.dumps({"frame": count, "shape": list(frame.shape)}))
    stream.stop()
    client.publish(topic=iot_topic, payload=json.dumps({"recorded": 5}))
    while True:
        awscam.getLastFrame()


infinite_infer_run()
'''


def test_a_deeplens_kinesis_video_lambda_records_its_frames_under_run(broker: Broker, tmp_path: Path,
                                                                      onnx_model_dir: Path) -> None:
    import cv2

    code = tmp_path / "lambda"
    code.mkdir()
    (code / "lambda_function.py").write_text(KVS_LAMBDA)
    config = testing.write_project(tmp_path / "project", source=onnx_model_dir, device={
        "kinesis_video_stream": "deeplens-stream"}, **{"lambda": {
            "source": str(code), "handler": "lambda_function.lambda_handler", "deeplens_compat": True}})
    bundle = testing.build(config).bundle
    received, thread, _ = _subscribe(broker.port, 6)
    video = tmp_path / "kvs.avi"
    run_device(bundle, DeviceOptions(device_dir=tmp_path / "device", mqtt_port=broker.port, thing=THING,
                                     frames=str(_frames(tmp_path / "frames", 3)), max_frames=6, kvs_record=video),
               reporter=Reporter(quiet=True), stop=__import__("threading").Event(), public_key=_key(bundle))
    thread.join(timeout=20)
    assert received[-1] == {"recorded": 5}
    capture = cv2.VideoCapture(str(video))
    frames = []
    ok, frame = capture.read()
    while ok:
        frames.append(frame)
        ok, frame = capture.read()
    assert len(frames) == 5, "every frame the Lambda saw between start and stop"
    assert {tuple(f.shape) for f in frames} == {tuple(r["shape"]) for r in received[:-1]} == {(60, 80, 3)}


def test_off_a_device_the_kinesis_pipeline_is_what_a_device_would_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from deeplens_build.device import support

    monkeypatch.syspath_prepend(str(support.COMPAT))
    monkeypatch.syspath_prepend(str(support.FOLDER))
    dkv = __import__("DeepLens_Kinesis_Video")
    assert dkv.pipeline("deeplens-stream", "eu-west-1", credentials=("AKID", "SECRET", "")).endswith(
        "kvssink stream-name=deeplens-stream aws-region=eu-west-1 access-key=AKID secret-key=SECRET")
    assert "v4l2src device=/dev/video0" in dkv.pipeline("s", "us-east-1")


def test_mo_optimize_names_what_the_bundle_ships_and_outputs_are_reachable_by_position(tmp_path: Path) -> None:
    """mo.optimize answers model.xml for an OpenVINO bundle, model.onnx otherwise; doInference's results are
    keyed by the model's output names and also by position; parseResult refuses a type with no documented shape."""
    from deeplens_build.device import support

    model_dir = testing.onnx_classifier(tmp_path / "model" / "model.onnx").parent
    shutil.copyfile(support.ONNXRUNTIME_MODEL, model_dir / "deeplens_model.py")
    probe = ("import mo, awscam, numpy as np\n"
             "print(mo.optimize('m', 32, 32)[1])\n"
             "out = awscam.Model('ignored', {'GPU': 1}).doInference(np.zeros((32, 32, 3), np.uint8))\n"
             "name = next(iter(out))\n"
             "print((out[0] == out[name]).all(), out[-1] is out[name], len(out))\n"
             "try:\n"
             "    awscam.Model('ignored').parseResult('segmentation', out)\n"
             "except ValueError as e:\n"
             "    print(e)\n")
    environment = {**os.environ, "DEEPLENS_MODEL_DIR": str(model_dir), "PYTHONPATH": str(support.COMPAT)}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=environment)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:2] == [str(model_dir / "model.onnx"), "True True 1"]
    assert "'segmentation' is not one whose result shape DeepLens documented" in done.stdout.splitlines()[2]
    (model_dir / "model.xml").write_text("<net/>")
    done = subprocess.run([sys.executable, "-c", "import mo; print(mo.optimize('m', 32, 32)[1])"],
                          capture_output=True, text=True, env=environment)
    assert done.stdout.strip() == str(model_dir / "model.xml")
