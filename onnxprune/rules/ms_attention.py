"""ONNX Runtime's fused ``com.microsoft.Attention`` (what its transformers optimizer makes of BERT).

    Attention(input [B, S, hidden], weights [hidden, 3·hidden], bias, [mask_index], -, [attention_bias])

Q, K and V are projected inside the op, so the site is decomposed (see ``_fused_attention``) into
the eager form before it is rewritten. Matched without a KV cache (``past``), rotary embedding or
``present`` output; ``mask_index`` 1-D ``[B]`` (right padding) or 2-D ``[B, S]``; ``unidirectional``
becomes a causal bias; ``attention_bias`` (relative position bias) is added to the scores.
"""

from __future__ import annotations

import math

from onnxprune.rules import _fused_attention as fused
from onnxprune.rules._common import SiteMatch, node_name
from onnxprune.rules._site_rule import SiteRule

MASK_INDEX, PAST, ATTENTION_BIAS = 3, 4, 5


class MsAttention(SiteRule):
    form = "com.microsoft.Attention"

    def __init__(self, name: str, layouts=None, with_present: bool = False):
        super().__init__(name, layouts)
        # A node with a ``present`` output is matched only to say why it is not a site.
        self.with_present = with_present

    def pattern(self, op, hidden, weights, bias):
        return op.Attention(
            hidden, weights, bias, _domain=fused.MS_DOMAIN, _allow_other_inputs=True, _allow_other_attributes=True,
            _outputs=["attention_out", "present"] if self.with_present else ["attention_out"],
        )

    def site(self, hidden, weights, bias, attention_out, **_):
        node = attention_out.producer()
        if any(fused.optional_input(node, i) is not None for i in range(PAST, len(node.inputs)) if i != ATTENTION_BIAS):
            return "Attention has a KV cache (past) input"
        if len(node.outputs) > 1:
            return "Attention has a present output (KV cache)"
        if fused.attribute(node, "do_rotary", 0):
            return "Attention applies rotary embeddings itself"
        heads = fused.attribute(node, "num_heads")
        sizes = fused.attribute(node, "qkv_hidden_sizes")
        if sizes is None:
            hidden_sizes = weights.shape[1] if weights.shape is not None and len(weights.shape) == 2 else None
            if not isinstance(hidden_sizes, int) or hidden_sizes % 3:
                return "the size of Q, K and V is unknown (weights shape unknown, no qkv_hidden_sizes)"
            sizes = [hidden_sizes // 3] * 3
        sizes = list(sizes)
        if not heads or any(s % heads for s in sizes) or sizes[0] != sizes[1]:
            return f"qkv_hidden_sizes {sizes} do not split into {heads} heads"
        mask = fused.optional_input(node, MASK_INDEX)
        if mask is not None:
            reason = fused.mask_reason(mask, hidden, "mask", "1-D end positions, 2-D [B, S]")
            if reason:
                return reason
        head_size = sizes[0] // heads
        scale = fused.attribute(node, "scale", 0.0) or 1.0 / math.sqrt(head_size)
        return SiteMatch(
            name=node_name(attention_out),
            form=self.form,
            q=hidden,
            k=None,
            k_transposed=None,
            v=hidden,
            scale=scale,
            mask=mask,
            is_causal=bool(fused.attribute(node, "unidirectional", 0)),
            heads=heads,
            head_dim=head_size,
            fused=True,
        )


class DecomposeMsAttention(fused.DecompositionCheck, MsAttention):
    """The rewrite: the op as MatMul/Split/Reshape/Transpose + the eager attention."""

    def rewrite(self, op, hidden, weights, bias, attention_out, **_):
        site = self._site
        node = attention_out.producer()
        sizes = list(fused.attribute(node, "qkv_hidden_sizes", None) or [site.heads * site.head_dim] * 3)
        qkv = op.Add(op.MatMul(hidden, weights), bias)
        q, k, v = op.Split(qkv, fused.int64s(op, sizes), axis=-1, _outputs=3)
        filter_value = fused.attribute(node, "mask_filter_value", fused.DEFAULT_MASK_FILTER)
        q = fused.split_heads(op, q, site.heads)
        k_transposed = fused.split_heads(op, k, site.heads, transpose_last=True)
        v = fused.split_heads(op, v, site.heads)
        biases = []
        if site.mask is not None:
            rank = fused.mask_rank(site.mask, hidden)
            biases.append(fused.key_padding_bias(op, site.mask, rank, hidden, filter_value))
        attention_bias = fused.optional_input(node, ATTENTION_BIAS)
        if attention_bias is not None:
            biases.append(attention_bias)
        if site.is_causal:
            length = fused.sequence_length(op, hidden)
            biases.append(fused.causal_bias(op, length, length, filter_value))
        y = fused.attention_core(op, q, k_transposed, v, site.scale, biases, site.name, self.form)
        return fused.merge_heads(op, y)
