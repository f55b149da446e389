"""Heatmap pictures: layout colours (computed, pruned, causally excluded), heads side by side,
attention on a log scale with the layout's pruned blocks dimmed."""

from __future__ import annotations

import numpy as np

from onnxprune.heatmaps import SiteHeatmap, attention_image, layout_image, write_heatmaps


def pixel(image, row, col, cell):
    return image[row * cell + cell // 2, col * cell + cell // 2]


def test_layout_colours():
    layout = np.array([[[1, 0, 0], [0, 1, 0], [1, 1, 1]]], np.uint8)
    image = layout_image(layout, is_causal=True)
    cell = image.shape[0] // 3
    np.testing.assert_allclose(pixel(image, 0, 0, cell), 1.0)  # computed: white
    np.testing.assert_allclose(pixel(image, 1, 0, cell), 0.0)  # pruned: black
    assert 0 < pixel(image, 0, 1, cell)[0] < 1  # above the diagonal of a causal site: grey
    np.testing.assert_allclose(pixel(image, 0, 1, cell), pixel(image, 0, 2, cell))


def test_heads_side_by_side():
    layout = np.ones((3, 4, 4), np.uint8)
    image = layout_image(layout)
    cell = image.shape[0] // 4
    assert image.shape == (4 * cell, 3 * 4 * cell + 2 * 2, 3)
    np.testing.assert_allclose(image[:, 4 * cell], np.broadcast_to([0.2, 0.4, 0.8], (4 * cell, 3)))  # separator


def test_many_heads_wrap():
    layout = np.zeros((12, 4, 4), np.uint8)
    layout[11] = 1  # the last head: second row, fourth place
    image = layout_image(layout)
    cell = (image.shape[0] - 2) // 8
    assert image.shape == (2 * 4 * cell + 2, 8 * 4 * cell + 7 * 2, 3)
    top, left = 4 * cell + 2, 3 * (4 * cell + 2)
    np.testing.assert_allclose(image[top:top + 4 * cell, left:left + 4 * cell], 1.0)
    assert image[:top - 2].max(axis=-1).max() <= 0.8  # nothing white in the first row
    np.testing.assert_allclose(image[top + 1, -1], [0.85, 0.9, 1.0])  # an empty slot


def test_attention_dims_pruned_blocks():
    attention = np.full((1, 4, 4), 0.25)
    layout = np.array([[[1, 0], [1, 1]]], np.uint8)  # block 32 over granularity 16: 2x2 cells per block
    image = attention_image(attention, layout, block_size=32, granularity=16)
    cell = image.shape[0] // 4
    kept, pruned = pixel(image, 0, 0, cell), pixel(image, 0, 3, cell)
    np.testing.assert_allclose(pruned, kept * 0.3)
    plain = attention_image(attention)
    np.testing.assert_allclose(pixel(plain, 0, 3, cell), kept)


def test_attention_log_scale():
    attention = np.array([[[1.0, 1e-2], [1e-4, 0.0]]])
    image = attention_image(attention)
    cell = image.shape[0] // 2
    levels = [pixel(image, r, c, cell).sum() for r, c in ((0, 0), (0, 1), (1, 0), (1, 1))]
    assert levels[0] > levels[1] > levels[2] >= levels[3]


def test_write_heatmaps_names_files(tmp_path):
    sites = [SiteHeatmap("/enc/layer.0/Softmax", layout=np.ones((1, 2, 2), np.uint8), block_size=16),
             SiteHeatmap("other", attention=np.ones((2, 3, 3)) / 3, granularity=16)]
    written = write_heatmaps(sites, tmp_path / "maps")
    assert [(w["site"], w["kind"]) for w in written] == [("/enc/layer.0/Softmax", "layout"), ("other", "attention")]
    assert [p.name for p in sorted((tmp_path / "maps").iterdir())] == [
        "00_enc_layer.0_Softmax_layout.png", "01_other_attention.png"]
