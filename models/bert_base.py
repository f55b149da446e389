"""A BERT-base-shaped encoder with random weights (12 layers, hidden 768, 12 heads, FFN 3072),
returning its last hidden state: the long-sequence benchmarks' model (tools/bench_e2e.py,
tools/bench_rewrite.py). Random weights serve speed and graph-size measurements, not quality.

    onnxprune export models.bert_base:make -o bert_base.onnx
"""

from __future__ import annotations

from .wrap import named_inputs

LAYERS = 12
HIDDEN = 768
HEADS = 12
MAX_POSITIONS = 512


def build(max_positions: int = MAX_POSITIONS, layers: int = LAYERS, hidden: int = HIDDEN, heads: int = HEADS,
          attn: str = "eager"):
    """The encoder (``input_ids``, ``attention_mask`` → last hidden state), weights drawn after
    ``torch.manual_seed(0)``; FFN width 4 × ``hidden`` as in BERT."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, max_position_embeddings=max_positions, attn_implementation=attn)
    return named_inputs(BertModel(config, add_pooling_layer=False), ["input_ids", "attention_mask"])


def make(max_positions: int = MAX_POSITIONS, **shape):
    """``(module, {input name: example tensor})`` for ``onnxprune export``: one 64-token input of
    token ids in [1000, 2000)."""
    import torch

    module = build(max_positions, **shape)
    ids = torch.randint(1000, 2000, (1, 64))
    return module, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
