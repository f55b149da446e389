"""Tiny ONNX models for the command-line tests, built in memory (no torch): a two-layer eager
attention encoder, its pruned form (from synthetic statistics), and models without attention or
with an attention that is not a site."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from onnxprune.model_io import file_sha256, save_model
from onnxprune.stats import Stats

HEADS, HEAD_SIZE = 2, 8
HIDDEN = HEADS * HEAD_SIZE
MAX_LENGTH = 64
GRANULARITY = 16


def _const(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _model(nodes, inputs, outputs, initializers, opset=20) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="cli-tests")
    model.ir_version = 10
    return model


def attention_encoder(layers: int = 2, scale_from_input: bool = False, seed: int = 0) -> onnx.ModelProto:
    """``X [b, s, HIDDEN]`` and ``attention_mask [b, s]`` → ``Y``: ``layers`` eager attention sites
    (MatMul → Mul(scale) → Add(mask) → Softmax → MatMul). With ``scale_from_input`` the first
    layer's scale is a graph input, so that layer is not a site (the scale is not a constant)."""
    rng = np.random.default_rng(seed)
    inits = [
        _const("heads_shape", np.array([0, 0, HEADS, HEAD_SIZE], np.int64)),
        _const("hidden_shape", np.array([0, 0, HIDDEN], np.int64)),
        _const("one", np.array(1.0, np.float32)),
        _const("big_negative", np.array(-10000.0, np.float32)),
        _const("mask_axes", np.array([1, 2], np.int64)),
        _const("scale", np.array(1.0 / math.sqrt(HEAD_SIZE), np.float32)),
    ]
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=T.FLOAT, name="mask_cast"),
        helper.make_node("Sub", ["one", "mask_f"], ["mask_inv"], name="mask_sub"),
        helper.make_node("Mul", ["mask_inv", "big_negative"], ["mask_add"], name="mask_mul"),
        helper.make_node("Unsqueeze", ["mask_add", "mask_axes"], ["bias"], name="mask_unsqueeze"),
    ]
    inputs = [helper.make_tensor_value_info("X", T.FLOAT, ["b", "s", HIDDEN]),
              helper.make_tensor_value_info("attention_mask", T.INT64, ["b", "s"])]
    x = "X"
    for layer in range(layers):
        p = f"layer{layer}"
        heads = {}
        for which, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
            w = (rng.standard_normal((HIDDEN, HIDDEN)) / math.sqrt(HIDDEN)).astype(np.float32)
            inits.append(_const(f"{p}.w{which}", w))
            nodes += [
                helper.make_node("MatMul", [x, f"{p}.w{which}"], [f"{p}.{which}_flat"], name=f"{p}/{which}_proj"),
                helper.make_node("Reshape", [f"{p}.{which}_flat", "heads_shape"], [f"{p}.{which}_4d"], name=f"{p}/{which}_reshape"),
                helper.make_node("Transpose", [f"{p}.{which}_4d"], [f"{p}.{which}"], perm=perm, name=f"{p}/{which}_transpose"),
            ]
            heads[which] = f"{p}.{which}"
        scale = "scale_input" if scale_from_input and layer == 0 else "scale"
        nodes += [
            helper.make_node("MatMul", [heads["q"], heads["k"]], [f"{p}.scores"], name=f"{p}/qk"),
            helper.make_node("Mul", [f"{p}.scores", scale], [f"{p}.scaled"], name=f"{p}/scale"),
            helper.make_node("Add", [f"{p}.scaled", "bias"], [f"{p}.masked"], name=f"{p}/mask"),
            helper.make_node("Softmax", [f"{p}.masked"], [f"{p}.probs"], axis=-1, name=f"{p}/softmax"),
            helper.make_node("MatMul", [f"{p}.probs", heads["v"]], [f"{p}.ctx"], name=f"{p}/pv"),
            helper.make_node("Transpose", [f"{p}.ctx"], [f"{p}.ctx_t"], perm=[0, 2, 1, 3], name=f"{p}/ctx_transpose"),
            helper.make_node("Reshape", [f"{p}.ctx_t", "hidden_shape"], [f"{p}.out"], name=f"{p}/ctx_reshape"),
            helper.make_node("Add", [f"{p}.out", x], [f"{p}.residual"], name=f"{p}/residual"),
        ]
        x = f"{p}.residual"
    nodes.append(helper.make_node("Identity", [x], ["Y"], name="output"))
    if scale_from_input:
        inputs.append(helper.make_tensor_value_info("scale_input", T.FLOAT, []))
    return _model(nodes, inputs, [helper.make_tensor_value_info("Y", T.FLOAT, ["b", "s", HIDDEN])], inits)


def softmax_classifier() -> onnx.ModelProto:
    """A Softmax that is not attention (no MatMul with V after it): an unmatched Softmax."""
    w = np.linspace(-1, 1, HIDDEN * 4, dtype=np.float32).reshape(HIDDEN, 4)
    nodes = [helper.make_node("MatMul", ["X", "w"], ["logits"], name="classifier"),
             helper.make_node("Softmax", ["logits"], ["Y"], axis=-1, name="class_softmax")]
    return _model(nodes, [helper.make_tensor_value_info("X", T.FLOAT, ["b", HIDDEN])],
                  [helper.make_tensor_value_info("Y", T.FLOAT, ["b", 4])], [_const("w", w)])


def mlp(seed: int = 0) -> onnx.ModelProto:
    """No attention at all: ``Y = relu(X W1 + b1) W2``."""
    rng = np.random.default_rng(seed)
    inits = [_const("w1", rng.standard_normal((HIDDEN, 32)).astype(np.float32)),
             _const("b1", np.zeros(32, np.float32)),
             _const("w2", rng.standard_normal((32, 3)).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["X", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["Y"])]
    return _model(nodes, [helper.make_tensor_value_info("X", T.FLOAT, ["b", HIDDEN])],
                  [helper.make_tensor_value_info("Y", T.FLOAT, ["b", 3])], inits)


def save(proto: onnx.ModelProto, path: Path, external: bool = False) -> Path:
    if external:
        onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(proto, str(path))
    return path


def synthetic_stats(model_path: Path, sites: list[str], seed: int = 0) -> Stats:
    """Statistics as calibrate would write them for ``model_path``, with random attention."""
    rng = np.random.default_rng(seed)
    stats = Stats.empty({s: HEADS for s in sites}, GRANULARITY, MAX_LENGTH, file_sha256(model_path))
    for site in sites:
        stats.sums[site] = rng.random(stats.sums[site].shape) * 10
        stats.counts[site] = np.full(stats.counts[site].shape, 10.0)
    stats.lengths[MAX_LENGTH] = 10
    stats.num_samples = 10
    return stats


def pruned_encoder(folder: Path, sparsity: float = 0.5, block_size: int = 16) -> dict[str, Path]:
    """The encoder, its statistics and its pruned form, written under ``folder``."""
    from onnxprune.model_io import load_model
    from onnxprune.prune import prune
    from onnxprune.rules import find_sites

    dense = save(attention_encoder(), folder / "dense.onnx")
    sites = [s.name for s in find_sites(load_model(dense).model).sites]
    stats_path = folder / "stats.safetensors"
    synthetic_stats(dense, sites).save(stats_path)
    model, _ = prune(dense, Stats.load(stats_path), sparsity, block_size, stats_sha256=file_sha256(stats_path))
    pruned = folder / "pruned.onnx"
    save_model(model, pruned)
    return {"dense": dense, "stats": stats_path, "pruned": pruned}


def npz_inputs(path: Path, count: int = 6, seq_len: int = 40, seed: int = 0) -> Path:
    """An .npz of ``count`` examples for the encoder (the last positions of some are padding)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count, seq_len, HIDDEN)).astype(np.float32)
    mask = np.ones((count, seq_len), np.int64)
    mask[1::2, seq_len * 3 // 4:] = 0
    np.savez(path, X=x, attention_mask=mask)
    return path
