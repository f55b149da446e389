"""The ONNX function body of ``onnxprune.BlockSparseAttention``.

A pruned model carries this body as a model-local function, so it runs in any ONNX runtime that
lacks onnxprune's library (plain ONNX Runtime, ``onnx.reference``) with the op's exact semantics,
at dense speed: the layout is expanded to an element mask and applied before the softmax.

Optional inputs cannot be tested for presence inside a function body portably, so the body is
specialised to how the model's nodes call the op (``MaskUse``): which optional inputs they pass
and the element type of ``attn_mask``. A model's nodes must all use the same form (the rewrite
normalises them). The attributes are referenced (``ref_attr_name``), so one body serves every
node; every node carries ``block_size``, ``scale`` and ``is_causal`` explicitly.
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

    def __post_init__(self):
        if self.attn_mask not in (None, "bool", "float"):
            raise ValueError(f"attn_mask must be None, 'bool' or 'float', not {self.attn_mask!r}")


def _ref_attr_constant(out: str, attr: str, attr_type: int) -> onnx.NodeProto:
    field = {onnx.AttributeProto.INT: "value_int", onnx.AttributeProto.FLOAT: "value_float"}[attr_type]
    node = helper.make_node("Constant", [], [out])
    ref = node.attribute.add()
    ref.name, ref.type, ref.ref_attr_name = field, attr_type, attr
    return node


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
        # The layout, expanded from blocks to elements and cut to [Hl, Sq, Sk].
        _ref_attr_constant("bs_scalar", "block_size", onnx.AttributeProto.INT),
        i64("one_dim", [1]),
        n("Reshape", ["bs_scalar", "one_dim"], ["bs"]),
        n("Cast", ["layout"], ["layout_b"], to=TensorProto.BOOL),
        i64("axes_2_4", [2, 4]),
        n("Unsqueeze", ["layout_b", "axes_2_4"], ["layout5"]),
        n("Concat", ["Hl", "Mq", "bs", "Mk", "bs"], ["layout5_shape"], axis=0),
        n("Expand", ["layout5", "layout5_shape"], ["layout5_e"]),
        n("Mul", ["Mq", "bs"], ["rows"]),
        n("Mul", ["Mk", "bs"], ["cols"]),
        n("Concat", ["Hl", "rows", "cols"], ["layout_el_shape"], axis=0),
        n("Reshape", ["layout5_e", "layout_el_shape"], ["layout_el"]),
        i64("zeros2", [0, 0]),
        i64("axes_1_2", [1, 2]),
        n("Concat", ["Sq", "Sk"], ["q_k_lengths"], axis=0),
        n("Slice", ["layout_el", "zeros2", "q_k_lengths", "axes_1_2"], ["layout_cut"]),
        i64("axis0", [0]),
        n("Unsqueeze", ["layout_cut", "axis0"], ["allow_layout"]),  # [1, Hl, Sq, Sk]
        # Causal: key j is allowed for query i when j <= i, or when is_causal is 0.
        helper.make_node("Constant", [], ["zero_s"], value=helper.make_tensor("z", TensorProto.INT64, [], [0])),
        helper.make_node("Constant", [], ["one_s"], value=helper.make_tensor("o", TensorProto.INT64, [], [1])),
        n("Squeeze", ["Sq", "axis0"], ["Sq_s"]),
        n("Squeeze", ["Sk", "axis0"], ["Sk_s"]),
        n("Range", ["zero_s", "Sq_s", "one_s"], ["q_pos"]),
        n("Range", ["zero_s", "Sk_s", "one_s"], ["k_pos"]),
        i64("axis1", [1]),
        n("Unsqueeze", ["q_pos", "axis1"], ["q_col"]),  # [Sq, 1]
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
    count = 6 if mask_use.key_padding_mask else 5 if mask_use.attn_mask else 4
    formal_inputs = list(op_schema.INPUTS[:count])
    return helper.make_function(
        op_schema.DOMAIN,
        op_schema.OP_TYPE,
        formal_inputs,
        list(op_schema.OUTPUTS),
        nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=list(op_schema.ATTRIBUTES),
        doc_string=(
            "Block-sparse attention (onnxprune). Pruned blocks of `layout` are masked before the "
            f"softmax. Body specialised for attn_mask={mask_use.attn_mask}, "
            f"key_padding_mask={'yes' if mask_use.key_padding_mask else 'no'}."
        ),
    )
