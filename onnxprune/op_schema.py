"""The contract of ``onnxprune.BlockSparseAttention`` (docs/DESIGN.md): names, attributes, limits."""

from __future__ import annotations

DOMAIN = "onnxprune"
OP_TYPE = "BlockSparseAttention"
OPSET_VERSION = 1

INPUTS = ("Q", "K", "V", "layout", "attn_mask", "key_padding_mask")
OUTPUTS = ("Y",)
ATTRIBUTES = ("block_size", "scale", "is_causal")

BLOCK_SIZES = (16, 32, 64, 128)

#: Prefix of the initializer that holds a site's layout in a pruned model.
LAYOUT_PREFIX = "onnxprune.layout."

#: Lowest default-domain opset whose operators the op's function body uses
#: (Shape with start/end, CastLike, LessOrEqual).
MIN_MODEL_OPSET = 16


def layout_name(site: str) -> str:
    return LAYOUT_PREFIX + site
