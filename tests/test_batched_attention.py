"""Attention with the heads folded into the batch (BLOOM) on tiny graphs built in memory: found
with the right heads, scale and bias, rewritten with the same outputs, or reported with the reason.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper

from onnxprune import op_schema
from onnxprune.rules import find_sites
from test_rules import B, D, H, S, check_rewrite, make_model, scalar, to_ir, vi


def batched_model(scaling="Mul", bias3=True, mask=True, fill=None, casts=0, bias3_batch=B * H, heads_known=True):
    value = {"Mul": 1 / math.sqrt(D), "Div": math.sqrt(D)}.get(scaling)
    inits = [onnx.numpy_helper.from_array(np.array([B * H, S, S], np.int64), "shape3")]
    inputs = [vi("Q3", [B * H, S, D]), vi("Kt3", [B * H, D, S]), vi("V3", [B * H, S, D])]
    if heads_known:
        inits.append(onnx.numpy_helper.from_array(np.array([B, H, S, S], np.int64), "shape4"))
    else:  # a computed target shape: shape inference cannot tell the heads
        inputs.append(vi("shape4", [4], T.INT64))
    nodes = [helper.make_node("MatMul", ["Q3", "Kt3"], ["qk"])]
    scores = "qk"
    if scaling != "None":
        inits.append(scalar("sc", value))
        nodes.append(helper.make_node(scaling, [scores, "sc"], ["scaled"]))
        scores = "scaled"
    if bias3:  # ALiBi, [B·H, 1, Sk]
        inputs.append(vi("ALIBI", [bias3_batch, 1, S]))
        nodes.append(helper.make_node("Add", [scores, "ALIBI"], ["biased"]))
        scores = "biased"
    nodes.append(helper.make_node("Reshape", [scores, "shape4"], ["scores4"]))
    scores = "scores4"
    if mask:
        inputs.append(vi("M", [B, 1, S, S]))
        nodes.append(helper.make_node("Add", [scores, "M"], ["masked"]))
        scores = "masked"
    if fill is not None:
        inputs.append(vi("F", [B, 1, 1, S], T.BOOL))
        inits.append(scalar("fill", fill))
        nodes.append(helper.make_node("Where", ["F", "fill", scores], ["filled"]))
        scores = "filled"
    nodes.append(helper.make_node("Softmax", [scores], ["probs"], axis=-1, name="the_softmax"))
    probs = "probs"
    for index in range(casts):
        nodes.append(helper.make_node("Cast", [probs], [f"cast{index}"], to=T.FLOAT))
        probs = f"cast{index}"
    nodes += [
        helper.make_node("Reshape", [probs, "shape3"], ["probs3"]),
        helper.make_node("MatMul", ["probs3", "V3"], ["Y"]),
    ]
    return make_model(nodes, inputs, inits)


VARIANTS = [
    pytest.param(dict(scaling=s, bias3=b, mask=m), id=f"{s}-{'alibi' if b else 'nobias'}-{'mask' if m else 'nomask'}")
    for s in ("Mul", "Div", "None")
    for b in (True, False)
    for m in (True, False)
] + [
    pytest.param(dict(mask=False, fill=float(np.finfo(np.float32).min), casts=2), id="alibi-masked-fill-casts"),
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_found(variant):
    discovery = find_sites(to_ir(batched_model(**variant)))
    assert discovery.unmatched == []
    [site] = discovery.sites
    assert (site.name, site.form, site.num_heads, site.head_size) == ("the_softmax", "batched-heads", H, D)
    expected_scale = 1.0 if variant.get("scaling", "Mul") == "None" else 1 / math.sqrt(D)
    assert site.scale == pytest.approx(expected_scale, rel=1e-6)
    assert [a.name for a in site.mask_addends][-1:] == (["ALIBI"] if variant.get("bias3", True) else [])


@pytest.mark.parametrize("variant", VARIANTS)
def test_rewrite_keeps_outputs(variant, ops_library):
    pruned = check_rewrite(batched_model(**variant), ops_library)
    node = next(n for n in pruned.graph.node if n.op_type == op_schema.OP_TYPE)
    has_mask = variant.get("bias3", True) or variant.get("mask", True) or variant.get("fill") is not None
    assert (len(node.input) == 5) == has_mask


@pytest.mark.parametrize(
    "variant, reason",
    [
        (dict(heads_known=False), "number of heads unknown (the probabilities' second axis)"),
        (dict(bias3_batch=1), "the 3-D bias is not [B·H, ·, Sk]"),
    ],
    ids=["heads-unknown", "bias-broadcast-over-heads"],
)
def test_not_a_site(variant, reason):
    discovery = find_sites(to_ir(batched_model(**variant)))
    assert discovery.sites == []
    assert discovery.unmatched == [("the_softmax", reason)]
