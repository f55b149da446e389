"""Loading models: one read of the file gives the model and its record (hash, inputs, domains,
opsets, external data); external weights stay on disk; outputs are written atomically."""

from __future__ import annotations

import builtins
import hashlib
import io
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper

import cli_models as models
from conftest import random_token_examples
from onnxprune.calibrate import calibrate
from onnxprune.data import Dataset
from onnxprune.errors import OnnxpruneError
from onnxprune.model_io import ModelInput, load_model, read_info, save_model, uses_external_data


def model_with_weights(path, external: bool):
    weight = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "g", [helper.make_tensor_value_info("X", T.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("Y", T.FLOAT, [2, 64])], initializer=[onnx.numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.save(model, str(path), save_as_external_data=external, location=path.name + ".data")
    return weight


@pytest.mark.parametrize("external", [True, False], ids=["external", "inline"])
def test_round_trip(tmp_path, external):
    weight = model_with_weights(tmp_path / "in.onnx", external)
    model = load_model(tmp_path / "in.onnx").model
    # External weights stay on disk until read.
    assert isinstance(model.graph.initializers["W"].const_value, ir.ExternalTensor) == external
    assert uses_external_data(model) == external
    save_model(model, tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").exists() == external
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in.onnx", "out.onnx"] + (["in.onnx.data", "out.onnx.data"] if external else [])
    )  # nothing left over from the atomic write
    reloaded = onnx.load(str(tmp_path / "out.onnx"))
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(reloaded.graph.initializer[0]), weight)


def test_save_into_missing_directory(tmp_path):
    model_with_weights(tmp_path / "in.onnx", True)
    with pytest.raises(OnnxpruneError, match="does not exist"):
        save_model(load_model(tmp_path / "in.onnx").model, tmp_path / "nowhere" / "out.onnx")


def described_model() -> onnx.ModelProto:
    """Runtime inputs with a symbolic, a fixed and an unknown axis, an initializer listed as an
    input, a non-tensor input, an embedding lookup of ``input_ids``, and a node of a custom domain."""
    table = onnx.numpy_helper.from_array(np.zeros((37, 4), np.float32), "table")
    scale = helper.make_tensor_value_info("scale", T.FLOAT16, [None])  # one axis, neither sized nor named
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["e"]),
         helper.make_node("Custom", ["e", "scale", "tokens"], ["Y"], domain="example.custom")], "g",
        [helper.make_tensor_value_info("input_ids", T.INT64, ["batch", 7]), scale,
         helper.make_tensor_value_info("table", T.FLOAT, [37, 4]),
         helper.make_tensor_sequence_value_info("tokens", T.INT64, None)],
        [helper.make_tensor_value_info("Y", T.FLOAT, None)], initializer=[table],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("ai.onnx", 18)])


def test_info_fields(tmp_path):
    path = models.save(described_model(), tmp_path / "m.onnx")
    info = read_info(path)
    assert info.path == str(path)
    assert info.inputs == (ModelInput("input_ids", T.INT64, ("batch", 7)), ModelInput("scale", T.FLOAT16, (None,)),
                           ModelInput("tokens", None, ()))
    assert info.input_names == ["input_ids", "scale", "tokens"]
    assert info.domains == {"ai.onnx", "", "example.custom"}
    assert info.uses_domain("example.custom") and not info.uses_domain("onnxprune")
    assert info.opset_imports == (("ai.onnx", 18),)
    assert info.opset() == info.opset("ai.onnx") == 18 and info.opset("example.custom") is None
    assert info.vocab_size == 37
    assert not info.has_external_data and info.external_data_files == ()
    assert load_model(path).info == info  # the loader's record is the same


@pytest.mark.parametrize("external", [True, False], ids=["external", "inline"])
def test_sha256_is_the_files(tmp_path, external):
    model_with_weights(tmp_path / "in.onnx", external)
    expected = hashlib.sha256((tmp_path / "in.onnx").read_bytes()).hexdigest()
    assert read_info(tmp_path / "in.onnx").sha256 == expected
    assert load_model(tmp_path / "in.onnx").info.sha256 == expected


def test_external_data_info(tmp_path):
    model_with_weights(tmp_path / "in.onnx", True)
    info = read_info(tmp_path / "in.onnx")
    assert info.has_external_data and info.external_data_files == ("in.onnx.data",)
    assert info.input_names == ["X"] and info.inputs[0].shape == (2, 64) and info.vocab_size is None
    loaded = load_model(tmp_path / "in.onnx", load_external_data=True)
    # Every weight read in; the record still says where they came from.
    assert not uses_external_data(loaded.model) and loaded.info.external_data_files == ("in.onnx.data",)


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: p.write_bytes(b"\xff" * 64), "not a readable ONNX model"),
    (lambda p: p.write_text("hello"), "not a readable ONNX model|no graph nodes"),
    (lambda p: onnx.save(helper.make_model(helper.make_graph([], "g", [], [])), str(p)), "no graph nodes"),
], ids=["missing", "directory", "garbage", "text", "empty-graph"])
@pytest.mark.parametrize("read", [read_info, load_model], ids=["read_info", "load_model"])
def test_errors(tmp_path, make, message, read):
    path = tmp_path / "model.onnx"
    make(path)
    with pytest.raises(OnnxpruneError, match=message) as error:
        read(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_external_data_file(tmp_path):
    model_with_weights(tmp_path / "in.onnx", True)
    (tmp_path / "in.onnx.data").unlink()
    assert read_info(tmp_path / "in.onnx").has_external_data  # the record needs no weight
    with pytest.raises(OnnxpruneError, match="not a readable ONNX model"):
        load_model(tmp_path / "in.onnx", load_external_data=True)


@pytest.fixture
def opened(monkeypatch):
    """The resolved paths of the files Python opens (``open``, ``io.open``, ``Path.read_bytes``)."""
    paths: list[Path] = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            paths.append(Path(file).resolve())
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    return paths


@pytest.mark.parametrize("external", [True, False], ids=["external", "inline"])
def test_calibrate_reads_the_model_once(tmp_path, opened, external):
    dense = models.save(models.attention_encoder(), tmp_path / "dense.onnx", external=external)
    rng = np.random.default_rng(0)
    examples = [{"X": rng.standard_normal((24, models.HIDDEN)).astype(np.float32),
                 "attention_mask": np.ones(24, np.int64)} for _ in range(4)]
    opened.clear()  # saving it opened it
    stats = calibrate(dense, Dataset(examples, ["X", "attention_mask"]), granularity=models.GRANULARITY,
                      max_length=models.MAX_LENGTH, batch_size=2, show_progress=False)
    assert opened.count(dense.resolve()) == 1
    assert stats.model_sha256 == hashlib.sha256(dense.read_bytes()).hexdigest()
    assert stats.num_samples == 4 and len(stats.sites) == 2


def test_bench_reads_each_model_once(tmp_path, opened):
    from onnxprune.bench import bench

    encoder = models.pruned_encoder(tmp_path)
    opened.clear()
    bench([encoder["dense"], encoder["pruned"]], seq_len=16, warmup=0, repeats=1, show_progress=False)
    # Python reads each file once for its record; ONNX Runtime reads it for the session itself.
    assert [opened.count(encoder[m].resolve()) for m in ("dense", "pruned")] == [1, 1]
