"""A tiny text model and tokenizer built in memory (no torch): token embeddings in front of
``cli_models``' two-layer attention encoder, and a whitespace word-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import cli_models

WORDS = "the a of to and in is it that for on with as was by this be are from at or an".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS]


def text_encoder(path: Path, seed: int = 0) -> Path:
    """``input_ids``, ``attention_mask`` → the encoder's output; two attention sites."""
    model = cli_models.attention_encoder(seed=seed)
    graph = model.graph
    rng = np.random.default_rng(seed + 1)
    table = rng.standard_normal((len(VOCAB), cli_models.HIDDEN)).astype(np.float32)
    graph.initializer.append(numpy_helper.from_array(table, "embedding"))
    graph.node.insert(0, helper.make_node("Gather", ["embedding", "input_ids"], ["X"], name="embed"))
    inputs = [helper.make_tensor_value_info("input_ids", T.INT64, ["b", "s"])]
    inputs += [i for i in graph.input if i.name != "X"]
    del graph.input[:]
    graph.input.extend(inputs)
    return cli_models.save(model, path)


def tokenizer(folder: Path) -> Path:
    """A ``tokenizer.json`` in ``folder``: whitespace words, ``[CLS] … [SEP]``."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def sentences(count: int, seed: int = 0, longest: int = 90) -> list[str]:
    """``count`` random sentences of 3 to ``longest`` words (some longer than 64 tokens)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, longest)))) for _ in range(count)]
