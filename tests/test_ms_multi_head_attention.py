"""``com.microsoft.MultiHeadAttention`` (ORT's fused form for encoder-decoder and cross-attention)
on tiny graphs built in memory: found, decomposed and rewritten with the fused op's outputs, or
reported with the reason.
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

B, SQ, SK, H, D = 2, 20, 37, 4, 8  # cross-attention: Sq ≠ Sk, neither a multiple of the block
HIDDEN = H * D


def mha_model(sk=SK, kv_layout="BSD", bias=False, mask=None, attention_bias=False, unidirectional=0, scale=None,
              present=False):
    inputs = [vi("Q", [B, SQ, HIDDEN])]
    kv_shape = [B, sk, HIDDEN] if kv_layout == "BSD" else [B, H, sk, D]
    inputs += [vi("K", kv_shape), vi("V", kv_shape)]
    names = ["Q", "K", "V"]
    inits = []
    if bias:
        rng = np.random.default_rng(1)
        inits.append(onnx.numpy_helper.from_array(rng.standard_normal(3 * HIDDEN).astype(np.float32), "bias"))
    names.append("bias" if bias else "")
    if mask == "raw":
        inputs.append(vi("key_padding_mask", [B, sk], T.INT32))
    elif mask == "lengths":
        inputs.append(vi("key_padding_mask", [B], T.INT32))
    elif mask == "3d":
        inputs.append(vi("key_padding_mask", [B, SQ, sk], T.INT32))
    names.append("key_padding_mask" if mask else "")
    if attention_bias:
        inputs.append(vi("PB", [1, H, SQ, sk]))
    names.append("PB" if attention_bias else "")
    while names[-1] == "":
        names.pop()
    attrs = {"num_heads": H, "unidirectional": unidirectional}
    if scale is not None:
        attrs["scale"] = scale
    outputs = ["Y", "present_key", "present_value"] if present else ["Y"]
    node = helper.make_node("MultiHeadAttention", names, outputs, name="fused", domain="com.microsoft", **attrs)
    model = make_model([node], inputs, inits)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def feeds_for(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in proto.graph.input:
        shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        if inp.name == "key_padding_mask":
            sk = SK if len(shape) == 1 else shape[-1]
            lengths = np.array([sk, sk - 9], np.int32)
            feeds[inp.name] = lengths if len(shape) == 1 else (np.arange(sk)[None] < lengths[:, None]).astype(np.int32)
        else:
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def prune_fused(proto: onnx.ModelProto, sk: int) -> onnx.ModelProto:
    model = to_ir(proto)
    [site] = find_sites(model).sites
    prune_passes(full_layouts([site.name], H, SQ, sk))(model)  # rectangular layout
    assert not any(n.op_type in ("MultiHeadAttention", "Softmax") for n in model.graph)
    return ir.serde.serialize_model(model)


VARIANTS = [
    pytest.param(dict(kv_layout=kv, bias=b, mask=m), id=f"{kv}-{'bias' if b else 'nobias'}-{m or 'nomask'}")
    for kv in ("BSD", "BNSH")
    for b in (False, True)
    for m in (None, "raw", "lengths")
    if not (kv == "BNSH" and b)  # ORT adds the bias only to projections it makes itself
] + [
    pytest.param(dict(mask="raw", attention_bias=True), id="attention-bias"),
    pytest.param(dict(sk=SQ, unidirectional=1), id="self-causal"),
    pytest.param(dict(mask="raw", scale=0.5), id="explicit-scale"),
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_found(variant):
    discovery = find_sites(to_ir(mha_model(**variant)))
    assert discovery.unmatched == []
    [site] = discovery.sites
    assert (site.name, site.form, site.fused) == ("fused", "com.microsoft.MultiHeadAttention", True)
    assert (site.num_heads, site.head_size) == (H, D)
    assert site.scale == pytest.approx(variant.get("scale", D ** -0.5))
    assert site.is_causal == bool(variant.get("unidirectional", 0))
    assert site.mask_kind == ("key-padding" if variant.get("mask") else None)


@pytest.mark.parametrize("variant", VARIANTS)
def test_decomposed_rewrite_keeps_outputs(variant, ops_library):
    proto = mha_model(**variant)
    feeds = feeds_for(proto)
    dense = run_plain(proto, feeds)
    pruned = prune_fused(proto, variant.get("sk", SK))
    ops = [(n.domain, n.op_type) for n in pruned.graph.node]
    assert ops.count((op_schema.DOMAIN, op_schema.OP_TYPE)) == 1
    assert ("com.microsoft", "MultiHeadAttention") not in ops and ("", "Softmax") not in ops
    kernel = session(pruned.SerializeToString(), with_library=True).run(["Y"], feeds)[0]
    body = run_plain(pruned, feeds)
    np.testing.assert_allclose(kernel, dense, atol=ATOL, rtol=0)
    np.testing.assert_allclose(body, dense, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "variant, reason",
    [
        (dict(mask="3d"), "key_padding_mask shape rank 3 (handled: 1-D end positions, 2-D [B, Sk])"),
        (dict(present=True), "MultiHeadAttention has present outputs (KV cache)"),
    ],
    ids=["mask-3d", "present"],
)
def test_not_a_site(variant, reason):
    model = to_ir(mha_model(**variant))
    discovery = find_sites(model)
    assert discovery.sites == []
    assert discovery.unmatched == [("fused", reason)]
    assert decompose_fused_attention(model) == 0
