"""DeepLens's ``DeepLens_Kinesis_Video`` on any device: the camera's video to Kinesis Video Streams.

    import DeepLens_Kinesis_Video as dkv

    producer = dkv.createProducer(access_key, secret_key, session_token, "us-east-1")
    stream = producer.createStream("deeplens-stream", 2)        # name, retention in hours
    stream.start()
    ...
    stream.stop()

On a device with the KVS producer's GStreamer element ``kvssink`` (the recipe requires it), ``start`` runs
``gst-launch-1.0`` from the camera into that element, credentials from the core's token exchange service when
the Lambda passes none. Under ``deeplens-build run --kvs-record FILE`` the frames ``awscam.getLastFrame`` delivers
between ``start`` and ``stop`` are written to FILE instead, a video OpenCV reads back. Anywhere else ``start``
says once that there is no producer and does nothing, so a DeepLens Lambda keeps running.
"""

import atexit
import os
import shutil
import subprocess
import sys
import threading

import awscam  # noqa: N999  (the module keeps DeepLens's name)

DEEPLENS_COMPAT = True
RECORD = "DEEPLENS_KVS_RECORD"
_said = False


def pipeline(stream_name, region, camera="/dev/video0", credentials=None):
    """The GStreamer pipeline ``start`` runs on a device: the camera, H.264, into ``kvssink``."""
    auth = ""
    if credentials and credentials[0]:
        auth = " access-key={} secret-key={}".format(credentials[0], credentials[1])
        if credentials[2]:
            auth += " session-token={}".format(credentials[2])
    return ("v4l2src device={} ! videoconvert ! video/x-raw,format=I420 ! x264enc tune=zerolatency "
            "key-int-max=45 bitrate=1000 ! video/x-h264,stream-format=avc,alignment=au,profile=baseline ! "
            "kvssink stream-name={} aws-region={}{}").format(camera, stream_name, region, auth)


class Stream:
    def __init__(self, name, retention_hours, region, credentials):
        self.name, self.retention_hours = name, retention_hours
        self._region, self._credentials = region, credentials
        self._process = None
        self._writer = None
        self._lock = threading.Lock()

    def start(self):
        atexit.register(self.stop)  # a core stops the Lambda with SIGTERM: the video is closed properly first
        if os.environ.get(RECORD):
            awscam.frame_listeners.append(self._record)
        elif shutil.which("gst-launch-1.0") and subprocess.run(["gst-inspect-1.0", "kvssink"],
                                                               capture_output=True).returncode == 0:
            command = ["gst-launch-1.0", "-e", *pipeline(self.name, self._region,
                                                          credentials=self._credentials).split()]
            self._process = subprocess.Popen(command)
        else:
            _say_once("DeepLens_Kinesis_Video: no KVS producer (GStreamer kvssink) on this device; {} is not "
                      "streamed".format(self.name))

    def stop(self):
        if self._record in awscam.frame_listeners:
            awscam.frame_listeners.remove(self._record)
        with self._lock:
            if self._writer is not None:
                self._writer.release()
                self._writer = None
        if self._process is not None:
            self._process.terminate()
            self._process.wait()
            self._process = None

    def _record(self, frame):
        import cv2

        with self._lock:
            if self._writer is None:
                height, width = frame.shape[:2]
                self._writer = cv2.VideoWriter(os.environ[RECORD], cv2.VideoWriter_fourcc(*"MJPG"), 15.0,
                                               (width, height))
            self._writer.write(frame)


class Producer:
    def __init__(self, access_key, secret_key, session_token, region):
        self._credentials = (access_key, secret_key, session_token)
        self._region = region

    def createStream(self, stream_name, retention):  # noqa: N802  (DeepLens's name)
        return Stream(stream_name, retention, self._region, self._credentials)


def createProducer(access_key, secret_key, session_token="", region="us-east-1"):  # noqa: N802
    return Producer(access_key, secret_key, session_token, region)


def _say_once(message):
    global _said
    if not _said:
        print(message, file=sys.stderr)
        _said = True
