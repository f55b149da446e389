"""Static attention patterns: attention sinks, a local band around the diagonal, whole heads.

A pattern is one head's ``layout_rule`` row ``(sink_blocks, window_before, window_after,
global_query_blocks)`` (:mod:`onnxprune.layout_rule`). Drawn on a calibrated grid it is the
head's explicit layout; beyond the grid the op continues it as the same rule, so a pattern means
the same thing at every length. StreamingLLM (Xiao et al., 2023) is ``(sinks, window, 0, 0)`` on
every head; a full head is ``(0, -1, 0, 0)`` under causal masking and ``(0, -1, -1, 0)`` without.
Non-causal heads take the band on both sides and as many global query rows as sink columns
(a [CLS]-like first block both sees and is seen by every position).
"""

from __future__ import annotations

import numpy as np

from onnxprune.errors import OnnxpruneError
from onnxprune.layout_rule import UNBOUNDED, blocks_at


def full_rule(causal: bool) -> tuple[int, int, int, int]:
    return (0, UNBOUNDED, 0 if causal else UNBOUNDED, 0)


def band_rule(sinks: int, window: int, causal: bool) -> tuple[int, int, int, int]:
    """Sink columns and a band of ``window`` blocks before (and, non-causal, after) the diagonal."""
    if sinks < 0 or window < 0:
        raise OnnxpruneError(f"a pattern's sink and window must be 0 or more, got sink {sinks}, window {window}")
    return (sinks, window, 0, 0) if causal else (sinks, window, window, sinks)


def draw(rule: tuple[int, int, int, int], query_blocks: int, key_blocks: int, causal: bool) -> np.ndarray:
    """Bool ``[query_blocks, key_blocks]``: the blocks the rule computes that masking leaves."""
    mask = blocks_at(np.zeros((1, 0, 0), np.uint8), np.asarray([rule], np.int64), query_blocks, key_blocks)[0]
    if causal:
        mask &= np.tril(np.ones((query_blocks, key_blocks), bool))
    return mask


def blocks_for(tokens: int, block_size: int) -> int:
    """Tokens → whole blocks, rounded up (a negative count is refused)."""
    if tokens < 0:
        raise OnnxpruneError(f"a pattern's sink and window must be 0 or more tokens, got {tokens}")
    return -(-tokens // block_size)
