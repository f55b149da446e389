"""Calibration: run the model in ONNX Runtime and accumulate each site's attention statistics.

Each site's probabilities ``[B, H, Sq, Sk]`` are pooled over keys inside the graph (added graph
outputs ``[B, H, Sq, ⌈Sk/g⌉]``), so what leaves ONNX Runtime is g times smaller; the pooling over
queries, which must skip padded queries, happens here with the batch's attention mask.
No PyTorch is needed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxprune.data import Dataset
from onnxprune.errors import OnnxpruneError
from onnxprune.lm_feeds import with_empty_cache
from onnxprune.model_io import LoadedModel, ModelInfo, load_model
from onnxprune.progress import progress
from onnxprune.rules import SiteMatch, decompose_fused_attention, find_sites
from onnxprune.runtime import session
from onnxprune.stats import Stats

PROBE_PREFIX = "onnxprune.probe."


def _probabilities_nodes(site: SiteMatch, out: str) -> list[onnx.NodeProto]:
    """Nodes computing a site's attention probabilities when the graph has no Softmax output
    (the fused ``Attention`` op): softmax(scale·Q·Kᵀ + mask), causal if the op is."""
    p = f"{out}/"
    i64 = lambda name, vals: helper.make_node(  # noqa: E731
        "Constant", [], [p + name], value=helper.make_tensor(name, TensorProto.INT64, [len(vals)], vals)
    )
    nodes = [
        # Grouped heads: each KV head serves Hq/Hkv query heads; repeat K to [B, Hq, Sk, D].
        helper.make_node("Shape", [site.q.name], [p + "hq"], start=1, end=2),
        helper.make_node("Shape", [site.k.name], [p + "b"], start=0, end=1),
        helper.make_node("Shape", [site.k.name], [p + "hkv"], start=1, end=2),
        helper.make_node("Shape", [site.k.name], [p + "skd"], start=2, end=4),
        helper.make_node("Div", [p + "hq", p + "hkv"], [p + "group"]),
        i64("axis2", [2]),
        helper.make_node("Unsqueeze", [site.k.name, p + "axis2"], [p + "k5"]),
        helper.make_node("Concat", [p + "b", p + "hkv", p + "group", p + "skd"], [p + "k5_shape"], axis=0),
        helper.make_node("Expand", [p + "k5", p + "k5_shape"], [p + "k5_e"]),
        helper.make_node("Concat", [p + "b", p + "hq", p + "skd"], [p + "k_shape"], axis=0),
        helper.make_node("Reshape", [p + "k5_e", p + "k_shape"], [p + "k_full"]),
        helper.make_node("Transpose", [p + "k_full"], [p + "kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", [site.q.name, p + "kt"], [p + "qk"]),
        helper.make_node("Constant", [], [p + "scale"], value=helper.make_tensor("s", TensorProto.FLOAT, [], [site.scale])),
        helper.make_node("Mul", [p + "qk", p + "scale"], [p + "scores0"]),
        helper.make_node("Constant", [], [p + "ninf"], value=helper.make_tensor("n", TensorProto.FLOAT, [], [float("-inf")])),
    ]
    scores = p + "scores0"
    if site.mask is not None and site.mask_kind == "bool":
        nodes.append(helper.make_node("Where", [site.mask.name, scores, p + "ninf"], [p + "scores1"]))
        scores = p + "scores1"
    elif site.mask is not None:
        nodes.append(helper.make_node("Add", [scores, site.mask.name], [p + "scores1"]))
        scores = p + "scores1"
    if site.is_causal:
        nodes += [
            helper.make_node("Shape", [scores], [p + "sqsk"], start=2, end=4),
            helper.make_node("ConstantOfShape", [p + "sqsk"], [p + "ones"], value=helper.make_tensor("o", TensorProto.INT64, [1], [1])),
            helper.make_node("Trilu", [p + "ones"], [p + "tril"], upper=0),
            helper.make_node("Cast", [p + "tril"], [p + "keep"], to=TensorProto.BOOL),
            helper.make_node("Where", [p + "keep", scores, p + "ninf"], [p + "scores2"]),
        ]
        scores = p + "scores2"
    nodes += [
        helper.make_node("Softmax", [scores], [p + "probs_raw"], axis=-1),
        helper.make_node("IsNaN", [p + "probs_raw"], [p + "nan"]),
        helper.make_node("Constant", [], [p + "zero"], value=helper.make_tensor("z", TensorProto.FLOAT, [], [0.0])),
        helper.make_node("Where", [p + "nan", p + "zero", p + "probs_raw"], [out]),
    ]
    return nodes


def _key_pooling_nodes(probs: str, out: str, granularity: int) -> list[onnx.NodeProto]:
    """``[B, H, Sq, Sk]`` → ``[B, H, Sq, ⌈Sk/g⌉]``: zero-pad keys to a multiple of g, sum groups."""
    p = f"{out}/"
    const = lambda name, vals: helper.make_node(  # noqa: E731
        "Constant", [], [p + name], value=helper.make_tensor(name, TensorProto.INT64, [len(vals)], vals)
    )
    return [
        helper.make_node("Shape", [probs], [p + "sk"], start=3, end=4),
        const("g", [granularity]),
        helper.make_node("Mod", [p + "sk", p + "g"], [p + "rem"]),
        helper.make_node("Sub", [p + "g", p + "rem"], [p + "gap"]),
        helper.make_node("Mod", [p + "gap", p + "g"], [p + "pad"]),
        const("zeros7", [0] * 7),
        helper.make_node("Concat", [p + "zeros7", p + "pad"], [p + "pads"], axis=0),
        helper.make_node("Pad", [probs, p + "pads"], [p + "padded"]),
        const("shape5", [0, 0, 0, -1, granularity]),
        helper.make_node("Reshape", [p + "padded", p + "shape5"], [p + "grouped"]),
        const("last", [-1]),
        helper.make_node("ReduceSum", [p + "grouped", p + "last"], [out], keepdims=0),
    ]


def probe_model(loaded: LoadedModel, granularity: int) -> tuple[bytes, list[SiteMatch]]:
    """The model with one added output per site: its key-pooled attention probabilities.
    ``loaded.model`` is changed (fused attention decomposed)."""
    model_path, ir_model = loaded.info.path, loaded.model
    decompose_fused_attention(ir_model)
    discovery = find_sites(ir_model)
    if not discovery.sites:
        reasons = "; ".join(f"{n}: {r}" for n, r in discovery.unmatched[:3])
        raise OnnxpruneError(
            f"{model_path}: no attention site found" + (f" ({reasons})" if reasons else " (no Softmax or Attention node)")
        )
    from onnx_ir import serde

    opset = loaded.info.opset() or 0
    if opset < 13:
        raise OnnxpruneError(f"{model_path}: opset {opset} is too old (need >= 13); export again with a newer opset")
    proto = serde.serialize_model(ir_model)
    del proto.graph.output[:]
    for index, site in enumerate(discovery.sites):
        probs = site.probs.name if site.probs is not None else None
        if probs is None:
            probs = f"{PROBE_PREFIX}{index}.probs"
            proto.graph.node.extend(_probabilities_nodes(site, probs))
        out = f"{PROBE_PREFIX}{index}"
        proto.graph.node.extend(_key_pooling_nodes(probs, out, granularity))
        proto.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    return proto.SerializeToString(), discovery.sites


def _probe_session(probe: bytes, info: ModelInfo, threads: int | None):
    """An ORT session of the probe model. With external data, ORT finds the data relative to the
    model file, so the probe is written beside the model for as long as the session loads."""
    if not info.has_external_data:
        return session(probe, threads=threads, with_library=False)
    folder = Path(info.path).resolve().parent
    fd, tmp = tempfile.mkstemp(prefix=".onnxprune-probe.", suffix=".onnx", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(probe)
        return session(tmp, threads=threads, with_library=False)
    finally:
        os.unlink(tmp)


def _pool_queries(key_pooled: np.ndarray, valid_q: np.ndarray, granularity: int) -> np.ndarray:
    """``[B, H, Sq, Mk]`` summed over batch and valid queries of each group → ``[H, Mq, Mk]``."""
    b, h, sq, mk = key_pooled.shape
    mq = -(-sq // granularity)
    padded = np.zeros((b, h, mq * granularity, mk))
    padded[:, :, :sq] = key_pooled * valid_q[:, None, :sq, None]
    return padded.reshape(b, h, mq, granularity, mk).sum(axis=(0, 3))


def _group_counts(valid: np.ndarray, granularity: int) -> np.ndarray:
    """``[B, S]`` 0/1 → ``[B, ⌈S/g⌉]``: valid positions per group."""
    b, s = valid.shape
    m = -(-s // granularity)
    padded = np.zeros((b, m * granularity))
    padded[:, :s] = valid
    return padded.reshape(b, m, granularity).sum(axis=2)


def calibrate(
    model: str | os.PathLike | LoadedModel,
    dataset: Dataset,
    granularity: int = 16,
    max_length: int = 256,
    batch_size: int = 8,
    threads: int | None = None,
    show_progress: bool = True,
) -> Stats:
    """Average attention statistics of every site of ``model`` over ``dataset``.

    ``model``: a path, or the ``load_model`` of one (a caller that read the file for its input
    names), whose graph calibration changes.
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    probe, sites = probe_model(loaded, granularity)
    sess = _probe_session(probe, loaded.info, threads)
    names = [o.name for o in sess.get_outputs()]
    stats: Stats | None = None
    sha = loaded.info.sha256
    batches = dataset.batches(batch_size)
    extents: dict[str, list] = {}  # site → [queries follow the input, keys do, query cells, key cells]
    total = -(-len(dataset) // batch_size)
    for feeds in progress(batches, total=total, desc="calibrating", unit="batch", enabled=show_progress):
        length = next(iter(feeds.values())).shape[1]
        if length > max_length:
            raise OnnxpruneError(f"an input has {length} positions, more than --max-length {max_length}")
        outputs = sess.run(names, with_empty_cache(loaded.info, feeds))
        if stats is None:
            stats = Stats.empty({s.name: o.shape[1] for s, o in zip(sites, outputs)}, granularity, max_length, sha)
        valid = feeds.get("attention_mask")
        valid = np.ones((len(outputs[0]), length)) if valid is None else (valid != 0).astype(np.float64)
        for site, pooled in zip(sites, outputs):
            # Self-attention sites follow the input's mask; other lengths count every position.
            sq, mk = pooled.shape[2], pooled.shape[3]
            if sq > stats.max_length or mk > stats.cells:
                raise OnnxpruneError(
                    f"site {site.name} attends {sq} queries to {mk * granularity} keys, more than --max-length "
                    f"{stats.max_length}"
                )
            extent = extents.setdefault(site.name, [True, True, 0, 0])
            extent[0] &= sq == length
            extent[1] &= mk == -(-length // granularity)
            extent[2], extent[3] = max(extent[2], -(-sq // granularity)), max(extent[3], mk)
            valid_q = valid if sq == length else np.ones((valid.shape[0], sq))
            valid_k = valid if mk == -(-length // granularity) else np.ones((valid.shape[0], mk * granularity))
            summed = _pool_queries(pooled.astype(np.float64), valid_q, granularity)
            counts = np.einsum("ba,bc->ac", _group_counts(valid_q, granularity), _group_counts(valid_k, granularity))
            mq, mk = summed.shape[1], summed.shape[2]
            stats.sums[site.name][:, :mq, :mk] += summed
            stats.counts[site.name][:mq, :mk] += counts[:mq, :mk]
        np.add.at(stats.lengths, valid.sum(axis=1).astype(np.int64), 1)
        stats.num_samples += valid.shape[0]
    if stats is None:
        raise OnnxpruneError("no calibration data")
    return _trim_to_extents(stats, extents)


def _trim_to_extents(stats: Stats, extents: dict[str, list]) -> Stats:
    """Rectangular statistics where a site's queries or keys do not follow the input's length.

    An axis that tracked the input's length (self-attention over it) spans ``max_length``; any
    other (a decoder's queries, a fixed number of image patches or audio frames, the keys of
    cross-attention from another input) spans the positions calibration saw, so cross-attention
    gets an ``Mq × Mk`` layout.
    """
    for site, (follows_q, follows_k, cells_q, cells_k) in extents.items():
        lq = stats.cells if follows_q else cells_q
        lk = stats.cells if follows_k else cells_k
        stats.sums[site] = np.ascontiguousarray(stats.sums[site][:, :lq, :lk])
        stats.counts[site] = np.ascontiguousarray(stats.counts[site][:lq, :lk])
    return stats
