"""Float64 numpy reference for onnxprune.BlockSparseAttention (version 2; version 1 is version 2
without ``layout_rule`` and ``queries_at_end``).

Deliberately simple: it materialises the full [B, Hq, Sq, Sk] score matrix and
the full additive bias, then applies a masked softmax. The block mask is written out per
(head, query position, key position) from the contract's words, independently of the kernel's
per-block loop.
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
    layout_rule=None,
    queries_at_end=False,
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

    allowed &= block_mask(layout, block_size, Hq, Sq, Sk, layout_rule, queries_at_end)[None]

    if key_padding_mask is not None:
        kpm = np.asarray(key_padding_mask) != 0  # [B, Sk]
        allowed &= kpm[:, None, None, :]

    if is_causal:
        i = query_positions(Sq, Sk, queries_at_end)[:, None]
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


def query_positions(Sq, Sk, queries_at_end=False):
    """Absolute position of each query: the last Sq of Sk positions, or 0 .. Sq-1."""
    return np.arange(Sq) + (Sk - Sq if queries_at_end else 0)


def block_mask(layout, block_size, Hq, Sq, Sk, layout_rule=None, queries_at_end=False):
    """[Hq, Sq, Sk] bool: whether each element's block is computed for each head."""
    layout = np.asarray(layout) != 0
    Hl, Mq, Mk = layout.shape
    qb = query_positions(Sq, Sk, queries_at_end) // block_size
    kb = np.arange(Sk) // block_size
    n_qb = int(qb.max()) + 1 if Sq else 0
    n_kb = int(kb.max()) + 1 if Sk else 0
    # The grid of blocks every element falls in: the layout's where it has them, else the rule.
    r = np.arange(n_qb)[None, :, None]
    c = np.arange(n_kb)[None, None, :]
    explicit = np.zeros((Hl, n_qb, n_kb), dtype=bool)
    explicit[:, : min(n_qb, Mq), : min(n_kb, Mk)] = layout[:, :n_qb, :n_kb]
    if layout_rule is None:
        continued = np.ones((Hl, n_qb, n_kb), dtype=bool)
    else:
        rule = np.asarray(layout_rule, dtype=np.int64)
        assert rule.shape == (Hl, 4)
        sink, before, after, global_rows = (rule[:, k, None, None] for k in range(4))
        in_window = ((before == -1) | (c >= r - before)) & ((after == -1) | (c <= r + after))
        continued = (c < sink) | in_window | (r < global_rows)
    grid = np.where((r < Mq) & (c < Mk), explicit, continued)
    out = grid[:, qb][:, :, kb]
    return np.broadcast_to(out, (Hq, Sq, Sk)) if Hl == 1 else out
