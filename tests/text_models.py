"""A tiny text model and tokenizer built in memory (no torch): token embeddings in front of
``cli_models``' two-layer attention encoder, and a whitespace word-level tokenizer; data files
of texts in the formats ``calibrate --data`` reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
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


def write_parquet(path, texts, field="text", row_group_size=8):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(texts))), field: texts})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_saved_dataset(folder, texts, field="text", files=2):
    """The layout ``datasets.Dataset.save_to_disk`` writes: Arrow IPC stream files
    ``data-XXXXX-of-YYYYY.arrow`` listed in ``state.json``, beside ``dataset_info.json``."""
    pa = pytest.importorskip("pyarrow")
    folder.mkdir()
    names = [f"data-{i:05d}-of-{files:05d}.arrow" for i in range(files)]
    for i, name in enumerate(names):
        part = pa.table({field: texts[i * len(texts) // files:(i + 1) * len(texts) // files]})
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, part.schema) as writer:
            for batch in part.to_batches(max_chunksize=7):
                writer.write_batch(batch)
    (folder / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": n} for n in names], "_fingerprint": "0123456789abcdef",
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
        "_split": None,
    }))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {field: {"dtype": "string", "_type": "Value"}}}))
    return folder
