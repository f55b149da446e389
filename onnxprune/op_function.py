"""The ONNX function body of ``onnxprune.BlockSparseAttention`` (op version 2).

A pruned model carries this body as a model-local function, so it runs in any ONNX runtime that
lacks onnxprune's library (plain ONNX Runtime, ``onnx.reference``) with the op's exact semantics,
at dense speed: the layout (and beyond its explicit region, the layout rule, or every block
without one) is expanded to an element mask for the actual lengths and applied before the
softmax. Layout rows, the rule and causal masking use the queries' absolute positions, which
start at ``Sk - Sq`` when ``queries_at_end`` is 1.

Optional inputs cannot be tested for presence inside a function body portably, so the body is
specialised to how the model's nodes call the op (``MaskUse``): which optional inputs they pass
and the element type of ``attn_mask``. A model's nodes must all use the same form (the rewrite
normalises them). The attributes are referenced (``ref_attr_name``), so one body serves every
node; every node carries ``block_size``, ``scale`` and ``is_causal`` explicitly, and
``queries_at_end`` defaults to 0 (a default the function declares). The body does not check the
rule's values (a runtime cannot raise from a function body); the kernel does.
"""

from __future__ import annotations

import dataclasses

import onnx
from onnx import TensorProto, helper

from onnxprune import op_schema


@dataclasses.dataclass(frozen=True)
class MaskUse:
    """Which optional inputs the op's nodes in one model pass."""

    attn_mask: str | None = None  # None, "bool" or "float"
    key_padding_mask: bool = False
    layout_rule: bool = False

    def __post_init__(self):
        if self.attn_mask not in (None, "bool", "float"):
            raise ValueError(f"attn_mask must be None, 'bool' or 'float', not {self.attn_mask!r}")


def _ref_attr_constant(out: str, attr: str, attr_type: int) -> onnx.NodeProto:
    field = {onnx.AttributeProto.INT: "value_int", onnx.AttributeProto.FLOAT: "value_float"}[attr_type]
    node = helper.make_node("Constant", [], [out])
    ref = node.attribute.add()
    ref.name, ref.type, ref.ref_attr_name = field, attr_type, attr
    return node


def _rule_nodes() -> list[onnx.NodeProto]:
    """``continued`` [Hl, Sq, Sk]: whether each head's layout_rule keeps each element's block
    (from ``qb_col`` [Sq, 1] and ``kb`` [Sk])."""
    n = helper.make_node
    nodes = [helper.make_node("Constant", [], ["axes_1_2r"], value=helper.make_tensor("a", TensorProto.INT64, [2], [1, 2]))]
    for index, column in enumerate(op_schema.LAYOUT_RULE_COLUMNS):
        nodes += [
            helper.make_node("Constant", [], [f"{column}_index"], value=helper.make_tensor("i", TensorProto.INT64, [], [index])),
            n("Gather", ["layout_rule", f"{column}_index"], [f"{column}_h"], axis=1),  # [Hl]
            n("Unsqueeze", [f"{column}_h", "axes_1_2r"], [column]),  # [Hl, 1, 1]
        ]
    nodes += [
        helper.make_node("Constant", [], ["unbounded"], value=helper.make_tensor("u", TensorProto.INT64, [], [-1])),
        n("Sub", ["qb_col", "kb"], ["blocks_before"]),  # [Sq, Sk]: qb - kb
        n("Neg", ["blocks_before"], ["blocks_after"]),
        n("LessOrEqual", ["blocks_before", "window_before"], ["before_in"]),
        n("Equal", ["window_before", "unbounded"], ["before_open"]),
        n("Or", ["before_in", "before_open"], ["before_ok"]),
        n("LessOrEqual", ["blocks_after", "window_after"], ["after_in"]),
        n("Equal", ["window_after", "unbounded"], ["after_open"]),
        n("Or", ["after_in", "after_open"], ["after_ok"]),
        n("And", ["before_ok", "after_ok"], ["in_window"]),
        n("Less", ["kb", "sink_blocks"], ["in_sink"]),  # [Hl, 1, Sk]
        n("Less", ["qb_col", "global_query_blocks"], ["in_global"]),  # [Hl, Sq, 1]
        n("Or", ["in_sink", "in_window"], ["sink_or_window"]),
        n("Or", ["sink_or_window", "in_global"], ["continued"]),
    ]
    return nodes


def build_function(mask_use: MaskUse, opset: int) -> onnx.FunctionProto:
    """The function body for nodes that pass the optional inputs described by ``mask_use``."""
    if opset < op_schema.MIN_MODEL_OPSET:
        raise ValueError(f"the function body needs opset >= {op_schema.MIN_MODEL_OPSET}, got {opset}")
    n = helper.make_node
    i64 = lambda name, vals: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(vals)], vals)
    )
    nodes = [
        # Sizes, each a 1-element int64 tensor.
        n("Shape", ["Q"], ["B"], start=0, end=1),
        n("Shape", ["Q"], ["Hq"], start=1, end=2),
        n("Shape", ["Q"], ["Sq"], start=2, end=3),
        n("Shape", ["Q"], ["D"], start=3, end=4),
        n("Shape", ["K"], ["Hkv"], start=1, end=2),
        n("Shape", ["K"], ["Sk"], start=2, end=3),
        n("Shape", ["V"], ["Dv"], start=3, end=4),
        n("Shape", ["layout"], ["Hl"], start=0, end=1),
        n("Shape", ["layout"], ["Mq"], start=1, end=2),
        n("Shape", ["layout"], ["Mk"], start=2, end=3),
        n("Div", ["Hq", "Hkv"], ["G"]),
        # Grouped heads: query head h reads KV head h // G. Q as [B, Hkv, G, Sq, D], K and V
        # as [B, Hkv, 1, Sk, *], so MatMul broadcasts each KV head over its group.
        n("Concat", ["B", "Hkv", "G", "Sq", "D"], ["q5_shape"], axis=0),
        n("Reshape", ["Q", "q5_shape"], ["Q5"]),
        i64("axis2", [2]),
        n("Unsqueeze", ["K", "axis2"], ["K5"]),
        n("Unsqueeze", ["V", "axis2"], ["V5"]),
        n("Transpose", ["K5"], ["K5t"], perm=[0, 1, 2, 4, 3]),
        n("MatMul", ["Q5", "K5t"], ["qk5"]),
        n("Concat", ["B", "Hq", "Sq", "Sk"], ["scores_shape"], axis=0),
        n("Reshape", ["qk5", "scores_shape"], ["qk"]),
        _ref_attr_constant("scale_f", "scale", onnx.AttributeProto.FLOAT),
        n("CastLike", ["scale_f", "Q"], ["scale_t"]),
        n("Mul", ["qk", "scale_t"], ["scaled"]),
        # Absolute positions: query i is at i + off, off = (Sk - Sq) * queries_at_end.
        helper.make_node("Constant", [], ["zero_s"], value=helper.make_tensor("z", TensorProto.INT64, [], [0])),
        helper.make_node("Constant", [], ["one_s"], value=helper.make_tensor("o", TensorProto.INT64, [], [1])),
        i64("axis0", [0]),
        i64("axis1", [1]),
        n("Squeeze", ["Sq", "axis0"], ["Sq_s"]),
        n("Squeeze", ["Sk", "axis0"], ["Sk_s"]),
        _ref_attr_constant("at_end", "queries_at_end", onnx.AttributeProto.INT),
        n("Sub", ["Sk_s", "Sq_s"], ["past"]),
        n("Mul", ["past", "at_end"], ["q_offset"]),
        n("Range", ["zero_s", "Sq_s", "one_s"], ["q_local"]),
        n("Add", ["q_local", "q_offset"], ["q_pos"]),  # [Sq]
        n("Range", ["zero_s", "Sk_s", "one_s"], ["k_pos"]),  # [Sk]
        n("Unsqueeze", ["q_pos", "axis1"], ["q_col"]),  # [Sq, 1]
        # Block indices of every position; the layout's own block where it has one: the layout
        # padded with one empty block row and column, indexed with the block clipped to it.
        _ref_attr_constant("bs_s", "block_size", onnx.AttributeProto.INT),
        n("Div", ["q_pos", "bs_s"], ["qb"]),  # [Sq]
        n("Div", ["k_pos", "bs_s"], ["kb"]),  # [Sk]
        n("Unsqueeze", ["qb", "axis1"], ["qb_col"]),  # [Sq, 1]
        n("Squeeze", ["Mq", "axis0"], ["Mq_s"]),
        n("Squeeze", ["Mk", "axis0"], ["Mk_s"]),
        i64("pad_last_two", [0, 0, 0, 0, 1, 1]),
        n("Pad", ["layout", "pad_last_two"], ["layout_pad"]),  # [Hl, Mq + 1, Mk + 1], zeros added
        n("Min", ["qb", "Mq_s"], ["q_row"]),
        n("Min", ["kb", "Mk_s"], ["k_col"]),
        n("Gather", ["layout_pad", "q_row"], ["layout_rows"], axis=1),  # [Hl, Sq, Mk + 1]
        n("Gather", ["layout_rows", "k_col"], ["layout_el"], axis=2),  # [Hl, Sq, Sk]
        n("Cast", ["layout_el"], ["explicit"], to=TensorProto.BOOL),
        n("GreaterOrEqual", ["qb_col", "Mq_s"], ["q_beyond"]),  # [Sq, 1]
        n("GreaterOrEqual", ["kb", "Mk_s"], ["k_beyond"]),  # [Sk]
        n("Or", ["q_beyond", "k_beyond"], ["beyond"]),  # [Sq, Sk]: outside the explicit region
    ]
    # `explicit` is false wherever `beyond` is true (the padded row and column).
    if mask_use.layout_rule:
        nodes += _rule_nodes()
        nodes += [
            n("And", ["beyond", "continued"], ["kept_beyond"]),
            n("Or", ["explicit", "kept_beyond"], ["allow_blocks"]),
        ]
    else:  # dense continuation
        nodes.append(n("Or", ["beyond", "explicit"], ["allow_blocks"]))
    nodes += [
        n("Unsqueeze", ["allow_blocks", "axis0"], ["allow_layout"]),  # [1, Hl, Sq, Sk]
        # Causal: key j is allowed for the query at position a when j <= a, or when is_causal is 0.
        n("LessOrEqual", ["k_pos", "q_col"], ["causal_ok"]),  # [Sq, Sk]
        _ref_attr_constant("is_causal_i", "is_causal", onnx.AttributeProto.INT),
        n("Cast", ["is_causal_i"], ["is_causal_b"], to=TensorProto.BOOL),
        n("Not", ["is_causal_b"], ["not_causal"]),
        n("Or", ["causal_ok", "not_causal"], ["allow_causal"]),
        n("And", ["allow_layout", "allow_causal"], ["allow_lc"]),
    ]
    allow = "allow_lc"
    if mask_use.key_padding_mask:
        nodes += [
            n("Cast", ["key_padding_mask"], ["kpm_b"], to=TensorProto.BOOL),
            i64("axes_1_2b", [1, 2]),
            n("Unsqueeze", ["kpm_b", "axes_1_2b"], ["kpm4"]),  # [B, 1, 1, Sk]
            n("And", [allow, "kpm4"], ["allow_kpm"]),
        ]
        allow = "allow_kpm"
    if mask_use.attn_mask == "bool":
        nodes.append(n("And", [allow, "attn_mask"], ["allow_mask"]))
        allow = "allow_mask"
    nodes += [
        helper.make_node(
            "Constant", [], ["neg_inf_f"], value=helper.make_tensor("n", TensorProto.FLOAT, [], [float("-inf")])
        ),
        n("CastLike", ["neg_inf_f", "Q"], ["neg_inf"]),
        n("Where", [allow, "scaled", "neg_inf"], ["masked"]),
    ]
    scores = "masked"
    if mask_use.attn_mask == "float":
        nodes.append(n("Add", [scores, "attn_mask"], ["biased"]))
        scores = "biased"
    nodes += [
        n("Softmax", [scores], ["probs_raw"], axis=-1),
        # A row with every score -inf has no distribution: its output is 0, not NaN.
        n("IsNaN", ["probs_raw"], ["probs_nan"]),
        helper.make_node("Constant", [], ["zero_f"], value=helper.make_tensor("zf", TensorProto.FLOAT, [], [0.0])),
        n("CastLike", ["zero_f", "Q"], ["zero"]),
        n("Where", ["probs_nan", "zero", "probs_raw"], ["probs"]),
        n("Concat", ["B", "Hkv", "G", "Sq", "Sk"], ["p5_shape"], axis=0),
        n("Reshape", ["probs", "p5_shape"], ["P5"]),
        n("MatMul", ["P5", "V5"], ["Y5"]),
        n("Concat", ["B", "Hq", "Sq", "Dv"], ["y_shape"], axis=0),
        n("Reshape", ["Y5", "y_shape"], ["Y"]),
    ]
    # The formal inputs are as many as the nodes pass (``onnx.reference`` insists on that):
    # trailing optional inputs that no node uses are left out.
    if mask_use.layout_rule:
        count = 7
    else:
        count = 6 if mask_use.key_padding_mask else 5 if mask_use.attn_mask else 4
    formal_inputs = list(op_schema.INPUTS[:count])
    # queries_at_end is optional (version-1 nodes lack it): a declared default of 0.
    at_end_default = helper.make_attribute("queries_at_end", 0)
    return helper.make_function(
        op_schema.DOMAIN,
        op_schema.OP_TYPE,
        formal_inputs,
        list(op_schema.OUTPUTS),
        nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=[a for a in op_schema.ATTRIBUTES if a != at_end_default.name],
        attribute_protos=[at_end_default],
        doc_string=(
            "Block-sparse attention (onnxprune, op version 2). Blocks that `layout` (or, beyond its "
            "region, the layout rule; without one, nothing) prunes are masked before the softmax. "
            f"Body specialised for attn_mask={mask_use.attn_mask}, "
            f"key_padding_mask={'yes' if mask_use.key_padding_mask else 'no'}, "
            f"layout_rule={'yes' if mask_use.layout_rule else 'no'}."
        ),
    )
