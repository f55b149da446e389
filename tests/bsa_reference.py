"""Float64 numpy reference for onnxprune.BlockSparseAttention (version 1).

Deliberately simple: it materialises the full [B, Hq, Sq, Sk] score matrix and
the full additive bias, then applies a masked softmax.
"""

import numpy as np


def block_sparse_attention_ref(
    q,
    k,
    v,
    layout,
    block_size,
    scale=None,
    is_causal=False,
    attn_mask=None,
    key_padding_mask=None,
):
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    layout = np.asarray(layout)
    B, Hq, Sq, D = q.shape
    _, Hkv, Sk, _ = k.shape
    assert Hq % Hkv == 0
    group = Hq // Hkv
    if scale is None:
        scale = 1.0 / np.sqrt(D)

    # Grouped-query attention: query head h uses KV head h // group.
    k_full = np.repeat(k, group, axis=1)  # [B, Hq, Sk, D]
    v_full = np.repeat(v, group, axis=1)  # [B, Hq, Sk, Dv]

    scores = float(scale) * np.einsum("bhid,bhjd->bhij", q, k_full)
    allowed = np.ones((B, Hq, Sq, Sk), dtype=bool)

    # Layout: block (i // bs, j // bs) of head h (or head 0 if shared).
    qi = np.arange(Sq) // block_size
    kj = np.arange(Sk) // block_size
    lay = layout != 0  # [Hl, Mq, Mk]
    lay = lay[:, qi][:, :, kj]  # [Hl, Sq, Sk]
    if lay.shape[0] == 1:
        lay = np.broadcast_to(lay, (Hq, Sq, Sk))
    allowed &= lay[None]

    if key_padding_mask is not None:
        kpm = np.asarray(key_padding_mask) != 0  # [B, Sk]
        allowed &= kpm[:, None, None, :]

    if is_causal:
        i = np.arange(Sq)[:, None]
        j = np.arange(Sk)[None, :]
        allowed &= j <= i

    bias = np.zeros((B, Hq, Sq, Sk), dtype=np.float64)
    if attn_mask is not None:
        m = np.asarray(attn_mask)
        if m.dtype == np.bool_:
            allowed &= np.broadcast_to(m, (B, Hq, Sq, Sk))
        else:
            bias = bias + np.broadcast_to(m.astype(np.float64), (B, Hq, Sq, Sk))

    s = np.where(allowed, scores + bias, -np.inf)

    row_max = s.max(axis=-1, keepdims=True)
    dead = ~np.isfinite(row_max) & (row_max < 0)  # all -inf rows
    row_max = np.where(dead, 0.0, row_max)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(s - row_max)
    denom = e.sum(axis=-1, keepdims=True)
    p = np.where(dead, 0.0, e / np.where(dead, 1.0, denom))
    return np.einsum("bhij,bhjd->bhid", p, v_full)
