"""The contract of ``onnxprune.BlockSparseAttention`` (docs/DESIGN.md): names, attributes, limits."""

from __future__ import annotations

DOMAIN = "onnxprune"
OP_TYPE = "BlockSparseAttention"
#: Version 2 added the optional ``layout_rule`` input and the ``queries_at_end`` attribute; a
#: version-1 node means the same as a version-2 node without them.
OPSET_VERSION = 2

INPUTS = ("Q", "K", "V", "layout", "attn_mask", "key_padding_mask", "layout_rule")
OUTPUTS = ("Y",)
ATTRIBUTES = ("block_size", "scale", "is_causal", "queries_at_end")

BLOCK_SIZES = (16, 32, 64, 128)

#: Columns of ``layout_rule`` (int64 ``[Hl, 4]``), one row per layout head. A block (qb, kb)
#: outside the layout's explicit ``[Mq, Mk]`` region is computed iff ``kb < sink_blocks``, or
#: ``qb - window_before <= kb <= qb + window_after`` (a window of -1 is unbounded on its side),
#: or ``qb < global_query_blocks``. Without the input every such block is computed.
LAYOUT_RULE_COLUMNS = ("sink_blocks", "window_before", "window_after", "global_query_blocks")

#: Prefix of the initializer that holds a site's layout in a pruned model.
LAYOUT_PREFIX = "onnxprune.layout."
#: Prefix of the initializer that holds a site's layout rule.
LAYOUT_RULE_PREFIX = "onnxprune.layout_rule."

#: Lowest default-domain opset whose operators the op's function body uses
#: (Shape with start/end, CastLike, LessOrEqual).
MIN_MODEL_OPSET = 16


def layout_name(site: str) -> str:
    return LAYOUT_PREFIX + site


def layout_rule_name(site: str) -> str:
    return LAYOUT_RULE_PREFIX + site

#: The op's internal statistics form, registered by the same library (CPU only) and used only in
#: calibration's in-memory model, never written to a file: BlockSparseAttention's inputs and
#: attributes, plus ``query_valid`` (bool or int64 ``[B, S]``, which queries count; ignored when
#: S differs from the site's Sq) and ``granularity``; outputs Y and the probabilities summed
#: over ``g × g`` cells of valid queries, float64 ``[B, Hq, ⌈Sq/g⌉, ⌈Sk/g⌉]``.
STATISTICS_OP_TYPE = "BlockSparseAttentionStatistics"
STATISTICS_INPUTS = INPUTS + ("query_valid",)
STATISTICS_OUTPUTS = ("Y", "pooled")
