"""Tests of the CPU kernel of onnxprune.BlockSparseAttention (via onnxruntime)
against the float64 numpy reference in bsa_reference.py."""

import os
import re
import sys
import zlib

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bsa_reference import block_sparse_attention_ref  # noqa: E402

ATOL = 1e-5
RTOL = 1e-4

_ORT_ERRORS = tuple(
    getattr(ort.capi.onnxruntime_pybind11_state, name)
    for name in (
        "Fail",
        "InvalidArgument",
        "RuntimeException",
        "InvalidGraph",
        "NotImplemented",
        "EngineError",
    )
    if hasattr(ort.capi.onnxruntime_pybind11_state, name)
)

_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.bool_): TensorProto.BOOL,
}

_INPUT_NAMES = ["Q", "K", "V", "layout", "attn_mask", "key_padding_mask", "layout_rule"]


def make_model(dtypes, block_size=None, scale=None, is_causal=None, queries_at_end=None, op_version=2):
    """One-node model. dtypes: list of up to 7 numpy dtypes or None (omitted input)."""
    node_inputs, graph_inputs = [], []
    for name, dt in zip(_INPUT_NAMES, dtypes):
        if dt is None:
            node_inputs.append("")
        else:
            node_inputs.append(name)
            graph_inputs.append(helper.make_tensor_value_info(name, _NP_TO_ONNX[np.dtype(dt)], None))
    while node_inputs and node_inputs[-1] == "":
        node_inputs.pop()
    attrs = {}
    if block_size is not None:
        attrs["block_size"] = block_size
    if scale is not None:
        attrs["scale"] = float(scale)
    if is_causal is not None:
        attrs["is_causal"] = int(is_causal)
    if queries_at_end is not None:
        attrs["queries_at_end"] = int(queries_at_end)
    node = helper.make_node(
        "BlockSparseAttention", node_inputs, ["Y"], domain="onnxprune", **attrs
    )
    graph = helper.make_graph(
        [node],
        "bsa",
        graph_inputs,
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("onnxprune", op_version)],
    )
    model.ir_version = 8
    return model


def make_session(ops_library, model):
    so = ort.SessionOptions()
    so.register_custom_ops_library(ops_library)
    so.intra_op_num_threads = 2
    return ort.InferenceSession(
        model.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )


def run_op(ops_library, q, k, v, layout, block_size, scale=None, is_causal=None,
           attn_mask=None, key_padding_mask=None, layout_rule=None, queries_at_end=None, op_version=2):
    arrays = [q, k, v, layout, attn_mask, key_padding_mask, layout_rule]
    dtypes = [None if a is None else a.dtype for a in arrays]
    sess = make_session(
        ops_library, make_model(dtypes, block_size, scale, is_causal, queries_at_end, op_version)
    )
    feeds = {n: a for n, a in zip(_INPUT_NAMES, arrays) if a is not None}
    return sess.run(None, feeds)[0]


@pytest.fixture(autouse=True, params=["native", "avx2", "baseline"])
def cpu_isa(request, ops_library, monkeypatch):
    """Runs every kernel test once per compiled instruction-set variant of the kernel.

    ONNXPRUNE_CPU_ISA caps the variant the library picks; the library's OnnxpruneCpuIsa()
    says which one it took, so a variant this CPU lacks is skipped rather than silently
    replaced.
    """
    import ctypes

    if request.param != "native":
        monkeypatch.setenv("ONNXPRUNE_CPU_ISA", request.param)
    else:
        monkeypatch.delenv("ONNXPRUNE_CPU_ISA", raising=False)
    isa_of = ctypes.CDLL(ops_library).OnnxpruneCpuIsa
    isa_of.restype = ctypes.c_char_p
    chosen = isa_of().decode()
    if request.param != "native" and chosen != request.param:
        pytest.skip(f"this CPU cannot run the {request.param} kernel (it uses {chosen})")
    return chosen


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def rand_inputs(rng, B, Hq, Hkv, Sq, Sk, D, Dv=None):
    Dv = D if Dv is None else Dv
    q = rng.standard_normal((B, Hq, Sq, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, Sk, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, Sk, Dv)).astype(np.float32)
    return q, k, v


def n_blocks(s, bs):
    return -(-s // bs)


def rand_layout(rng, Hl, Mq, Mk, p=0.5, keep_diag=True):
    lay = (rng.random((Hl, Mq, Mk)) < p).astype(np.uint8)
    if keep_diag:
        for i in range(min(Mq, Mk)):
            lay[:, i, i] = 1
    return lay


def check(ops_library, q, k, v, layout, block_size, scale=None, is_causal=False,
          attn_mask=None, key_padding_mask=None, expect_dead_rows=None, layout_rule=None,
          queries_at_end=False, op_version=2):
    out = run_op(
        ops_library, q, k, v, layout, block_size, scale=scale,
        is_causal=int(is_causal) if is_causal else None,
        attn_mask=attn_mask, key_padding_mask=key_padding_mask, layout_rule=layout_rule,
        queries_at_end=int(queries_at_end) if queries_at_end else None, op_version=op_version,
    )
    ref = block_sparse_attention_ref(
        q, k, v, layout, block_size, scale=scale, is_causal=is_causal,
        attn_mask=attn_mask, key_padding_mask=key_padding_mask, layout_rule=layout_rule,
        queries_at_end=queries_at_end,
    )
    assert out.dtype == np.float32
    assert out.shape == ref.shape
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=RTOL)
    # Rows without any attended key are exactly zero (V is random, so an
    # all-zero reference row means "fully masked").
    dead = np.all(ref == 0.0, axis=-1)
    assert np.all(out[dead] == 0.0)
    if expect_dead_rows is not None:
        assert bool(dead.any()) == expect_dead_rows
    return out, ref


# --------------------------------------------------------------------------
# Correctness


@pytest.mark.parametrize("bs", [16, 32, 64, 128])
@pytest.mark.parametrize("seq", [37, 100, 150])
def test_block_sizes_and_ragged_lengths(ops_library, rng, bs, seq):
    B, H, D = 1, 2, 16
    q, k, v = rand_inputs(rng, B, H, H, seq, seq, D)
    m = n_blocks(seq, bs)
    layout = rand_layout(rng, H, m, m, p=0.6)
    check(ops_library, q, k, v, layout, bs)


@pytest.mark.parametrize("bs", [16, 64])
@pytest.mark.parametrize("d,dv", [(8, 8), (24, 24), (32, 32), (40, 72), (64, 64), (80, 80), (128, 128), (64, 20)])
def test_head_sizes(ops_library, rng, bs, d, dv):
    # Head sizes around the vector widths (4, 8, 16 floats): the query-block transpose and
    # the P·V column tails both take their vector and scalar paths.
    q, k, v = rand_inputs(rng, 2, 2, 2, 150, 150, d, dv)
    m = n_blocks(150, bs)
    check(ops_library, q, k, v, rand_layout(rng, 2, m, m, p=0.6), bs, scale=0.3)


@pytest.mark.parametrize("bs", [16, 32, 64, 128])
def test_single_block(ops_library, rng, bs):
    q, k, v = rand_inputs(rng, 1, 2, 2, bs, bs, 8)
    layout = np.ones((1, 1, 1), np.uint8)
    check(ops_library, q, k, v, layout, bs)


def test_single_partial_block(ops_library, rng):
    q, k, v = rand_inputs(rng, 1, 1, 1, 5, 5, 8)
    check(ops_library, q, k, v, np.ones((1, 1, 1), np.uint8), 16)


@pytest.mark.parametrize("sq,sk", [(20, 45), (45, 20), (1, 100), (100, 1)])
def test_cross_attention_shapes(ops_library, rng, sq, sk):
    bs = 16
    q, k, v = rand_inputs(rng, 2, 2, 2, sq, sk, 16)
    layout = rand_layout(rng, 2, n_blocks(sq, bs), n_blocks(sk, bs), p=0.7)
    check(ops_library, q, k, v, layout, bs)


@pytest.mark.parametrize("hl", ["shared", "per_head"])
def test_batch_and_layout_heads(ops_library, rng, hl):
    B, H, S, D, bs = 3, 4, 70, 16, 16
    q, k, v = rand_inputs(rng, B, H, H, S, S, D)
    m = n_blocks(S, bs)
    layout = rand_layout(rng, 1 if hl == "shared" else H, m, m, p=0.5)
    check(ops_library, q, k, v, layout, bs)


def test_per_head_layout_differs(ops_library, rng):
    # Head 0 sees only its diagonal block, head 1 everything.
    B, H, S, D, bs = 1, 2, 64, 8, 32
    q, k, v = rand_inputs(rng, B, H, H, S, S, D)
    layout = np.zeros((H, 2, 2), np.uint8)
    layout[0] = np.eye(2, dtype=np.uint8)
    layout[1] = 1
    check(ops_library, q, k, v, layout, bs)


@pytest.mark.parametrize("bs", [16, 32])
def test_random_layout_with_missing_diagonal(ops_library, rng, bs):
    B, H, S, D = 2, 3, 100, 16
    q, k, v = rand_inputs(rng, B, H, H, S, S, D)
    m = n_blocks(S, bs)
    layout = rand_layout(rng, H, m, m, p=0.4, keep_diag=False)
    layout[0, 0, :] = 0  # guaranteed fully masked query block
    layout[1, :, 0] = 1
    check(ops_library, q, k, v, layout, bs, expect_dead_rows=True)


def test_empty_layout_gives_zeros(ops_library, rng):
    q, k, v = rand_inputs(rng, 1, 2, 2, 40, 40, 8)
    layout = np.zeros((1, 3, 3), np.uint8)
    out, _ = check(ops_library, q, k, v, layout, 16, expect_dead_rows=True)
    assert np.all(out == 0.0)


@pytest.mark.parametrize("kpm_dtype", [np.bool_, np.int64])
def test_key_padding(ops_library, rng, kpm_dtype):
    B, H, S, D, bs = 3, 2, 50, 16, 16
    q, k, v = rand_inputs(rng, B, H, H, S, S, D)
    m = n_blocks(S, bs)
    layout = rand_layout(rng, 1, m, m, p=0.7)
    lengths = [S, 23, 0]  # batch row 2 fully padded -> zeros
    kpm = np.zeros((B, S), dtype=kpm_dtype)
    for b, n in enumerate(lengths):
        kpm[b, :n] = 1
    if kpm_dtype == np.int64:
        kpm[0, 5] = 7  # any nonzero value means "valid"
    out, _ = check(ops_library, q, k, v, layout, bs, key_padding_mask=kpm,
                   expect_dead_rows=True)
    assert np.all(out[2] == 0.0)


@pytest.mark.parametrize("bs", [16, 32, 64])
@pytest.mark.parametrize("sq,sk", [(100, 100), (37, 37), (20, 45), (45, 20)])
def test_causal(ops_library, rng, bs, sq, sk):
    H, D = 2, 16
    q, k, v = rand_inputs(rng, 1, H, H, sq, sk, D)
    layout = np.tril(np.ones((n_blocks(sq, bs), n_blocks(sk, bs)), np.uint8))[None]
    check(ops_library, q, k, v, layout, bs, is_causal=True)


def test_causal_with_sparse_layout_and_padding(ops_library, rng):
    B, H, S, D, bs = 2, 2, 90, 16, 16
    q, k, v = rand_inputs(rng, B, H, H, S, S, D)
    m = n_blocks(S, bs)
    layout = rand_layout(rng, H, m, m, p=0.5, keep_diag=False)
    kpm = np.ones((B, S), np.bool_)
    kpm[1, :10] = False
    check(ops_library, q, k, v, layout, bs, is_causal=True, key_padding_mask=kpm)


@pytest.mark.parametrize("hkv", [1, 2, 3, 6])
@pytest.mark.parametrize("hl", [1, 6])
def test_grouped_query_heads(ops_library, rng, hkv, hl):
    B, Hq, S, D, bs = 2, 6, 48, 16, 16
    q, k, v = rand_inputs(rng, B, Hq, hkv, S, S, D)
    m = n_blocks(S, bs)
    layout = rand_layout(rng, hl, m, m, p=0.6)
    check(ops_library, q, k, v, layout, bs)


def test_float_mask_bert_style(ops_library, rng):
    B, H, S, D, bs = 3, 2, 60, 16, 16
    q, k, v = rand_inputs(rng, B, H, H, S, S, D)
    m = n_blocks(S, bs)
    layout = rand_layout(rng, 1, m, m, p=0.6)
    mask = np.zeros((B, 1, 1, S), np.float32)
    mask[0, ..., 40:] = -3.4e38
    mask[1, ..., :] = -3.4e38  # every key "masked" with a finite value: uniform
    check(ops_library, q, k, v, layout, bs, attn_mask=mask)


def test_float_mask_finite_all_keys_is_uniform(ops_library, rng):
    q, k, v = rand_inputs(rng, 1, 1, 1, 20, 20, 8)
    mask = np.full((1, 1, 1, 20), -3.4e38, np.float32)
    out, _ = check(ops_library, q, k, v, np.ones((1, 2, 2), np.uint8), 16, attn_mask=mask)
    np.testing.assert_allclose(out[0, 0], np.broadcast_to(v[0, 0].mean(0), (20, 8)),
                               atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("bs,sq,sk,causal", [(16, 50, 70, False), (64, 150, 130, False), (32, 100, 100, True)])
def test_float_mask_full(ops_library, rng, bs, sq, sk, causal):
    # A per-query mask is added to the (transposed) score tile in register-transposed tiles
    # with element-wise ragged edges; several tiles per block and ragged blocks cover both.
    B, H, D = 2, 2, 16
    q, k, v = rand_inputs(rng, B, H, H, sq, sk, D)
    layout = rand_layout(rng, H, n_blocks(sq, bs), n_blocks(sk, bs), p=0.6)
    mask = rng.standard_normal((B, 1, sq, sk)).astype(np.float32) * 3
    check(ops_library, q, k, v, layout, bs, attn_mask=mask, is_causal=causal)


def test_float_mask_2d(ops_library, rng):
    B, H, Sq, Sk, D, bs = 2, 3, 40, 33, 8, 16
    q, k, v = rand_inputs(rng, B, H, H, Sq, Sk, D)
    layout = rand_layout(rng, 1, n_blocks(Sq, bs), n_blocks(Sk, bs), p=0.8)
    mask = rng.standard_normal((Sq, Sk)).astype(np.float32)
    check(ops_library, q, k, v, layout, bs, attn_mask=mask)


@pytest.mark.parametrize("shape", ["B1SqSk", "BHSqSk", "1HSq1", "Sk"])
def test_float_mask_other_broadcasts(ops_library, rng, shape):
    B, H, Sq, Sk, D, bs = 2, 3, 40, 33, 8, 16
    q, k, v = rand_inputs(rng, B, H, H, Sq, Sk, D)
    layout = rand_layout(rng, 1, n_blocks(Sq, bs), n_blocks(Sk, bs), p=0.8)
    mshape = {"B1SqSk": (B, 1, Sq, Sk), "BHSqSk": (B, H, Sq, Sk), "1HSq1": (1, H, Sq, 1),
              "Sk": (Sk,)}[shape]
    mask = rng.standard_normal(mshape).astype(np.float32)
    check(ops_library, q, k, v, layout, bs, attn_mask=mask)


def test_float_mask_with_neg_inf(ops_library, rng):
    B, H, Sq, Sk, D, bs = 2, 2, 45, 45, 16, 16
    q, k, v = rand_inputs(rng, B, H, H, Sq, Sk, D)
    layout = rand_layout(rng, H, n_blocks(Sq, bs), n_blocks(Sk, bs), p=0.7)
    mask = np.where(rng.random((B, 1, Sq, Sk)) < 0.3, -np.inf, 0.0).astype(np.float32)
    mask[0, 0, 3, :] = -np.inf  # fully masked row
    mask[1, 0, 10:20, :30] = -np.inf  # rows masked in some blocks only
    out, _ = check(ops_library, q, k, v, layout, bs, attn_mask=mask, expect_dead_rows=True)
    assert np.all(out[0, :, 3] == 0.0)


def test_bool_mask(ops_library, rng):
    B, H, Sq, Sk, D, bs = 2, 2, 45, 60, 16, 16
    q, k, v = rand_inputs(rng, B, H, H, Sq, Sk, D)
    layout = rand_layout(rng, 1, n_blocks(Sq, bs), n_blocks(Sk, bs), p=0.7)
    mask = rng.random((B, 1, Sq, Sk)) < 0.7
    mask[1, 0, 7, :] = False  # fully masked row
    out, _ = check(ops_library, q, k, v, layout, bs, attn_mask=mask, expect_dead_rows=True)
    assert np.all(out[1, :, 7] == 0.0)


def test_all_masks_combined(ops_library, rng):
    B, Hq, Hkv, S, D, bs = 2, 4, 2, 75, 16, 32
    q, k, v = rand_inputs(rng, B, Hq, Hkv, S, S, D, Dv=24)
    layout = rand_layout(rng, Hq, n_blocks(S, bs), n_blocks(S, bs), p=0.6)
    mask = (rng.standard_normal((B, 1, S, S)) * 2).astype(np.float32)
    kpm = np.ones((B, S), np.int64)
    kpm[0, 60:] = 0
    check(ops_library, q, k, v, layout, bs, scale=0.2, is_causal=True, attn_mask=mask,
          key_padding_mask=kpm)


@pytest.mark.parametrize("scale", [None, 0.05, 1.0, -0.7])
def test_scale_attribute(ops_library, rng, scale):
    q, k, v = rand_inputs(rng, 1, 2, 2, 40, 40, 32)
    layout = rand_layout(rng, 1, 3, 3, p=0.7)
    check(ops_library, q, k, v, layout, 16, scale=scale)


def test_scale_default_is_inv_sqrt_d(ops_library, rng):
    q, k, v = rand_inputs(rng, 1, 2, 2, 40, 40, 32)
    layout = rand_layout(rng, 1, 3, 3, p=0.7)
    a = run_op(ops_library, q, k, v, layout, 16)
    b = run_op(ops_library, q, k, v, layout, 16, scale=1.0 / np.sqrt(32))
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("d,dv", [(8, 24), (32, 8), (16, 1)])
def test_dv_differs_from_d(ops_library, rng, d, dv):
    q, k, v = rand_inputs(rng, 2, 2, 1, 50, 50, d, Dv=dv)
    layout = rand_layout(rng, 2, 4, 4, p=0.6)
    check(ops_library, q, k, v, layout, 16)


def test_layout_larger_than_needed(ops_library, rng):
    bs = 16
    q, k, v = rand_inputs(rng, 2, 2, 2, 37, 21, 16)
    layout = rand_layout(rng, 2, 8, 6, p=0.6)  # covers 128 x 96 > 37 x 21
    check(ops_library, q, k, v, layout, bs)


def test_larger_problem(ops_library, rng):
    B, Hq, Hkv, S, D, bs = 2, 4, 2, 300, 32, 32
    q, k, v = rand_inputs(rng, B, Hq, Hkv, S, S, D)
    m = n_blocks(S, bs)
    layout = rand_layout(rng, Hq, m, m, p=0.3)
    check(ops_library, q, k, v, layout, bs, is_causal=True)


@pytest.mark.parametrize("b,sq,sk", [(1, 20, 0), (0, 20, 20), (1, 0, 20)])
def test_empty_dimensions(ops_library, rng, b, sq, sk):
    bs = 16
    q, k, v = rand_inputs(rng, b, 2, 2, sq, sk, 8)
    layout = np.ones((1, n_blocks(sq, bs), n_blocks(sk, bs)), np.uint8)
    out = run_op(ops_library, q, k, v, layout, bs)
    assert out.shape == (b, 2, sq, 8)
    assert np.all(out == 0.0)


def test_middle_optional_input_omitted(ops_library, rng):
    # attn_mask omitted (empty name) while key_padding_mask is given.
    B, H, S, D, bs = 2, 2, 40, 8, 16
    q, k, v = rand_inputs(rng, B, H, H, S, S, D)
    layout = rand_layout(rng, 1, 3, 3, p=0.8)
    kpm = np.ones((B, S), np.bool_)
    kpm[1, 20:] = False
    model = make_model([q.dtype, k.dtype, v.dtype, layout.dtype, None, kpm.dtype], bs)
    assert list(model.graph.node[0].input) == ["Q", "K", "V", "layout", "", "key_padding_mask"]
    sess = make_session(ops_library, model)
    out = sess.run(None, {"Q": q, "K": k, "V": v, "layout": layout, "key_padding_mask": kpm})[0]
    ref = block_sparse_attention_ref(q, k, v, layout, bs, key_padding_mask=kpm)
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=RTOL)


def test_session_reuse_with_different_shapes(ops_library, rng):
    bs = 16
    model = make_model([np.float32] * 3 + [np.uint8, None, None], bs)
    sess = make_session(ops_library, model)
    layout = rand_layout(rng, 1, 8, 8, p=0.5)
    for s in (5, 16, 17, 64, 127):
        q, k, v = rand_inputs(rng, 1, 2, 2, s, s, 8)
        out = sess.run(None, {"Q": q, "K": k, "V": v, "layout": layout})[0]
        ref = block_sparse_attention_ref(q, k, v, layout, bs)
        np.testing.assert_allclose(out, ref, atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------
# Version 2: lengths beyond the layout's explicit region, layout_rule, queries_at_end.


def rand_rule(rng, hl, n_blocks_total):
    """Per-head (sink_blocks, window_before, window_after, global_query_blocks), unbounded windows
    (-1) and zeros included."""
    rule = np.stack([
        rng.integers(0, 3, hl),
        rng.choice([-1, 0, 1, 3], hl),
        rng.choice([-1, 0, 2], hl),
        rng.integers(0, 2, hl),
    ], axis=1).astype(np.int64)
    rule[0] = (1, 1, 0, 0)  # at least one head with a proper sink + local window
    return np.minimum(rule, n_blocks_total)


@pytest.mark.parametrize("bs", [16, 32, 64, 128])
@pytest.mark.parametrize("sq,sk", [(1, 203), (5, 150), (37, 150), (100, 300), (150, 150)])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_queries_at_end(ops_library, rng, bs, sq, sk, is_causal):
    # Offset queries: the tile holding the first query starts before it and the last one is
    # partial; layout rows and causal masking use the absolute positions sk - sq + i.
    H = 2
    q, k, v = rand_inputs(rng, 1, H, H, sq, sk, 16)
    m = n_blocks(sk, bs)
    layout = rand_layout(rng, H, m, m, p=0.5)
    check(ops_library, q, k, v, layout, bs, is_causal=is_causal, queries_at_end=True)


@pytest.mark.parametrize("bs", [16, 32, 64, 128])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_rule_beyond_the_explicit_region(ops_library, rng, bs, is_causal):
    B, Hq, Hkv, S, D = 1, 4, 2, 301, 16
    q, k, v = rand_inputs(rng, B, Hq, Hkv, S, S, D)
    layout = rand_layout(rng, Hq, 2, 2, p=0.5)
    rule = rand_rule(rng, Hq, n_blocks(S, bs))
    check(ops_library, q, k, v, layout, bs, is_causal=is_causal, layout_rule=rule)


@pytest.mark.parametrize("explicit", [0, 1], ids=["rule-only", "one-block"])
@pytest.mark.parametrize("bs", [16, 64])
@pytest.mark.parametrize("sq,sk,at_end", [(130, 130, False), (7, 130, True), (1, 97, True), (40, 97, False)])
def test_rule_only_layouts(ops_library, rng, explicit, bs, sq, sk, at_end):
    Hq = 3
    q, k, v = rand_inputs(rng, 2, Hq, 1, sq, sk, 24)
    layout = np.ones((Hq, explicit, explicit), np.uint8)
    rule = np.array([[1, 1, 0, 0], [0, 0, 0, 1], [2, -1, 1, 0]], np.int64)
    check(ops_library, q, k, v, layout, bs, is_causal=True, layout_rule=rule, queries_at_end=at_end)


@pytest.mark.parametrize("sq", [1, 5, 16, 33])
def test_decode_and_chunks_with_rule_gqa_and_padding(ops_library, rng, sq):
    # A KV-cache step: batch rows of different lengths (key padding), grouped heads, a rule that
    # continues a small learned layout, causal masking at absolute positions.
    B, Hq, Hkv, Sk, D, bs = 3, 4, 2, 170, 32, 16
    q, k, v = rand_inputs(rng, B, Hq, Hkv, sq, Sk, D)
    layout = rand_layout(rng, 1, 3, 3, p=0.6)
    rule = np.array([[1, 2, 0, 1]], np.int64)
    kpm = np.ones((B, Sk), np.int64)
    kpm[1, :40] = 0  # left padding
    kpm[2, :] = 0  # no valid key at all: zeros
    out, _ = check(ops_library, q, k, v, layout, bs, is_causal=True, key_padding_mask=kpm, layout_rule=rule,
                   queries_at_end=True, expect_dead_rows=True)
    assert np.all(out[2] == 0.0)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attn_mask_with_queries_at_end(ops_library, rng, kind):
    # attn_mask [B, 1, Sq, Sk] is indexed by the local query, not by its absolute position.
    B, H, Sq, Sk, D, bs = 2, 2, 21, 90, 16, 16
    q, k, v = rand_inputs(rng, B, H, H, Sq, Sk, D)
    layout = rand_layout(rng, 1, 2, 2)
    if kind == "bool":
        mask = rng.random((B, 1, Sq, Sk)) < 0.7
        mask[0, 0, 4] = False
    else:
        mask = (rng.standard_normal((B, 1, Sq, Sk)) * 2).astype(np.float32)
        mask[0, 0, 4] = -np.inf
    out, _ = check(ops_library, q, k, v, layout, bs, attn_mask=mask, layout_rule=np.array([[0, 1, 1, 0]], np.int64),
                   queries_at_end=True, expect_dead_rows=True)
    assert np.all(out[0, :, 4] == 0.0)


def test_rule_rows_fully_masked_give_zeros(ops_library, rng):
    # Beyond the region only the diagonal block is kept (window 0, 0); key padding removes
    # every key of block 3, so the queries of block row 3 see nothing.
    B, H, S, D, bs = 1, 2, 80, 8, 16
    q, k, v = rand_inputs(rng, B, H, H, S, S, D)
    kpm = np.ones((B, S), np.bool_)
    kpm[0, 48:64] = False
    out, _ = check(ops_library, q, k, v, np.ones((1, 1, 1), np.uint8), bs, key_padding_mask=kpm,
                   layout_rule=np.array([[0, 0, 0, 0]], np.int64), expect_dead_rows=True)
    assert np.all(out[0, :, 48:64] == 0.0)
    assert np.all(np.abs(out[0, :, 64:]).sum(-1) > 0)


@pytest.mark.parametrize("sq,sk", [(100, 100), (40, 75), (75, 40)])
def test_version_1_node_continues_densely(ops_library, rng, sq, sk):
    # A version-1 file whose layout is shorter than the input: the blocks beyond it are computed.
    q, k, v = rand_inputs(rng, 2, 2, 2, sq, sk, 16)
    layout = rand_layout(rng, 2, 2, 2, p=0.5)
    out, ref = check(ops_library, q, k, v, layout, 16, op_version=1)
    dense_beyond = block_sparse_attention_ref(q, k, v, np.pad(layout, ((0, 0), (0, 5), (0, 5)), constant_values=1), 16)
    np.testing.assert_allclose(out, dense_beyond, atol=ATOL, rtol=RTOL)


def test_random_rules_lengths_and_offsets(ops_library, rng):
    # Many small random configurations: every combination of rule columns (-1 included), explicit
    # regions from empty to wider than the input, offsets, causal or not.
    for _ in range(12):
        bs = int(rng.choice([16, 32, 64, 128]))
        hq, hkv = [(2, 1), (2, 2), (4, 2)][rng.integers(3)]
        sk = int(rng.integers(1, 400))
        at_end = bool(rng.integers(2))
        sq = int(rng.integers(1, sk + 1)) if at_end else int(rng.integers(1, 300))
        hl = int(rng.choice([1, hq]))
        mq, mk = (int(x) for x in rng.integers(0, 4, 2))
        rule = np.stack([rng.integers(0, 4, hl), rng.integers(-1, 5, hl), rng.integers(-1, 5, hl),
                         rng.integers(0, 3, hl)], axis=1).astype(np.int64)
        q, k, v = rand_inputs(rng, 2, hq, hkv, sq, sk, 16)
        check(ops_library, q, k, v, rand_layout(rng, hl, mq, mk, p=0.5), bs, is_causal=bool(rng.integers(2)),
              layout_rule=rule, queries_at_end=at_end)


def test_rule_equals_its_explicit_expansion(ops_library, rng):
    # The same blocks given by the rule or written out in the layout give the same output.
    B, H, S, D, bs = 1, 2, 200, 16, 32
    q, k, v = rand_inputs(rng, B, H, H, S, S, D)
    m = n_blocks(S, bs)
    rule = np.array([[1, 2, 0, 0], [0, -1, 0, 1]], np.int64)
    r, c = np.arange(m)[:, None], np.arange(m)[None, :]
    explicit = np.stack([(c < 1) | ((c >= r - 2) & (c <= r)), (c <= r) | (r < 1)]).astype(np.uint8)
    by_rule = run_op(ops_library, q, k, v, np.zeros((H, 0, 0), np.uint8), bs, layout_rule=rule)
    by_layout = run_op(ops_library, q, k, v, explicit, bs)
    np.testing.assert_allclose(by_rule, by_layout, atol=1e-6, rtol=1e-6)


def test_queries_at_end_with_equal_lengths_is_top_left(ops_library, rng):
    q, k, v = rand_inputs(rng, 1, 2, 2, 70, 70, 16)
    layout = rand_layout(rng, 2, 5, 5)
    a = run_op(ops_library, q, k, v, layout, 16, is_causal=1, queries_at_end=1)
    b = run_op(ops_library, q, k, v, layout, 16, is_causal=1)
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------
# Errors: session.run raises an onnxruntime error naming the sizes.


def _base(rng, B=2, Hq=4, Hkv=2, Sq=40, Sk=40, D=16, Dv=16, bs=16):
    q, k, v = rand_inputs(rng, B, Hq, Hkv, Sq, Sk, D, Dv)
    layout = np.ones((1, n_blocks(Sq, bs), n_blocks(Sk, bs)), np.uint8)
    return dict(q=q, k=k, v=v, layout=layout)


def _expect_error(ops_library, fragments, block_size=16, is_causal=None, scale=None, queries_at_end=None,
                  **arrays):
    names = ["q", "k", "v", "layout", "attn_mask", "key_padding_mask", "layout_rule"]
    arrs = [arrays.get(n) for n in names]
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument) as excinfo:
        run_op(ops_library, *arrs[:4], block_size, scale=scale, is_causal=is_causal,
               attn_mask=arrs[4], key_padding_mask=arrs[5], layout_rule=arrs[6],
               queries_at_end=queries_at_end)
    msg = str(excinfo.value)
    for frag in fragments:
        assert re.search(frag, msg), f"{frag!r} not in error message: {msg}"
    return msg


def test_error_q_rank(ops_library, rng):
    a = _base(rng)
    a["q"] = a["q"][0]
    _expect_error(ops_library, [r"Q", r"rank 4", r"\[4, 40, 16\]"], **a)


def test_error_layout_rank(ops_library, rng):
    a = _base(rng)
    a["layout"] = a["layout"][0]
    _expect_error(ops_library, [r"layout", r"rank 3", r"\[3, 3\]"], **a)


def test_error_batch_mismatch(ops_library, rng):
    a = _base(rng, B=2)
    a["k"] = np.concatenate([a["k"], a["k"]], axis=0)
    a["v"] = np.concatenate([a["v"], a["v"]], axis=0)
    _expect_error(ops_library, [r"B=2", r"B=4"], **a)


def test_error_head_dim_mismatch(ops_library, rng):
    a = _base(rng, D=16)
    a["k"] = a["k"][..., :8].copy()
    _expect_error(ops_library, [r"D=16", r"D=8"], **a)


def test_error_heads_not_divisible(ops_library, rng):
    a = _base(rng, Hq=6, Hkv=4)
    _expect_error(ops_library, [r"Hq=6", r"Hkv=4"], **a)


def test_error_layout_heads(ops_library, rng):
    a = _base(rng, Hq=4, Hkv=2)
    a["layout"] = np.ones((2, 3, 3), np.uint8)
    _expect_error(ops_library, [r"Hl=2", r"Hq=4"], **a)


def test_error_v_seq_mismatch(ops_library, rng):
    a = _base(rng, Sk=40)
    a["v"] = a["v"][:, :, :30].copy()
    _expect_error(ops_library, [r"V shape \[2, 2, 30, 16\]", r"\[2, 2, 40, 16\]"], **a)


def test_error_v_heads_mismatch(ops_library, rng):
    a = _base(rng, Hq=4, Hkv=2)
    a["v"] = a["v"][:, :1].copy()
    _expect_error(ops_library, [r"\[2, 1, 40, 16\]"], **a)


@pytest.mark.parametrize("mshape", [(2, 1, 40, 41), (3, 1, 1, 40), (2, 2, 40, 40), (1, 1, 1, 1, 40)])
def test_error_mask_not_broadcastable(ops_library, rng, mshape):
    a = _base(rng, B=2, Hq=4, Sq=40, Sk=40)
    a["attn_mask"] = np.zeros(mshape, np.float32)
    frag = re.escape("[" + ", ".join(map(str, mshape)) + "]")
    _expect_error(ops_library, [frag, r"\[2, 4, 40, 40\]"], **a)


@pytest.mark.parametrize("pshape", [(2, 41), (1, 40), (2, 1, 40), (40,)])
def test_error_key_padding_shape(ops_library, rng, pshape):
    a = _base(rng, B=2, Sk=40)
    a["key_padding_mask"] = np.ones(pshape, np.bool_)
    frag = re.escape("[" + ", ".join(map(str, pshape)) + "]")
    _expect_error(ops_library, [frag, r"\[2, 40\]"], **a)


@pytest.mark.parametrize("bs", [8, 24, 256, 0, -16])
def test_error_block_size(ops_library, rng, bs):
    a = _base(rng, bs=16)
    _expect_error(ops_library, [r"block_size", str(bs)], block_size=bs, **a)


def test_error_missing_block_size(ops_library, rng):
    a = _base(rng)
    _expect_error(ops_library, [r"block_size"], block_size=None, **a)


def test_error_is_causal_value(ops_library, rng):
    a = _base(rng)
    _expect_error(ops_library, [r"is_causal", r"2"], is_causal=2, **a)


@pytest.mark.parametrize("column,value,name", [
    (0, -1, "sink_blocks=-1"), (1, -2, "window_before=-2"), (2, -5, "window_after=-5"),
    (3, -1, "global_query_blocks=-1"),
])
def test_error_rule_values(ops_library, rng, column, value, name):
    a = _base(rng, Hq=4, Hkv=2)
    a["layout"] = np.ones((4, 1, 1), np.uint8)
    rule = np.zeros((4, 4), np.int64)
    rule[2, column] = value
    a["layout_rule"] = rule
    _expect_error(ops_library, [r"layout_rule", r"head 2", name], **a)


@pytest.mark.parametrize("shape", [(1, 3), (4, 4), (4,), (1, 1, 4)])
def test_error_rule_shape(ops_library, rng, shape):
    a = _base(rng, Hq=4, Hkv=2)  # layout Hl = 1
    a["layout_rule"] = np.zeros(shape, np.int64)
    frag = re.escape("[" + ", ".join(map(str, shape)) + "]")
    _expect_error(ops_library, [r"layout_rule shape", frag, r"\[1, 4\]"], **a)


@pytest.mark.parametrize("dt", [np.int32, np.float32, np.uint8])
def test_error_rule_dtype(ops_library, rng, dt):
    a = _base(rng)
    a["layout_rule"] = np.zeros((1, 4), dt)
    _expect_error(ops_library, [r"layout_rule must be int64"], **a)


def test_error_more_queries_than_keys_at_end(ops_library, rng):
    a = _base(rng, Sq=41, Sk=40)
    _expect_error(ops_library, [r"queries_at_end", r"Sq=41", r"Sk=40"], queries_at_end=1, **a)


def test_error_queries_at_end_value(ops_library, rng):
    a = _base(rng)
    _expect_error(ops_library, [r"queries_at_end", r"2"], queries_at_end=2, **a)


@pytest.mark.parametrize("dt", [np.int32, np.float64, np.uint8])
def test_error_attn_mask_dtype(ops_library, rng, dt):
    a = _base(rng)
    a["attn_mask"] = np.zeros((2, 1, 40, 40), dt)
    _expect_error(ops_library, [r"attn_mask", r"bool or float32"], **a)


@pytest.mark.parametrize("dt", [np.int32, np.float32])
def test_error_key_padding_dtype(ops_library, rng, dt):
    a = _base(rng)
    a["key_padding_mask"] = np.ones((2, 40), dt)
    _expect_error(ops_library, [r"key_padding_mask", r"bool or int64"], **a)


@pytest.mark.parametrize("which", ["q", "layout"])
def test_error_declared_dtype(ops_library, rng, which):
    # Q/K/V/layout types are declared by the op, so ORT itself may reject the
    # model when the session is created; either way an ORT error is raised.
    a = _base(rng)
    a[which] = a[which].astype(np.float64 if which == "q" else np.int32)
    with pytest.raises(_ORT_ERRORS):
        run_op(ops_library, a["q"], a["k"], a["v"], a["layout"], 16)


def test_process_survives_errors(ops_library, rng):
    a = _base(rng)
    bad = dict(a)
    bad["layout"] = np.ones((3, 3, 3), np.uint8)  # Hl=3 heads for Hq=4
    model = make_model([np.float32] * 3 + [np.uint8, None, None], 16)
    sess = make_session(ops_library, model)
    feeds = {"Q": a["q"], "K": a["k"], "V": a["v"]}
    for _ in range(3):
        with pytest.raises(_ORT_ERRORS):
            sess.run(None, dict(feeds, layout=bad["layout"]))
    out = sess.run(None, dict(feeds, layout=a["layout"]))[0]
    ref = block_sparse_attention_ref(a["q"], a["k"], a["v"], a["layout"], 16)
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=RTOL)


def test_isa_cap_is_honoured(ops_library, monkeypatch):
    # The baseline variant runs on every CPU, so capping at it must always take effect;
    # otherwise the per-variant runs above would silently test one variant three times.
    import ctypes

    isa_of = ctypes.CDLL(ops_library).OnnxpruneCpuIsa
    isa_of.restype = ctypes.c_char_p
    monkeypatch.setenv("ONNXPRUNE_CPU_ISA", "baseline")
    assert isa_of() == b"baseline"
    monkeypatch.delenv("ONNXPRUNE_CPU_ISA")
    assert isa_of().decode() in ("avx512", "avx2", "baseline")


# ---- onnxprune.BlockSparseAttentionStatistics: Y and the pooled probabilities ------------------


def run_statistics_op(ops_library, q, k, v, layout, block_size, granularity, is_causal=False, attn_mask=None,
                      key_padding_mask=None, layout_rule=None, query_valid=None):
    arrays = [q, k, v, layout, attn_mask, key_padding_mask, layout_rule, query_valid]
    names = _INPUT_NAMES + ["query_valid"]
    node_inputs = [n if a is not None else "" for n, a in zip(names, arrays)]
    while node_inputs[-1] == "":
        node_inputs.pop()
    node = helper.make_node("BlockSparseAttentionStatistics", node_inputs, ["Y", "pooled"], domain="onnxprune",
                            block_size=block_size, is_causal=int(is_causal), granularity=granularity)
    graph = helper.make_graph(
        [node], "bsa_statistics",
        [helper.make_tensor_value_info(n, _NP_TO_ONNX[a.dtype], None) for n, a in zip(names, arrays) if a is not None],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("pooled", TensorProto.DOUBLE, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("onnxprune", 2)])
    model.ir_version = 8
    feeds = {n: a for n, a in zip(names, arrays) if a is not None}
    return make_session(ops_library, model).run(None, feeds)


def pooled_reference(q, k, layout, block_size, granularity, query_valid=None, **masks):
    """The float64 probabilities (the reference's Y with V = identity), summed over g × g cells
    of valid queries."""
    b, hkv, sk, _ = k.shape
    sq = q.shape[2]
    eye = np.broadcast_to(np.eye(sk), (b, hkv, sk, sk))
    probs = block_sparse_attention_ref(q, k, eye, layout, block_size, **masks)  # [B, Hq, Sq, Sk]
    if query_valid is not None and query_valid.shape[1] == sq:
        probs = probs * (query_valid != 0)[:, None, :, None]
    g = granularity
    mq, mk = -(-sq // g), -(-sk // g)
    padded = np.zeros(probs.shape[:2] + (mq * g, mk * g))
    padded[:, :, :sq, :sk] = probs
    return padded.reshape(b, -1, mq, g, mk, g).sum(axis=(3, 5))


def check_statistics(ops_library, q, k, v, layout, block_size, granularity, query_valid=None, **masks):
    y, pooled = run_statistics_op(ops_library, q, k, v, layout, block_size, granularity, query_valid=query_valid,
                                  **masks)
    assert pooled.dtype == np.float64
    np.testing.assert_allclose(y, block_sparse_attention_ref(q, k, v, layout, block_size, **masks), atol=ATOL,
                               rtol=RTOL)
    expected = pooled_reference(q, k, layout, block_size, granularity, query_valid, **masks)
    assert pooled.shape == expected.shape
    np.testing.assert_allclose(pooled, expected, atol=1e-5, rtol=1e-5)
    return pooled


@pytest.mark.parametrize("bs", [16, 32, 64, 128])
@pytest.mark.parametrize("g", [1, 4, 16, 64])
def test_statistics_block_sizes_and_granularities(ops_library, rng, bs, g):
    q, k, v = rand_inputs(rng, 2, 4, 2, 77, 77, 32)
    layout = rand_layout(rng, 4, n_blocks(77, bs), n_blocks(77, bs))
    mask = np.ones((2, 77), np.int64)
    mask[1, 60:] = 0
    check_statistics(ops_library, q, k, v, layout, bs, g, query_valid=mask, key_padding_mask=mask)


@pytest.mark.parametrize("g", [1, 3, 16, 48, 256])
def test_statistics_causal_gqa_dense(ops_library, rng, g):
    q, k, v = rand_inputs(rng, 3, 6, 2, 100, 100, 16)
    valid = rng.random((3, 100)) < 0.8
    check_statistics(ops_library, q, k, v, np.ones((1, 1, 1), np.uint8), 16, g, query_valid=valid, is_causal=True)


@pytest.mark.parametrize("sq,sk", [(20, 45), (45, 20), (1, 50)])
def test_statistics_rectangular_ignores_other_lengths(ops_library, rng, sq, sk):
    """query_valid of another length than Sq (cross-attention) counts every query."""
    q, k, v = rand_inputs(rng, 2, 2, 2, sq, sk, 16)
    other = np.zeros((2, sq + 1), np.int64)
    bias = rng.standard_normal((2, 1, sq, sk)).astype(np.float32)
    check_statistics(ops_library, q, k, v, np.ones((1, 1, 1), np.uint8), 16, 4, query_valid=other, attn_mask=bias)


def test_statistics_with_rule_and_masked_rows(ops_library, rng):
    q, k, v = rand_inputs(rng, 1, 2, 1, 90, 90, 8)
    layout = rand_layout(rng, 2, 2, 2)
    rule = np.array([[1, 1, 0, 0], [0, -1, 1, 1]], np.int64)
    bool_mask = rng.random((1, 1, 90, 90)) < 0.7
    bool_mask[..., 5, :] = False  # a row with no key: probability 0, Y 0
    check_statistics(ops_library, q, k, v, layout, 32, 16, layout_rule=rule, attn_mask=bool_mask)


def test_statistics_independent_of_batch_and_threads(ops_library, rng):
    q, k, v = rand_inputs(rng, 4, 2, 2, 70, 70, 16)
    layout = np.ones((1, 1, 1), np.uint8)
    whole = run_statistics_op(ops_library, q, k, v, layout, 16, 48)[1]
    for b in range(4):
        alone = run_statistics_op(ops_library, q[b:b + 1], k[b:b + 1], v[b:b + 1], layout, 16, 48)[1]
        np.testing.assert_array_equal(alone[0], whole[b])


def test_statistics_errors(ops_library, rng):
    q, k, v = rand_inputs(rng, 1, 2, 2, 20, 20, 8)
    layout = np.ones((1, 1, 1), np.uint8)
    with pytest.raises(_ORT_ERRORS, match="granularity must be >= 1"):
        run_statistics_op(ops_library, q, k, v, layout, 16, 0)
    with pytest.raises(_ORT_ERRORS, match=r"query_valid shape \[3, 20\] must be \[B, S\]"):
        run_statistics_op(ops_library, q, k, v, layout, 16, 4, query_valid=np.ones((3, 20), np.int64))
    with pytest.raises(_ORT_ERRORS, match="query_valid must be bool or int64"):
        run_statistics_op(ops_library, q, k, v, layout, 16, 4, query_valid=np.ones((1, 20), np.float32))


def test_statistics_without_values(ops_library, rng):
    """Dv = 0: Y is empty, the probabilities are still pooled."""
    q, k, v = rand_inputs(rng, 1, 2, 2, 40, 40, 8, Dv=0)
    check_statistics(ops_library, q, k, v, np.ones((1, 1, 1), np.uint8), 16, 16)
