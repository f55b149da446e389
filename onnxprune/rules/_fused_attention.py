"""What the rules for ONNX Runtime's fused attention ops share.

A fused op (``com.microsoft.Attention``, ``com.microsoft.MultiHeadAttention``) has no Q, K and V
tensors for ``BlockSparseAttention`` to take, so a rule for one does two things: as a site rule it
describes the op for discovery (``SiteMatch`` with ``fused=True``), and as a decomposition it
rewrites the op into the standard-op eager form with the op's exact semantics:

    MatMul(Q, Kᵀ) → Mul(scale) → Add(mask) → Softmax → MatMul(·, V)

which ``EagerAttention`` then matches like any exported model. The Softmax takes the fused node's
name (so a site keeps its name from discovery through calibration to the rewrite) and records the
fused form in its metadata (``FORM_KEY``), which the eager rule reports as the site's form.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

#: Node metadata key: the form a decomposed site was found in.
FORM_KEY = "onnxprune.form"
#: Node metadata key: the name of the fused node a Softmax was decomposed from.
SITE_KEY = "onnxprune.site"
MS_DOMAIN = "com.microsoft"
#: ORT's default ``mask_filter_value``.
DEFAULT_MASK_FILTER = -10000.0


def optional_input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


class DecompositionCheck:
    """``check`` of a decomposition rule (mixed in before the op's site rule): every site of the
    op qualifies, with or without a layout, since the eager rule rewrites the decomposed site."""

    def check(self, context, **bindings) -> pattern.MatchResult:
        result = pattern.MatchResult()
        site = self.site(**bindings)
        if isinstance(site, str):
            return result.fail(site)
        self._site = site
        return result


def int64s(op, values) -> ir.Value:
    return op.Constant(value=ir.tensor(np.asarray(values, dtype=np.int64)))


def float_scalar(op, value: float) -> ir.Value:
    return op.Constant(value=ir.tensor(np.asarray(value, dtype=np.float32)))


def split_heads(op, x: ir.Value, heads: int, transpose_last: bool = False) -> ir.Value:
    """``[B, S, H·D]`` → ``[B, H, S, D]`` (``[B, H, D, S]`` with ``transpose_last``)."""
    shaped = op.Reshape(x, int64s(op, [0, 0, heads, -1]))
    return op.Transpose(shaped, perm=[0, 2, 3, 1] if transpose_last else [0, 2, 1, 3])


def merge_heads(op, y: ir.Value) -> ir.Value:
    """``[B, H, S, D]`` → ``[B, S, H·D]``."""
    return op.Reshape(op.Transpose(y, perm=[0, 2, 1, 3]), int64s(op, [0, 0, -1]))


def key_padding_bias(op, mask: ir.Value, rank: int, key_states: ir.Value, filter_value: float) -> ir.Value:
    """The additive ``[B, 1, 1, Sk]`` bias of an ORT key mask: 2-D ``[B, Sk]`` (0 = padding) or
    1-D ``[B]`` (valid keys end there: right padding). ``key_states`` is ``[B, Sk, ·]``."""
    zero, masked = float_scalar(op, 0.0), float_scalar(op, filter_value)
    if rank == 1:
        sk = op.Shape(key_states, start=1, end=2)
        positions = op.Range(int64s(op, 0), op.Squeeze(sk, int64s(op, [0])), int64s(op, 1))
        ends = op.Unsqueeze(op.Cast(mask, to=ir.DataType.INT64), int64s(op, [1]))
        valid = op.Less(op.Unsqueeze(positions, int64s(op, [0])), ends)
    else:
        valid = op.Cast(mask, to=ir.DataType.BOOL)
    return op.Unsqueeze(op.Where(valid, zero, masked), int64s(op, [1, 2]))


def causal_bias(op, sq: ir.Value, sk: ir.Value, filter_value: float) -> ir.Value:
    """``[Sq, Sk]`` (sizes as 1-element int64): 0 on and below the diagonal (top-left aligned),
    ``filter_value`` above."""
    ones = op.ConstantOfShape(op.Concat(sq, sk, axis=0), value=ir.tensor(np.ones([1], np.float32)))
    return op.Where(op.Cast(op.Trilu(ones, upper=0), to=ir.DataType.BOOL), float_scalar(op, 0.0),
                    float_scalar(op, filter_value))


def sequence_length(op, states: ir.Value) -> ir.Value:
    """``S`` of ``[B, S, ·]`` as a 1-element int64 tensor."""
    return op.Shape(states, start=1, end=2)


def attention_core(op, q, k_transposed, v, scale: float, biases: list[ir.Value], name: str, form: str) -> ir.Value:
    """The eager form, its Softmax named ``name`` and tagged with ``form``; returns ``[B, H, Sq, Dv]``."""
    scores = op.Mul(op.MatMul(q, k_transposed), float_scalar(op, scale))
    if biases:
        total = biases[0]
        for bias in biases[1:]:
            total = op.Add(total, bias)
        scores = op.Add(scores, total)
    probs = op.Softmax(scores, axis=-1)
    softmax = probs.producer()
    # The rewriter may name new nodes itself: the names are set again after it (``SITE_KEY``).
    softmax.metadata_props[SITE_KEY] = name
    softmax.metadata_props[FORM_KEY] = form
    return op.MatMul(probs, v)


def mask_rank(mask: ir.Value, states: ir.Value) -> int | None:
    """The rank of an ORT key mask, where its meaning is certain; ``states`` is ``[B, S, ·]``.

    A 1-D mask is either ``[B]`` end positions or ``[2B]`` end and start positions; only the
    first is handled, so a 1-D mask counts when its length is the batch (same number or symbol),
    it sums a 2-D mask over its rows, or it is ``EmbedLayerNormalization``'s ``mask_index``
    (``[B]`` by its schema; shape inference does not see through contrib ops).
    """
    producer = mask.producer()
    if (producer is not None and producer.domain == MS_DOMAIN and producer.op_type == "EmbedLayerNormalization"
            and mask.index() == 1):
        return 1
    if mask.shape is None:
        return None
    if len(mask.shape) == 1 and _is_row_sum(mask):
        return 1
    if len(mask.shape) == 1:
        batch = states.shape[0] if states.shape is not None and len(states.shape) >= 1 else None
        if batch is None or mask.shape[0] != batch or (not isinstance(batch, int) and batch.value is None):
            return None
    return len(mask.shape)


def _is_row_sum(value: ir.Value) -> bool:
    """``ReduceSum(m [B, S], axes=[1], keepdims=0)``, through Casts: one count per batch row (the
    optimizer's ``mask_index`` for right-padded inputs)."""
    producer = value.producer()
    while producer is not None and producer.op_type == "Cast":
        producer = producer.inputs[0].producer()
    if producer is None or producer.op_type != "ReduceSum" or len(producer.inputs) < 2:
        return False
    axes = producer.inputs[1].const_value
    source = producer.inputs[0]
    return (axes is not None and list(axes.numpy().ravel()) in ([1], [-1]) and source.shape is not None
            and len(source.shape) == 2)


def mask_reason(mask: ir.Value, states: ir.Value, label: str, handled: str) -> str | None:
    """Why an ORT key mask is not one the decomposition reproduces exactly, else None."""
    rank = mask_rank(mask, states)
    if rank in (1, 2):
        return None
    if rank is None and mask.shape is not None and len(mask.shape) == 1:
        return f"1-D {label} whose length is not the batch (end and start positions?)"
    return f"{label} shape {'unknown' if rank is None else f'rank {rank}'} (handled: {handled})"


def attribute(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value
