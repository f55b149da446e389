"""Eager attention as both torch exporters emit it (BERT, GPT-2, MiniLM, ...).

    MatMul(Q, Kᵀ) → [Mul | Div](scale) → [Add](mask) → [Add](bias) → [Where](masked_fill) → [Cast]
        → Softmax(-1) → [Cast [→ Cast]] → MatMul(·, V)

The optional pieces are ``OrValue`` alternatives: T5 has no scaling and adds its position bias
and mask one after the other, ViT has no mask, MPT adds ALiBi and then masks with
``masked_fill`` (a ``Where``), TorchScript exports cast around the Softmax.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxprune.rules._fused_attention import FORM_KEY
from onnxprune.rules._common import SiteMatch, check_qkv, node_name, scalar_constant, scale_factor
from onnxprune.rules._site_rule import SiteRule
from onnxprune.rules.kv_cache import cache_form


def float_casts(op, probs):
    """``probs`` through zero, one or two ``Cast`` nodes (TorchScript exports cast softmax's
    output to float32 and back to the value's type); ``casts_are_float`` checks they are no-ops."""
    once = op.Cast(probs, _allow_other_attributes=True, _outputs=["cast_first"])
    twice = op.Cast(op.Cast(probs, _allow_other_attributes=True, _outputs=["cast_first"]),
                    _allow_other_attributes=True, _outputs=["cast_second"])
    return pattern.OrValue([twice, once, probs], tag_var="casts", tag_values=[2, 1, 0])


def optionally_scaled(op, scores, qk_scale):
    """``scores`` times or over ``qk_scale``, or unscaled (T5); tag ``qk_scaling``."""
    return pattern.OrValue(
        [op.Mul(scores, qk_scale), op.Div(scores, qk_scale), scores],
        tag_var="qk_scaling",
        tag_values=["Mul", "Div", "None"],
    )


def masked_softmax(op, scores, mask, second_mask, fill_condition, fill_value):
    """[Add](mask) → [Add] → [Where](masked_fill) → [Cast] → Softmax, output named ``probs``;
    tags ``additive_terms``, ``filled`` and ``scores_cast``."""
    # T5 adds its position bias and the mask one after the other.
    scores = pattern.OrValue(
        [op.Add(op.Add(scores, mask), second_mask), op.Add(scores, mask), scores],
        tag_var="additive_terms",
        tag_values=[2, 1, 0],
    )
    # masked_fill (MPT, older DistilBERT): masked scores replaced by a constant.
    scores = pattern.OrValue(
        [op.Where(fill_condition, fill_value, scores), scores], tag_var="filled", tag_values=[True, False]
    )
    # TorchScript casts the scores to float32 before the Softmax (a no-op for float32 models).
    # (Every OrValue gets a tag: commute() cannot clone an untagged one.)
    scores = pattern.OrValue(
        [op.Cast(scores, _allow_other_attributes=True, _outputs=["cast_scores"]), scores],
        tag_var="scores_cast",
        tag_values=[True, False],
    )
    return op.Softmax(scores, _allow_other_attributes=True, _outputs=["probs"])


def casts_are_float(*casts) -> bool:
    for cast in casts:
        if cast is None:
            continue
        to = cast.producer().attributes.get("to")
        if to is None or to.as_int() != ir.DataType.FLOAT:
            return False
    return True


def softmax_axis_is_last(probs) -> bool:
    node = probs.producer()
    axis = node.attributes.get("axis")
    axis = -1 if axis is None else axis.as_int()
    rank = len(probs.shape) if probs.shape is not None else 4
    return axis in (-1, rank - 1)


class EagerAttention(SiteRule):
    form = "eager"

    def pattern(self, op, q, k_transposed, qk_scale, mask, second_mask, fill_condition, fill_value, v):
        scores = optionally_scaled(op, op.MatMul(q, k_transposed), qk_scale)
        probs = masked_softmax(op, scores, mask, second_mask, fill_condition, fill_value)
        return op.MatMul(float_casts(op, probs), v)

    def site(self, q, k_transposed, v, probs, qk_scaling, additive_terms, filled, qk_scale=None, mask=None,
             second_mask=None, fill_condition=None, fill_value=None, cast_scores=None, cast_first=None,
             cast_second=None, **_):
        checked = check_qkv(q, v)
        if not checked:
            return checked.reason
        if not softmax_axis_is_last(probs):
            return "Softmax is not over the last axis"
        if not casts_are_float(cast_scores):
            return "the scores are cast to another type than float32 before the Softmax"
        if filled and (scalar_constant(fill_value) is None or fill_condition.dtype not in (None, ir.DataType.BOOL)):
            return "masked_fill with a value that is not a constant"
        if not casts_are_float(cast_first, cast_second):
            return "the probabilities are cast to another type than float32 before the MatMul with V"
        scale = scale_factor(qk_scaling, qk_scale)
        if scale is None:
            return "scale is not a constant"
        return cache_form(SiteMatch(
            name=node_name(probs),
            # A site decomposed from a fused op keeps the fused op's form.
            form=probs.producer().metadata_props.get(FORM_KEY, self.form),
            q=q,
            k=None,
            k_transposed=k_transposed,
            v=v,
            scale=scale,
            mask=mask if additive_terms else None,
            mask_addends=[second_mask] if additive_terms == 2 else [],
            fill_mask=(fill_condition, fill_value) if filled else None,
            probs=probs,
        ))
