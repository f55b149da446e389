"""The ONNX function body of onnxprune.BlockSparseAttention (op_function.build_function).

One-node models carrying the body run in plain ONNX Runtime (no library: the body is inlined)
and in ``onnx.reference.ReferenceEvaluator``; both must agree with the float64 numpy reference,
and with the library's kernel, on fresh random inputs.
"""

from __future__ import annotations

import os
import sys
import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnxprune import op_schema
from onnxprune.op_function import MaskUse, build_function
from onnxprune.runtime import session

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bsa_reference import block_sparse_attention_ref  # noqa: E402

ATOL = 1e-5

# Fully masked rows make softmax compute NaN (then replaced by 0) inside onnx.reference.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
RTOL = 1e-4

_ELEM = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.bool_): TensorProto.BOOL,
}


def one_node_model(mask_use: MaskUse, feeds: dict, block_size: int, scale: float, is_causal: bool, opset: int = 20,
                   queries_at_end: bool | None = False):
    """queries_at_end None: the node leaves the attribute out (as a version-1 node does)."""
    node_inputs = ["Q", "K", "V", "layout"]
    if mask_use.attn_mask or mask_use.key_padding_mask or mask_use.layout_rule:
        node_inputs.append("attn_mask" if mask_use.attn_mask else "")
    if mask_use.key_padding_mask or mask_use.layout_rule:
        node_inputs.append("key_padding_mask" if mask_use.key_padding_mask else "")
    if mask_use.layout_rule:
        node_inputs.append("layout_rule")
    attributes = dict(block_size=block_size, scale=float(scale), is_causal=int(is_causal))
    if queries_at_end is not None:
        attributes["queries_at_end"] = int(queries_at_end)
    node = helper.make_node(op_schema.OP_TYPE, node_inputs, ["Y"], domain=op_schema.DOMAIN, **attributes)
    inputs = [helper.make_tensor_value_info(n, _ELEM[feeds[n].dtype], feeds[n].shape) for n in node_inputs if n]
    graph = helper.make_graph([node], "bsa", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None] * 4)])
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(op_schema.DOMAIN, op_schema.OPSET_VERSION)],
        functions=[build_function(mask_use, opset)],
    )
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def run_three_ways(ops_library, mask_use, feeds, block_size, scale, is_causal, opset=20, queries_at_end=False):
    """Plain ORT (the body inlined), onnx.reference and ORT with the library. onnx.reference
    (1.23) ignores a function's attribute defaults, so a node without queries_at_end runs in the
    other two only (None in its place)."""
    model = one_node_model(mask_use, feeds, block_size, scale, is_causal, opset, queries_at_end)
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with_library = session(model.SerializeToString(), with_library=True)
    names = {i.name for i in plain.get_inputs()}
    run_feeds = {k: v for k, v in feeds.items() if k in names}
    out_plain = plain.run(["Y"], run_feeds)[0]
    out_reference = None if queries_at_end is None else ReferenceEvaluator(model).run(None, run_feeds)[0]
    out_library = with_library.run(["Y"], run_feeds)[0]
    return out_plain, out_reference, out_library


def check(ops_library, q, k, v, layout, block_size, scale=None, is_causal=False, attn_mask=None,
          key_padding_mask=None, opset=20, layout_rule=None, queries_at_end=False):
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    mask_use = MaskUse(
        attn_mask=None if attn_mask is None else ("bool" if attn_mask.dtype == np.bool_ else "float"),
        key_padding_mask=key_padding_mask is not None,
        layout_rule=layout_rule is not None,
    )
    feeds = {"Q": q, "K": k, "V": v, "layout": layout}
    if attn_mask is not None:
        feeds["attn_mask"] = attn_mask
    if key_padding_mask is not None:
        feeds["key_padding_mask"] = key_padding_mask
    if layout_rule is not None:
        feeds["layout_rule"] = layout_rule
    ref = block_sparse_attention_ref(q, k, v, layout, block_size, scale=scale, is_causal=is_causal,
                                     attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                     layout_rule=layout_rule, queries_at_end=bool(queries_at_end))
    plain, reference, library = run_three_ways(ops_library, mask_use, feeds, block_size, scale, is_causal, opset,
                                               queries_at_end)
    outputs = [out for out in (plain, reference, library) if out is not None]
    for out in outputs:
        assert out.shape == ref.shape
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out, ref, atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(out, library, atol=ATOL, rtol=0)
    dead = np.all(ref == 0.0, axis=-1)
    for out in outputs:
        assert np.all(out[dead] == 0.0)
    return plain, ref


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def rand_qkv(rng, b, hq, hkv, sq, sk, d, dv=None):
    dv = d if dv is None else dv
    return (
        rng.standard_normal((b, hq, sq, d)).astype(np.float32),
        rng.standard_normal((b, hkv, sk, d)).astype(np.float32),
        rng.standard_normal((b, hkv, sk, dv)).astype(np.float32),
    )


def blocks(s, bs):
    return -(-s // bs)


def rand_layout(rng, hl, mq, mk, p=0.6):
    layout = (rng.random((hl, mq, mk)) < p).astype(np.uint8)
    for i in range(min(mq, mk)):
        layout[:, i, i] = 1
    return layout


def make_attn_mask(rng, kind, b, sq, sk):
    if kind == "float":
        mask = rng.standard_normal((b, 1, sq, sk)).astype(np.float32)
        mask[rng.random((b, 1, sq, sk)) < 0.2] = -np.inf
        mask[..., 0] = 0.0
        return mask
    if kind == "bool":
        mask = rng.random((b, 1, sq, sk)) > 0.2
        mask[..., 0] = True
        return mask
    return None


def make_kpm(b, sk, dtype=np.bool_):
    kpm = np.zeros((b, sk), dtype)
    for row in range(b):
        kpm[row, : max(1, sk - 7 * row)] = 1
    return kpm


MASK_VARIANTS = [
    pytest.param(None, False, id="nomask"),
    pytest.param("float", False, id="float"),
    pytest.param("bool", False, id="bool"),
    pytest.param(None, True, id="kpm"),
    pytest.param("float", True, id="float+kpm"),
    pytest.param("bool", True, id="bool+kpm"),
]


@pytest.mark.parametrize("attn_mask,kpm", MASK_VARIANTS)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_mask_use_variants(ops_library, rng, attn_mask, kpm, is_causal):
    b, h, s, d, bs = 2, 3, 40, 8, 16
    q, k, v = rand_qkv(rng, b, h, h, s, s, d)
    layout = rand_layout(rng, h, blocks(s, bs), blocks(s, bs))
    check(ops_library, q, k, v, layout, bs, is_causal=is_causal,
          attn_mask=make_attn_mask(rng, attn_mask, b, s, s),
          key_padding_mask=make_kpm(b, s) if kpm else None)


@pytest.mark.parametrize("hkv,hl", [(1, 1), (2, 1), (2, 4), (4, 4)])
@pytest.mark.parametrize("attn_mask", [None, "float", "bool"])
def test_grouped_heads(ops_library, rng, hkv, hl, attn_mask):
    b, hq, s, d, bs = 2, 4, 33, 8, 16
    q, k, v = rand_qkv(rng, b, hq, hkv, s, s, d)
    layout = rand_layout(rng, hl, blocks(s, bs), blocks(s, bs), p=0.5)
    check(ops_library, q, k, v, layout, bs, attn_mask=make_attn_mask(rng, attn_mask, b, s, s))


@pytest.mark.parametrize("bs", [16, 32, 64])
@pytest.mark.parametrize("sq,sk", [(5, 5), (37, 37), (20, 45), (45, 20), (64, 64)])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_ragged_and_cross_lengths(ops_library, rng, bs, sq, sk, is_causal):
    q, k, v = rand_qkv(rng, 1, 2, 2, sq, sk, 8, dv=6)
    layout = rand_layout(rng, 2, blocks(sq, bs), blocks(sk, bs), p=0.5)
    check(ops_library, q, k, v, layout, bs, is_causal=is_causal)


def test_layout_larger_than_the_input(ops_library, rng):
    """The layout covers the longest input; a shorter input uses its top-left corner."""
    q, k, v = rand_qkv(rng, 1, 2, 2, 20, 20, 8)
    layout = rand_layout(rng, 2, 4, 4, p=0.3)
    check(ops_library, q, k, v, layout, 16)


def test_explicit_scale(ops_library, rng):
    q, k, v = rand_qkv(rng, 2, 2, 2, 24, 24, 8)
    out, _ = check(ops_library, q, k, v, np.ones((1, 2, 2), np.uint8), 16, scale=0.05)
    # Not the default scale: the attribute is really used.
    default = block_sparse_attention_ref(q, k, v, np.ones((1, 2, 2), np.uint8), 16)
    assert np.abs(out - default).max() > 1e-3


@pytest.mark.parametrize("opset", [17, 20, 23])
def test_model_opsets(ops_library, rng, opset):
    q, k, v = rand_qkv(rng, 2, 2, 2, 30, 30, 8)
    check(ops_library, q, k, v, rand_layout(rng, 2, 2, 2), 16, is_causal=True,
          attn_mask=make_attn_mask(rng, "float", 2, 30, 30), opset=opset)


# Fully masked rows: the output row is exactly 0 (not NaN, not a uniform average).


def test_dead_rows_from_layout(ops_library, rng):
    q, k, v = rand_qkv(rng, 1, 2, 2, 40, 40, 8)
    layout = np.ones((2, 3, 3), np.uint8)
    layout[0, 1, :] = 0  # head 0: query block 1 sees nothing
    out, _ = check(ops_library, q, k, v, layout, 16)
    assert np.all(out[0, 0, 16:32] == 0.0)
    assert np.all(np.abs(out[0, 1, 16:32]).sum(-1) > 0)


@pytest.mark.parametrize("kpm_dtype", [np.bool_, np.int64])
def test_dead_rows_from_key_padding(ops_library, rng, kpm_dtype):
    q, k, v = rand_qkv(rng, 3, 2, 2, 30, 30, 8)
    kpm = np.zeros((3, 30), kpm_dtype)
    kpm[0] = 1
    kpm[1, :11] = 1
    if kpm_dtype == np.int64:
        kpm[0, 3] = 7  # any nonzero value means "valid"
    out, _ = check(ops_library, q, k, v, np.ones((1, 2, 2), np.uint8), 16, key_padding_mask=kpm)
    assert np.all(out[2] == 0.0)
    assert np.all(np.abs(out[:2]).sum(-1) > 0)


@pytest.mark.parametrize("kind", ["float", "bool"])
def test_dead_rows_from_attn_mask(ops_library, rng, kind):
    q, k, v = rand_qkv(rng, 2, 2, 2, 20, 20, 8)
    if kind == "float":
        mask = np.zeros((2, 1, 20, 20), np.float32)
        mask[1, :, 5] = -np.inf
    else:
        mask = np.ones((2, 1, 20, 20), bool)
        mask[1, :, 5] = False
    out, _ = check(ops_library, q, k, v, np.ones((1, 2, 2), np.uint8), 16, attn_mask=mask)
    assert np.all(out[1, :, 5] == 0.0)
    assert np.all(np.abs(out[0, :, 5]).sum(-1) > 0)


def test_dead_rows_causal_with_padding(ops_library, rng):
    """Left padding under a causal mask: the first queries see no valid key."""
    q, k, v = rand_qkv(rng, 2, 2, 2, 24, 24, 8)
    kpm = np.ones((2, 24), np.bool_)
    kpm[1, :6] = False
    out, _ = check(ops_library, q, k, v, np.tril(np.ones((2, 2), np.uint8))[None], 16, is_causal=True,
                   key_padding_mask=kpm)
    assert np.all(out[1, :, :6] == 0.0)


def test_finite_float_mask_on_all_keys_is_uniform(ops_library, rng):
    q, k, v = rand_qkv(rng, 1, 1, 1, 20, 20, 8)
    mask = np.full((1, 1, 1, 20), -3.4e38, np.float32)
    out, _ = check(ops_library, q, k, v, np.ones((1, 2, 2), np.uint8), 16, attn_mask=mask)
    np.testing.assert_allclose(out[0, 0], np.broadcast_to(v[0, 0].mean(0), (20, 8)), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("shape", [(20, 20), (20,), (1, 2, 20, 1), (2, 2, 20, 20)])
def test_float_mask_broadcasts(ops_library, rng, shape):
    q, k, v = rand_qkv(rng, 2, 2, 2, 20, 20, 8)
    mask = rng.standard_normal(shape).astype(np.float32)
    check(ops_library, q, k, v, rand_layout(rng, 1, 2, 2, p=0.5), 16, attn_mask=mask)


# Version 2: lengths beyond the layout's explicit region, layout_rule, queries_at_end.


def rand_rule(rng, hl):
    rule = np.stack([rng.integers(0, 3, hl), rng.choice([-1, 0, 2], hl), rng.choice([-1, 0, 1], hl),
                     rng.integers(0, 2, hl)], axis=1).astype(np.int64)
    rule[0] = (1, 1, 0, 0)
    return rule


@pytest.mark.parametrize("bs", [16, 32, 64, 128])
@pytest.mark.parametrize("sq,sk", [(1, 140), (5, 140), (37, 140), (140, 140)])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_queries_at_end(ops_library, rng, bs, sq, sk, is_causal):
    q, k, v = rand_qkv(rng, 1, 2, 2, sq, sk, 8)
    m = blocks(sk, bs)
    check(ops_library, q, k, v, rand_layout(rng, 2, m, m, p=0.5), bs, is_causal=is_causal, queries_at_end=True)


@pytest.mark.parametrize("bs", [16, 32, 64, 128])
@pytest.mark.parametrize("sq,sk,at_end", [(150, 150, False), (40, 150, False), (9, 150, True), (1, 150, True)])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_rule_beyond_the_explicit_region(ops_library, rng, bs, sq, sk, at_end, is_causal):
    q, k, v = rand_qkv(rng, 1, 4, 2, sq, sk, 8)
    check(ops_library, q, k, v, rand_layout(rng, 4, 2, 1, p=0.5), bs, is_causal=is_causal,
          layout_rule=rand_rule(rng, 4), queries_at_end=at_end)


@pytest.mark.parametrize("explicit", [0, 1], ids=["rule-only", "one-block"])
@pytest.mark.parametrize("hl", [1, 3])
def test_rule_only_layouts(ops_library, rng, explicit, hl):
    q, k, v = rand_qkv(rng, 2, 3, 1, 70, 70, 8)
    check(ops_library, q, k, v, np.ones((hl, explicit, explicit), np.uint8), 16, is_causal=True,
          layout_rule=rand_rule(rng, hl))


@pytest.mark.parametrize("attn_mask,kpm", MASK_VARIANTS)
@pytest.mark.parametrize("sq", [1, 20])
def test_mask_use_variants_with_rule_and_offset(ops_library, rng, attn_mask, kpm, sq):
    b, h, sk, d, bs = 2, 2, 60, 8, 16
    q, k, v = rand_qkv(rng, b, h, h, sq, sk, d)
    check(ops_library, q, k, v, rand_layout(rng, 1, 2, 2), bs, is_causal=True,
          attn_mask=make_attn_mask(rng, attn_mask, b, sq, sk), key_padding_mask=make_kpm(b, sk) if kpm else None,
          layout_rule=np.array([[1, 1, 0, 0]], np.int64), queries_at_end=True)


@pytest.mark.parametrize("sq,sk", [(70, 70), (30, 60), (60, 30)])
def test_version_1_node_beyond_its_layout_continues_densely(ops_library, rng, sq, sk):
    """A node without queries_at_end or a rule (version 1's form): the blocks beyond the layout
    are all computed, in the body as in the kernel."""
    q, k, v = rand_qkv(rng, 1, 2, 2, sq, sk, 8)
    layout = rand_layout(rng, 2, 2, 2, p=0.4)
    out, _ = check(ops_library, q, k, v, layout, 16, is_causal=True, queries_at_end=None)
    dense_beyond = block_sparse_attention_ref(q, k, v, np.pad(layout, ((0, 0), (0, 3), (0, 3)), constant_values=1),
                                              16, is_causal=True)
    np.testing.assert_allclose(out, dense_beyond, atol=ATOL, rtol=RTOL)


# The builder's own contract.


def test_formal_inputs_follow_the_mask_use():
    assert list(build_function(MaskUse(), 20).input) == ["Q", "K", "V", "layout"]
    assert list(build_function(MaskUse("float"), 20).input) == ["Q", "K", "V", "layout", "attn_mask"]
    assert list(build_function(MaskUse(None, True), 20).input) == list(op_schema.INPUTS[:6])
    assert list(build_function(MaskUse(layout_rule=True), 20).input) == list(op_schema.INPUTS)
    function = build_function(MaskUse("bool", True), 20)
    assert (function.domain, function.name) == (op_schema.DOMAIN, op_schema.OP_TYPE)
    declared = list(function.attribute) + [a.name for a in function.attribute_proto]
    assert sorted(declared) == sorted(op_schema.ATTRIBUTES)
    # Only queries_at_end (absent from version-1 nodes) has a default: 0.
    assert [(a.name, a.i) for a in function.attribute_proto] == [("queries_at_end", 0)]


def test_opset_too_old():
    with pytest.raises(ValueError, match="opset"):
        build_function(MaskUse(), op_schema.MIN_MODEL_OPSET - 1)


def test_bad_mask_kind():
    with pytest.raises(ValueError, match="attn_mask"):
        MaskUse(attn_mask="int")
