"""Tiny random-init models of every common transformer family, and how each exporter sees them.

A ``Family`` builds a tiny model (2 layers, hidden 32, 4 heads) wrapped to take plain tensors and
return one tensor, its example inputs, and what the graph must hold: the number of attention
sites and which of them are causal or cross-attention. ``export_family`` writes one ``FORMS`` form.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

LAYERS = 2
HEADS = 4
HIDDEN = 32
VOCAB = 100
MAX_POSITIONS = 64
ENCODER_LENGTH = 40  # longer than two blocks of 16: pruned blocks are reached
DECODER_LENGTH = 24  # ≠ ENCODER_LENGTH: cross-attention is rectangular

#: form → (exporter, attn_implementation, opset, post-processing); a post-processed form is the
#: export of ``BASE_FORM[form]`` (same exporter settings) stored or optimised differently.
FORMS = {
    "dynamo-eager-20": ("dynamo", "eager", 20, None),
    "dynamo-sdpa-18": ("dynamo", "sdpa", 18, None),
    "dynamo-sdpa-20": ("dynamo", "sdpa", 20, None),
    "dynamo-sdpa-23": ("dynamo", "sdpa", 23, None),
    "torchscript-eager-17": ("torchscript", "eager", 17, None),
    "ort-fused": ("torchscript", "eager", 17, "ort-optimizer"),
    "external-data": ("dynamo", "sdpa", 20, "external-data"),
}
BASE_FORM = {"ort-fused": "torchscript-eager-17", "external-data": "dynamo-sdpa-20"}


@dataclasses.dataclass
class Family:
    name: str
    build: Callable[[str], object]  # attn_implementation → torch module
    inputs: Callable[[np.random.Generator, int], dict[str, np.ndarray]]  # rng, batch → feeds
    dynamic: dict[str, dict[int, str]]
    sites: int
    causal_sites: int = 0
    cross_sites: int = 0
    #: ``onnxruntime.transformers.optimizer`` model type, None where it has none
    ort_model_type: str | None = None
    #: rotary position embeddings (opset 23 exports them as ``RotaryEmbedding``)
    rotary: bool = False
    #: transformers implements SDPA attention for it
    sdpa: bool = True


def _text_inputs(rng: np.random.Generator, batch: int, length: int = ENCODER_LENGTH) -> dict[str, np.ndarray]:
    ids = rng.integers(3, VOCAB, size=(batch, length)).astype(np.int64)
    mask = np.ones((batch, length), np.int64)
    for row in range(1, batch):  # rows after the first are padded, by different amounts
        mask[row, int(rng.integers(length // 3, length)):] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _seq2seq_inputs(rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
    feeds = _text_inputs(rng, batch)
    feeds["decoder_input_ids"] = rng.integers(3, VOCAB, size=(batch, DECODER_LENGTH)).astype(np.int64)
    return feeds


_TEXT_DYNAMIC = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}


def _wrap(model, names: list[str], output: Callable = lambda out: out.last_hidden_state, **fixed):
    """A module taking the inputs ``names`` (named, as torch.export wants them), returning one tensor."""
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model.eval()

        def call(self, **inputs):
            return output(self.model(**inputs, **fixed))

    # forward(self, input_ids, attention_mask, ...): torch.export matches dynamic shapes by name.
    signature = ", ".join(names)
    namespace: dict = {}
    exec(f"def forward(self, {signature}):\n    return self.call({', '.join(f'{n}={n}' for n in names)})", namespace)
    Wrapped.forward = namespace["forward"]
    return Wrapped().eval()


def _hf(config_class, model_class, attn: str, names=("input_ids", "attention_mask"), fixed=None, **config):
    import torch
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_class)(attn_implementation=attn, **config)
    model = getattr(transformers, model_class)(config)
    return _wrap(model, list(names), **(fixed or {}))


_BERT_LIKE = dict(
    hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=64,
    vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS,
)


def _vit(attn: str):
    return _hf("ViTConfig", "ViTModel", attn, names=("pixel_values",), image_size=24, patch_size=4, num_channels=3,
               hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=64)


def _whisper_encoder(attn: str):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        attn_implementation=attn, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=64, decoder_ffn_dim=64,
        num_mel_bins=8, max_source_positions=20, max_target_positions=32, vocab_size=VOCAB,
        pad_token_id=1, bos_token_id=2, eos_token_id=2, decoder_start_token_id=2,
    )
    encoder = transformers.WhisperModel(config).get_encoder()
    return _wrap(encoder, ["input_features"])


def _torch_encoder(attn: str):
    """``nn.TransformerEncoder`` over an embedding; the padding mask as a bool key mask."""
    import torch

    torch.manual_seed(0)

    class HandWritten(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
            layer = torch.nn.TransformerEncoderLayer(HIDDEN, HEADS, 64, dropout=0.0, batch_first=True)
            self.encoder = torch.nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)

        def forward(self, input_ids, attention_mask):
            return self.encoder(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)

    return HandWritten().eval()


def _gpt_style(config_class, model_class, **config):
    return lambda attn: _hf(config_class, model_class, attn, fixed={"use_cache": False}, **config)


FAMILIES = {
    f.name: f
    for f in [
        Family("bert", lambda a: _hf("BertConfig", "BertModel", a, **_BERT_LIKE), _text_inputs, _TEXT_DYNAMIC,
               LAYERS, ort_model_type="bert"),
        Family("roberta", lambda a: _hf("RobertaConfig", "RobertaModel", a, pad_token_id=1, **_BERT_LIKE),
               _text_inputs, _TEXT_DYNAMIC, LAYERS, ort_model_type="bert"),
        Family("distilbert", lambda a: _hf("DistilBertConfig", "DistilBertModel", a, dim=HIDDEN, n_layers=LAYERS,
                                           n_heads=HEADS, hidden_dim=64, vocab_size=VOCAB,
                                           max_position_embeddings=MAX_POSITIONS),
               _text_inputs, _TEXT_DYNAMIC, LAYERS, ort_model_type="bert"),
        Family("albert", lambda a: _hf("AlbertConfig", "AlbertModel", a, embedding_size=16, **_BERT_LIKE),
               _text_inputs, _TEXT_DYNAMIC, LAYERS, ort_model_type="bert"),
        Family("electra", lambda a: _hf("ElectraConfig", "ElectraModel", a, embedding_size=16, **_BERT_LIKE),
               _text_inputs, _TEXT_DYNAMIC, LAYERS, ort_model_type="bert"),
        Family("vit", _vit, lambda rng, b: {"pixel_values": rng.standard_normal((b, 3, 24, 24)).astype(np.float32)},
               {"pixel_values": {0: "batch"}}, LAYERS, ort_model_type="vit"),
        Family("gpt2", _gpt_style("GPT2Config", "GPT2Model", n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                  vocab_size=VOCAB, n_positions=MAX_POSITIONS),
               _text_inputs, _TEXT_DYNAMIC, LAYERS, causal_sites=LAYERS, ort_model_type="gpt2"),
        Family("gpt_neox", _gpt_style("GPTNeoXConfig", "GPTNeoXModel", hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, intermediate_size=64, vocab_size=VOCAB,
                                      max_position_embeddings=MAX_POSITIONS),
               _text_inputs, _TEXT_DYNAMIC, LAYERS, causal_sites=LAYERS, rotary=True, ort_model_type="gpt_neox"),
        Family("opt", _gpt_style("OPTConfig", "OPTModel", hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                 num_attention_heads=HEADS, ffn_dim=64, word_embed_proj_dim=HIDDEN, vocab_size=VOCAB,
                                 max_position_embeddings=MAX_POSITIONS),
               _text_inputs, _TEXT_DYNAMIC, LAYERS, causal_sites=LAYERS),
        # ALiBi: a per-head linear bias added to the scores, then masked_fill.
        Family("mpt", _gpt_style("MptConfig", "MptModel", d_model=HIDDEN, n_heads=HEADS, n_layers=LAYERS,
                                 expansion_ratio=2, max_seq_len=MAX_POSITIONS, vocab_size=VOCAB),
               _text_inputs, _TEXT_DYNAMIC, LAYERS, causal_sites=LAYERS, sdpa=False),
        # ALiBi added by baddbmm to scores computed with the heads folded into the batch.
        Family("bloom", _gpt_style("BloomConfig", "BloomModel", hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                   vocab_size=VOCAB),
               _text_inputs, _TEXT_DYNAMIC, LAYERS, causal_sites=LAYERS, sdpa=False),
        Family("llama", _gpt_style("LlamaConfig", "LlamaModel", hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, num_key_value_heads=2, intermediate_size=64,
                                   vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS),
               _text_inputs, _TEXT_DYNAMIC, LAYERS, causal_sites=LAYERS, rotary=True),
        Family("qwen2", _gpt_style("Qwen2Config", "Qwen2Model", hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, num_key_value_heads=1, intermediate_size=64,
                                   vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS),
               _text_inputs, _TEXT_DYNAMIC, LAYERS, causal_sites=LAYERS, rotary=True),
        Family("bart", lambda a: _hf("BartConfig", "BartModel", a,
                                     names=("input_ids", "attention_mask", "decoder_input_ids"),
                                     fixed={"use_cache": False}, d_model=HIDDEN, encoder_layers=LAYERS,
                                     decoder_layers=LAYERS, encoder_attention_heads=HEADS,
                                     decoder_attention_heads=HEADS, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                     vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS),
               _seq2seq_inputs, {**_TEXT_DYNAMIC, "decoder_input_ids": {0: "batch", 1: "target"}},
               3 * LAYERS, causal_sites=LAYERS, cross_sites=LAYERS, ort_model_type="bart"),
        Family("t5", lambda a: _hf("T5Config", "T5Model", a,
                                   names=("input_ids", "attention_mask", "decoder_input_ids"),
                                   fixed={"use_cache": False}, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=64,
                                   num_layers=LAYERS, num_decoder_layers=LAYERS, num_heads=HEADS,
                                   vocab_size=VOCAB, relative_attention_num_buckets=8,
                                   relative_attention_max_distance=32),
               _seq2seq_inputs, {**_TEXT_DYNAMIC, "decoder_input_ids": {0: "batch", 1: "target"}},
               3 * LAYERS, causal_sites=LAYERS, cross_sites=LAYERS, ort_model_type="t5"),
        Family("whisper_encoder", _whisper_encoder,
               lambda rng, b: {"input_features": rng.standard_normal((b, 8, 40)).astype(np.float32)},
               {"input_features": {0: "batch"}}, LAYERS),
        Family("torch_encoder", _torch_encoder, _text_inputs, _TEXT_DYNAMIC, LAYERS),
    ]
}


def export_family(family: Family, form: str, path, base: str | None = None) -> None:
    """Export ``family`` in ``form`` to ``path`` (an ``.onnx`` file). For a post-processed form,
    ``base`` may name the existing export of ``BASE_FORM[form]`` to start from."""
    import torch

    exporter, attn, opset, post = FORMS[form]
    if post is not None and base is None:
        base = str(path) + ".base.onnx"
        export_family(family, BASE_FORM[form], base)
    if post == "external-data":
        model = onnx.load(base)
        onnx.save(model, str(path), save_as_external_data=True, location=Path(path).name + ".data")
        return
    if post == "ort-optimizer":
        from onnxruntime.transformers import optimizer

        optimized = optimizer.optimize_model(
            base, model_type=family.ort_model_type, num_heads=HEADS, hidden_size=HIDDEN, opt_level=1,
            use_gpu=False, only_onnxruntime=False,
        )
        optimized.save_model_to_file(str(path))
        return
    feeds = family.inputs(np.random.default_rng(0), 2)
    names = list(feeds)
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            with torch.no_grad():
                program = torch.onnx.export(
                    family.build(attn), args, input_names=names, output_names=["output"], dynamo=True,
                    opset_version=opset, verbose=False, dynamic_shapes={n: family.dynamic.get(n, {}) for n in names},
                )
            program.save(str(path))
        else:
            # Grad stays enabled: under no_grad nn.TransformerEncoderLayer takes a fused fast path
            # the TorchScript exporter cannot export.
            torch.onnx.export(
                family.build(attn), args, str(path), input_names=names, output_names=["output"], dynamo=False,
                opset_version=opset, dynamic_axes=family.dynamic,
            )
