"""The standard ONNX ``Attention`` op (opset 23), as the dynamo exporter emits it for SDPA.

Matched when Q, K, V are 4-D (``[B, H, S, D]``), there is no KV cache input, no soft-capping, and
only the main output is used. Its ``is_causal`` is top-left aligned like the op's. K and V
concatenated from a cache input before the op (the dynamo exporter's SDPA at opset 23) are the
cache form (``kv_cache.py``).
"""

from __future__ import annotations

from onnxprune.rules._common import SiteMatch, check_qkv, default_scale, node_name
from onnxprune.rules._site_rule import SiteRule
from onnxprune.rules.kv_cache import cache_form


class OnnxAttention(SiteRule):
    form = "onnx-attention"

    def __init__(self, name: str, has_mask: bool, layouts=None):
        super().__init__(name, layouts)
        self.has_mask = has_mask

    def pattern(self, op, q, k, v, mask):
        inputs = [q, k, v, mask] if self.has_mask else [q, k, v]
        return op.Attention(*inputs, _allow_other_attributes=True, _outputs=["attention_out"])

    def site(self, q, k, v, attention_out, mask=None, **_):
        checked = check_qkv(q, v)
        if not checked:
            return checked.reason
        node = attention_out.producer()
        attrs = node.attributes
        if attrs.get("softcap") is not None and attrs["softcap"].as_float() != 0.0:
            return "Attention uses softcap"
        if k.shape is None or len(k.shape) != 4:
            return "K is not 4-D"
        scale = attrs["scale"].as_float() if attrs.get("scale") is not None else default_scale(q.shape[3])
        if scale is None:
            return "head size unknown and no scale attribute"
        is_causal = attrs.get("is_causal") is not None and attrs["is_causal"].as_int() != 0
        return cache_form(SiteMatch(
            name=node_name(attention_out),
            form=self.form,
            q=q,
            k=k,
            k_transposed=None,
            v=v,
            scale=scale,
            mask=mask if self.has_mask else None,
            is_causal=is_causal,
        ))
