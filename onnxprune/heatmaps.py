"""Heatmaps of attention sites as PNG: a pruned site's block layout, and the average attention
from calibration statistics (with the layout's pruned blocks dimmed when there is one).

Heads are drawn side by side, left to right (up to eight per row), separated by blue lines;
queries go down, keys go right. Layout: white = computed block, black = pruned, grey = excluded by causal masking.
Attention: log scale over four decades below each head's maximum (dark = little attention).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np

from onnxprune.png import colormap, write_png

#: Heads per row of a picture (more heads wrap to further rows).
HEADS_PER_ROW = 8
#: Longest side of one head's picture, in pixels (cells are drawn as squares of whole pixels).
TARGET_PIXELS = 384
_SEPARATOR = np.array([0.2, 0.4, 0.8])
_SEPARATOR_PIXELS = 2
_EMPTY = np.array([0.85, 0.9, 1.0])  # slots of a last row with fewer heads
_CAUSAL_GREY = 0.3
_PRUNED_DIM = 0.3
_DECADES = 4.0


@dataclasses.dataclass
class SiteHeatmap:
    """What can be drawn for one site; either part may be missing."""

    name: str
    layout: np.ndarray | None = None  # [Hl, Mq, Mk], nonzero = computed
    block_size: int | None = None
    is_causal: bool = False
    attention: np.ndarray | None = None  # [H, Lq, Lk] average probability per statistics cell
    granularity: int | None = None


def _side_by_side(heads: list[np.ndarray], pixels: int) -> np.ndarray:
    """One RGB image of ``[rows, cols, 3]`` heads, each cell ``pixels`` wide: up to
    ``HEADS_PER_ROW`` heads side by side per row, separated by blue lines."""
    scaled = [np.repeat(np.repeat(head, pixels, axis=0), pixels, axis=1) for head in heads]
    height, width = scaled[0].shape[:2]
    per_row = min(len(scaled), HEADS_PER_ROW)
    rows = -(-len(scaled) // per_row)
    gap = _SEPARATOR_PIXELS
    image = np.empty((rows * height + (rows - 1) * gap, per_row * width + (per_row - 1) * gap, 3))
    image[:] = _SEPARATOR
    for empty in range(len(scaled), rows * per_row):
        r, c = divmod(empty, per_row)
        image[r * (height + gap): r * (height + gap) + height, c * (width + gap): c * (width + gap) + width] = _EMPTY
    for i, head in enumerate(scaled):
        r, c = divmod(i, per_row)
        image[r * (height + gap): r * (height + gap) + height, c * (width + gap): c * (width + gap) + width] = head
    return image


def _cell_pixels(cells: int) -> int:
    return max(1, min(16, TARGET_PIXELS // max(cells, 1)))


def layout_image(layout: np.ndarray, is_causal: bool = False) -> np.ndarray:
    computed = layout != 0
    _, mq, mk = computed.shape
    value = computed.astype(np.float64)
    if is_causal:
        above = np.triu(np.ones((mq, mk), bool), k=1)
        value = np.where(above & ~computed, _CAUSAL_GREY, value)
    heads = [np.repeat(v[..., None], 3, axis=-1) for v in value]
    return _side_by_side(heads, _cell_pixels(max(mq, mk)))


def attention_image(
    attention: np.ndarray, layout: np.ndarray | None = None, block_size: int | None = None,
    granularity: int | None = None,
) -> np.ndarray:
    heads = []
    _, lq, lk = attention.shape
    kept_cells = None
    if layout is not None and block_size and granularity and block_size % granularity == 0:
        ratio = block_size // granularity
        cells = np.repeat(np.repeat(layout != 0, ratio, axis=1), ratio, axis=2)[:, :lq, :lk]
        kept_cells = np.ones((cells.shape[0], lq, lk), bool)  # outside the layout: nothing to dim
        kept_cells[:, : cells.shape[1], : cells.shape[2]] = cells
    for h, head in enumerate(attention):
        peak = float(head.max())
        if peak > 0:
            logs = np.log10(np.maximum(head, peak * 10 ** -_DECADES))
            level = (logs - (np.log10(peak) - _DECADES)) / _DECADES
            level = np.where(head > 0, level, 0.0)
        else:
            level = np.zeros_like(head)
        rgb = colormap(level)
        if kept_cells is not None:
            kept = kept_cells[h if kept_cells.shape[0] > 1 else 0]
            rgb = np.where(kept[..., None], rgb, rgb * _PRUNED_DIM)
        heads.append(rgb)
    return _side_by_side(heads, _cell_pixels(max(lq, lk)))


def _file_stem(index: int, name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.")[-80:]
    return f"{index:02d}_{safe or 'site'}"


def write_heatmaps(sites: list[SiteHeatmap], out_dir: str | os.PathLike) -> list[dict]:
    """Write what each site has (``*_layout.png``, ``*_attention.png``); returns one entry per file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, site in enumerate(sites):
        stem = _file_stem(index, site.name)
        if site.layout is not None:
            path = out / f"{stem}_layout.png"
            write_png(path, layout_image(site.layout, site.is_causal))
            written.append({"site": site.name, "kind": "layout", "path": str(path)})
        if site.attention is not None:
            path = out / f"{stem}_attention.png"
            write_png(path, attention_image(site.attention, site.layout, site.block_size, site.granularity))
            written.append({"site": site.name, "kind": "attention", "path": str(path)})
    return written
