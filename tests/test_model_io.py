"""Models with external data: read without loading the weights, written with a data file, atomically."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper

from onnxprune.model_io import load_ir, save_model, uses_external_data


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
    model = load_ir(tmp_path / "in.onnx")
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
    from onnxprune.errors import OnnxpruneError

    model_with_weights(tmp_path / "in.onnx", True)
    with pytest.raises(OnnxpruneError, match="does not exist"):
        save_model(load_ir(tmp_path / "in.onnx"), tmp_path / "nowhere" / "out.onnx")
