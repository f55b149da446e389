"""``com.microsoft.Attention`` (ORT's fused BERT attention) on tiny graphs built in memory.

Each variant is found as one site of form ``com.microsoft.Attention``; decomposed into the eager
form and rewritten with a full layout, ONNX Runtime gives the fused op's outputs, with the
library's kernel and with the op's function body. Unsupported uses are reported with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper

from onnxprune import op_schema
from onnxprune.passes import prune_passes
from onnxprune.rules import decompose_fused_attention, find_sites
from onnxprune.runtime import session
from test_rules import ATOL, full_layouts, make_model, run_plain, to_ir, vi

B, S, H, D = 2, 20, 4, 8
HIDDEN = H * D


def fused_attention_model(mask=None, unidirectional=0, scale=None, attention_bias=False, present=False,
                          qkv_hidden_sizes=None, mask_filter_value=None):
    rng = np.random.default_rng(0)
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((HIDDEN, 3 * HIDDEN)).astype(np.float32) * 0.3, "W"),
        onnx.numpy_helper.from_array(rng.standard_normal(3 * HIDDEN).astype(np.float32) * 0.1, "bias"),
    ]
    inputs = [vi("X", [B, S, HIDDEN])]
    names = ["X", "W", "bias"]
    if mask == "lengths":
        inputs.append(vi("mask_index", [B], T.INT32))
    elif mask == "raw":
        inputs.append(vi("mask_index", [B, S], T.INT32))
    elif mask == "end-and-start":
        inputs.append(vi("mask_index", [2 * B], T.INT32))
    elif mask == "3d":
        inputs.append(vi("mask_index", [B, S, S], T.INT32))
    elif mask == "unknown":
        inputs.append(helper.make_tensor_value_info("mask_index", T.INT32, None))
    names.append("mask_index" if mask else "")
    if attention_bias:
        inputs.append(vi("PB", [1, H, S, S]))
        names += ["", "PB"]
    while names and names[-1] == "":
        names.pop()
    attrs = {"num_heads": H, "unidirectional": unidirectional}
    if scale is not None:
        attrs["scale"] = scale
    if qkv_hidden_sizes is not None:
        attrs["qkv_hidden_sizes"] = qkv_hidden_sizes
    if mask_filter_value is not None:
        attrs["mask_filter_value"] = mask_filter_value
    outputs = ["Y", "present"] if present else ["Y"]
    node = helper.make_node("Attention", names, outputs, name="fused", domain="com.microsoft", **attrs)
    model = make_model([node], inputs, inits)
    if present:
        model.graph.output.append(helper.make_tensor_value_info("present", T.FLOAT, None))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def feeds_for(proto: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {"X": rng.standard_normal((B, S, HIDDEN)).astype(np.float32)}
    lengths = np.array([S, S - 7], np.int32)  # right padding
    for inp in proto.graph.input:
        if inp.name == "mask_index":
            rank = len(inp.type.tensor_type.shape.dim)
            feeds["mask_index"] = lengths if rank == 1 else (np.arange(S)[None] < lengths[:, None]).astype(np.int32)
        elif inp.name == "PB":
            feeds["PB"] = rng.standard_normal((1, H, S, S)).astype(np.float32)
    return feeds


def prune_fused(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite every site with an all-ones layout, as ``prune.prune`` does (the pipeline decomposes)."""
    model = to_ir(proto)
    [site] = find_sites(model).sites  # found as the fused op, named as the pipeline's decomposition names it
    assert prune_passes(full_layouts([site.name], H, S, S))(model).modified
    assert not any(n.op_type in ("Attention", "Softmax") for n in model.graph)
    return ir.serde.serialize_model(model)


VARIANTS = [
    pytest.param(dict(mask=m, unidirectional=u), id=f"{m or 'nomask'}-causal{u}")
    for m in (None, "lengths", "raw")
    for u in (0, 1)
] + [
    pytest.param(dict(mask="raw", scale=0.3), id="explicit-scale"),
    pytest.param(dict(mask="lengths", attention_bias=True), id="attention-bias"),
    pytest.param(dict(mask="raw", qkv_hidden_sizes=[HIDDEN] * 3), id="qkv-hidden-sizes"),
    pytest.param(dict(mask="raw", mask_filter_value=-1e4 * 3), id="mask-filter-value"),
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_found(variant):
    discovery = find_sites(to_ir(fused_attention_model(**variant)))
    assert discovery.unmatched == []
    [site] = discovery.sites
    assert (site.name, site.form, site.fused) == ("fused", "com.microsoft.Attention", True)
    assert (site.num_heads, site.head_size) == (H, D)
    assert site.scale == pytest.approx(variant.get("scale", D ** -0.5))
    assert site.is_causal == bool(variant["unidirectional"] if "unidirectional" in variant else 0)
    assert site.mask_kind == ("key-padding" if variant.get("mask") else None)


@pytest.mark.parametrize("variant", VARIANTS)
def test_decomposed_rewrite_keeps_outputs(variant, ops_library):
    proto = fused_attention_model(**variant)
    feeds = feeds_for(proto)
    dense = run_plain(proto, feeds)
    pruned = prune_fused(proto)
    ops = [(n.domain, n.op_type) for n in pruned.graph.node]
    assert ops.count((op_schema.DOMAIN, op_schema.OP_TYPE)) == 1
    assert ("com.microsoft", "Attention") not in ops and ("", "Softmax") not in ops
    kernel = session(pruned.SerializeToString(), with_library=True).run(["Y"], feeds)[0]
    body = run_plain(pruned, feeds)
    np.testing.assert_allclose(kernel, dense, atol=ATOL, rtol=0)
    np.testing.assert_allclose(body, dense, atol=ATOL, rtol=0)


def test_decomposed_site_keeps_name_and_form():
    model = to_ir(fused_attention_model(mask="lengths"))
    decompose_fused_attention(model)
    [site] = find_sites(model).sites
    assert (site.name, site.form, site.fused) == ("fused", "com.microsoft.Attention", False)
    assert site.probs is not None


@pytest.mark.parametrize(
    "variant, reason",
    [
        (dict(mask="3d"), "mask shape rank 3 (handled: 1-D end positions, 2-D [B, S])"),
        (dict(mask="unknown"), "mask shape unknown (handled: 1-D end positions, 2-D [B, S])"),
        (dict(mask="end-and-start"), "1-D mask whose length is not the batch (end and start positions?)"),
        (dict(present=True), "Attention has a present output (KV cache)"),
        (dict(qkv_hidden_sizes=[HIDDEN, HIDDEN // 2, HIDDEN]), f"qkv_hidden_sizes {[HIDDEN, HIDDEN // 2, HIDDEN]} "
                                                               f"do not split into {H} heads"),
    ],
    ids=["mask-3d", "mask-unknown", "mask-end-and-start", "present", "uneven-qk"],
)
def test_not_a_site(variant, reason):
    model = to_ir(fused_attention_model(**variant))
    discovery = find_sites(model)
    assert discovery.sites == []
    assert discovery.unmatched == [("fused", reason)]
    assert decompose_fused_attention(model) == 0
