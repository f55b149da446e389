"""What every attention-site rule shares: the description of a matched site and its rewrite."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern

from onnxprune import op_schema
from onnxprune.layouts import Layouts


@dataclasses.dataclass
class SiteMatch:
    """One attention site as a rule found it in the graph.

    ``k`` is ``[B, Hkv, Sk, D]``; when the graph only has Kᵀ (``[B, H, D, Sk]``), ``k`` is None and
    ``k_transposed`` holds it. ``probs`` is the post-softmax value when the graph has one.
    """

    name: str
    form: str
    q: ir.Value
    k: ir.Value | None
    k_transposed: ir.Value | None
    v: ir.Value
    scale: float
    mask: ir.Value | None = None
    is_causal: bool = False
    probs: ir.Value | None = None
    #: More terms added to the scores after ``mask`` (T5: position bias, then the mask); the
    #: rewrite adds them into one ``attn_mask``.
    mask_addends: list[ir.Value] = dataclasses.field(default_factory=list)
    #: ``(condition, value)`` of a ``masked_fill`` before the Softmax (MPT): where the condition
    #: holds the score becomes ``value``. The rewrite adds ``Where(condition, value, 0)`` to the
    #: mask: the same probabilities wherever a row keeps a key (a masked key gets exp(value + s)
    #: ≈ 0 either way). A row masked entirely is uniform in the model and stays uniform only when
    #: ``value`` swamps the scores (finfo.min, as MPT and DistilBERT use).
    fill_mask: tuple[ir.Value, ir.Value] | None = None
    #: Heads and head size when Q is not ``[B, H, S, D]`` (fused ops: read from attributes).
    heads: int | None = None
    head_dim: int | None = None
    #: A fused ONNX Runtime op (``q``/``k``/``v`` are its packed inputs): ``decompose_fused_attention``
    #: turns it into the eager form before calibration and the rewrite.
    fused: bool = False
    #: The queries are the last ``Sq`` of the ``Sk`` key positions (a KV cache: ``rules/kv_cache.py``).
    queries_at_end: bool = False

    @property
    def num_heads(self) -> int | None:
        if self.heads is not None:
            return self.heads
        dim = self.q.shape[1] if self.q.shape is not None and len(self.q.shape) == 4 else None
        return dim if isinstance(dim, int) else None

    @property
    def head_size(self) -> int | None:
        if self.head_dim is not None:
            return self.head_dim
        dim = self.q.shape[3] if self.q.shape is not None and len(self.q.shape) == 4 else None
        return dim if isinstance(dim, int) else None

    @property
    def mask_kind(self) -> str | None:
        if self.mask is None:
            return "float" if self.fill_mask is not None else None
        if self.fused:  # ORT's key mask: 1-D end positions or 2-D 0/1 per key
            return "key-padding"
        return "bool" if self.mask.dtype == ir.DataType.BOOL else "float"


def scalar_constant(value: ir.Value | None) -> float | None:
    """The number a constant single-element tensor holds, else None."""
    return _ir_utils.get_singleton_value(value)


def scale_factor(kind: str, value: ir.Value | None) -> float | None:
    """The factor a ``Mul``/``Div`` by a constant applies; 1 for no op; None if not constant."""
    if kind == "None":
        return 1.0
    number = scalar_constant(value)
    if number is None or number == 0:
        return None
    return float(number) if kind == "Mul" else 1.0 / float(number)


def rank_of(value: ir.Value) -> int | None:
    """The rank of ``value``: from its shape, or, where shape inference stopped (after a contrib
    op), from the ``Transpose`` that made it (its ``perm`` has one entry per axis)."""
    if value.shape is not None:
        return len(value.shape)
    producer = value.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.domain in ("", "ai.onnx"):
        perm = producer.attributes.get("perm")
        if perm is not None:
            return len(perm.as_ints())
    return None


def check_qkv(q: ir.Value, v: ir.Value) -> pattern.MatchResult:
    """The kernel's requirements on Q and V: float32, rank 4."""
    result = pattern.MatchResult()
    for name, value in (("Q", q), ("V", v)):
        if value.dtype is not None and value.dtype != ir.DataType.FLOAT:
            return result.fail(f"{name} is {value.dtype.name}, the CPU kernel takes float32", value)
        rank = rank_of(value)
        if rank is None:
            return result.fail(f"shape of {name} unknown", value)
        if rank != 4:
            return result.fail(f"{name} has rank {rank}, not 4 ([B, H, S, D])", value)
    return result


def node_name(value: ir.Value) -> str:
    producer = value.producer()
    assert producer is not None and producer.name, "sites are named after their nodes"
    return producer.name


def transposed_key(value: ir.Value) -> ir.Value | None:
    """K when ``value`` is ``Transpose(K, perm=[0, 1, 3, 2])``: no second transpose needed."""
    producer = value.producer()
    if producer is None or producer.op_type != "Transpose" or producer.domain not in ("", "ai.onnx"):
        return None
    perm = producer.attributes.get("perm")
    if perm is None or list(perm.as_ints()) != [0, 1, 3, 2]:
        return None
    return producer.inputs[0]


def _int_or_symbol(dim):
    return dim if isinstance(dim, int) else getattr(dim, "value", None)


def same_dim(a, b) -> bool:
    """Whether two known axis sizes are equal: the same number, or the same symbol. A symbolic
    sum matches its terms in any order: shape inference writes ``past_sequence + sequence`` for
    one tensor and ``sequence + past_sequence`` for another of the same size."""
    a, b = _int_or_symbol(a), _int_or_symbol(b)
    if a is None or b is None:
        return False
    if isinstance(a, str) and isinstance(b, str):
        return sorted(t.strip() for t in a.split("+")) == sorted(t.strip() for t in b.split("+"))
    return a == b


def grouped_source(value: ir.Value) -> ir.Value:
    """The ``[B, Hkv, S, D]`` tensor behind ``repeat_kv`` (Llama, Qwen, ...), else ``value``.

    ``Reshape(Expand(Unsqueeze(x, 2), [B, Hkv, G, S, D]), [B, Hkv·G, S, D])`` gives query head
    ``h`` the KV head ``h // G``, which is how the op reads grouped heads: it can take ``x`` itself.
    """
    reshape = value.producer()
    if reshape is None or reshape.op_type != "Reshape" or reshape.domain not in ("", "ai.onnx"):
        return value
    expand = reshape.inputs[0].producer()
    if expand is None or expand.op_type != "Expand" or expand.domain not in ("", "ai.onnx"):
        return value
    unsqueeze = expand.inputs[0].producer()
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or len(unsqueeze.inputs) < 2:
        return value
    axes = _ir_utils.get_numpy_value(unsqueeze.inputs[1])
    source, expanded = unsqueeze.inputs[0], expand.outputs[0]
    if axes is None or list(np.ravel(axes)) != [2] or source.shape is None or expanded.shape is None:
        return value
    if len(source.shape) != 4 or len(expanded.shape) != 5 or value.shape is None or len(value.shape) != 4:
        return value
    # Every axis but the new one is the source's, and the result merges exactly (Hkv, G).
    same = [same_dim(source.shape[i], expanded.shape[j]) for i, j in ((1, 1), (2, 3), (3, 4))]
    hkv, group, merged = (_int_or_symbol(d) for d in (expanded.shape[1], expanded.shape[2], value.shape[1]))
    if not all(same) or not all(isinstance(d, int) for d in (hkv, group, merged)) or hkv * group != merged:
        return value
    if not same_dim(value.shape[3], source.shape[3]):
        return value
    return source


def emit_block_sparse_attention(op, site: SiteMatch, layouts: Layouts) -> ir.Value:
    """Build the replacement: one ``onnxprune.BlockSparseAttention`` carrying the site's layout
    (and the rule that continues it beyond its explicit region, where the layouts have one)."""
    entry = layouts.sites[site.name]
    layout = np.ascontiguousarray(entry.layout, dtype=np.uint8)
    layout_value = op.initializer(ir.tensor(layout, name=op_schema.layout_name(site.name)))
    k = site.k
    if k is None:
        k = transposed_key(site.k_transposed)
    if k is None:
        k = op.Transpose(site.k_transposed, perm=[0, 1, 3, 2])
    # Grouped-query attention: the op reads the Hkv heads themselves, not their repeats.
    v = site.v
    k_source, v_source = grouped_source(k), grouped_source(v)
    if k_source is not k and v_source is not v and k_source.shape[1] == v_source.shape[1]:
        k, v = k_source, v_source
    inputs = [site.q, k, v, layout_value]
    terms = ([site.mask] if site.mask is not None else []) + list(site.mask_addends)
    if site.fill_mask is not None:
        condition, value = site.fill_mask
        zero = op.Constant(value=ir.tensor(np.array(0.0, np.float32)))
        terms.append(op.Where(condition, value, zero))
    if terms:
        mask = terms[0]
        for term in terms[1:]:
            mask = op.Add(mask, term)
        inputs.append(mask)
    if entry.rule is not None:
        inputs += [None] * (6 - len(inputs))  # attn_mask and key_padding_mask may be absent
        inputs.append(op.initializer(ir.tensor(np.ascontiguousarray(entry.rule, dtype=np.int64),
                                               name=op_schema.layout_rule_name(site.name))))
    return op.BlockSparseAttention(
        *inputs,
        block_size=layouts.block_size,
        scale=float(site.scale),
        is_causal=int(site.is_causal),
        # Always explicit: onnx.reference does not apply a function's attribute defaults.
        queries_at_end=int(site.queries_at_end),
        _domain=op_schema.DOMAIN,
    )


def default_scale(head_size: int | None) -> float | None:
    return None if head_size is None else 1.0 / math.sqrt(head_size)
