"""The CPU kernel's decode path (Sq <= 16: one task per batch, KV head and chunk of kept key
blocks, all G query heads of the group as the rows of one tile, split-K merged by log-sum-exp)
against the float64 numpy reference in bsa_reference.py.

Every case runs with 1 and with 4 intra-op threads: the split into chunks does not depend on
the run's thread count, so both outputs must be bitwise equal (and close to the reference).
"""

import ctypes
import os
import sys
import zlib

import numpy as np
import onnxruntime as ort
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bsa_reference import block_sparse_attention_ref  # noqa: E402
from test_kernel_cpu import _INPUT_NAMES, make_model  # noqa: E402

ATOL = 1e-5
RTOL = 1e-4


def run(ops_library, threads, case, arrays):
    dtypes = [None if a is None else a.dtype for a in arrays]
    model = make_model(dtypes, case["block"], is_causal=case.get("causal", False),
                       queries_at_end=case.get("at_end", True))
    so = ort.SessionOptions()
    so.register_custom_ops_library(ops_library)
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {n: a for n, a in zip(_INPUT_NAMES, arrays) if a is not None})[0]


def inputs(case):
    """Fresh random inputs for the case (seeded by its name); per-head random layouts."""
    rng = np.random.default_rng(zlib.crc32(case["id"].encode()))
    B, Hkv, G, Sq, Sk = case.get("B", 1), case.get("Hkv", 2), case["G"], case["Sq"], case["Sk"]
    D, Dv, bs = case.get("D", 32), case.get("Dv", case.get("D", 32)), case["block"]
    Hq = Hkv * G
    q = rng.standard_normal((B, Hq, Sq, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, Sk, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, Sk, Dv)).astype(np.float32)
    m = case.get("explicit_blocks", -(-Sk // bs))
    hl = 1 if case.get("shared_layout") else Hq
    layout = (rng.random((hl, m, m)) < case.get("density", 0.6)).astype(np.uint8)
    layout[:, np.arange(m), np.arange(m)] = 1
    for h in case.get("empty_heads", ()):
        layout[h] = 0  # that head keeps no block: its rows are fully masked
    rule = None
    if case.get("rule"):
        # Per head its own sink and window, so that heads of one group differ beyond the layout.
        window = case.get("window", 0)
        rule = np.array([[1 + h % 2, window + h % 3, 0, 0] for h in range(hl)], np.int64)
    padding = None
    if case.get("padding"):
        padding = rng.random((B, Sk)) < 0.8
        padding[0, :] = False  # batch row 0: every key padded, every row fully masked
        padding = padding.astype(case["padding"])
    mask = None
    if case.get("mask") == "bool":
        mask = rng.random((B, 1, Sq, Sk)) < 0.9
    elif case.get("mask") == "float-heads":
        mask = rng.standard_normal((B, Hq, Sq, Sk)).astype(np.float32)
    elif case.get("mask") == "float-keys":
        mask = rng.standard_normal((B, 1, 1, Sk)).astype(np.float32)
    return [q, k, v, layout, mask, padding, rule]


def case(id, **kw):
    return pytest.param(dict(id=id, **kw), id=id)


CASES = [
    # Sq over 1..16 (a vector of 16, 8 or 4 rows holds one head, several, or a part), G in {1, 3},
    # Sk not a multiple of the block, causal, queries at the end.
    *(case(f"sq{sq}-g{g}", Sq=sq, G=g, Sk=200, block=32, causal=True)
      for sq in (1, 2, 3, 5, 8, 13, 16) for g in (1, 3)),
    case("single-block", Sq=4, G=3, Sk=20, block=32, causal=True),
    case("single-key", Sq=1, G=3, Sk=1, block=16),
    # Queries straddling a block boundary (positions 60 .. 69 of block 64): rows of two block rows.
    case("offset-straddles", Sq=10, G=3, Sk=70, block=64, causal=True, density=0.5),
    case("queries-at-start", Sq=5, G=3, Sk=300, block=32, at_end=False),
    case("queries-at-start-causal", Sq=16, G=1, Sk=90, block=16, at_end=False, causal=True),
    case("more-queries-than-keys", Sq=12, G=3, Sk=5, block=16, at_end=False, causal=True),
    case("padding-bool", B=2, Sq=3, G=3, Sk=150, block=32, padding=np.bool_, causal=True),
    case("padding-int64", B=2, Sq=1, G=1, Sk=150, block=16, padding=np.int64),
    case("empty-head", Sq=2, G=3, Sk=130, block=16, empty_heads=(1,), causal=True),
    case("mask-bool", B=2, Sq=4, G=3, Sk=100, block=16, mask="bool"),
    case("mask-float-per-head", Sq=6, G=3, Sk=100, block=32, mask="float-heads", causal=True),
    case("mask-float-keys", B=2, Sq=1, G=3, Sk=100, block=32, mask="float-keys"),
    case("shared-layout", Sq=7, G=3, Sk=111, block=16, shared_layout=True, density=0.4),
    case("head-size-odd", Sq=3, G=3, Sk=77, block=16, D=40, Dv=24),
    # Lengths beyond the explicit layout: the per-head rule continues it.
    case("rule", Sq=1, G=3, Sk=1000, block=16, explicit_blocks=4, rule=True, causal=True),
    case("rule-chunk", Sq=16, G=3, Sk=999, block=32, explicit_blocks=2, rule=True, causal=True),
    case("dense-beyond-layout", Sq=2, G=3, Sk=500, block=64, explicit_blocks=3),
    # Split-K: one (b, hk) pair and >= 4 * 256 kept keys, so the kept blocks are split into
    # min(4 * cores, kept / 16) >= 4 chunks on any machine, merged by the last one to finish.
    case("split-dense", Sq=1, G=3, Hkv=1, Sk=2000, block=16, density=1.0),
    case("split-sparse", Sq=16, G=3, Hkv=1, Sk=3000, block=16, density=0.5, causal=True),
    case("split-g1-padding", B=2, Sq=5, G=1, Hkv=1, Sk=2500, block=64, density=1.0, padding=np.bool_),
    case("split-rule", Sq=1, G=3, Hkv=1, Sk=3000, block=16, explicit_blocks=8, rule=True, window=70,
         mask="float-heads"),
]


@pytest.fixture(params=["native", "avx2", "baseline"])
def cpu_isa(request, ops_library, monkeypatch):
    """Each compiled kernel variant (a lower one where this CPU lacks it)."""
    if request.param == "native":
        monkeypatch.delenv("ONNXPRUNE_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONNXPRUNE_CPU_ISA", request.param)
    isa_of = ctypes.CDLL(ops_library).OnnxpruneCpuIsa
    isa_of.restype = ctypes.c_char_p
    return isa_of().decode()


@pytest.mark.parametrize("c", CASES)
def test_decode_matches_reference(ops_library, cpu_isa, c):
    arrays = inputs(c)
    q, k, v, layout, mask, padding, rule = arrays
    ref = block_sparse_attention_ref(q, k, v, layout, c["block"], is_causal=c.get("causal", False),
                                     attn_mask=mask, key_padding_mask=padding, layout_rule=rule,
                                     queries_at_end=c.get("at_end", True))
    one = run(ops_library, 1, c, arrays)
    many = run(ops_library, 4, c, arrays)
    np.testing.assert_array_equal(one, many)
    np.testing.assert_allclose(one, ref, atol=ATOL, rtol=RTOL)
    if c.get("padding") is not None:
        assert not one[0].any()  # batch row 0 has no key: its rows are zero
    for h in c.get("empty_heads", ()):
        assert not one[:, h].any() and one[:, h + 1].any()
