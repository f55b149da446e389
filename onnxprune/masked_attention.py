"""The op's semantics inside a transformers model in PyTorch: block layouts as attention masks.

``onnxprune.BlockSparseAttention`` computes ``softmax(scale·QKᵀ + attn_mask)`` over the positions
its layout keeps (a kept block ``(i, j)`` covers queries ``i·b … i·b+b-1`` and keys ``j·b …``);
a row with no kept, unmasked key gives 0. Here the same thing runs as a transformers attention
function, so a PyTorch model can be evaluated, and fine-tuned, with exactly the mask the pruned
ONNX model will apply. Layouts come from a pruned ``.onnx`` (:func:`onnxprune.layouts.load_layouts`)
or straight from :func:`onnxprune.layouts.learn_layouts`.
"""

from __future__ import annotations

import contextlib

from onnxprune.errors import OnnxpruneError
from onnxprune.layout_rule import blocks_at
from onnxprune.layouts import Layouts

#: The name the attention function is registered under in transformers.
ATTN_IMPLEMENTATION = "onnxprune_block_sparse"


def _expanded_allowed(site, block_size: int, sq: int, sk: int, offset: int, device):
    """Bool ``[H or 1, Sq, Sk]``: the positions the site's layout keeps for queries at absolute
    positions ``offset …`` (the explicit layout inside its region, its rule beyond)."""
    import torch

    first, last = offset // block_size, (offset + sq - 1) // block_size
    blocks = blocks_at(site.layout, site.rule, last - first + 1, -(-sk // block_size), first)
    allowed = torch.from_numpy(blocks).to(device)
    if block_size > 1:
        allowed = allowed.repeat_interleave(block_size, dim=1).repeat_interleave(block_size, dim=2)
    start = offset - first * block_size
    return allowed[:, start : start + sq, :sk]


def block_sparse_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function with the op's semantics.

    Uses ``module.onnxprune_site`` (a :class:`~onnxprune.layouts.SiteLayout`, or None for dense)
    and ``module.onnxprune_block_size``; records its output when a recorder is active. Decoder
    self-attention given fewer queries than keys (a KV cache) has its queries at the end, as the
    op's ``queries_at_end``; otherwise queries start at position 0.
    """
    import torch

    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: query head h reads KV head h // groups
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    site = getattr(module, "onnxprune_site", None)
    if site is not None:
        sq, sk = scores.shape[-2], scores.shape[-1]
        offset = sk - sq if getattr(module, "is_causal", False) and sq < sk else 0
        key = (sq, sk, offset, scores.device)
        cache = module.__dict__.setdefault("onnxprune_allowed", {})
        if key not in cache:  # training repeats the same few lengths: expand each once
            cache[key] = _expanded_allowed(site, module.onnxprune_block_size, sq, sk, offset, scores.device)
        scores = scores.masked_fill(~cache[key], float("-inf"))
    # The op's rule for a row with nothing left: output 0 (softmax would give NaN).
    dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    output = torch.matmul(probs, value)
    recorder = getattr(module, "onnxprune_recorder", None)
    if recorder is not None:
        recorder.append(output)
    return output.transpose(1, 2).contiguous(), probs


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, block_sparse_attention_forward)
    # The same additive float mask as eager attention: the pruned ONNX model's attn_mask.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


def attention_modules(model) -> list:
    """The modules that call the attention function, in the order they run (one dry forward)."""
    import torch

    _register()
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    seen: list = []

    def record(module, *args, **kwargs):
        seen.append(module)
        return block_sparse_attention_forward(module, *args, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, record)
    try:
        ids = torch.ones(1, 4, dtype=torch.long, device=model.device)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        AttentionInterface.register(ATTN_IMPLEMENTATION, block_sparse_attention_forward)
    return seen


def apply_layouts(model, layouts: Layouts | None) -> list:
    """Make ``model`` attend like the pruned ONNX model (``layouts`` None: dense, same code path).

    The sites' layouts go to the attention modules in execution order (the order ``layouts``
    lists them). Returns the attention modules.
    """
    modules = attention_modules(model)
    if layouts is not None and len(layouts.sites) != len(modules):
        raise OnnxpruneError(f"{len(layouts.sites)} layouts for a model with {len(modules)} attention layers")
    sites = [None] * len(modules) if layouts is None else list(layouts.sites.values())
    for module, site in zip(modules, sites):
        module.onnxprune_site = site
        module.onnxprune_block_size = None if layouts is None else layouts.block_size
        module.onnxprune_allowed = {}
    return modules


@contextlib.contextmanager
def recording(modules):
    """Collect each attention module's output (``[B, H, S, D]``) during the forwards inside."""
    outputs: list = []
    for module in modules:
        module.onnxprune_recorder = outputs
    try:
        yield outputs
    finally:
        for module in modules:
            module.onnxprune_recorder = None
