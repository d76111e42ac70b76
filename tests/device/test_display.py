"""The local display's reader takes whole JPEGs out of whatever the FIFO gives, in pieces of any size."""

from __future__ import annotations

import pytest

from deeplens_build.device.display import frames

A = b"\xff\xd8" + b"a" * 50 + b"\xff\xd9"
B = b"\xff\xd8" + b"\xffb" * 30 + b"\xff\xd9"


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 1000])
def test_whole_frames_come_out_whatever_the_pieces(piece: int) -> None:
    stream = b"noise" + A + b"\x00\x00" + B + A[:10]
    data, out = bytearray(), []
    for i in range(0, len(stream), piece):
        data += stream[i:i + piece]
        out += frames(data)
    assert out == [A, B]
    assert bytes(data) == A[:10], "a partial frame waits for the rest"
