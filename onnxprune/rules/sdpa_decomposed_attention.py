"""Scaled-dot-product attention as the exporters decompose ``F.scaled_dot_product_attention``.

    MatMul([Mul|Div](Q, √s), [Mul|Div](Kᵀ, √s)) → [Add](mask) → Softmax(-1)
        → Where(IsNaN(·), 0, ·) → MatMul(·, V)

The scale is split over Q and Kᵀ (their product is the site's scale; a scale of 1, as OPT passes
after scaling Q in its projection, leaves no Mul); the ``IsNaN``/``Where``
pair turns fully masked rows into zeros, which is the op's own semantics.
"""

from __future__ import annotations

from onnxscript.rewriter import pattern

from onnxprune.rules._common import SiteMatch, check_qkv, node_name, scalar_constant, scale_factor
from onnxprune.rules._site_rule import SiteRule
from onnxprune.rules.kv_cache import cache_form
from onnxprune.rules.eager_attention import softmax_axis_is_last


class SdpaDecomposedAttention(SiteRule):
    form = "sdpa-decomposed"

    def pattern(self, op, q, k_transposed, q_scale, k_scale, mask, zero, v):
        q_scaled = pattern.OrValue(
            [op.Mul(q, q_scale), op.Div(q, q_scale), q], tag_var="q_scaling", tag_values=["Mul", "Div", "None"]
        )
        k_scaled = pattern.OrValue(
            [op.Mul(k_transposed, k_scale), op.Div(k_transposed, k_scale), k_transposed],
            tag_var="k_scaling",
            tag_values=["Mul", "Div", "None"],
        )
        scores = op.MatMul(q_scaled, k_scaled)
        scores = pattern.OrValue([op.Add(scores, mask), scores], tag_var="has_mask", tag_values=[True, False])
        probs = op.Softmax(scores, _allow_other_attributes=True, _outputs=["probs"])
        cleaned = op.Where(op.IsNaN(probs), zero, probs)
        return op.MatMul(cleaned, v)

    def site(self, q, k_transposed, v, probs, q_scaling, k_scaling, zero, has_mask, q_scale=None, k_scale=None,
             mask=None, **_):
        checked = check_qkv(q, v)
        if not checked:
            return checked.reason
        if not softmax_axis_is_last(probs):
            return "Softmax is not over the last axis"
        if scalar_constant(zero) != 0:
            return "the value replacing NaN probabilities is not 0"
        sq, sk = scale_factor(q_scaling, q_scale), scale_factor(k_scaling, k_scale)
        if sq is None or sk is None:
            return "scale is not a constant"
        return cache_form(SiteMatch(
            name=node_name(probs),
            form=self.form,
            q=q,
            k=None,
            k_transposed=k_transposed,
            v=v,
            scale=sq * sk,
            mask=mask if has_mask else None,
            probs=probs,
        ))
