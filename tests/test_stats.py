"""Calibration statistics: merging, saving and loading (onnxprune.stats.Stats)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_token_examples
from onnxprune.calibrate import calibrate
from onnxprune.data import Dataset
from onnxprune.errors import OnnxpruneError
from onnxprune.stats import Stats, merge_all

INPUTS = ["input_ids", "attention_mask"]
MAX_LENGTH = 64


def run_calibration(path, examples, batch_size=4):
    return calibrate(path, Dataset(examples, INPUTS), granularity=16, max_length=MAX_LENGTH,
                     batch_size=batch_size, show_progress=False)


@pytest.fixture(scope="module", params=["bert", "gpt2"])
def halves_and_whole(request, tiny_model):
    pytest.importorskip("torch")
    path = tiny_model(request.param, "dynamo-eager-20")
    examples = random_token_examples(20, seed=3)
    first = run_calibration(path, examples[:10])
    second = run_calibration(path, examples[10:], batch_size=3)
    whole = run_calibration(path, examples, batch_size=8)
    return first, second, whole, path


def assert_same_stats(a: Stats, b: Stats):
    assert (a.granularity, a.max_length, a.model_sha256, a.sites, a.num_samples) == (
        b.granularity, b.max_length, b.model_sha256, b.sites, b.num_samples
    )
    np.testing.assert_array_equal(a.lengths, b.lengths)
    for site in a.sites:
        np.testing.assert_allclose(a.sums[site], b.sums[site], rtol=1e-6, atol=1e-9)
        np.testing.assert_array_equal(a.counts[site], b.counts[site])


def test_halves_merge_to_the_whole(halves_and_whole):
    first, second, whole, _ = halves_and_whole
    assert first.num_samples == second.num_samples == 10
    assert whole.num_samples == 20
    # The halves saw different data.
    assert not np.array_equal(first.lengths, second.lengths)
    merged = first.merge(second)
    assert_same_stats(merged, whole)
    assert_same_stats(second.merge(first), whole)
    assert merged.lengths.sum() == 20
    assert merged.lengths.dtype == np.int64


def test_merge_leaves_its_operands_alone(halves_and_whole):
    first, second, _, _ = halves_and_whole
    before = {s: first.sums[s].copy() for s in first.sites}
    lengths, samples = first.lengths.copy(), first.num_samples
    first.merge(second)
    assert first.num_samples == samples
    np.testing.assert_array_equal(first.lengths, lengths)
    for s in first.sites:
        np.testing.assert_array_equal(first.sums[s], before[s])


def test_counts_are_valid_pairs(halves_and_whole):
    """Each cell counts the (valid query, valid key) pairs of the inputs."""
    _, _, whole, _ = halves_and_whole
    expected = np.zeros((4, 4))
    for length, how_many in enumerate(whole.lengths):
        per_cell = np.clip(length - 16 * np.arange(4), 0, 16)
        expected += how_many * np.outer(per_cell, per_cell)
    for site in whole.sites:
        np.testing.assert_array_equal(whole.counts[site], expected)


def test_save_load_round_trip(halves_and_whole, tmp_path):
    _, _, whole, _ = halves_and_whole
    path = tmp_path / "stats.safetensors"
    whole.save(path)
    loaded = Stats.load(path)
    assert_same_stats(loaded, whole)
    for site in whole.sites:
        np.testing.assert_array_equal(loaded.sums[site], whole.sums[site])  # exact, not just close
        assert loaded.sums[site].dtype == np.float64


def test_save_load_odd_site_names(tmp_path):
    sites = {"/m/encoder/layer.0/attention/self/Softmax": 2, 'a "quoted", name': 1, "ünïcødé.1": 3}
    stats = Stats.empty(sites, granularity=32, max_length=100, model_sha256="ab" * 32)
    rng = np.random.default_rng(0)
    for site in stats.sites:
        stats.sums[site][...] = rng.random(stats.sums[site].shape)
        stats.counts[site][...] = rng.integers(0, 50, stats.counts[site].shape)
    stats.lengths[[3, 50, 100]] = [1, 2, 3]
    stats.num_samples = 6
    path = tmp_path / "odd.safetensors"
    stats.save(path)
    loaded = Stats.load(path)
    assert loaded.sites == list(sites)
    assert loaded.cells == 4
    assert_same_stats(loaded, stats)
    assert loaded.merge(stats).num_samples == 12


def test_load_missing_file(tmp_path):
    with pytest.raises(OnnxpruneError, match="no such file"):
        Stats.load(tmp_path / "absent.safetensors")


def test_load_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are not statistics\n")
    with pytest.raises(OnnxpruneError):
        Stats.load(path)


def test_load_onnx_model(halves_and_whole):
    _, _, _, model_path = halves_and_whole
    with pytest.raises(OnnxpruneError):
        Stats.load(model_path)


def test_load_other_safetensors(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"weight": np.zeros((2, 2), np.float32)}, str(path), metadata={"format": "pt"})
    with pytest.raises(OnnxpruneError, match="not an onnxprune statistics file"):
        Stats.load(path)


def test_load_truncated_stats_file(tmp_path):
    stats = Stats.empty({"s": 1}, 16, 32, "0" * 64)
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxpruneError):
        Stats.load(path)


def test_merge_different_models_raises(tiny_model):
    pytest.importorskip("torch")
    examples = random_token_examples(4, seed=4)
    bert = run_calibration(tiny_model("bert", "dynamo-eager-20"), examples)
    gpt2 = run_calibration(tiny_model("gpt2", "dynamo-eager-20"), examples)
    with pytest.raises(OnnxpruneError, match="different models"):
        bert.merge(gpt2)


def test_merge_same_sites_different_sha_raises():
    a = Stats.empty({"s": 2}, 16, 64, "a" * 64)
    b = Stats.empty({"s": 2}, 16, 64, "b" * 64)
    with pytest.raises(OnnxpruneError, match="different models"):
        a.merge(b)


def test_merge_different_sites_raises():
    a = Stats.empty({"s": 2}, 16, 64, "a" * 64)
    b = Stats.empty({"t": 2}, 16, 64, "a" * 64)
    with pytest.raises(OnnxpruneError, match="different models"):
        a.merge(b)


def test_merge_different_granularity_raises():
    a = Stats.empty({"s": 2}, 16, 64, "a" * 64)
    b = Stats.empty({"s": 2}, 32, 64, "a" * 64)
    with pytest.raises(OnnxpruneError, match="cannot merge statistics of granularity 16 with granularity 32"):
        a.merge(b)


def test_merge_different_heads_raises():
    a = Stats.empty({"s": 2}, 16, 64, "a" * 64)
    b = Stats.empty({"s": 3}, 16, 64, "a" * 64)
    with pytest.raises(OnnxpruneError, match="cannot merge statistics of site s: 2 and 3 heads"):
        a.merge(b)


def test_halves_of_other_max_lengths_merge_to_the_whole(tiny_model):
    """The shorter statistics are padded with zero counts, so the merge is exact: calibrating
    short inputs at max length 32 and the rest at 64 adds up to all of them at 64."""
    pytest.importorskip("torch")
    path = tiny_model("bert", "dynamo-eager-20")
    short = random_token_examples(6, seed=5, low=5, high=32)
    long = random_token_examples(6, seed=6, low=33, high=60)
    first = calibrate(path, Dataset(short, INPUTS), granularity=16, max_length=32, show_progress=False)
    second = run_calibration(path, long)
    whole = run_calibration(path, short + long)
    assert first.max_length == 32 and first.cells == 2
    for merged in (first.merge(second), second.merge(first)):
        assert merged.max_length == 64 and len(merged.lengths) == 65
        assert_same_stats(merged, whole)


def test_mean_is_zero_where_unseen():
    stats = Stats.empty({"s": 2}, 16, 48, "a" * 64)
    stats.sums["s"][:, 0, 0] = [4.0, 8.0]
    stats.counts["s"][0, 0] = 2
    mean = stats.mean("s")
    np.testing.assert_array_equal(mean[:, 0, 0], [2.0, 4.0])
    assert mean[:, 1:, :].sum() == 0 and mean[:, :, 1:].sum() == 0
    assert np.all(np.isfinite(mean))


def test_merge_pads_rectangular_sites_of_other_extents():
    """A cross-attention site's statistics span the decoder lengths calibration saw: a merge pads
    the shorter with zero sums and counts."""
    a = Stats.empty({"s": 2}, 16, 64, "a" * 64)
    b = Stats.empty({"s": 2}, 16, 64, "a" * 64)
    a.sums["s"], a.counts["s"] = np.ones((2, 2, 4)), np.ones((2, 4))
    b.sums["s"], b.counts["s"] = np.full((2, 3, 4), 2.0), np.full((3, 4), 2.0)
    merged = a.merge(b)
    np.testing.assert_array_equal(merged.counts["s"], [[3] * 4, [3] * 4, [2] * 4])
    np.testing.assert_array_equal(merged.sums["s"][:, 2], np.full((2, 4), 2.0))
    np.testing.assert_array_equal(merged.mean("s"), np.ones((2, 3, 4)))


def test_merge_all_and_summary():
    parts = []
    for length in (10, 20, 40):
        part = Stats.empty({"s": 2}, 16, length, "a" * 64)
        part.lengths[length] = 1
        part.num_samples = 1
        parts.append(part)
    total = merge_all(parts)
    assert total.max_length == 40 and total.num_samples == 3 and total.tokens == 70
    summary = total.summary()
    assert summary["lengths"] == {"min": 10, "max": 40, "mean": 70 / 3}
    assert summary["sites"] == [{"name": "s", "heads": 2, "cells": [3, 3], "pairs": 0.0}]
    with pytest.raises(OnnxpruneError, match="no statistics to merge"):
        merge_all([])


def test_rectangular_round_trip(tmp_path):
    stats = Stats.empty({"cross": 2}, 16, 64, "a" * 64)
    stats.sums["cross"] = np.random.default_rng(0).random((2, 2, 4))
    stats.counts["cross"] = np.ones((2, 4))
    stats.save(tmp_path / "s.safetensors")
    loaded = Stats.load(tmp_path / "s.safetensors")
    np.testing.assert_array_equal(loaded.sums["cross"], stats.sums["cross"])
    assert loaded.mean("cross").shape == (2, 2, 4)


def test_add_is_merge_in_place():
    rng = np.random.default_rng(1)
    parts = []
    for _ in range(3):
        part = Stats.empty({"s": 2, "t": 1}, 16, 64, "a" * 64)
        for site in part.sites:
            part.sums[site][...] = rng.random(part.sums[site].shape)
            part.counts[site][...] = rng.integers(0, 9, part.counts[site].shape)
        part.lengths[rng.integers(0, 65, 4)] += 1
        part.num_samples = int(part.lengths.sum())
        parts.append(part)
    expected = parts[0].merge(parts[1]).merge(parts[2])
    for site in parts[0].sites:  # arrays Ray hands over from its object store are read-only
        parts[0].sums[site].flags.writeable = False
    total = parts[0].add(parts[1])
    assert total is parts[0]
    sums = total.sums["s"]
    assert total.add(parts[2]) is total and total.sums["s"] is sums  # added in place
    assert_same_stats(total, expected)
    longer = Stats.empty({"s": 2, "t": 1}, 16, 128, "a" * 64)
    padded = total.add(longer)
    assert padded is not total and padded.max_length == 128
    with pytest.raises(OnnxpruneError, match="different models"):
        total.add(Stats.empty({"s": 2, "t": 1}, 16, 64, "b" * 64))
