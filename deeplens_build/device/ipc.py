"""A stand-in for the Greengrass nucleus's IPC server, for the device box: the wire protocol the real ``awsiotsdk``
client speaks, on a Unix socket, with the nucleus's authorization.

Greengrass IPC is eventstream RPC: binary messages (a prelude with two CRC32s, typed headers, a payload) on the
socket the nucleus names in ``AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT``. A client first sends CONNECT
with ``{"authToken": $SVCUID}``; the server accepts it with CONNECT_ACK (flag CONNECTION_ACCEPTED) only for the
token it gave the component. Each call is then one stream: an APPLICATION_MESSAGE whose ``operation`` header names
it (``aws.greengrass#PublishToIoTCore``), answered on the same stream by the response or an APPLICATION_ERROR whose
``service-model-type`` names the error shape, with TERMINATE_STREAM.

``PublishToIoTCore`` is checked against the component's ``accessControl`` for ``aws.greengrass.ipc.mqttproxy`` as
the nucleus checks it (the operation or ``*``; the topic against each resource, with MQTT's ``+`` and ``#`` and
the ``*`` wildcard), refused with the nucleus's ``UnauthorizedError``, and what is allowed goes to an MQTT broker
(mosquitto standing in for AWS IoT Core), answered once the broker acknowledged it (QoS 1).

What this proves: the bundle's own ``awsiotsdk`` connects, authenticates and publishes with the recipe's policy.
What only a real core proves: IoT Core's own policy for the thing's certificate, the nucleus's spooler and
reconnects to the cloud, and the other IPC services. The message codec is hand-written (about 20 lines of
encoding; decoding uses botocore's parser): awscrt ships the eventstream RPC client only.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import secrets
import socket
import socketserver
import struct
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.eventstream import EventStreamBuffer, ParserError

MQTT_PROXY = "aws.greengrass.ipc.mqttproxy"
PUBLISH = "aws.greengrass#PublishToIoTCore"
APPLICATION_MESSAGE, APPLICATION_ERROR, PING, PING_RESPONSE, CONNECT, CONNECT_ACK = range(6)
CONNECTION_ACCEPTED, TERMINATE_STREAM = 1, 2
JSON = "application/json"


@dataclass(frozen=True)
class Policy:
    """One ``accessControl`` policy of one IPC service, its recipe variables already replaced."""

    operations: tuple[str, ...]
    resources: tuple[str, ...]


def policies(access_control: Mapping[str, Any], service: str) -> tuple[Policy, ...]:
    """The component's policies for ``service`` from its ``accessControl`` configuration."""
    return tuple(Policy(tuple(p.get("operations", ())), tuple(p.get("resources", ())))
                 for p in access_control.get(service, {}).values())


def allowed(rules: Sequence[Policy], operation: str, resource: str) -> bool:
    return any((operation in p.operations or "*" in p.operations) and any(_matches(r, resource) for r in p.resources)
               for p in rules)


def _matches(pattern: str, topic: str) -> bool:
    if pattern == topic or ("*" in pattern and fnmatch.fnmatchcase(topic, pattern)):
        return True
    want, have = pattern.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return i == len(want) - 1
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)


def encode(kind: int, stream: int, headers: Mapping[str, str], payload: bytes = b"", flags: int = 0) -> bytes:
    """One eventstream message: the ``:message-type``/``:message-flags``/``:stream-id`` int32 headers, then
    ``headers`` as strings."""
    raw = b"".join(_header(name, value) for name, value in
                   {":message-type": kind, ":message-flags": flags, ":stream-id": stream, **headers}.items())
    prelude = struct.pack(">II", 16 + len(raw) + len(payload), len(raw))
    body = prelude + struct.pack(">I", zlib.crc32(prelude)) + raw + payload
    return body + struct.pack(">I", zlib.crc32(body))


def _header(name: str, value: str | int) -> bytes:
    key = name.encode()
    if isinstance(value, int):
        return bytes([len(key)]) + key + b"\x04" + struct.pack(">i", value)
    text = value.encode()
    return bytes([len(key)]) + key + b"\x07" + struct.pack(">H", len(text)) + text


class IpcServer:
    """The stand-in nucleus socket for one component; a context manager serving on a thread.

    :param forward: publishes ``(topic, payload)`` with QoS 1 and returns once the broker acknowledged it.
    """

    def __init__(self, path: Path, component: str, rules: Sequence[Policy],
                 forward: Callable[[str, bytes], None]):
        self.path, self.component, self.rules, self.forward = path, component, tuple(rules), forward
        self.token = secrets.token_hex(16)
        """The component's ``SVCUID``: the only token CONNECT accepts."""
        self.published: list[tuple[str, bytes]] = []
        self.refused: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                server._serve(self.request)

        self._server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        self._server.daemon_threads = True
        path.chmod(0o666)  # the component user connects; the token is what authenticates it
        self._thread = threading.Thread(target=self._server.serve_forever, name="ipc-stand-in", daemon=True)

    def __enter__(self) -> IpcServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)

    def _serve(self, connection: socket.socket) -> None:
        messages = EventStreamBuffer()
        accepted = False
        while True:
            try:
                chunk = connection.recv(65536)
            except OSError:  # the component went away (stopped, restarted) mid-stream
                return
            if not chunk:
                return
            messages.add_data(chunk)
            try:
                for message in messages:
                    headers = message.headers
                    kind = headers.get(":message-type")
                    if kind == CONNECT:
                        accepted = self._authenticated(message.payload)
                        connection.sendall(encode(CONNECT_ACK, 0, {}, flags=CONNECTION_ACCEPTED if accepted else 0))
                        if not accepted:
                            return  # the nucleus closes a connection whose token it does not know
                    elif kind == PING:
                        connection.sendall(encode(PING_RESPONSE, 0, {}))
                    elif kind == APPLICATION_MESSAGE and accepted and headers.get(":stream-id", 0) > 0:
                        connection.sendall(self._call(headers[":stream-id"], headers.get("operation", ""),
                                                      message.payload))
            except ParserError:
                return  # not eventstream: the nucleus drops such a client too

    def _authenticated(self, payload: bytes) -> bool:
        try:
            token = json.loads(payload).get("authToken")
        except (ValueError, AttributeError):
            return False
        return isinstance(token, str) and secrets.compare_digest(token, self.token)

    def _call(self, stream: int, operation: str, payload: bytes) -> bytes:
        if operation != PUBLISH:
            return self._error(stream, "ServiceError", f"the device box's IPC stand-in does not serve {operation}")
        try:
            request = json.loads(payload)
            topic, data = request["topicName"], base64.b64decode(request.get("payload", ""), validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            return self._error(stream, "InvalidArgumentsError", "PublishToIoTCore needs topicName and a payload")
        if not allowed(self.rules, PUBLISH, topic):
            # the nucleus's own wording (AuthorizationHandler)
            message = (f"Principal {self.component} is not authorized to perform {MQTT_PROXY}:{PUBLISH} on "
                       f"resource {topic}")
            with self._lock:
                self.refused.append((topic, message))
            return self._error(stream, "UnauthorizedError", message)
        self.forward(topic, data)
        with self._lock:
            self.published.append((topic, data))
        return encode(APPLICATION_MESSAGE, stream, {":content-type": JSON,
                                                    "service-model-type": "aws.greengrass#PublishToIoTCoreResponse"},
                      b"{}", TERMINATE_STREAM)

    @staticmethod
    def _error(stream: int, shape: str, message: str) -> bytes:
        headers = {":content-type": JSON, "service-model-type": f"aws.greengrass#{shape}"}
        return encode(APPLICATION_ERROR, stream, headers, json.dumps({"message": message}).encode(), TERMINATE_STREAM)
