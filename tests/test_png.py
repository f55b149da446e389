"""The PNG writer: files any decoder reads back to the same pixels (decoded here with zlib)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from onnxprune.png import SIGNATURE, colormap, encode_png, write_png


def decode(data: bytes) -> np.ndarray:
    assert data[:8] == SIGNATURE
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(tag + body)
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color, *_ = header
    channels = {0: 1, 2: 3}[color]
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * channels)
    assert (raw[:, 0] == 0).all()  # filter type 0 on each row
    pixels = raw[:, 1:].reshape(height, width, channels)
    return pixels[..., 0] if channels == 1 else pixels


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (5, 3, 3)])
def test_round_trip(shape, tmp_path):
    image = np.random.default_rng(0).random(shape)
    write_png(tmp_path / "x.png", image)
    pixels = decode((tmp_path / "x.png").read_bytes())
    np.testing.assert_array_equal(pixels, np.round(image * 255).astype(np.uint8))


@pytest.mark.parametrize("shape", [(0, 4), (4, 4, 4), (3,)])
def test_bad_shapes(shape):
    with pytest.raises(ValueError):
        encode_png(np.zeros(shape))


def test_colormap_is_dark_to_bright():
    ramp = colormap(np.linspace(0, 1, 50))
    brightness = ramp.sum(axis=-1)
    assert ramp.shape == (50, 3) and brightness[0] < 0.1 and brightness[-1] > 2.5
    assert (np.diff(brightness) > 0).all()
