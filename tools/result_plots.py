"""The line charts of docs/RESULTS.md (tools/results.py and tools/results_llm.py): axes, labels and a
legend naming every curve (matplotlib, the `plots` extra)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

#: One marker per curve as well as one colour, so that curves stay apart in grayscale print.
MARKERS = "osD^vP"
#: Horizontal levels (baselines) apart from each other: dotted, then dash-dotted, then dashed.
LEVEL_STYLES = (":", "-.", (0, (5, 2)))


@dataclasses.dataclass
class Curve:
    """One line of a plot. ``reference``: a value to compare against, not a result of this run
    (drawn dashed and gray); ``markers``: how many points carry a marker (None: every point)."""

    label: str
    xs: list
    ys: list
    reference: bool = False
    markers: int | None = None


def plot(path: Path, curves: list[Curve], title: str, xlabel: str, ylabel: str, *, levels=(), ylog=False,
         xlim=None, ylim=None) -> None:
    """A line chart with its axes, labels and a legend naming every curve. ``levels``: (label, y)
    horizontal lines (a baseline such as the dense model's)."""
    from onnxprune.figures import new_figure, save_figure

    figure = new_figure(6.4, 4.2, dpi=150)
    ax = figure.subplots()
    colours = iter(f"C{i}" for i in range(10))
    for index, curve in enumerate(curves):
        style = (dict(color="0.45", linestyle="--", marker="x", markersize=7) if curve.reference else
                 dict(color=next(colours), marker=MARKERS[index % len(MARKERS)], markersize=5))
        every = None if curve.markers is None else max(1, len(curve.xs) // curve.markers)
        ax.plot(curve.xs, curve.ys, label=curve.label, linewidth=1.5, markevery=every, **style)
    for index, (label, y) in enumerate(levels):
        ax.axhline(y, color="0.3", linestyle=LEVEL_STYLES[index % len(LEVEL_STYLES)], linewidth=1.2, label=label)
    if ylog:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        # 1-2-5 ticks in plain decimals: readable without counting decades
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set(xlim=xlim, ylim=ylim)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.35)
    ax.legend(fontsize=8, framealpha=0.9)
    save_figure(figure, path)  # atomic: a half-written plot never replaces the last one
