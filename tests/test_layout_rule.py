"""The rule that continues a layout beyond its explicit region: learning it back from layouts it
generated, expanding it at any length and offset, and refusing rules that cannot apply."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.errors import OnnxpruneError
from onnxprune.layout_rule import UNBOUNDED, blocks_at, describe, learn_rule, validate_rule


def _pattern(m_q: int, m_k: int, sinks: int, before: int, after: int, globals_: int, first: int = 0) -> np.ndarray:
    """Independent spelling of the rule, element by element."""
    out = np.zeros((m_q, m_k), bool)
    for i in range(m_q):
        qb = first + i
        for kb in range(m_k):
            in_band = (before == UNBOUNDED or kb >= qb - before) and (after == UNBOUNDED or kb <= qb + after)
            out[i, kb] = kb < sinks or in_band or qb < globals_
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("rule", [(1, 1, 0, 0), (2, 0, 0, 0), (0, 2, 1, 0), (1, 0, 0, 1), (3, 2, 2, 1)])
def test_learn_rule_recovers_the_rule_that_made_the_layout(rule, causal):
    m = 8
    allowed = np.tril(np.ones((m, m), bool)) if causal else np.ones((m, m), bool)
    layout = (_pattern(m, m, *rule) & allowed).astype(np.uint8)[None]
    sinks, before, after, globals_ = rule
    if causal:  # what causal masking hides is not learned: nothing after the diagonal, no global rows
        after = globals_ = 0
    learned = learn_rule(layout, causal)
    assert learned.tolist() == [[sinks, before, after, globals_]]
    # Continued to 13 blocks, it is the same pattern again.
    wide = blocks_at(layout, learned, 13, 13)
    expected = _pattern(13, 13, sinks, before, after, globals_)
    assert np.array_equal(wide[0] & np.tril(np.ones((13, 13), bool)) if causal else wide[0],
                          expected & np.tril(np.ones((13, 13), bool)) if causal else expected)


@pytest.mark.parametrize("causal", [True, False])
def test_a_full_layout_continues_as_a_full_head(causal):
    m = 5
    allowed = np.tril(np.ones((m, m), np.uint8)) if causal else np.ones((m, m), np.uint8)
    layout = np.stack([allowed, allowed])
    rule = learn_rule(layout, causal)
    assert rule.tolist() == [[0, UNBOUNDED, 0 if causal else UNBOUNDED, 0]] * 2
    wide = blocks_at(layout, rule, 20, 20)
    if causal:
        assert wide[:, np.tril(np.ones((20, 20), bool))].all()
    else:
        assert wide.all()
    assert describe(rule[0]).startswith("every block")


def test_heads_learn_their_own_rules():
    m = 6
    causal = np.tril(np.ones((m, m), bool))
    streaming = (_pattern(m, m, 1, 1, 0, 0) & causal).astype(np.uint8)
    diagonal = np.eye(m, dtype=np.uint8)
    rule = learn_rule(np.stack([streaming, diagonal, causal.astype(np.uint8)]), causal=True)
    assert rule.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [0, UNBOUNDED, 0, 0]]
    assert describe(rule[0]) == "1 sink block, the diagonal and 1 block(s) before, 0 after it"
    assert describe(rule[1]) == "the diagonal block"


def test_a_layout_without_its_diagonal_gets_no_band():
    layout = np.zeros((1, 4, 4), np.uint8)
    layout[0, :, 0] = 1  # the sink column only
    assert learn_rule(layout, causal=True).tolist() == [[1, 0, 0, 0]]


def test_blocks_at_keeps_the_explicit_region_and_continues_outside():
    rng = np.random.default_rng(0)
    layout = (rng.random((2, 3, 3)) < 0.5).astype(np.uint8)
    rule = np.array([[1, 0, 0, 0], [0, 1, 0, 0]])
    out = blocks_at(layout, rule, 7, 6)
    assert np.array_equal(out[:, :3, :3], layout.astype(bool))
    for head in range(2):
        expected = _pattern(7, 6, *rule[head])
        outside = np.ones((7, 6), bool)
        outside[:3, :3] = False
        assert np.array_equal(out[head][outside], expected[outside])


def test_without_a_rule_every_block_outside_is_computed():
    layout = np.zeros((1, 2, 2), np.uint8)
    out = blocks_at(layout, None, 5, 4)
    assert not out[0, :2, :2].any()
    outside = np.ones((5, 4), bool)
    outside[:2, :2] = False
    assert out[0][outside].all()


@pytest.mark.parametrize("first", [0, 2, 5])
def test_blocks_at_an_offset_are_the_rows_of_the_absolute_grid(first):
    rng = np.random.default_rng(first)
    layout = (rng.random((1, 4, 4)) < 0.5).astype(np.uint8)
    rule = np.array([[1, 2, 0, 1]])
    whole = blocks_at(layout, rule, first + 3, 9)
    assert np.array_equal(blocks_at(layout, rule, 3, 9, first_query_block=first), whole[:, first:])


def test_rule_only_layouts_have_no_explicit_region():
    out = blocks_at(np.zeros((1, 0, 0), np.uint8), np.array([[2, 1, 0, 0]]), 6, 6)
    assert np.array_equal(out[0], _pattern(6, 6, 2, 1, 0, 0))


@pytest.mark.parametrize(
    "rule, message",
    [
        (np.array([[-1, 0, 0, 0]]), "head 0: sink_blocks = -1"),
        (np.array([[0, -2, 0, 0]]), "window_before = -2"),
        (np.array([[0, 0, 0, -3]]), "global_query_blocks = -3"),
        (np.array([[0, 0, 0]]), "shape [1, 4]"),
        (np.array([[0.5, 0, 0, 0]]), "integers"),
    ],
)
def test_rules_that_cannot_apply_are_refused(rule, message):
    with pytest.raises(OnnxpruneError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_rule(rule, heads=1)


def test_a_window_wider_than_any_input_is_fine():
    out = blocks_at(np.zeros((1, 0, 0), np.uint8), np.array([[0, 10_000, 0, 0]]), 4, 4)
    assert np.array_equal(out[0], np.tril(np.ones((4, 4), bool)))
