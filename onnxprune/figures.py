"""matplotlib, an optional dependency (``pip install 'onnxprune[plots]'``), for the figures that
``onnxprune inspect --heatmaps`` and ``tools/results.py report`` draw.

Figures are drawn on matplotlib's Agg canvas directly, without pyplot: no display is needed, and
no global figure state is left behind in the caller's process.
"""

from __future__ import annotations

import os

from onnxprune.errors import OnnxpruneError
from onnxprune.model_io import atomic_path

INSTALL_HINT = "pip install 'onnxprune[plots]'"


def require_matplotlib() -> None:
    """Raise OnnxpruneError with the install line when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise OnnxpruneError(f"figures need matplotlib, which is not installed: {INSTALL_HINT}") from e


def new_figure(width_in: float, height_in: float, dpi: int = 100):
    """An empty ``matplotlib.figure.Figure`` of that size (inches) on an Agg canvas."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: str | os.PathLike) -> None:
    """Write ``figure`` as PNG, atomically: a half-written file never replaces the last one."""
    with atomic_path(path) as tmp:
        # tight: fixed-aspect panels (images) can leave constrained layout short of room for labels
        figure.savefig(tmp, format="png", bbox_inches="tight", pad_inches=0.1)
