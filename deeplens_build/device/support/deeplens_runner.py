"""Runs an inference Lambda as a long-lived process: ``python deeplens_runner.py MODULE CODE_DIR``.

How a Greengrass v2 core (the recipe's Run step) and ``deeplens-build run`` start the Lambda. The module is an
argument, never pasted into code. A DeepLens Lambda's work is a loop its import starts on a thread, so the process
lives as long as the module's threads do, and exits non-zero as soon as one dies with an error: the nucleus then
restarts the component instead of keeping a process whose loop is gone; an import that raises ends it too, even
while a thread the module started lives on (blocked opening a FIFO, say). On SIGTERM (how a core stops a component)
and on that error it first runs the exit hooks, so ``deeplens_publish`` hands the results still waiting to the
broker. Runs on the device's Python, 3.8 and up, with the standard library only.
"""

import atexit
import builtins
import importlib
import os
import signal
import stat
import sys
import threading
import traceback


def _died(failure):
    traceback.print_exception(failure.exc_type, failure.exc_value, failure.exc_traceback)
    atexit._run_exitfuncs()
    os._exit(1)


def _stop(*_):
    atexit._run_exitfuncs()
    os._exit(0)


class _FifoWriter:
    """A FIFO opened for writing in text mode that takes bytes too: DeepLens samples were Python 2, where the
    JPEG bytes they write to the display FIFO were a str; Python 3 would raise TypeError and kill the thread."""

    def __init__(self, raw):
        self._raw = raw

    def write(self, data):
        return self._raw.write(data.encode("latin-1") if isinstance(data, str) else data)

    def __getattr__(self, name):
        return getattr(self._raw, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._raw.close()


def _fifo_writes_take_bytes():
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and "w" in mode and "b" not in mode:
            try:
                fifo = stat.S_ISFIFO(os.stat(file).st_mode)
            except OSError:
                fifo = False
            if fifo:
                return _FifoWriter(real_open(file, mode.replace("t", "") + "b", buffering=0))
        return real_open(file, mode, *args, **kwargs)

    builtins.open = open_


def main(module, code_dir):
    _fifo_writes_take_bytes()
    threading.excepthook = _died
    signal.signal(signal.SIGTERM, _stop)
    sys.path.insert(0, code_dir)
    sys.path.append(os.path.join(code_dir, "deeplens_compat"))
    try:
        importlib.import_module(module)
    except BaseException:  # noqa: BLE001  (a live non-daemon thread would keep the interpreter from exiting)
        traceback.print_exc()
        atexit._run_exitfuncs()
        os._exit(1)
    for thread in threading.enumerate():
        if thread is not threading.main_thread():
            thread.join()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
