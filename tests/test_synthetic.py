"""Synthetic inputs read from a model's graph inputs: static axes kept, symbolic ones filled in,
masks padded on request, token ids inside the embedding table."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import cli_models as models
from onnxprune.errors import OnnxpruneError
from onnxprune.model_io import read_info
from onnxprune.synthetic import DEFAULT_VOCAB, input_specs, synthetic_dataset, synthetic_feeds


def token_model(vocab: int) -> onnx.ModelProto:
    table = numpy_helper.from_array(np.zeros((vocab, 4), np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["e"]),
         helper.make_node("Cast", ["attention_mask"], ["m"], to=T.FLOAT),
         helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]),
         helper.make_node("Mul", ["e", "m3"], ["Y"])], "g",
        [helper.make_tensor_value_info("input_ids", T.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", T.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("Y", T.FLOAT, None)],
        initializer=[table, numpy_helper.from_array(np.array([2], np.int64), "axis")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_token_inputs(tmp_path):
    path = models.save(token_model(vocab=37), tmp_path / "tokens.onnx")
    specs, vocab = input_specs(path)
    assert [s.name for s in specs] == ["input_ids", "attention_mask"] and vocab == 37
    feeds = synthetic_feeds(specs, vocab, batch=3, seq_len=20, seed=1)
    assert feeds["input_ids"].shape == (3, 20) and feeds["input_ids"].dtype == np.int64
    assert 1 <= feeds["input_ids"].min() and feeds["input_ids"].max() < 37
    assert (feeds["attention_mask"] == 1).all()
    padded = synthetic_feeds(specs, vocab, batch=8, seq_len=20, seed=1, padded=True)["attention_mask"]
    lengths = padded.sum(axis=1)
    assert (lengths >= 10).all() and (lengths <= 20).all() and lengths.min() < 20
    assert all((row[:n] == 1).all() and (row[n:] == 0).all() for row, n in zip(padded, lengths))


def test_static_axes_are_kept(tmp_path):
    path = models.save(models.attention_encoder(), tmp_path / "enc.onnx")
    specs, _ = input_specs(path)
    feeds = synthetic_feeds(specs, 100, batch=2, seq_len=9)
    assert feeds["X"].shape == (2, 9, models.HIDDEN) and feeds["X"].dtype == np.float32
    dataset = synthetic_dataset(path, count=5, seq_len=9)
    (batch,) = list(dataset.batches(8))
    assert batch["X"].shape == (5, 9, models.HIDDEN) and batch["attention_mask"].shape == (5, 9)


def test_specs_from_the_record(tmp_path):
    path = models.save(token_model(vocab=37), tmp_path / "tokens.onnx")
    info = read_info(path)
    assert input_specs(info) == input_specs(path)
    specs, vocab = input_specs(info)
    assert vocab == 37 and [s.dims for s in specs] == [[None, None], [None, None]]  # symbolic axes
    dataset = synthetic_dataset(info, count=2, seq_len=5)
    assert dataset.input_names == ["input_ids", "attention_mask"]


def test_without_an_embedding_table(tmp_path):
    path = models.save(models.mlp(), tmp_path / "mlp.onnx")
    specs, vocab = input_specs(path)
    assert vocab == DEFAULT_VOCAB and [(s.name, s.dims) for s in specs] == [("X", [None, models.HIDDEN])]


def test_non_tensor_input_is_refused(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("SequenceLength", ["tokens"], ["n"])], "g",
        [helper.make_tensor_sequence_value_info("tokens", T.INT64, None)],
        [helper.make_tensor_value_info("n", T.INT64, [])],
    )
    path = models.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), tmp_path / "s.onnx")
    with pytest.raises(OnnxpruneError, match="'tokens' is not a tensor"):
        input_specs(path)
