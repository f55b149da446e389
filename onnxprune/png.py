"""A minimal PNG writer (8-bit grayscale or RGB, written atomically) and a colour map, so that
heatmaps need no plotting library."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np

from onnxprune.model_io import atomic_path

SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: Anchors of a dark-to-bright perceptual ramp (close to matplotlib's "magma").
_RAMP = np.array(
    [[0, 0, 4], [59, 15, 112], [140, 41, 129], [222, 73, 104], [254, 159, 109], [252, 253, 191]], dtype=np.float64
) / 255.0


def colormap(values: np.ndarray) -> np.ndarray:
    """``[..., 3]`` RGB in [0, 1] for values in [0, 1] along the ramp."""
    x = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.minimum(np.floor(x).astype(int), len(_RAMP) - 2)
    frac = (x - low)[..., None]
    return _RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of ``[H, W]`` (grayscale) or ``[H, W, 3]`` (RGB) values in [0, 1]."""
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3) or 0 in image.shape[:2]:
        raise ValueError(f"an image is [H, W] or [H, W, 3] and not empty, got shape {image.shape}")
    pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    height, width = pixels.shape[:2]
    color_type = 0 if pixels.ndim == 2 else 2
    rows = pixels.reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter 0 (none) on every row
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    data = encode_png(image)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
