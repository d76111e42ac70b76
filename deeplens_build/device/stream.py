"""The project stream, as DeepLens showed it in a browser: the Lambda's annotated frames as MJPEG, and its latest
results beside them (label, score, latency, frames per second), served on 127.0.0.1 by ``run --stream PORT``.

The Lambda writes each annotated frame as a JPEG to ``$DEEPLENS_STREAM`` (``deeplens_publish.show``); results are
what reaches the broker, read by a subscription of our own, so the page shows what AWS IoT would receive.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from deeplens_build.device.watch import headline, is_inference, status_text
from deeplens_build.errors import DeviceError

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} — project stream</title>
<style>
body {{ font-family: sans-serif; background: #111; color: #eee; margin: 0; display: flex; gap: 16px; padding: 16px; }}
#stream {{ width: 640px; height: 480px; background: #000; object-fit: contain; }}
#results {{ min-width: 240px; max-width: 320px; overflow-wrap: anywhere; }}
.value {{ font-size: 28px; font-weight: bold; }} .name {{ color: #999; }}
</style></head>
<body>
<img id="stream" src="/stream.mjpeg" alt="project stream">
<div id="results">
<div class="name">label</div><div class="value" id="label">–</div>
<div class="name" id="others"></div>
<div class="name">score</div><div class="value" id="score">–</div>
<div class="name">latency</div><div class="value" id="latency">–</div>
<div class="name">frames/s</div><div class="value" id="fps">–</div>
<div class="name">results</div><div class="value" id="count">0</div>
<div class="name">status</div><div id="status">–</div>
</div>
<script>
async function refresh() {{
  try {{
    const r = await (await fetch("/results.json", {{cache: "no-store"}})).json();
    if (r.shown) {{
      document.getElementById("label").textContent = r.shown.label;
      document.getElementById("others").textContent = r.shown.others ? "then " + r.shown.others : "";
      document.getElementById("score").textContent = r.shown.score != null ? r.shown.score.toFixed(3) : "–";
      document.getElementById("latency").textContent = r.latest.latency_ms != null ? r.latest.latency_ms + " ms" : "–";
    }}
    if (r.status) document.getElementById("status").textContent = r.status;
    document.getElementById("fps").textContent = r.fps.toFixed(1);
    document.getElementById("count").textContent = r.count;
  }} catch (e) {{}}
}}
setInterval(refresh, 250);
refresh();
</script>
</body></html>
"""
_BOUNDARY = "deeplensframe"


class Results:
    """The latest result, the latest status message (never counted as a result), and the rate results arrive at
    (over the last few seconds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._times: deque[float] = deque(maxlen=100)
        self.latest: Any = None
        self.status: str | None = None
        self.count = 0

    def add(self, result: Any) -> None:
        with self._lock:
            if not is_inference(result):
                self.status = status_text(result)
                return
            self.latest = result
            self.count += 1
            self._times.append(time.monotonic())

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            recent = [t for t in self._times if t > time.monotonic() - 5]
            fps = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 and recent[-1] > recent[0] else 0.0
            shown = None
            if self.latest is not None:
                label, score, others = headline(self.latest)
                shown = {"label": label, "score": score, "others": others}
            return {"latest": self.latest, "shown": shown, "status": self.status, "count": self.count, "fps": fps}


class ProjectStream:
    """The page, the MJPEG stream of ``frames`` (a JPEG file the Lambda replaces) and ``results`` as JSON."""

    def __init__(self, port: int, frames: Path, results: Results, title: str):
        closing = threading.Event()
        page = PAGE.format(title=title).encode()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # the terminal belongs to run's own output
                pass

            def do_GET(self) -> None:  # noqa: N802  (http.server's name)
                if self.path == "/":
                    self._send(page, "text/html; charset=utf-8")
                elif self.path == "/results.json":
                    self._send(json.dumps(results.snapshot()).encode(), "application/json")
                elif self.path == "/stream.mjpeg":
                    self._stream()
                else:
                    self.send_error(HTTPStatus.NOT_FOUND)

            def _send(self, body: bytes, kind: str) -> None:
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def _stream(self) -> None:
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={_BOUNDARY}")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                shown = None
                while not closing.is_set():
                    try:
                        stamp = frames.stat().st_mtime_ns
                        if stamp != shown:
                            jpeg = frames.read_bytes()
                            self.wfile.write(f"--{_BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                             f"{len(jpeg)}\r\n\r\n".encode() + jpeg + b"\r\n")
                            self.wfile.flush()
                            shown = stamp
                    except FileNotFoundError:
                        pass  # no frame yet
                    except (BrokenPipeError, ConnectionResetError):
                        return  # the browser went away
                    closing.wait(0.03)

        try:
            self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        except OSError as exc:
            raise DeviceError(f"--stream {port}: cannot serve on 127.0.0.1:{port} ({exc.strerror}); choose another "
                              "port") from exc
        self._server.daemon_threads = True
        self._closing = closing
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        threading.Thread(target=self._server.serve_forever, name="project-stream", daemon=True).start()

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
