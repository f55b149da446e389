"""Tiny random-init models (2 layers, hidden 32, 4 heads, seeded) of every common transformer
family: the structure tests' models. Nothing is downloaded; each builds in well under a second.

``RECIPES[name]`` builds a family's model wrapped to take named tensors and return one tensor,
with example inputs; ``transformers_model(name)`` is the transformers model itself (to save as a
model directory). ``bert`` and ``gpt2`` are ``module:function`` recipes for ``onnxprune export``::

    onnxprune export models.tiny:bert -o bert.onnx
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

from .wrap import named_inputs

LAYERS = 2
HEADS = 4
HIDDEN = 32
FFN = 64
VOCAB = 100
MAX_POSITIONS = 64
ENCODER_LENGTH = 40  # longer than two blocks of 16: pruned blocks are reached
DECODER_LENGTH = 24  # ≠ ENCODER_LENGTH: cross-attention is rectangular
TEXT = ("input_ids", "attention_mask")
SEQ2SEQ = (*TEXT, "decoder_input_ids")

#: the config entries that BERT, its relatives and most decoders spell alike
_COMMON = dict(
    hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
    vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS,
)

#: family → (transformers config class, model class, config)
CONFIGS: dict[str, tuple[str, str, dict]] = {
    "bert": ("BertConfig", "BertModel", _COMMON),
    "roberta": ("RobertaConfig", "RobertaModel", dict(pad_token_id=1, **_COMMON)),
    "distilbert": ("DistilBertConfig", "DistilBertModel", dict(
        dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN, vocab_size=VOCAB,
        max_position_embeddings=MAX_POSITIONS)),
    "albert": ("AlbertConfig", "AlbertModel", dict(embedding_size=16, **_COMMON)),
    "electra": ("ElectraConfig", "ElectraModel", dict(embedding_size=16, **_COMMON)),
    "vit": ("ViTConfig", "ViTModel", dict(
        image_size=24, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=FFN)),
    "gpt2": ("GPT2Config", "GPT2Model", dict(
        n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=MAX_POSITIONS)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXModel", _COMMON),
    "opt": ("OPTConfig", "OPTModel", dict(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=FFN,
        word_embed_proj_dim=HIDDEN, vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS)),
    # ALiBi: a per-head linear bias added to the scores, then masked_fill.
    "mpt": ("MptConfig", "MptModel", dict(
        d_model=HIDDEN, n_heads=HEADS, n_layers=LAYERS, expansion_ratio=2, max_seq_len=MAX_POSITIONS,
        vocab_size=VOCAB)),
    # ALiBi added by baddbmm to scores computed with the heads folded into the batch.
    "bloom": ("BloomConfig", "BloomModel", dict(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB)),
    "llama": ("LlamaConfig", "LlamaModel", dict(num_key_value_heads=2, **_COMMON)),
    "qwen2": ("Qwen2Config", "Qwen2Model", dict(num_key_value_heads=1, **_COMMON)),
    "bart": ("BartConfig", "BartModel", dict(
        d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, vocab_size=VOCAB,
        max_position_embeddings=MAX_POSITIONS)),
    "t5": ("T5Config", "T5Model", dict(
        d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN, num_layers=LAYERS, num_decoder_layers=LAYERS,
        num_heads=HEADS, vocab_size=VOCAB, relative_attention_num_buckets=8, relative_attention_max_distance=32)),
    "whisper": ("WhisperConfig", "WhisperModel", dict(
        d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, num_mel_bins=8,
        max_source_positions=20, max_target_positions=32, vocab_size=VOCAB, pad_token_id=1, bos_token_id=2,
        eos_token_id=2, decoder_start_token_id=2)),
}


def transformers_model(name: str, attn: str | None = "eager", seed: int = 0, **overrides):
    """The tiny transformers model of family ``name`` (``CONFIGS``), random weights drawn after
    ``torch.manual_seed(seed)``; ``overrides`` replace config entries. ``attn=None`` leaves the
    attention implementation to transformers."""
    import torch
    import transformers

    config_class, model_class, config = CONFIGS[name]
    torch.manual_seed(seed)
    if attn is not None:
        overrides = {"attn_implementation": attn, **overrides}
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**{**config, **overrides}))


# ---- example inputs: rng, batch → {name: array}


def text_inputs(rng: np.random.Generator, batch: int, length: int = ENCODER_LENGTH) -> dict[str, np.ndarray]:
    ids = rng.integers(3, VOCAB, size=(batch, length)).astype(np.int64)
    mask = np.ones((batch, length), np.int64)
    for row in range(1, batch):  # rows after the first are padded, by different amounts
        mask[row, int(rng.integers(length // 3, length)):] = 0
    return {"input_ids": ids, "attention_mask": mask}


def seq2seq_inputs(rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
    feeds = text_inputs(rng, batch)
    feeds["decoder_input_ids"] = rng.integers(3, VOCAB, size=(batch, DECODER_LENGTH)).astype(np.int64)
    return feeds


def image_inputs(rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
    return {"pixel_values": rng.standard_normal((batch, 3, 24, 24)).astype(np.float32)}


def audio_inputs(rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
    return {"input_features": rng.standard_normal((batch, 8, 40)).astype(np.float32)}


TEXT_DYNAMIC = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
SEQ2SEQ_DYNAMIC = {**TEXT_DYNAMIC, "decoder_input_ids": {0: "batch", 1: "target"}}


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    build: Callable[[str], object]  # attn_implementation → torch module: named tensors in, one tensor out
    inputs: Callable[[np.random.Generator, int], dict[str, np.ndarray]]  # rng, batch → feeds
    dynamic: Mapping[str, Mapping[int, str]]  # input → {axis: name} of the axes that vary

    def example(self, attn: str = "eager", batch: int = 2, seed: int = 0):
        """``(module, {input name: example tensor})``: what ``onnxprune export`` takes."""
        import torch

        feeds = self.inputs(np.random.default_rng(seed), batch)
        return self.build(attn), {n: torch.from_numpy(v) for n, v in feeds.items()}


def _hf(name: str, names=TEXT, inputs=text_inputs, dynamic=TEXT_DYNAMIC, **fixed) -> Recipe:
    """A transformers family: ``fixed`` are forward arguments every call gets (``use_cache``)."""
    return Recipe(name, lambda attn: named_inputs(transformers_model(name, attn), list(names), **fixed), inputs, dynamic)


def _whisper_encoder(attn: str):
    return named_inputs(transformers_model("whisper", attn).get_encoder(), ["input_features"])


def _torch_encoder(attn: str):
    """``nn.TransformerEncoder`` over an embedding; the padding mask as a bool key mask (it has one
    attention implementation: ``attn`` is ignored)."""
    import torch

    torch.manual_seed(0)

    class HandWritten(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
            layer = torch.nn.TransformerEncoderLayer(HIDDEN, HEADS, FFN, dropout=0.0, batch_first=True)
            self.encoder = torch.nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)

        def forward(self, input_ids, attention_mask):
            return self.encoder(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)

    return HandWritten().eval()


_NO_CACHE = {"use_cache": False}
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        *(_hf(name) for name in ("bert", "roberta", "distilbert", "albert", "electra")),
        _hf("vit", names=("pixel_values",), inputs=image_inputs, dynamic={"pixel_values": {0: "batch"}}),
        *(_hf(name, **_NO_CACHE) for name in ("gpt2", "gpt_neox", "opt", "mpt", "bloom", "llama", "qwen2")),
        *(_hf(name, names=SEQ2SEQ, inputs=seq2seq_inputs, dynamic=SEQ2SEQ_DYNAMIC, **_NO_CACHE) for name in ("bart", "t5")),
        Recipe("whisper_encoder", _whisper_encoder, audio_inputs, {"input_features": {0: "batch"}}),
        Recipe("torch_encoder", _torch_encoder, text_inputs, TEXT_DYNAMIC),
    ]
}


def bert():
    """Tiny BERT, eager attention: ``onnxprune export models.tiny:bert``."""
    return RECIPES["bert"].example()


def gpt2():
    """Tiny GPT-2, eager attention: ``onnxprune export models.tiny:gpt2``."""
    return RECIPES["gpt2"].example()
