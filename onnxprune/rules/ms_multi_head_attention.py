"""ONNX Runtime's fused ``com.microsoft.MultiHeadAttention`` (its optimizer's form for encoder-
decoder models and cross-attention).

    MultiHeadAttention(query [B, Sq, hidden], key, value, [bias], [key_padding_mask], [attention_bias])

K and V are ``[B, Sk, hidden]`` or already ``[B, H, Sk, D]``. Decomposed like
``com.microsoft.Attention`` (see ``_fused_attention``); matched without a KV cache, packed QKV or
extra outputs.
"""

from __future__ import annotations

import math

from onnxprune.rules import _fused_attention as fused
from onnxprune.rules._common import SiteMatch, node_name
from onnxprune.rules._site_rule import SiteRule

BIAS, KEY_PADDING_MASK, ATTENTION_BIAS, PAST_KEY = 3, 4, 5, 6


def _rank(value) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


class MsMultiHeadAttention(SiteRule):
    form = "com.microsoft.MultiHeadAttention"

    def __init__(self, name: str, layouts=None, with_present: bool = False):
        super().__init__(name, layouts)
        # A node with ``present_key``/``present_value`` outputs is matched only to say why it is not a site.
        self.with_present = with_present

    def pattern(self, op, query, key, value):
        return op.MultiHeadAttention(
            query, key, value, _domain=fused.MS_DOMAIN, _allow_other_inputs=True, _allow_other_attributes=True,
            _outputs=["attention_out", "present_key", "present_value"] if self.with_present else ["attention_out"],
        )

    def site(self, query, key, value, attention_out, **_):
        node = attention_out.producer()
        if any(fused.optional_input(node, i) is not None for i in range(PAST_KEY, len(node.inputs))):
            return "MultiHeadAttention has a KV cache (past) input"
        if len(node.outputs) > 1:
            return "MultiHeadAttention has present outputs (KV cache)"
        if _rank(query) != 3:
            return "query is not [B, S, hidden] (packed QKV or shape unknown)"
        if _rank(key) not in (3, 4) or _rank(value) != _rank(key):
            return "key/value are neither [B, S, hidden] nor [B, H, S, D] (packed KV or shape unknown)"
        heads = fused.attribute(node, "num_heads")
        hidden = query.shape[2]
        if not heads or not isinstance(hidden, int) or hidden % heads:
            return f"hidden size {hidden} does not split into {heads} heads"
        mask = fused.optional_input(node, KEY_PADDING_MASK)
        if mask is not None:
            reason = fused.mask_reason(mask, query, "key_padding_mask", "1-D end positions, 2-D [B, Sk]")
            if reason:
                return reason
        head_size = hidden // heads
        return SiteMatch(
            name=node_name(attention_out),
            form=self.form,
            q=query,
            k=key,
            k_transposed=None,
            v=value,
            scale=fused.attribute(node, "scale", 0.0) or 1.0 / math.sqrt(head_size),
            mask=mask,
            is_causal=bool(fused.attribute(node, "unidirectional", 0)),
            heads=heads,
            head_dim=head_size,
            fused=True,
        )


class DecomposeMsMultiHeadAttention(fused.DecompositionCheck, MsMultiHeadAttention):
    """The rewrite: the op as Reshape/Transpose + the eager attention."""

    def rewrite(self, op, query, key, value, attention_out, **_):
        site = self._site
        node = attention_out.producer()
        filter_value = fused.attribute(node, "mask_filter_value", fused.DEFAULT_MASK_FILTER)
        projected = _rank(key) == 3  # [B, Sk, hidden]; else already [B, H, Sk, D]
        mask_rank = None if site.mask is None else fused.mask_rank(site.mask, query)  # before query changes
        bias = fused.optional_input(node, BIAS)
        if bias is not None:
            hidden = site.heads * site.head_dim
            q_bias, k_bias, v_bias = op.Split(bias, fused.int64s(op, [hidden] * 3),
                                              axis=0, _outputs=3)
            query = op.Add(query, q_bias)
            if projected:
                key, value = op.Add(key, k_bias), op.Add(value, v_bias)
        q = fused.split_heads(op, query, site.heads)
        if projected:
            k_transposed = fused.split_heads(op, key, site.heads, transpose_last=True)
            v = fused.split_heads(op, value, site.heads)
            key_length = fused.sequence_length(op, key)
        else:  # [B, H, Sk, D]
            k_transposed = op.Transpose(key, perm=[0, 1, 3, 2])
            v = value
            key_length = op.Shape(key, start=2, end=3)
        biases = []
        if site.mask is not None:
            key_states = key if projected else op.Transpose(key, perm=[0, 2, 1, 3])
            biases.append(fused.key_padding_bias(op, site.mask, mask_rank, key_states, filter_value))
        attention_bias = fused.optional_input(node, ATTENTION_BIAS)
        if attention_bias is not None:
            biases.append(attention_bias)
        if site.is_causal:
            biases.append(fused.causal_bias(op, fused.sequence_length(op, query), key_length, filter_value))
        y = fused.attention_core(op, q, k_transposed, v, site.scale, biases, site.name, self.form)
        return fused.merge_heads(op, y)
