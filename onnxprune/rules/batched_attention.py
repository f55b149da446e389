"""Attention computed on heads folded into the batch (BLOOM's ``baddbmm``/``bmm``), the scores
reshaped to ``[B, H, Sq, Sk]`` only around the Softmax:

    MatMul(Q₃ [B·H, Sq, D], Kᵀ₃ [B·H, D, Sk]) → [Mul | Div](scale) → [Add](bias₃, ALiBi)
        → Reshape(·, [B, H, Sq, Sk]) → [Add](mask) → [Add] → [Where](masked_fill) → [Cast] → Softmax(-1)
        → [Cast [→ Cast]] → Reshape(·, [B·H, Sq, Sk]) → MatMul(·, V₃ [B·H, Sk, Dv])

The rewrite unfolds Q, K, V and the 3-D bias to 4-D (the number of heads is the probabilities'
second axis), calls ``BlockSparseAttention`` like the eager form, and folds its output back.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxprune.rules._common import SiteMatch, emit_block_sparse_attention, node_name, scalar_constant, scale_factor
from onnxprune.rules._site_rule import SiteRule
from onnxprune.rules.eager_attention import (
    casts_are_float,
    float_casts,
    masked_softmax,
    optionally_scaled,
    softmax_axis_is_last,
)


def _rank_is(value: ir.Value, rank: int) -> bool:
    return value.shape is not None and len(value.shape) == rank


class BatchedAttention(SiteRule):
    form = "batched-heads"

    def pattern(self, op, q3, k3_transposed, qk_scale, bias3, shape4, mask, second_mask, fill_condition, fill_value,
                shape3, v3):
        scores = optionally_scaled(op, op.MatMul(q3, k3_transposed), qk_scale)
        scores = pattern.OrValue([op.Add(scores, bias3), scores], tag_var="has_bias3", tag_values=[True, False])
        scores = op.Reshape(scores, shape4, _allow_other_attributes=True)
        probs = masked_softmax(op, scores, mask, second_mask, fill_condition, fill_value)
        probs3 = op.Reshape(float_casts(op, probs), shape3, _allow_other_attributes=True)
        return op.MatMul(probs3, v3)

    def site(self, q3, k3_transposed, v3, probs, qk_scaling, has_bias3, additive_terms, filled, qk_scale=None,
             bias3=None, mask=None, second_mask=None, fill_condition=None, fill_value=None, cast_scores=None,
             cast_first=None, cast_second=None, **_):
        for name, value in (("Q", q3), ("Kᵀ", k3_transposed), ("V", v3)):
            if value.dtype is not None and value.dtype != ir.DataType.FLOAT:
                return f"{name} is {value.dtype.name}, the CPU kernel takes float32"
            if not _rank_is(value, 3):
                return f"{name} is not [B·H, S, D] (rank {len(value.shape) if value.shape else 'unknown'})"
        heads = probs.shape[1] if _rank_is(probs, 4) else None
        if not isinstance(heads, int):
            return "number of heads unknown (the probabilities' second axis)"
        if not softmax_axis_is_last(probs):
            return "Softmax is not over the last axis"
        if not casts_are_float(cast_scores, cast_first, cast_second):
            return "the scores or probabilities are cast to another type than float32"
        if filled and (scalar_constant(fill_value) is None or fill_condition.dtype not in (None, ir.DataType.BOOL)):
            return "masked_fill with a value that is not a constant"
        if has_bias3 and not (_rank_is(bias3, 3) and bias3.shape[0] != 1):
            return "the 3-D bias is not [B·H, ·, Sk]"
        scale = scale_factor(qk_scaling, qk_scale)
        if scale is None:
            return "scale is not a constant"
        head_size = q3.shape[2]
        return SiteMatch(
            name=node_name(probs),
            form=self.form,
            q=q3,
            k=None,
            k_transposed=k3_transposed,
            v=v3,
            scale=scale,
            mask=mask if additive_terms else None,
            mask_addends=([second_mask] if additive_terms == 2 else []) + ([bias3] if has_bias3 else []),
            fill_mask=(fill_condition, fill_value) if filled else None,
            probs=probs,
            heads=heads,
            head_dim=head_size if isinstance(head_size, int) else None,
        )

    def rewrite(self, op, bias3=None, **_):
        site = self._site
        heads = op.Constant(value=ir.tensor(np.array([-1, site.heads], np.int64)))

        def unfold(value):  # [B·H, a, b] → [B, H, a, b]
            return op.Reshape(value, op.Concat(heads, op.Shape(value, start=1), axis=0))

        addends = [unfold(a) if a is bias3 else a for a in site.mask_addends]
        unfolded = dataclasses.replace(
            site, q=unfold(site.q), k=None, k_transposed=unfold(site.k_transposed), v=unfold(site.v),
            mask_addends=addends,
        )
        if unfolded.mask is None and addends:  # the ALiBi bias alone
            unfolded = dataclasses.replace(unfolded, mask=addends[0], mask_addends=addends[1:])
        y = emit_block_sparse_attention(op, unfolded, self.layouts)
        minus_one = op.Constant(value=ir.tensor(np.array([-1], np.int64)))
        return op.Reshape(y, op.Concat(minus_one, op.Shape(y, start=2), axis=0))
