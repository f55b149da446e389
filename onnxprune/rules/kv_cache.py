"""Attention over a KV cache, as a ``text-generation-with-past`` export computes it (GPT-2,
GPT-NeoX, Llama, Qwen2, ... in the eager and SDPA forms):

    present = Concat(past_key_values.i.key, K_new, axis=-2)      (the same for V)
    [repeat_kv: Reshape(Expand(Unsqueeze(present, 2)))]          (grouped-query attention)
    Kᵀ = Transpose(·, [0, 1, 3, 2])  or  Reshape(Transpose(Reshape(·, 3-D), [0, 2, 1]), 4-D)  (SDPA)

The eager, SDPA and opset-23 ``Attention`` rules match the attention itself; ``cache_form``
turns such a site into the cache form: the op reads the concatenated (present) K and V in their ``Hkv`` heads, and its
queries are the last ``Sq`` of the ``Sk = past + new`` key positions (``queries_at_end = 1``),
so the layout's blocks line up with absolute positions during decode.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from onnxprune.rules._common import SiteMatch, grouped_source, rank_of, same_dim, transposed_key

#: Ops between a cache Concat and the attention that only move or repeat its values.
_LAYOUT_OPS = ("Reshape", "Expand", "Unsqueeze", "Transpose")


def _is_op(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def cache_concat(value: ir.Value) -> bool:
    """Whether ``value`` is ``Concat(past, new)`` along the sequence axis of ``[B, H, S, D]``
    tensors, with ``past`` a graph input (the cache the caller feeds back)."""
    node = value.producer()
    if not _is_op(node, "Concat") or len(node.inputs) != 2 or rank_of(value) != 4:
        return False
    axis = node.attributes.get("axis")
    past = node.inputs[0]
    return axis is not None and axis.as_int() in (2, -2) and past is not None and past.is_graph_input()


def reaches_cache(value: ir.Value, steps: int = 6) -> bool:
    """Whether ``value`` is a cache ``Concat`` moved or repeated by a few layout ops."""
    for _ in range(steps):
        if cache_concat(value):
            return True
        node = value.producer()
        if node is None or node.op_type not in _LAYOUT_OPS or node.domain not in ("", "ai.onnx"):
            return False
        value = node.inputs[0]
    return False


def untransposed_key(k_transposed: ir.Value) -> ir.Value | None:
    """K ``[B, H, Sk, D]`` behind Kᵀ: a 4-D ``Transpose``, or the SDPA decomposition's
    ``Reshape(Transpose(Reshape(K, [B·H, Sk, D]), [0, 2, 1]), [B, H, D, Sk])``; None otherwise."""
    key = transposed_key(k_transposed)
    if key is not None:
        return key
    outer = k_transposed.producer()
    if not _is_op(outer, "Reshape"):
        return None
    transpose = outer.inputs[0].producer()
    perm = transpose.attributes.get("perm") if _is_op(transpose, "Transpose") else None
    if perm is None or list(perm.as_ints()) != [0, 2, 1]:
        return None
    inner = transpose.inputs[0].producer()
    if not _is_op(inner, "Reshape"):
        return None
    key, flat = inner.inputs[0], inner.outputs[0]
    if key.shape is None or flat.shape is None or k_transposed.shape is None:
        return None
    if len(key.shape) != 4 or len(flat.shape) != 3 or len(k_transposed.shape) != 4:
        return None
    # The same tensor, transposed: [B, H, Sk, D] → [·, Sk, D] → [B, H, D, Sk], every axis accounted for.
    same = [(key, 2, flat, 1), (key, 3, flat, 2), (key, 0, k_transposed, 0), (key, 1, k_transposed, 1),
            (key, 3, k_transposed, 2), (key, 2, k_transposed, 3)]
    if not all(same_dim(a.shape[i], b.shape[j]) for a, i, b, j in same):
        return None
    return key


def cache_form(site: SiteMatch) -> SiteMatch | str:
    """``site`` in its cache form when its K and V are a KV cache ``Concat``; ``site`` itself
    when neither is; a reason when the cache is there but not in a form the op can take."""
    key = site.k if site.k is not None else untransposed_key(site.k_transposed)
    value_source = grouped_source(site.v)
    key_source = grouped_source(key) if key is not None else None
    key_cached = key_source is not None and cache_concat(key_source)
    value_cached = cache_concat(value_source)
    if not key_cached and not value_cached:
        # A cache behind a path not followed above: its queries would be misplaced as a plain site.
        if reaches_cache(site.k if site.k is not None else site.k_transposed) or reaches_cache(site.v):
            return "the keys or values come from a KV cache by a path the kv-cache rule does not follow"
        return site
    if not (key_cached and value_cached):
        return "only one of the keys and values comes from a KV cache Concat"
    if (key_source is key) != (value_source is site.v):
        return "the keys and values of the KV cache are not grouped alike (repeat_kv on one only)"
    if site.is_causal:  # the site's causal mask is top-left aligned; with queries at the end the op's is not
        return "causal attention over a KV cache with the causal mask aligned top-left"
    return dataclasses.replace(site, form=f"{site.form}-kv-cache", k=key_source, k_transposed=None,
                               v=value_source, queries_at_end=True)
