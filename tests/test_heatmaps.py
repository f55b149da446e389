"""Heatmap pictures: layout classes (computed, pruned, causally excluded), one panel per head with
block indices on both axes and a colour bar, attention on a log scale with the layout's pruned
blocks dimmed; and without matplotlib, one error before anything is written."""

from __future__ import annotations

import struct
import sys

import numpy as np
import pytest

import cli_models as models
from onnxprune.cli import main
from onnxprune.errors import OnnxpruneError
from onnxprune.heatmaps import (COMPUTED, EXCLUDED, PRUNED, SiteHeatmap, attention_figure, layout_classes,
                                layout_figure, pruned_cells, write_heatmaps)

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def head_axes(figure):
    """The panels that show a head (not the colour bar, not the hidden spare slots)."""
    return [ax for ax in figure.axes if ax.get_images() and ax.axison]


def test_layout_classes():
    layout = np.array([[[1, 0, 0], [0, 1, 0], [1, 1, 1]]], np.uint8)
    classes = layout_classes(layout, is_causal=True)[0]
    assert classes[0, 0] == COMPUTED and classes[1, 0] == PRUNED
    assert classes[0, 1] == classes[0, 2] == classes[1, 2] == EXCLUDED  # above the diagonal of a causal site
    assert (layout_classes(layout)[0] != EXCLUDED).all()


def test_layout_figure_axes_and_colour_bar():
    layout = np.tril(np.ones((3, 4, 4), np.uint8))
    layout[1, 3, 1] = 0
    figure = layout_figure(SiteHeatmap("enc/layer.0", layout, block_size=16, is_causal=True))
    panels = head_axes(figure)
    assert [ax.get_title() for ax in panels] == ["head 0", "head 1", "head 2"]
    assert panels[0].get_ylabel() == "query block (16 tokens)" and panels[0].get_xlabel() == "key block (16 tokens)"
    for ax in (panels[0].xaxis, panels[0].yaxis):  # block indices, each block's tick at its centre
        low, high = sorted(ax.get_view_interval())
        assert [t for t in ax.get_majorticklocs() if low <= t <= high] == [0, 1, 2, 3]
    # the drawn classes, one colour each, and a colour bar naming them
    assert panels[1].get_images()[0].get_array()[3, 1] == 0 and panels[1].get_images()[0].get_array()[3, 2] == 2
    bars = [ax for ax in figure.axes if ax not in panels and ax.axison and ax.get_yticklabels()]
    labels = [t.get_text() for t in bars[0].get_yticklabels()]
    assert labels == ["pruned", "excluded\n(causal)", "computed"]
    assert figure.get_suptitle() == "enc/layer.0\nblock layout: 97% of the blocks computed"  # 29 of 30 uncovered
    plain = layout_figure(SiteHeatmap("x", np.ones((1, 2, 2), np.uint8), block_size=32))
    assert [ax.get_title() for ax in head_axes(plain)] == ["all heads"]
    bar = [ax for ax in plain.axes if ax not in head_axes(plain) and ax.axison][0]
    assert [t.get_text() for t in bar.get_yticklabels()] == ["pruned", "computed"]  # not causal: two classes
    assert "100% of the blocks computed" in plain.get_suptitle()


def test_many_heads_wrap():
    figure = layout_figure(SiteHeatmap("x", np.zeros((12, 4, 4), np.uint8), block_size=16))
    panels = head_axes(figure)
    assert len(panels) == 12
    rows = sorted({round(ax.get_position().y0, 3) for ax in panels})
    assert len(rows) == 2  # eight in the first row, four in the second
    assert sum(round(ax.get_position().y0, 3) == rows[0] for ax in panels) == 4


def test_pruned_cells():
    layout = np.array([[[1, 0], [1, 1]]], np.uint8)  # block 32 over granularity 16: 2x2 cells per block
    pruned = pruned_cells((2, 5, 5), layout, block_size=32, granularity=16)
    assert pruned.shape == (1, 5, 5)
    assert pruned[0, :2, 2:4].all() and not pruned[0, :2, :2].any() and not pruned[0, 2:].any()
    assert not pruned[0, :, 4].any()  # beyond the layout: nothing to dim
    assert pruned_cells((2, 4, 4), layout, block_size=24, granularity=16) is None
    assert pruned_cells((2, 4, 4), None, None, 16) is None


def test_attention_figure_log_scale_blocks_and_dimming():
    attention = np.array([[[1.0, 1e-2, 0, 0], [1e-4, 1e-6, 0, 0], [0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0]]] * 2)
    layout = np.array([[[1, 0], [1, 1]]], np.uint8)
    figure = attention_figure(SiteHeatmap("s", layout, 32, attention=attention, granularity=16))
    panels = head_axes(figure)
    assert len(panels) == 2 and panels[0].get_xlabel() == "key block (32 tokens)"
    assert panels[0].get_xlim() == (-0.5, 1.5)  # two blocks of two cells each, centred on their index
    heat, veil = panels[0].get_images()
    assert heat.norm.vmin == pytest.approx(1e-4) and heat.norm.vmax == 1.0
    assert heat.get_array()[0, 2] == heat.get_array()[1, 1] == pytest.approx(1e-4)  # none, or below: the scale's bottom
    assert heat.get_array()[0, 1] == 1e-2
    alpha = veil.get_array()[..., 3]
    assert alpha[0, 2] > 0 and alpha[0, 0] == 0 and alpha[2, 2] == 0
    assert any(text.get_text() == "pruned block (dimmed)" for legend in figure.legends for text in legend.get_texts())
    bar = [ax for ax in figure.axes if ax not in panels and ax.axison][0]
    assert "attention" in bar.get_ylabel()
    dense = attention_figure(SiteHeatmap("s", attention=attention, granularity=4))
    assert head_axes(dense)[0].get_xlabel() == "key cell (4 tokens)" and not dense.legends
    assert len(head_axes(dense)[0].get_images()) == 1


def test_write_heatmaps_names_files(tmp_path):
    sites = [SiteHeatmap("/enc/layer.0/Softmax", layout=np.ones((2, 2, 2), np.uint8), block_size=16),
             SiteHeatmap("other", attention=np.ones((2, 3, 3)) / 3, granularity=16)]
    written = write_heatmaps(sites, tmp_path / "maps")
    assert [(w["site"], w["kind"]) for w in written] == [("/enc/layer.0/Softmax", "layout"), ("other", "attention")]
    assert [p.name for p in sorted((tmp_path / "maps").iterdir())] == [
        "00_enc_layer.0_Softmax_layout.png", "01_other_attention.png"]
    for entry in written:
        width, height = png_size(entry["path"])
        assert 300 < width < 1500 and 200 < height < 800 and width > height  # two heads side by side


def test_without_matplotlib_nothing_is_written(tmp_path, monkeypatch, capsys):
    (tmp_path / "model").mkdir()
    encoder = models.pruned_encoder(tmp_path / "model")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    sites = [SiteHeatmap("s", layout=np.ones((1, 2, 2), np.uint8), block_size=16)]
    with pytest.raises(OnnxpruneError, match=r"pip install 'onnxprune\[plots\]'"):
        write_heatmaps(sites, tmp_path / "maps")
    assert not (tmp_path / "maps").exists()
    # the command: exit 2, one line that says how to install it, and no output
    assert main(["inspect", str(encoder["pruned"]), "--json", "--heatmaps", str(tmp_path / "maps")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not (tmp_path / "maps").exists()
    assert len(captured.err.strip().splitlines()) == 1 and "pip install 'onnxprune[plots]'" in captured.err
