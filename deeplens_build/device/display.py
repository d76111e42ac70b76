"""The DeepLens local display under ``run``: DeepLens Lambdas show frames by making a FIFO at
``/tmp/results.mjpeg`` and writing JPEGs into it (the console's project stream read it). ``run`` reads that FIFO
in the device's ``/tmp`` and hands each whole JPEG to the project stream, as the frame ``run --stream`` serves.

The reader is always there while the Lambda runs, as the console's was: a display thread's ``open()`` of the FIFO
would otherwise block forever. Browsers watch the HTTP stream, never the FIFO, so a viewer cannot break the pipe
under the Lambda.
"""

from __future__ import annotations

import contextlib
import os
import select
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

FIFO_NAME = "results.mjpeg"
START, END = b"\xff\xd8", b"\xff\xd9"
MAX_FRAME = 16 * 1024 * 1024
"""A frame larger than this is not a JPEG the display wrote: the buffer is dropped rather than grown forever."""


def frames(data: bytearray) -> Iterator[bytes]:
    """Take every whole JPEG (SOI … EOI) out of the front of ``data``, leaving a partial one in place."""
    while True:
        start = data.find(START)
        if start < 0:
            del data[:max(0, len(data) - 1)]  # keep a trailing 0xff: it may begin the next SOI
            return
        end = data.find(END, start + 2)
        if end < 0:
            del data[:start]
            if len(data) > MAX_FRAME:
                data.clear()
            return
        yield bytes(data[start:end + 2])
        del data[:end + 2]


@contextlib.contextmanager
def local_display(tmp: Callable[[], Path | None], frame_file: Path) -> Iterator[None]:
    """While the block runs, read the FIFO ``results.mjpeg`` in the Lambda's /tmp (``tmp()``, None while no Lambda
    runs; it is asked again after the FIFO closes: a restarted Lambda makes a new one) and replace
    ``frame_file`` with each whole frame."""
    done = threading.Event()
    reader = threading.Thread(target=_read, args=(tmp, frame_file, done), name="local-display", daemon=True)
    reader.start()
    try:
        yield
    finally:
        done.set()
        reader.join(timeout=5)


def _read(tmp: Callable[[], Path | None], frame_file: Path, done: threading.Event) -> None:
    while not done.is_set():
        folder = tmp()
        fifo = folder / FIFO_NAME if folder else None
        try:
            is_fifo = fifo is not None and stat.S_ISFIFO(fifo.stat().st_mode)
        except OSError:
            is_fifo = False
        if not is_fifo:
            done.wait(0.1)
            continue
        # non-blocking, so the reader can stop: an open for reading never waits for a writer this way
        try:
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:  # the Lambda ended meanwhile
            continue
        try:
            _pump(fd, frame_file, done)
        finally:
            os.close(fd)


def _pump(fd: int, frame_file: Path, done: threading.Event) -> None:
    data = bytearray()
    writer_seen = False
    while not done.is_set():
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            continue
        if not chunk:  # no writer: none yet, or the Lambda closed it (a restart makes a new one)
            if writer_seen:
                return
            done.wait(0.05)
            continue
        writer_seen = True
        data += chunk
        for frame in frames(data):
            partial = frame_file.with_name(frame_file.name + ".part")
            partial.write_bytes(frame)
            os.replace(partial, frame_file)  # the stream never serves half a frame
