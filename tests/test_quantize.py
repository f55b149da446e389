"""ONNX Runtime's 4-bit weight quantizer (MatMulNBits) over a pruned with-past model
(``onnxprune/quantize.py``): it applies unchanged, keeps every ``onnxprune.BlockSparseAttention``
node with its attributes and layout inputs, and the quantized model runs, with the library's
kernel and with the op's function body, close to the float pruned model.

Model: the tiny random Llama with grouped-query attention (4 query / 2 KV heads) of
tests/lm_exports.py, exported with its KV cache and pruned at p = 0.6 (block 16).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from models import tiny
from onnxprune import op_schema
from onnxprune.errors import OnnxpruneError
from onnxprune.quantize import quantize_model, quantize_weights

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
from lm_exports import exported_lm, pruned_lm  # noqa: E402
from test_kv_cache import Runner, left_padded_prompt  # noqa: E402

SPARSITY = 0.6


@pytest.fixture(scope="module")
def pruned_path():
    return pruned_lm("llama", "eager", SPARSITY)


@pytest.fixture(scope="module")
def quantized(pruned_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("quantized") / "pruned-q4.onnx"
    return path, quantize_weights(pruned_path, path, bits=4, block_size=16)


def nodes(path, op_type):
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == op_type]


def test_every_attention_node_survives_with_its_layout(pruned_path, quantized):
    path, report = quantized
    before, after = nodes(pruned_path, op_schema.OP_TYPE), nodes(path, op_schema.OP_TYPE)
    assert len(before) == tiny.LAYERS == report.onnxprune_nodes
    assert [n.SerializeToString() for n in after] == [n.SerializeToString() for n in before]
    original = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(pruned_path)).graph.initializer}
    kept = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    layouts = [name for n in after for name in n.input if name.startswith(op_schema.LAYOUT_PREFIX)]
    assert len(layouts) == tiny.LAYERS
    for name in layouts:
        np.testing.assert_array_equal(kept[name], original[name])
    model = onnx.load(str(path))
    assert {o.domain: o.version for o in model.opset_import}[op_schema.DOMAIN] == op_schema.OPSET_VERSION
    assert [f.name for f in model.functions] == [f.name for f in onnx.load(str(pruned_path)).functions]


def test_weight_matmuls_become_matmulnbits(pruned_path, quantized):
    path, report = quantized
    weights = {t.name for t in onnx.load(str(pruned_path)).graph.initializer}
    weight_matmuls = [n for n in nodes(pruned_path, "MatMul") if n.input[1] in weights]
    # q, k, v, o, gate, up, down per layer, and the LM head
    assert len(weight_matmuls) == 7 * tiny.LAYERS + 1 == report.matmuls
    assert len(nodes(path, "MatMulNBits")) == report.matmuls
    assert all(n.input[1] not in weights for n in nodes(path, "MatMul"))
    assert report.weight_bytes_after < report.weight_bytes_before


def relative_rms(logits, reference) -> float:
    """RMS of the difference over the RMS spread of the reference's logits (each row centred)."""
    out = np.concatenate([x.reshape(-1, x.shape[-1]) for x in logits])
    ref = np.concatenate([x.reshape(-1, x.shape[-1]) for x in reference])
    return float(np.sqrt(((out - ref) ** 2).mean() / ((ref - ref.mean(-1, keepdims=True)) ** 2).mean()))


def decode_logits(path, library="auto"):
    """Prefill of 20 tokens and 24 decode steps (past the calibrated 32 positions), the same
    tokens fed to every model."""
    return Runner(path, library).logits(left_padded_prompt()[:1], 24, list(range(5, 29)))


@pytest.mark.parametrize("library", ["auto", "none"])
def test_quantizing_commutes_with_pruning_at_p0(library, tmp_path, ops_library):
    """At p = 0 the pruned model is the dense function; quantizing either gives the same weights,
    so the quantized pruned model is the quantized dense one (kernel and function body)."""
    quantize_weights(exported_lm("llama", "eager") / "model.onnx", tmp_path / "dense-q4.onnx", block_size=16)
    quantize_weights(pruned_lm("llama", "eager", 0.0), tmp_path / "pruned-q4.onnx", block_size=16)
    dense, pruned = decode_logits(tmp_path / "dense-q4.onnx"), decode_logits(tmp_path / "pruned-q4.onnx", library)
    assert max(np.abs(p - d).max() for p, d in zip(pruned, dense)) < 1e-4


@pytest.mark.parametrize("bits, tolerance", [(8, 0.05), (4, 0.5)])
@pytest.mark.parametrize("library", ["auto", "none"])
def test_quantized_pruned_model_runs_close_to_the_float_one(pruned_path, bits, tolerance, library, tmp_path,
                                                            ops_library):
    """Quantization noise only (measured: 0.02 at 8 bits, 0.34 at 4 bits on this model's wide
    random weights); a wrong weight layout would be above 1."""
    quantize_weights(pruned_path, tmp_path / "q.onnx", bits=bits, block_size=16)
    assert 0 < relative_rms(decode_logits(tmp_path / "q.onnx", library), decode_logits(pruned_path)) < tolerance


def test_kernel_and_body_of_the_quantized_model_agree(quantized, ops_library):
    path, _ = quantized
    kernel, body = decode_logits(path), decode_logits(path, "none")
    assert max(np.abs(k - b).max() for k, b in zip(kernel, body)) < 1e-4


def test_a_quantizer_that_touched_the_attention_nodes_is_refused(pruned_path, monkeypatch):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    process = MatMulNBitsQuantizer.process

    def process_and_change_a_block_size(self):
        process(self)
        node = next(n for n in self.model.model.graph.node if n.domain == op_schema.DOMAIN)
        next(a for a in node.attribute if a.name == "block_size").i = 32

    monkeypatch.setattr(MatMulNBitsQuantizer, "process", process_and_change_a_block_size)
    with pytest.raises(OnnxpruneError, match="changed onnxprune's attention nodes"):
        quantize_model(onnx.load(str(pruned_path)))


def test_metadata_survives(pruned_path, tmp_path):
    model = onnx.load(str(pruned_path))
    onnx.helper.set_model_props(model, {"onnxprune.note": "kept"})
    out, _ = quantize_model(model, bits=8, block_size=32)
    assert {p.key: p.value for p in out.metadata_props}["onnxprune.note"] == "kept"
    assert len(out.functions) == len(model.functions)


def test_bad_input_is_one_line(pruned_path, tmp_path):
    with pytest.raises(OnnxpruneError, match="bits must be one of"):
        quantize_weights(pruned_path, tmp_path / "x.onnx", bits=3)
    with pytest.raises(OnnxpruneError, match="power of two"):
        quantize_weights(pruned_path, tmp_path / "x.onnx", block_size=24)
    with pytest.raises(OnnxpruneError, match="no such model file"):
        quantize_weights(tmp_path / "missing.onnx", tmp_path / "x.onnx")
    attention_only = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])]))
    with pytest.raises(OnnxpruneError, match="no MatMul with a constant weight"):
        quantize_model(attention_only)


def test_transposed_weights_are_folded_and_quantized():
    """The exporter leaves a large weight as ``Transpose(W)`` (SmolLM2's every projection): it is
    folded into one initializer, quantized, and the transposed original dropped."""
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(32, 64)).astype(np.float32)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "Wt"], ["y"])],
        "g", [helper.make_tensor_value_info("x", T.FLOAT, [3, 64])],
        [helper.make_tensor_value_info("y", T.FLOAT, [3, 32])],
        [onnx.numpy_helper.from_array(weight, "W")]), opset_imports=[helper.make_opsetid("", 20)])
    out, report = quantize_model(model, bits=8, block_size=32)
    assert report.matmuls == 1 and report.kept_matmuls == 0
    assert [n.op_type for n in out.graph.node] == ["MatMulNBits"]
    assert "W" not in {t.name for t in out.graph.initializer}
    x = rng.normal(size=(3, 64)).astype(np.float32)
    (y,) = ort.InferenceSession(out.SerializeToString()).run(None, {"x": x})
    expected = x @ weight.T
    assert np.abs(y - expected).max() < 0.02 * np.abs(expected).max()
