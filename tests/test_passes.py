"""The prune pipeline's passes (``onnxprune.passes``) one by one on tiny graphs built in memory,
and the pipeline as a whole: what each changes, what it leaves alone, and the errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper

from onnxprune import op_schema
from onnxprune.errors import OnnxpruneError
from onnxprune.layouts import Layouts, SiteLayout, attention_nodes
from onnxprune.op_function import MaskUse
from onnxprune.passes import (
    AttachFunctionPass, DecomposeFusedAttentionPass, RewriteSitesPass, UnifyMaskInputsPass, prune_passes,
)
from onnxprune.passes.attach_function import mask_use
from onnxprune.rules import find_sites
from onnxprune.runtime import session
from test_ms_attention import fused_attention_model
from test_rules import B, BLOCK, D, H, S, eager_model, full_layouts, make_model, to_ir, vi


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


# --------------------------------------------------------------------------------------------
# DecomposeFusedAttentionPass


def test_decompose_names_the_softmax_after_the_fused_node():
    model = to_ir(fused_attention_model(mask="raw"))
    assert DecomposeFusedAttentionPass()(model).modified
    assert "Attention" not in _ops(model)
    assert [n.name for n in model.graph if n.op_type == "Softmax"] == ["fused"]


def test_decompose_leaves_eager_attention_alone():
    model = to_ir(eager_model())
    before = _ops(model)
    assert not DecomposeFusedAttentionPass()(model).modified
    assert _ops(model) == before


# --------------------------------------------------------------------------------------------
# RewriteSitesPass


def test_rewrite_gives_each_site_its_layout():
    model = to_ir(eager_model())
    layouts = full_layouts(["the_softmax"])
    assert RewriteSitesPass(layouts)(model).modified
    [node] = attention_nodes(model.graph)
    assert node.inputs[3].name == op_schema.layout_name("the_softmax")
    assert node.attributes["block_size"].as_int() == layouts.block_size


def test_rewrite_of_a_site_the_rules_do_not_match_is_an_error():
    model = to_ir(eager_model())
    with pytest.raises(OnnxpruneError, match="rewrote 1 of 2 attention sites; no rule matched elsewhere"):
        RewriteSitesPass(full_layouts(["the_softmax", "elsewhere"]))(model)


# --------------------------------------------------------------------------------------------
# UnifyMaskInputsPass and AttachFunctionPass


def two_sites_model(first_mask: str | None, second_mask: str | None):
    """Two ``BlockSparseAttention`` nodes in a row (``Y0`` is the second's Q); each mask None,
    "bool" or "float"."""
    m = -(-S // BLOCK)
    inits = [onnx.numpy_helper.from_array(np.ones((H, m, m), np.uint8), op_schema.layout_name(f"site{i}"))
             for i in range(2)]
    nodes, inputs = [], [vi("Q", [B, H, S, D]), vi("K", [B, H, S, D]), vi("V", [B, H, S, D])]
    for index, kind in enumerate((first_mask, second_mask)):
        names = ["Y0" if index else "Q", "K", "V", op_schema.layout_name(f"site{index}")]
        if kind is not None:
            inputs.append(vi(f"M{index}", [B, 1, 1, S], T.BOOL if kind == "bool" else T.FLOAT))
            names.append(f"M{index}")
        nodes.append(helper.make_node(op_schema.OP_TYPE, names, ["Y" if index else "Y0"], domain=op_schema.DOMAIN,
                                      name=f"site{index}", block_size=BLOCK, scale=D ** -0.5, is_causal=0))
    proto = make_model(nodes, inputs, inits)
    proto.opset_import.append(helper.make_opsetid(op_schema.DOMAIN, op_schema.OPSET_VERSION))
    return proto


def feeds(proto) -> dict[str, np.ndarray]:
    """Random Q, K, V; masks that hide about a third of the keys (never key 0)."""
    rng = np.random.default_rng(0)
    values = {name: rng.standard_normal((B, H, S, D)).astype(np.float32) for name in ("Q", "K", "V")}
    for inp in proto.graph.input:
        if inp.name.startswith("M"):
            keep = rng.random((B, 1, 1, S)) > 0.3
            keep[..., 0] = True
            bool_mask = inp.type.tensor_type.elem_type == T.BOOL
            values[inp.name] = keep if bool_mask else np.where(keep, 0.0, -np.inf).astype(np.float32)
    return values


@pytest.mark.parametrize("masks", [("float", None), ("bool", "float"), (None, "bool")])
def test_unify_gives_every_node_a_float_mask(masks, ops_library):
    proto = two_sites_model(*masks)
    model = to_ir(proto)
    with pytest.raises(OnnxpruneError, match="2 different forms"):
        mask_use(attention_nodes(model.graph))
    assert UnifyMaskInputsPass()(model).modified
    assert mask_use(attention_nodes(model.graph)) == MaskUse(attn_mask="float")
    inputs = feeds(proto)
    before = session(proto.SerializeToString()).run(["Y"], inputs)[0]
    after = session(ir.serde.serialize_model(model).SerializeToString()).run(["Y"], inputs)[0]
    np.testing.assert_allclose(after, before, atol=1e-6)


@pytest.mark.parametrize("masks", [("float", "float"), ("bool", "bool"), (None, None)])
def test_unify_leaves_nodes_of_one_form_alone(masks):
    model = to_ir(two_sites_model(*masks))
    assert not UnifyMaskInputsPass()(model).modified
    assert mask_use(attention_nodes(model.graph)) == MaskUse(attn_mask=masks[0])


def test_attach_function_adds_the_body_and_the_opset():
    model = to_ir(two_sites_model("float", "float"))
    assert AttachFunctionPass()(model).modified
    assert [f.name for f in model.functions.values()] == [op_schema.OP_TYPE]
    assert model.opset_imports[op_schema.DOMAIN] == op_schema.OPSET_VERSION


def test_attach_function_needs_one_form_and_a_recent_opset():
    with pytest.raises(OnnxpruneError, match="different forms"):
        AttachFunctionPass()(to_ir(two_sites_model("float", None)))
    old = to_ir(two_sites_model(None, None))
    old.opset_imports[""] = 13
    with pytest.raises(OnnxpruneError, match="opset is 13"):
        AttachFunctionPass()(old)


def test_attach_function_without_attention_nodes_does_nothing():
    model = to_ir(eager_model())
    assert not AttachFunctionPass()(model).modified and not model.functions


# --------------------------------------------------------------------------------------------
# The pipeline


def test_pipeline_prunes_a_fused_model_and_removes_what_is_unused():
    model = to_ir(fused_attention_model(mask="lengths"))
    [site] = find_sites(model).sites
    assert prune_passes(full_layouts([site.name], sq=S, sk=S))(model).modified
    assert _ops(model).count(op_schema.OP_TYPE) == 1
    assert not {"Attention", "Softmax"} & set(_ops(model))
    assert "com.microsoft" not in model.opset_imports and op_schema.DOMAIN in model.opset_imports


def test_pipeline_errors_reach_the_caller_as_they_are():
    # ir.passes.Sequential wraps errors in a PassError; the user must see the one-line reason.
    model = to_ir(eager_model())
    layouts = Layouts(16, {"not_a_site": SiteLayout(np.ones((H, 2, 2), np.uint8))})
    with pytest.raises(OnnxpruneError, match="rewrote 0 of 1 attention sites"):
        prune_passes(layouts)(model)
