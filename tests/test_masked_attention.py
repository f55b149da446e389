"""The PyTorch attention function with the op's semantics, against the float64 reference and
against the pruned ONNX model run by the library's kernel."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bsa_reference import block_sparse_attention_ref  # noqa: E402
from onnxprune.errors import OnnxpruneError  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


class _Module(torch.nn.Module):
    training = False


def _run(q, k, v, layout, block_size, mask=None, scale=None, rule=None, is_causal=False):
    from onnxprune.layouts import SiteLayout
    from onnxprune.masked_attention import block_sparse_attention_forward

    module = _Module()
    module.is_causal = is_causal
    module.onnxprune_site = SiteLayout(layout=layout, rule=rule)
    module.onnxprune_block_size = block_size
    out, _ = block_sparse_attention_forward(
        module, torch.as_tensor(q), torch.as_tensor(k), torch.as_tensor(v),
        None if mask is None else torch.as_tensor(mask), scaling=scale,
    )
    return out.transpose(1, 2).numpy()  # back to [B, H, S, D]


@pytest.mark.parametrize(
    "b,hq,hkv,sq,sk,d,block,shared,with_mask,empty_row",
    [
        (1, 2, 2, 16, 16, 8, 16, False, False, False),
        (2, 4, 4, 37, 37, 16, 16, False, True, False),
        (1, 4, 2, 50, 50, 8, 16, True, True, False),  # grouped heads, shared layout
        (2, 2, 2, 70, 70, 8, 32, False, True, True),  # odd length, a row with no kept block
        (1, 3, 3, 20, 45, 8, 16, False, False, True),  # rectangular (cross-attention shape)
    ],
)
def test_matches_float64_reference(b, hq, hkv, sq, sk, d, block, shared, with_mask, empty_row):
    rng = np.random.default_rng(sq * 7 + hq)
    q = rng.standard_normal((b, hq, sq, d)).astype(np.float32)
    k = rng.standard_normal((b, hkv, sk, d)).astype(np.float32)
    v = rng.standard_normal((b, hkv, sk, d)).astype(np.float32)
    mq, mk = -(-sq // block), -(-sk // block)
    layout = (rng.random((1 if shared else hq, mq, mk)) < 0.5).astype(np.uint8)
    layout[:, :, 0] = 1
    if empty_row:
        layout[0, mq - 1, :] = 0
    mask = None
    if with_mask:  # the additive form transformers' eager mask has: 0 or the dtype's minimum
        valid = np.ones((b, sk), bool)
        valid[-1, sk - 5 :] = False
        mask = np.where(valid, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None, None, :]
    got = _run(q, k, v, layout, block, mask, scale=0.3)
    expected = block_sparse_attention_ref(q, k, v, layout, block, scale=0.3, attn_mask=mask)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)
    if empty_row:
        assert np.all(got[:, 0, (mq - 1) * block :] == 0)


@pytest.mark.parametrize("rule", [None, np.array([[1, 1, 0, 0], [0, 2, 0, 1]])])
@pytest.mark.parametrize("block", [16, 32])
def test_beyond_the_layout_the_rule_or_every_block(rule, block):
    rng = np.random.default_rng(block)
    b, h, s, d = 2, 2, 5 * block + 3, 8
    q, k, v = (rng.standard_normal((b, h, s, d)).astype(np.float32) for _ in range(3))
    layout = (rng.random((h, 2, 2)) < 0.6).astype(np.uint8)  # covers 2 blocks of 5 and a bit
    got = _run(q, k, v, layout, block, scale=0.4, rule=rule)
    expected = block_sparse_attention_ref(q, k, v, layout, block, scale=0.4, layout_rule=rule)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("sq", [1, 5, 16, 23])
def test_a_causal_module_with_fewer_queries_than_keys_has_them_at_the_end(sq):
    """A KV cache: the op's queries_at_end, with bottom-right causal masking."""
    rng = np.random.default_rng(sq)
    b, h, sk, d, block = 1, 2, 70, 8, 16
    q = rng.standard_normal((b, h, sq, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, h, sk, d)).astype(np.float32) for _ in range(2))
    layout = np.tril(rng.random((h, 3, 3)) < 0.7).astype(np.uint8)
    rule = np.array([[1, 1, 0, 0], [0, 0, 0, 0]])
    causal = np.where(np.arange(sk)[None, :] <= np.arange(sk - sq, sk)[:, None], 0.0, -np.inf).astype(np.float32)
    got = _run(q, k, v, layout, block, mask=causal[None, None], scale=0.3, rule=rule, is_causal=True)
    expected = block_sparse_attention_ref(q, k, v, layout, block, scale=0.3, is_causal=True, layout_rule=rule,
                                          queries_at_end=True)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)


def test_load_layouts_rejects_a_dense_model(tiny_model):
    from onnxprune.layouts import load_layouts

    with pytest.raises(OnnxpruneError, match="no onnxprune.BlockSparseAttention node"):
        load_layouts(tiny_model("bert", "dynamo-eager-20"))
