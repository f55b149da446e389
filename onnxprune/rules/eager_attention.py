"""Eager attention as both torch exporters emit it (BERT, GPT-2, MiniLM, ...).

    MatMul(Q, Kᵀ) → [Mul | Div](scale) → [Add](mask) → Softmax(-1) → [Cast] → MatMul(·, V)

The optional pieces are ``OrValue`` alternatives: T5 has no scaling, ViT no mask, GPT-2's
TorchScript export casts the probabilities back to the value's type.
"""

from __future__ import annotations

from onnxscript.rewriter import pattern

from onnxprune.rules._common import SiteMatch, check_qkv, node_name, scale_factor
from onnxprune.rules._site_rule import SiteRule


def softmax_axis_is_last(probs) -> bool:
    node = probs.producer()
    axis = node.attributes.get("axis")
    axis = -1 if axis is None else axis.as_int()
    rank = len(probs.shape) if probs.shape is not None else 4
    return axis in (-1, rank - 1)


class EagerAttention(SiteRule):
    form = "eager"

    def pattern(self, op, q, k_transposed, qk_scale, mask, v):
        scores = op.MatMul(q, k_transposed)
        scores = pattern.OrValue(
            [op.Mul(scores, qk_scale), op.Div(scores, qk_scale), scores],
            tag_var="qk_scaling",
            tag_values=["Mul", "Div", "None"],
        )
        scores = pattern.OrValue([op.Add(scores, mask), scores], tag_var="has_mask", tag_values=[True, False])
        probs = op.Softmax(scores, _allow_other_attributes=True, _outputs=["probs"])
        probs = pattern.OrValue([op.Cast(probs, _allow_other_attributes=True), probs])
        return op.MatMul(probs, v)

    def site(self, q, k_transposed, v, probs, qk_scaling, has_mask, qk_scale=None, mask=None, **_):
        checked = check_qkv(q, v)
        if not checked:
            return checked.reason
        if not softmax_axis_is_last(probs):
            return "Softmax is not over the last axis"
        scale = scale_factor(qk_scaling, qk_scale)
        if scale is None:
            return "scale is not a constant"
        return SiteMatch(
            name=node_name(probs),
            form=self.form,
            q=q,
            k=None,
            k_transposed=k_transposed,
            v=v,
            scale=scale,
            mask=mask if has_mask else None,
            probs=probs,
        )
