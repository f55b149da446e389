"""Heatmaps of attention sites as PNG (matplotlib): a pruned site's block layout, and the average
attention from calibration statistics (with the layout's pruned blocks dimmed when there is one).

One panel per head (up to eight per row), queries down and keys right, with block indices on both
axes and a colour bar. Layout: computed, pruned, and (causal sites) excluded by causal masking.
Attention: average probability on a log scale over four decades below the site's maximum.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np

from onnxprune.figures import new_figure, require_matplotlib, save_figure

#: Heads per row of a picture (more heads wrap to further rows).
HEADS_PER_ROW = 8
#: Side of one head's panel, in inches (at 100 dpi).
PANEL_INCHES = 2.4
_DECADES = 4.0
#: Opacity of the black veil over pruned blocks in attention pictures.
_PRUNED_VEIL = 0.7

#: Layout classes, in colour-bar order.
PRUNED, EXCLUDED, COMPUTED = 0, 1, 2
_CLASS_NAMES = {PRUNED: "pruned", EXCLUDED: "excluded\n(causal)", COMPUTED: "computed"}
_CLASS_COLOURS = {PRUNED: "black", EXCLUDED: "0.6", COMPUTED: "white"}


@dataclasses.dataclass
class SiteHeatmap:
    """What can be drawn for one site; either part may be missing."""

    name: str
    layout: np.ndarray | None = None  # [Hl, Mq, Mk], nonzero = computed
    block_size: int | None = None
    is_causal: bool = False
    attention: np.ndarray | None = None  # [H, Lq, Lk] average probability per statistics cell
    granularity: int | None = None


def layout_classes(layout: np.ndarray, is_causal: bool = False) -> np.ndarray:
    """``[Hl, Mq, Mk]`` of PRUNED / EXCLUDED / COMPUTED per block."""
    computed = layout != 0
    classes = np.where(computed, COMPUTED, PRUNED)
    if is_causal:
        above = np.triu(np.ones(computed.shape[1:], bool), k=1)
        classes = np.where(above & ~computed, EXCLUDED, classes)
    return classes


def pruned_cells(shape: tuple[int, int, int], layout: np.ndarray | None, block_size: int | None,
                 granularity: int | None) -> np.ndarray | None:
    """``[H or 1, Lq, Lk]`` True where a statistics cell lies in a pruned block; None when the
    layout cannot be mapped onto the cells (no layout, or blocks not a multiple of the cells)."""
    if layout is None or not block_size or not granularity or block_size % granularity:
        return None
    _, lq, lk = shape
    ratio = block_size // granularity
    cells = np.repeat(np.repeat(layout == 0, ratio, axis=1), ratio, axis=2)[:, :lq, :lk]
    pruned = np.zeros((cells.shape[0], lq, lk), bool)  # beyond the layout: nothing to dim
    pruned[:, : cells.shape[1], : cells.shape[2]] = cells
    return pruned


def _site_figure(heads: int):
    """A figure with a grid of ``heads`` panels sharing axes (spare slots of the last row hidden);
    returns (figure, axes, per_row)."""
    per_row = min(heads, HEADS_PER_ROW)
    rows = -(-heads // per_row)
    # room on the right for the colour bar, above for the two-line title
    figure = new_figure(max(PANEL_INCHES * per_row + 1.6, 5.0), PANEL_INCHES * rows + 1.0)
    axes = figure.subplots(rows, per_row, sharex=True, sharey=True, squeeze=False)
    for spare in axes.flat[heads:]:
        spare.set_axis_off()
    return figure, axes, per_row


def _label_axes(axes, per_row: int, unit: str, heads: int, shared: bool) -> None:
    from matplotlib.ticker import MaxNLocator

    for index, ax in enumerate(axes.flat[:heads]):
        ax.set_title("all heads" if shared else f"head {index}", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.tick_params(labelsize=8, labelbottom=True)  # sharex hides inner rows' labels; spare slots need them
        if index % per_row == 0:
            ax.set_ylabel(f"query {unit}", fontsize=9)
        if index >= heads - per_row:
            ax.set_xlabel(f"key {unit}", fontsize=9)


def layout_figure(site: SiteHeatmap):
    """The figure of ``site``'s block layout (one panel per layout head)."""
    from matplotlib.colors import BoundaryNorm, ListedColormap

    classes = layout_classes(site.layout, site.is_causal)
    kept = float((classes == COMPUTED).sum() / max((classes != EXCLUDED).sum(), 1))
    shown = [PRUNED, EXCLUDED, COMPUTED] if site.is_causal else [PRUNED, COMPUTED]
    # one colour per class shown, so that the colour bar has no unlabelled band
    cmap = ListedColormap([_CLASS_COLOURS[c] for c in shown])
    norm = BoundaryNorm(np.arange(len(shown) + 1) - 0.5, cmap.N)
    classes = np.searchsorted(shown, classes)
    figure, axes, per_row = _site_figure(len(classes))
    blocks = max(classes.shape[1:])
    for ax, head in zip(axes.flat, classes):
        image = ax.imshow(head, cmap=cmap, norm=norm, interpolation="nearest")
        if blocks <= 64:  # cell edges, so that neighbouring computed blocks stay countable
            ax.set_xticks(np.arange(-0.5, head.shape[1]), minor=True)
            ax.set_yticks(np.arange(-0.5, head.shape[0]), minor=True)
            ax.grid(which="minor", color="0.5", linewidth=0.3)
            ax.tick_params(which="minor", length=0)
    unit = f"block ({site.block_size} tokens)" if site.block_size else "block"
    _label_axes(axes, per_row, unit, len(classes), shared=len(classes) == 1)
    bar = figure.colorbar(image, ax=axes, ticks=range(len(shown)))
    bar.ax.set_yticklabels([_CLASS_NAMES[c] for c in shown], fontsize=8)
    figure.suptitle(f"{site.name}\nblock layout: {kept:.0%} of the blocks computed", fontsize=10)
    return figure


def attention_figure(site: SiteHeatmap):
    """The figure of ``site``'s average attention, pruned blocks dimmed when the layout is known."""
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Patch

    attention = site.attention
    heads, lq, lk = attention.shape
    peak = float(attention.max()) if attention.size else 0.0
    peak = peak if peak > 0 else 1.0
    norm = LogNorm(vmin=peak * 10 ** -_DECADES, vmax=peak)
    granularity = site.granularity or 1
    if site.block_size and site.block_size % granularity == 0:
        cells_per_unit, unit = site.block_size // granularity, f"block ({site.block_size} tokens)"
    else:
        cells_per_unit, unit = 1, ("token" if granularity == 1 else f"cell ({granularity} tokens)")
    pruned = pruned_cells(attention.shape, site.layout, site.block_size, site.granularity)
    # one unit per block (or per cell), centred on its index as in the layout pictures
    extent = (-0.5, lk / cells_per_unit - 0.5, lq / cells_per_unit - 0.5, -0.5)
    figure, axes, per_row = _site_figure(heads)
    for h, (ax, head) in enumerate(zip(axes.flat, attention)):
        # at most four decades below the peak; less (and none) is drawn as the bottom of the scale
        # matplotlib's default interpolation: antialiased where a panel has fewer pixels than cells
        image = ax.imshow(np.maximum(head, norm.vmin), cmap="magma", norm=norm, extent=extent)
        if pruned is not None:
            veil = np.zeros((lq, lk, 4))
            veil[..., 3] = pruned[h if len(pruned) > 1 else 0] * _PRUNED_VEIL
            ax.imshow(veil, extent=extent, interpolation="nearest")
    _label_axes(axes, per_row, unit, heads, shared=False)
    bar = figure.colorbar(image, ax=axes, extend="min")
    bar.set_label("average attention probability (log)", fontsize=9)
    bar.ax.tick_params(labelsize=8)
    if pruned is not None:
        figure.legend(handles=[Patch(facecolor="black", alpha=_PRUNED_VEIL, label="pruned block (dimmed)")],
                      loc="outside lower right", fontsize=8, frameon=False)
    figure.suptitle(f"{site.name}\naverage attention over the calibration inputs", fontsize=10)
    return figure


def _file_stem(index: int, name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.")[-80:]
    return f"{index:02d}_{safe or 'site'}"


def write_heatmaps(sites: list[SiteHeatmap], out_dir: str | os.PathLike) -> list[dict]:
    """Write what each site has (``*_layout.png``, ``*_attention.png``); returns one entry per file.
    Without matplotlib, raises OnnxpruneError before anything is written."""
    require_matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, site in enumerate(sites):
        stem = _file_stem(index, site.name)
        for kind, has, draw in (("layout", site.layout is not None, layout_figure),
                                ("attention", site.attention is not None, attention_figure)):
            if has:
                path = out / f"{stem}_{kind}.png"
                save_figure(draw(site), path)
                written.append({"site": site.name, "kind": kind, "path": str(path)})
    return written
