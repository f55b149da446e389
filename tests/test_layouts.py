"""AP layout learning (onnxprune.layouts) on synthetic statistics with known sums and counts."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from onnxprune.errors import OnnxpruneError
from onnxprune.layout_rule import learn_rule
from onnxprune.layouts import (
    Layouts, SiteLayout, effective_sparsity, learn_layouts, looks_causal, node_site, read_layouts,
)
from onnxprune.stats import Stats

G = 16  # granularity
L = 64  # max length: 4 x 4 cells
M = L // G
OFF_DIAGONAL = ~np.eye(M, dtype=bool)
UPPER = np.triu(np.ones((M, M), bool), k=1)
LOWER_OR_DIAGONAL = ~UPPER


def make_stats(scores: dict[str, np.ndarray], counts: np.ndarray | None = None, lengths=None) -> Stats:
    """Stats whose mean per cell is ``scores[site]`` ([H, M, M]); counts default to 10 per cell."""
    stats = Stats.empty({s: v.shape[0] for s, v in scores.items()}, G, L, "f" * 64)
    counts = np.full((M, M), 10.0) if counts is None else counts
    for site, value in scores.items():
        stats.sums[site][...] = value * counts
        stats.counts[site][...] = counts
    if lengths is not None:
        for length, how_many in lengths.items():
            stats.lengths[length] = how_many
    else:
        stats.lengths[L] = 1
    stats.num_samples = int(stats.lengths.sum())
    return stats


def distinct_scores(heads: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.permutation(heads * M * M).reshape(heads, M, M).astype(np.float64) + 1.0


def test_p0_keeps_all():
    stats = make_stats({"a": distinct_scores(2), "b": distinct_scores(3, seed=1)})
    for scope in ("layer", "head", "global"):
        result = learn_layouts(stats, 0.0, 16, scope)
        for site in ("a", "b"):
            assert result.sites[site].layout.dtype == np.uint8
            assert result.sites[site].layout.all()
            assert result.sites[site].density == 1.0
            assert result.sites[site].retained_mass == 1.0
            assert not result.sites[site].causal
        assert result.effective_sparsity == 0.0


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.7, 0.8, 0.9, 0.99])
def test_pruned_count_and_lowest_scores(p):
    heads = 2
    scores = distinct_scores(heads)
    result = learn_layouts(make_stats({"a": scores}), p, 16, "layer")
    layout = result.sites["a"].layout
    eligible = heads * M * M
    candidates = heads * (M * M - M)
    expected = min(round(p * eligible), candidates)
    assert int((layout == 0).sum()) == expected
    assert result.sites["a"].density == pytest.approx((eligible - expected) / eligible)
    # Diagonal always kept.
    assert all(layout[:, i, i].all() for i in range(M))
    # The pruned blocks are exactly the lowest-scoring off-diagonal ones.
    off = np.broadcast_to(OFF_DIAGONAL, scores.shape)
    threshold = np.sort(scores[off])[expected - 1]
    np.testing.assert_array_equal(layout == 0, off & (scores <= threshold))


def test_keep_diagonal_false_can_prune_the_diagonal():
    scores = np.ones((1, M, M))
    scores[0][np.eye(M, dtype=bool)] = 0.01  # the diagonal is the least attended
    kept = learn_layouts(make_stats({"a": scores}), 0.25, 16, keep_diagonal=True).sites["a"].layout
    assert np.all(np.diagonal(kept[0]) == 1)
    pruned = learn_layouts(make_stats({"a": scores}), 0.25, 16, keep_diagonal=False).sites["a"].layout
    assert np.all(np.diagonal(pruned[0]) == 0)
    assert int((pruned == 0).sum()) == 4


def test_head_scope_prunes_the_same_count_per_head():
    scores = distinct_scores(2)
    scores[0] /= 1000  # head 0 attends much less than head 1 everywhere
    stats = make_stats({"a": scores})
    p = 0.5
    per_head = round(p * M * M)
    head = learn_layouts(stats, p, 16, "head").sites["a"].layout
    assert [int((head[h] == 0).sum()) for h in range(2)] == [per_head, per_head]
    layer = learn_layouts(stats, p, 16, "layer").sites["a"].layout
    # One threshold across the layer: the weak head loses all its candidates first.
    assert int((layer == 0).sum()) == 2 * per_head
    assert int((layer[0] == 0).sum()) == M * M - M
    assert int((layer[1] == 0).sum()) == 2 * per_head - (M * M - M)


def test_global_scope_prunes_more_in_a_low_mass_site():
    strong = distinct_scores(2, seed=1)
    weak = distinct_scores(2, seed=2) / 1000
    stats = make_stats({"strong": strong, "weak": weak})
    p = 0.4
    layer = learn_layouts(stats, p, 16, "layer")
    glob = learn_layouts(stats, p, 16, "global")
    per_site = round(p * 2 * M * M)
    assert [int((layer.sites[s].layout == 0).sum()) for s in ("strong", "weak")] == [per_site, per_site]
    pruned_weak = int((glob.sites["weak"].layout == 0).sum())
    pruned_strong = int((glob.sites["strong"].layout == 0).sum())
    assert pruned_weak + pruned_strong == round(p * 4 * M * M)
    assert pruned_weak == 2 * (M * M - M)  # every candidate of the weak site
    assert pruned_strong < per_site
    assert glob.sites["weak"].density < layer.sites["weak"].density


@pytest.mark.parametrize("how", ["declared", "detected"])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.6, 0.9])
def test_causal_site(how, p):
    heads = 2
    scores = distinct_scores(heads, seed=5)
    if how == "detected":
        scores[:, UPPER] = 0.0  # no mass above the diagonal: the site masks causally
    stats = make_stats({"a": scores})
    causal_sites = {"a"} if how == "declared" else None
    assert looks_causal(stats, "a") == (how == "detected")
    result = learn_layouts(stats, p, 16, "layer", causal_sites=causal_sites)
    site = result.sites["a"]
    assert site.causal
    assert not site.layout[:, UPPER].any()
    # Blocks above the diagonal do not count in p.
    eligible = heads * int(LOWER_OR_DIAGONAL.sum())  # 2 x 10
    candidates = heads * int((LOWER_OR_DIAGONAL & OFF_DIAGONAL).sum())  # 2 x 6
    expected = min(round(p * eligible), candidates)
    assert int(site.layout[:, LOWER_OR_DIAGONAL].sum()) == eligible - expected
    assert site.density == pytest.approx((eligible - expected) / eligible)
    # The lowest scores among the causal candidates are the pruned ones.
    cand = np.broadcast_to(LOWER_OR_DIAGONAL & OFF_DIAGONAL, scores.shape)
    if expected:
        threshold = np.sort(scores[cand])[expected - 1]
        np.testing.assert_array_equal(site.layout == 0, np.broadcast_to(UPPER, scores.shape) | (cand & (scores <= threshold)))


def test_non_causal_site_with_mass_above_the_diagonal():
    stats = make_stats({"a": distinct_scores(1)})
    assert not looks_causal(stats, "a")
    assert not learn_layouts(stats, 0.5, 16).sites["a"].causal


def test_unseen_blocks_stay():
    counts = np.full((M, M), 10.0)
    counts[3, :] = counts[:, 3] = 0  # no input was long enough for the last cell
    scores = distinct_scores(1)
    result = learn_layouts(make_stats({"a": scores}, counts=counts), 0.9, 16)
    layout = result.sites["a"].layout[0]
    assert layout[3, :].all() and layout[:, 3].all()
    # 0.9 x 16 rounds to 14 but only the 6 seen off-diagonal blocks are candidates.
    assert int((layout == 0).sum()) == 6


def test_retained_mass():
    scores = np.zeros((1, M, M))
    scores[0] = np.arange(1, M * M + 1).reshape(M, M)
    counts = np.full((M, M), 2.0)
    result = learn_layouts(make_stats({"a": scores}, counts=counts), 0.25, 16)
    layout = result.sites["a"].layout[0]
    # Four pruned: the off-diagonal cells with scores 2, 3, 4, 5.
    expected_pruned = np.zeros((M, M), bool)
    expected_pruned.flat[[1, 2, 3, 4]] = True
    np.testing.assert_array_equal(layout == 0, expected_pruned)
    total = 2.0 * sum(range(1, 17))  # 272
    kept = total - 2.0 * (2 + 3 + 4 + 5)  # 244
    assert result.sites["a"].retained_mass == pytest.approx(kept / total)


def test_larger_blocks_pool_cells():
    """Block 32 over granularity 16: a block's score is its summed mass over its summed count."""
    scores = np.ones((1, M, M))
    scores[0, 0:2, 2:4] = 0.001  # top-right 32-block
    counts = np.full((M, M), 10.0)
    counts[0, 2] = 1000  # weights the block's average towards one cell...
    scores[0, 0, 2] = 5.0  # ...that is strongly attended: block mean ≈ 4.86
    scores[0, 2:4, 0:2] = 0.5  # bottom-left 32-block: mean 0.5
    result = learn_layouts(make_stats({"a": scores}, counts=counts), 0.25, 32)
    layout = result.sites["a"].layout
    assert layout.shape == (1, 2, 2)
    np.testing.assert_array_equal(layout[0], [[1, 1], [0, 1]])


def test_effective_sparsity_hand_computed():
    full = SiteLayout(layout=np.array([[[1, 0, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]]], np.uint8),
                      causal=False, density=0.0, retained_mass=0.0)
    causal = SiteLayout(layout=np.array([[[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]] * 2, np.uint8),
                        causal=True, density=0.0, retained_mass=0.0)
    lengths = np.zeros(L + 1, np.int64)
    lengths[20] = 3  # 2 blocks
    lengths[64] = 1  # 4 blocks
    lengths[33] = 2  # 3 blocks
    # full site (1 head): length 20 -> 4 computed, 1 skipped; 33 -> 9, 2; 64 -> 16, 8.
    # causal site (2 heads), only blocks on or below the diagonal:
    #   20 -> 2 x 3 computed, 2 x 1 skipped; 33 -> 2 x 6, 2 x 2; 64 -> 2 x 10, 2 x 3.
    computed = 3 * (4 + 6) + 2 * (9 + 12) + 1 * (16 + 20)  # 108
    skipped = 3 * (1 + 2) + 2 * (2 + 4) + 1 * (8 + 6)  # 35
    value = effective_sparsity(lengths, {"full": full, "causal": causal}, 16)
    assert value == pytest.approx(35 / 108)
    assert value == pytest.approx(skipped / computed)
    assert effective_sparsity(np.zeros(L + 1, np.int64), {"full": full}, 16) == 0.0


def test_effective_sparsity_beyond_the_layout_follows_its_rule():
    # A 2-block causal layout (diagonal only) whose rule keeps 1 sink block and the diagonal; at
    # 5 blocks the op computes the diagonal (5) and, outside the explicit 2 x 2 region, the sink
    # column of rows 2-4 (3): 8 of the 15 blocks on or below the diagonal.
    site = SiteLayout(layout=np.eye(2, dtype=np.uint8)[None], causal=True, rule=np.array([[1, 0, 0, 0]]))
    lengths = np.zeros(81, np.int64)
    lengths[80] = 1
    assert effective_sparsity(lengths, {"s": site}, 16) == pytest.approx(1 - 8 / 15)
    without_rule = SiteLayout(layout=site.layout, causal=True)  # version 1: every block beyond
    assert effective_sparsity(lengths, {"s": without_rule}, 16) == pytest.approx(1 - (15 - 1) / 15)


def test_effective_sparsity_reported_by_learn_layouts():
    stats = make_stats({"a": distinct_scores(2)}, lengths={64: 2, 10: 5})
    result = learn_layouts(stats, 0.5, 16)
    layout = result.sites["a"].layout
    # Length 10 is one block (the diagonal, kept); length 64 sees the whole layout.
    computed = 5 * 2 * 1 + 2 * 2 * 16
    skipped = 2 * int((layout == 0).sum())
    assert result.effective_sparsity == pytest.approx(skipped / computed)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_out_of_range(p):
    with pytest.raises(OnnxpruneError, match="sparsity"):
        learn_layouts(make_stats({"a": distinct_scores(1)}), p, 16)


@pytest.mark.parametrize("bs", [0, 8, 24, 48, 256])
def test_bad_block_size(bs):
    with pytest.raises(OnnxpruneError, match="block-size"):
        learn_layouts(make_stats({"a": distinct_scores(1)}), 0.5, bs)


def test_block_size_not_a_multiple_of_granularity():
    stats = Stats.empty({"a": 1}, 32, 64, "f" * 64)
    with pytest.raises(OnnxpruneError, match="granularity"):
        learn_layouts(stats, 0.5, 16)


def test_bad_scope():
    with pytest.raises(OnnxpruneError, match="scope"):
        learn_layouts(make_stats({"a": distinct_scores(1)}), 0.5, 16, "model")


# --------------------------------------------------------------------------------------------
# Layouts in a model: what metadata_props writes, read_layouts reads back


def _learned() -> Layouts:
    stats = make_stats({"site0": distinct_scores(2), "site1": distinct_scores(2, seed=1)})
    learned = learn_layouts(stats, 0.5, 16, "head", causal_sites={"site1"})
    return dataclasses.replace(learned, stats_sha256="ab" * 32, onnxprune_version="9.9")


def _model_with(layouts: Layouts):
    """Two BlockSparseAttention nodes (sites ``site0``, ``site1``) carrying ``layouts``."""
    from test_passes import two_sites_model
    from test_rules import to_ir

    model = to_ir(two_sites_model(None, None))
    for node in list(model.graph):
        node.attributes["block_size"] = ir.AttrInt64("block_size", layouts.block_size)
        site = layouts.sites[node_site(node)]
        node.inputs[3].const_value = ir.tensor(site.layout)
        if site.rule is not None:
            rule = ir.Value(name=f"onnxprune.layout_rule.{node_site(node)}")
            rule.const_value = ir.tensor(site.rule)
            model.graph.register_initializer(rule)
            node.resize_inputs(7)
            node.replace_input_with(6, rule)
    model.metadata_props.update(layouts.metadata_props())
    return model


def test_read_layouts_gives_back_what_was_written():
    learned = _learned()
    read = read_layouts(_model_with(learned))
    assert list(read.sites) == ["site0", "site1"]
    for name, site in learned.sites.items():
        np.testing.assert_array_equal(read.sites[name].layout, site.layout)
        assert read.sites[name].causal == site.causal
        assert read.sites[name].density == pytest.approx(site.density, abs=1e-6)
        assert read.sites[name].retained_mass == pytest.approx(site.retained_mass, abs=1e-6)
        np.testing.assert_array_equal(read.sites[name].rule, site.rule)
    assert read.metadata() == pytest.approx(learned.metadata(), abs=1e-6)
    assert (read.version, read.scope, read.keep_diagonal, read.calibration_samples) == (2, "head", True, 1)
    assert read.recorded()


def test_a_version_1_file_reads_as_version_1_without_rules():
    v1 = _learned()
    v1 = dataclasses.replace(v1, version=None, sites={n: dataclasses.replace(s, rule=None) for n, s in v1.sites.items()})
    model = _model_with(v1)
    assert "onnxprune.layout_version" not in model.metadata_props
    read = read_layouts(model)
    assert read.version == 1 and all(s.rule is None for s in read.sites.values())


def test_a_newer_layout_version_is_refused():
    model = _model_with(_learned())
    model.metadata_props["onnxprune.layout_version"] = "3"
    with pytest.raises(OnnxpruneError, match="layout version 3 is newer than this onnxprune"):
        read_layouts(model)


def test_a_rule_that_cannot_apply_is_refused():
    learned = _learned()
    learned.sites["site0"].rule = np.array([[0, -2, 0, 0]] * learned.sites["site0"].layout.shape[0])
    with pytest.raises(OnnxpruneError, match="window_before = -2"):
        read_layouts(_model_with(learned))


def test_learned_layouts_carry_the_rule_that_continues_them():
    learned = _learned()
    for site in learned.sites.values():
        np.testing.assert_array_equal(site.rule, learn_rule(site.layout, site.causal))


def test_read_layouts_without_metadata_and_with_bad_values():
    model = _model_with(_learned())
    model.metadata_props.clear()
    model.metadata_props["onnxprune.sparsity"] = "half"
    read = read_layouts(model)
    assert read.block_size == 16 and read.sparsity is None and not read.recorded()
    assert read.sites["site0"].density is None and read.sites["site1"].causal is False  # the node's is_causal


def test_read_layouts_errors():
    from test_rules import eager_model, to_ir

    with pytest.raises(OnnxpruneError, match="no onnxprune.BlockSparseAttention node"):
        read_layouts(to_ir(eager_model()))
    model = _model_with(_learned())
    node = next(iter(model.graph))
    node.attributes["block_size"] = ir.AttrInt64("block_size", 32)
    with pytest.raises(OnnxpruneError, match=r"disagree on block_size \(\[16, 32\]\)"):
        read_layouts(model)
    node.replace_input_with(3, node.inputs[0])
    with pytest.raises(OnnxpruneError, match="no constant layout initializer"):
        read_layouts(model)


def test_renamed_keeps_the_order():
    learned = _learned()
    renamed = learned.renamed(["a", "b"])
    assert list(renamed.sites) == ["a", "b"] and renamed.sites["b"] is learned.sites["site1"]
    with pytest.raises(OnnxpruneError, match="the model has 3 attention sites, the layouts 2"):
        learned.renamed(["a", "b", "c"])
