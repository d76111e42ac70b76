"""The Greengrass v1 SDK's ``client("iot-data").publish(...)`` on any core, through ``deeplens_publish``: IPC on a
v2 core, MQTT under ``deeplens-build run``. On a real v1 core the real SDK comes first on the import path."""

import deeplens_publish

DEEPLENS_COMPAT = True


class _IotDataClient:
    def publish(self, topic, payload="", queueFullPolicy=None, **kwargs):  # noqa: N803  (the SDK's names)
        deeplens_publish.publish(payload, topic_name=topic)


def client(client_type, *args, **kwargs):
    if client_type != "iot-data":
        raise NotImplementedError("greengrasssdk.client({!r}): only 'iot-data' is provided off a v1 core".format(
            client_type))
    return _IotDataClient()
