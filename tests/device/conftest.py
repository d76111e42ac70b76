"""The device tests' broker: Debian's mosquitto on 127.0.0.1, started by the tests (.ci/run installs it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import Broker


@pytest.fixture
def broker(tmp_path: Path):
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()
