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
import importlib
import os
import signal
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


def main(module, code_dir):
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
