"""The per-head pattern selection and the baselines (onnxprune.selection, onnxprune.patterns) on
synthetic causal statistics with known mass."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.errors import OnnxpruneError
from onnxprune.layout_rule import blocks_at
from onnxprune.layouts import effective_sparsity
from onnxprune.patterns import band_rule, blocks_for, draw, full_rule
from onnxprune.selection import (
    block_weights, candidates, duo_layouts, head_picture, learn, select_layouts, streaming_layouts,
)
from onnxprune.stats import Stats

G = 16
M = 8
L = M * G
CAUSAL = np.tril(np.ones((M, M), bool))


def causal_stats(mass: np.ndarray, lengths: dict[int, int] | None = None) -> Stats:
    """Statistics with per-head block mass ``mass`` [H, M, M] (granularity = block = 16) on a causal grid."""
    stats = Stats.empty({"s": mass.shape[0]}, G, L, "f" * 64)
    stats.sums["s"][...] = mass * CAUSAL
    stats.counts["s"][...] = 10.0 * CAUSAL
    for length, how_many in (lengths or {L: 4}).items():
        stats.lengths[length] = how_many
    stats.num_samples = int(stats.lengths.sum())
    return stats


def local_head() -> np.ndarray:
    """Mass on the sink column and the diagonal only, each row summing to one."""
    head = np.zeros((M, M))
    head[:, 0] += 0.5
    head[np.arange(M), np.arange(M)] += 0.5
    return head


def far_head() -> np.ndarray:
    """Mass spread over every key of each row: no sink or band holds it."""
    return CAUSAL / CAUSAL.sum(axis=1, keepdims=True)


def mixed_stats() -> Stats:
    return causal_stats(np.stack([local_head(), local_head(), far_head(), local_head()]))


@pytest.mark.parametrize("density", [0.25, 0.35, 0.5, 0.8])
def test_the_selection_meets_the_budget(density):
    stats = causal_stats(np.stack([local_head(), local_head(), far_head(), local_head()]) + 0.01)
    learned = select_layouts(stats, density, block_size=G)
    kept = 1.0 - learned.effective_sparsity
    assert kept <= density + 1e-9
    assert kept >= density - 1.0 / (4 * CAUSAL.sum())  # the leftover buys single blocks: at most one unspent


def test_a_head_with_mass_far_from_the_diagonal_goes_full():
    learned = select_layouts(mixed_stats(), 0.57, block_size=G, fill=False)
    assert head_picture(learned)["s"] == ["s1+w0", "s1+w0", "full", "s1+w0"]
    rule = learned.sites["s"].rule
    assert rule[2].tolist() == list(full_rule(True)) and rule[0].tolist() == [1, 0, 0, 0]


def test_the_rule_is_the_pattern_and_draws_the_layout():
    learned = select_layouts(mixed_stats(), 0.57, block_size=G, fill=False)
    site = learned.sites["s"]
    assert (blocks_at(np.zeros((4, 0, 0), np.uint8), site.rule, M, M) & CAUSAL == site.layout.astype(bool)).all()


def test_density_one_is_dense_everywhere():
    learned = select_layouts(mixed_stats(), 1.0, block_size=G)
    assert learned.effective_sparsity == 0.0
    assert all(r == list(full_rule(True)) for r in learned.sites["s"].rule.tolist())


def test_streaming_is_sink_and_band_on_every_head():
    learned = learn(mixed_stats(), G, method=None, pattern="streaming", sink_tokens=G, window_tokens=G + 1)
    site = learned.sites["s"]
    assert site.rule.tolist() == [[1, 2, 0, 0]] * 4  # 17 tokens round up to 2 blocks
    q, k = np.indices((M, M))
    assert (site.layout.astype(bool) == ((k == 0) | ((q - k <= 2) & (k <= q)))).all()
    assert learned.method == "streaming"


def test_duo_keeps_the_far_head_full_and_streams_the_rest():
    stats = mixed_stats()
    stream_cost = draw(band_rule(1, 0, True), M, M, True).sum()
    one_full = (3 * stream_cost + CAUSAL.sum()) / (4 * CAUSAL.sum())
    learned = duo_layouts(stats, one_full, sink_blocks=1, window_blocks=0, block_size=G)
    assert head_picture(learned)["s"] == ["s1+w0", "s1+w0", "full", "s1+w0"]
    assert 1.0 - learned.effective_sparsity == pytest.approx(one_full)


def test_densities_are_counted_alike_for_every_method():
    stats = causal_stats(np.stack([far_head(), local_head()]), lengths={L: 3, 5 * G: 2})
    for learned in (learn(stats, G, density=0.4), learn(stats, G, method="ap", density=0.4),
                    learn(stats, G, method=None, pattern="duo", density=0.4),
                    learn(stats, G, method=None, pattern="streaming", sink_tokens=G, window_tokens=G)):
        site = learned.sites["s"]
        assert site.density == pytest.approx(1.0 - effective_sparsity(stats.lengths, learned.sites, G))


def test_costs_follow_the_length_histogram():
    weight = block_weights(np.bincount([L, L, 2 * G], minlength=L + 1), M, M, G, causal=True)
    assert weight[0, 0] == 3 and weight[1, 1] == 3 and weight[2, 2] == 2 and weight[0, 1] == 0


def test_candidates_are_distinct_and_end_with_the_full_head():
    rules, masks = candidates(M, M, causal=True)
    assert rules[-1] == full_rule(True) and masks[-1].all() == CAUSAL.all()
    assert len({m.tobytes() for m in masks}) == len(masks)
    assert (0, 0, 0, 0) in rules


def test_non_causal_patterns_are_symmetric_with_global_rows():
    assert band_rule(1, 2, causal=False) == (1, 2, 2, 1)
    mask = draw(band_rule(1, 0, False), 4, 4, False)
    assert mask[0].all() and mask[:, 0].all() and mask[2, 2] and not mask[2, 3]


@pytest.mark.parametrize("kwargs, message", [
    ({"density": 0.0}, "must be in (0, 1]"),
    ({"density": 1.5}, "must be in (0, 1]"),
    ({"method": "ap", "pattern": "duo", "density": 0.5}, "not both"),
    ({"method": None, "pattern": "streaming", "sink_tokens": -1}, "0 or more"),
    ({"method": None, "pattern": "streaming", "window_tokens": -16}, "0 or more"),
    ({"density": 0.5, "scope": "head"}, "takes --scope layer or global"),
])
def test_bad_choices_are_one_clear_error(kwargs, message):
    with pytest.raises(OnnxpruneError, match=message.replace("(", r"\(").replace("]", r"\]")):
        learn(mixed_stats(), G, **kwargs)


def test_tokens_round_up_to_blocks():
    assert [blocks_for(t, 64) for t in (0, 1, 64, 65)] == [0, 1, 1, 2]


def test_below_the_diagonals_the_selection_keeps_the_diagonals():
    learned = select_layouts(mixed_stats(), 0.1, block_size=G)
    assert (learned.sites["s"].layout.astype(bool) == np.eye(M, dtype=bool)).all()


def test_full_heads_per_site_come_first_and_are_the_far_ones():
    stats = causal_stats(np.stack([local_head(), far_head(), local_head(), far_head() * 0.5 + local_head() * 0.5]))
    learned = select_layouts(stats, 0.5, block_size=G, full_heads=1)
    picture = head_picture(learned)["s"]
    assert picture[1].startswith("full") and sum(w.startswith("full") for w in picture) >= 1
    assert 1.0 - learned.effective_sparsity <= 0.5 + 1e-9


def _two_sites() -> Stats:
    stats = Stats.empty({"a": 2, "b": 2}, G, L, "f" * 64)
    for name, heads in (("a", [far_head(), far_head()]), ("b", [local_head(), local_head()])):
        stats.sums[name][...] = np.stack(heads) * CAUSAL + 0.01 * CAUSAL
        stats.counts[name][...] = 10.0 * CAUSAL
    stats.lengths[L] = 4
    stats.num_samples = 4
    return stats


def test_layer_scope_gives_each_site_its_own_budget_and_global_scope_moves_it():
    per_layer = select_layouts(_two_sites(), 0.4, block_size=G, scope="layer")
    assert all(site.density <= 0.4 + 1e-9 for site in per_layer.sites.values())
    pooled = select_layouts(_two_sites(), 0.4, block_size=G)
    assert pooled.sites["b"].density > 0.4  # the budget moved between sites
    assert 1.0 - pooled.effective_sparsity <= 0.4 + 1e-9


@pytest.mark.parametrize("density, expected", [(0.6, 0), (0.7, 1)])
def test_auto_full_heads_only_where_the_others_keep_a_sink_and_a_local_band(density, expected):
    # 4 heads on an 8-block causal grid: a full head computes 36 blocks, sink + diagonal + the
    # block before it 21, so one full head and three such heads need 99 of 4 × 36 = 144 blocks.
    # Local heads: mass alone never makes one full.
    stats = causal_stats(np.stack([local_head()] * 4))
    learned = select_layouts(stats, density, G, {"s"}, full_heads=None)
    full = [tuple(rule) == full_rule(True) for rule in learned.sites["s"].rule.tolist()]
    assert sum(full) == expected
    assert learned.sites["s"].density <= density + 1e-9
