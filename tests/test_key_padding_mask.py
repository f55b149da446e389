"""The key-padding pass: masks that are only the padding (or padding + causal) of the
``attention_mask`` input become ``key_padding_mask`` (+ ``is_causal``), with the same outputs;
any other mask is left alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import random_token_examples
from onnxprune.calibrate import calibrate
from onnxprune.data import Dataset
from onnxprune.model_io import save_model
from onnxprune.passes.key_padding_mask import HUGE_NEGATIVE, is_padding_mask
from onnxprune.prune import prune
from onnxprune.runtime import session

INPUTS = ["input_ids", "attention_mask"]
BLOCK = 16


def _keep(batch=3, length=6, seed=0):
    rng = np.random.default_rng(seed)
    keep = rng.random((batch, length)) < 0.7
    keep[:, 0] = True
    return keep


def _additive(allowed: np.ndarray, fill: float) -> np.ndarray:
    return np.where(allowed, 0.0, fill).astype(np.float32)


@pytest.mark.parametrize("fill", [np.finfo(np.float32).min, -np.inf, -1e31])
@pytest.mark.parametrize("per_query", [False, True])
def test_padding_masks_match(fill, per_query):
    keep = _keep()
    length = keep.shape[1]
    mask = _additive(keep[:, None, None, :], fill)
    if per_query:
        mask = np.broadcast_to(mask, (3, 1, length, length)).copy()
    assert is_padding_mask(mask, keep, causal=False)
    assert not is_padding_mask(mask, keep, causal=True)


def test_padding_and_causal_masks_match():
    keep = _keep()
    length = keep.shape[1]
    allowed = keep[:, None, None, :] & np.tril(np.ones((length, length), bool))
    assert is_padding_mask(_additive(allowed, np.finfo(np.float32).min), keep, causal=True)
    assert is_padding_mask(allowed, keep, causal=True)  # a bool mask
    assert not is_padding_mask(allowed, keep, causal=False)


@pytest.mark.parametrize(
    "case",
    ["fill -1e4 (old BERT): not exactly zero probability", "bias on kept keys", "per-head mask", "wrong key axis"],
)
def test_other_masks_do_not_match(case):
    keep = _keep()
    length = keep.shape[1]
    mask = _additive(keep[:, None, None, :], np.finfo(np.float32).min)
    if case.startswith("fill"):
        mask = _additive(keep[:, None, None, :], -1e4)
        assert -1e4 > HUGE_NEGATIVE
    elif case == "bias on kept keys":
        mask = mask + np.linspace(0, 1, length, dtype=np.float32)
    elif case == "per-head mask":
        mask = np.repeat(mask, 2, axis=1)
    else:
        mask = mask[..., :-1]
    assert not is_padding_mask(mask, keep, causal=False)
    assert not is_padding_mask(mask, keep, causal=True)


@pytest.mark.parametrize("arch,form", [("bert", "dynamo-eager-20"), ("bert", "dynamo-sdpa-20"),
                                       ("gpt2", "dynamo-eager-20"), ("gpt2", "dynamo-sdpa-20")])
def test_pruned_models_take_the_padding_mask(tiny_model, tmp_path, arch, form):
    dense = tiny_model(arch, form)
    stats = calibrate(dense, Dataset(random_token_examples(16, seed=3), INPUTS), granularity=BLOCK,
                      max_length=64, show_progress=False)
    batches = list(Dataset(random_token_examples(8, seed=4), INPUTS).batches(4, sort=False))
    assert any((b["attention_mask"] == 0).any() for b in batches)
    dense_sess = session(dense, with_library=False)
    for p in (0.0, 0.9):
        model, _ = prune(dense, stats, p, block_size=BLOCK)
        path = tmp_path / f"p{p}.onnx"
        save_model(model, path)
        nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "BlockSparseAttention"]
        assert nodes and all(list(n.input[4:6]) == ["", "attention_mask"] for n in nodes)
        assert all(n.input[6].startswith("onnxprune.layout_rule.") for n in nodes)  # still there
        causal = {a.i for n in nodes for a in n.attribute if a.name == "is_causal"}
        assert causal == ({1} if arch == "gpt2" else {0})
        kernel, body = session(path), session(path, with_library=False)
        for feeds in batches:
            valid = feeds["attention_mask"].astype(bool)
            got = kernel.run(None, feeds)[0]
            np.testing.assert_allclose(got[valid], body.run(None, feeds)[0][valid], atol=1e-5)
            if p == 0.0:
                np.testing.assert_allclose(got[valid], dense_sess.run(None, feeds)[0][valid], atol=1e-5)


# --------------------------------------------------------------------------------------------
# The pass on graphs built in memory: it evaluates the masks of the model it is given (no file).


def padding_attention_model(fill: float = float(np.finfo(np.float32).min), causal: bool = False,
                            input_name: str = "attention_mask"):
    """Eager attention whose mask is built from ``input_name`` [b, s] as exporters build it:
    ``(1 - mask) · fill`` over the keys, plus a ``fill`` triangle above the diagonal if ``causal``."""
    from onnx import TensorProto as T
    from onnx import helper

    from test_rules import B, D, H, S, make_model, vi

    inits = [onnx.numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
             (("one", 1.0), ("zero", 0.0), ("fill", fill), ("scale", D ** -0.5))]
    inits.append(onnx.numpy_helper.from_array(np.array([1, 2], np.int64), "axes"))
    nodes = [
        helper.make_node("Cast", [input_name], ["keep"], to=T.FLOAT),
        helper.make_node("Sub", ["one", "keep"], ["padded"]),
        helper.make_node("Mul", ["padded", "fill"], ["padding_bias"]),
        helper.make_node("Unsqueeze", ["padding_bias", "axes"], ["mask"]),
    ]
    if causal:
        nodes += [
            helper.make_node("Shape", [input_name], ["length"], start=1, end=2),
            helper.make_node("Concat", ["length", "length"], ["square"], axis=0),
            helper.make_node("ConstantOfShape", ["square"], ["ones"], value=helper.make_tensor("v", T.FLOAT, [1], [1])),
            helper.make_node("Trilu", ["ones"], ["lower"], upper=0),
            helper.make_node("Cast", ["lower"], ["allowed"], to=T.BOOL),
            helper.make_node("Where", ["allowed", "zero", "fill"], ["causal_bias"]),
            helper.make_node("Add", ["mask", "causal_bias"], ["causal_mask"]),
        ]
    mask = "causal_mask" if causal else "mask"
    nodes += [
        helper.make_node("Transpose", ["K"], ["Kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["Q", "Kt"], ["qk"]),
        helper.make_node("Mul", ["qk", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", mask], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1, name="the_softmax"),
        helper.make_node("MatMul", ["probs", "V"], ["Y"]),
    ]
    inputs = [vi("Q", [B, H, S, D]), vi("K", [B, H, S, D]), vi("V", [B, H, S, D]),
              vi(input_name, ["b", "s"], T.INT64)]
    return make_model(nodes, inputs, inits)


def _feeds(proto):
    from test_rules import B, D, H, S

    rng = np.random.default_rng(0)
    values = {n: rng.standard_normal((B, H, S, D)).astype(np.float32) for n in ("Q", "K", "V")}
    name = proto.graph.input[3].name
    values[name] = (np.arange(S)[None] < np.array([[S], [S - 7]])).astype(np.int64)  # right padding
    return values


def _rewritten(proto):
    from onnxprune.passes import RewriteSitesPass
    from test_rules import full_layouts, to_ir

    model = to_ir(proto)
    RewriteSitesPass(full_layouts(["the_softmax"]))(model)
    return model


@pytest.mark.parametrize("causal", [False, True])
def test_pass_on_an_in_memory_model(causal, ops_library):
    import onnx_ir as ir

    from onnxprune.layouts import attention_nodes
    from onnxprune.passes import KeyPaddingMaskPass, prune_passes
    from test_rules import full_layouts, run_plain, to_ir

    proto = padding_attention_model(causal=causal)
    model = _rewritten(proto)
    assert KeyPaddingMaskPass()(model).modified
    [node] = attention_nodes(model.graph)
    assert node.inputs[4] is None and node.inputs[5].name == "attention_mask"
    assert node.attributes["is_causal"].as_int() == int(causal)

    model = to_ir(proto)
    prune_passes(full_layouts(["the_softmax"]))(model)
    pruned = ir.serde.serialize_model(model)
    assert not any(n.op_type in ("Sub", "Trilu") for n in pruned.graph.node)  # the S×S mask is gone
    feeds = _feeds(proto)
    dense = run_plain(proto, feeds)
    np.testing.assert_allclose(session(pruned.SerializeToString()).run(["Y"], feeds)[0], dense, atol=1e-5)
    np.testing.assert_allclose(run_plain(pruned, feeds), dense, atol=1e-5)


@pytest.mark.parametrize("case", ["fill -1e4", "input not named attention_mask"])
def test_pass_leaves_other_masks(case):
    from onnxprune.layouts import attention_nodes
    from onnxprune.passes import KeyPaddingMaskPass

    proto = padding_attention_model(fill=-1e4) if case.startswith("fill") else padding_attention_model(input_name="m")
    model = _rewritten(proto)
    assert not KeyPaddingMaskPass()(model).modified
    [node] = attention_nodes(model.graph)
    assert node.inputs[4] is not None and len(node.inputs) < 6
