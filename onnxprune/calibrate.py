"""Calibration: run the model in ONNX Runtime and accumulate each site's attention statistics.

Every site is rewritten, through the same passes as a prune with nothing pruned, into the
statistics form of the op (``onnxprune.BlockSparseAttentionStatistics``, see
``passes/statistics_form.py``): it computes the attention and sums its probabilities over
``g × g`` cells of valid queries in two passes over the key blocks, so no ``S × S`` matrix is
ever held and memory stays near the dense forward pass's. Batches are bounded by a token budget,
so memory does not grow with the number of inputs either. A model the rewrite cannot take keeps
the older probe path: probabilities pooled over keys in the graph (``[B, H, Sq, ⌈Sk/g⌉]``) and over
queries here. Counts come from the inputs' attention mask. No PyTorch is needed.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxprune import op_schema
from onnxprune.data import Dataset
from onnxprune.errors import OnnxpruneError
from onnxprune.layouts import Layouts, SiteLayout
from onnxprune.lm_feeds import with_empty_cache
from onnxprune.model_io import LoadedModel, ModelInfo, load_model
from onnxprune.progress import counter
from onnxprune.rules import SiteMatch, decompose_fused_attention, find_sites
from onnxprune.runtime import session
from onnxprune.stats import Stats

PROBE_PREFIX = "onnxprune.probe."
#: Positions per batch at most (fewer inputs per batch at long --max-length): the forward pass's
#: activations, and so calibration's memory, do not grow with --batch-size beyond it.
BATCH_TOKENS = 4096
#: Cells per axis the default granularity keeps a site's statistics to (see default_granularity).
MAX_DEFAULT_CELLS = 256
DEFAULT_GRANULARITY = 16


def default_granularity(max_length: int) -> int:
    """16 up to 4096 positions; beyond, the smallest power of two (at most the largest block
    size, 128) that keeps ``⌈max_length/g⌉ <= 256``: a site's statistics stay ``H × 256 × 256``
    float64 (142 MB for SmolLM2's 30 × 9 heads, not 566 MB at 8192 positions and g = 16), and
    layouts at such lengths are pruned with blocks of at least g anyway."""
    g = DEFAULT_GRANULARITY
    while -(-max_length // g) > MAX_DEFAULT_CELLS and g < max(op_schema.BLOCK_SIZES):
        g *= 2
    return g


def statistics_block_size(granularity: int) -> int:
    """The op's block size for the statistics form: the largest block no larger than g (16
    below it). The kernel pools any g; g dividing the query tile writes cells directly."""
    return max(b for b in op_schema.BLOCK_SIZES if b <= max(granularity, op_schema.BLOCK_SIZES[0]))


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


def _discover(loaded: LoadedModel) -> list[SiteMatch]:
    """The sites of ``loaded.model`` (fused attention decomposed in place), or a one-line error."""
    model_path, ir_model = loaded.info.path, loaded.model
    decompose_fused_attention(ir_model)
    discovery = find_sites(ir_model)
    if not discovery.sites:
        reasons = "; ".join(f"{n}: {r}" for n, r in discovery.unmatched[:3])
        raise OnnxpruneError(
            f"{model_path}: no attention site found" + (f" ({reasons})" if reasons else " (no Softmax or Attention node)")
        )
    opset = loaded.info.opset() or 0
    if opset < 13:
        raise OnnxpruneError(f"{model_path}: opset {opset} is too old (need >= 13); export again with a newer opset")
    return discovery.sites


def statistics_model(loaded: LoadedModel, granularity: int) -> tuple[bytes, list[SiteMatch]]:
    """The model with every site in the statistics form; its outputs, per site: the pooled sums
    ``[B, H, ⌈Sq/g⌉, ⌈Sk/g⌉]`` and Sq. ``loaded.model`` is changed. Raises an OnnxpruneError
    where the rewrite does not take a site."""
    sites = _discover(loaded)
    return _statistics_form(loaded, granularity, sites), sites


def _statistics_form(loaded: LoadedModel, granularity: int, sites: list[SiteMatch]) -> bytes:
    from onnx_ir import serde
    from onnx_ir.passes import common as common_passes

    from onnxprune.passes import KeyPaddingMaskPass, PrunePipeline, RewriteSitesPass
    from onnxprune.passes.statistics_form import StatisticsFormPass

    # Nothing pruned: a [1, 1, 1] layout without a rule continues densely at every length.
    everything = SiteLayout(layout=np.ones((1, 1, 1), np.uint8))
    layouts = Layouts(block_size=statistics_block_size(granularity), sites={s.name: everything for s in sites})
    PrunePipeline(
        RewriteSitesPass(layouts),
        KeyPaddingMaskPass(),
        StatisticsFormPass(granularity, [s.name for s in sites], PROBE_PREFIX),
        common_passes.RemoveUnusedNodesPass(),
    )(loaded.model)
    return serde.serialize_model(loaded.model).SerializeToString()


def probe_model(loaded: LoadedModel, granularity: int) -> tuple[bytes, list[SiteMatch]]:
    """The model with one added output per site: its key-pooled attention probabilities.
    ``loaded.model`` is changed (fused attention decomposed)."""
    from onnx_ir import serde

    sites = _discover(loaded)
    proto = serde.serialize_model(loaded.model)
    del proto.graph.output[:]
    for index, site in enumerate(sites):
        probs = site.probs.name if site.probs is not None else None
        if probs is None:
            probs = f"{PROBE_PREFIX}{index}.probs"
            proto.graph.node.extend(_probabilities_nodes(site, probs))
        out = f"{PROBE_PREFIX}{index}"
        proto.graph.node.extend(_key_pooling_nodes(probs, out, granularity))
        proto.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    return proto.SerializeToString(), sites


def _session(model: bytes, info: ModelInfo, threads: int | None, with_library: bool):
    """An ORT session of calibration's model. With external data, ORT finds the data relative to
    the model file, so the model is written beside it for as long as the session loads."""
    if not info.has_external_data:
        return session(model, threads=threads, with_library=with_library)
    folder = Path(info.path).resolve().parent
    fd, tmp = tempfile.mkstemp(prefix=".onnxprune-probe.", suffix=".onnx", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model)
        return session(tmp, threads=threads, with_library=with_library)
    finally:
        os.unlink(tmp)


class _Runner:
    """One calibration model in a session: per batch, each site's sums over the batch
    ``[H, ⌈Sq/g⌉, ⌈Sk/g⌉]`` and its number of queries."""

    def __init__(self, loaded: LoadedModel, granularity: int, threads: int | None):
        self.granularity = granularity
        self.info = loaded.info
        self.sites = _discover(loaded)
        try:
            # The library is needed here only: without it (or where the rewrite does not take a
            # site) calibration still runs, as it did before the statistics form.
            self.sess = _session(_statistics_form(loaded, granularity, self.sites), loaded.info, threads, True)
            self.statistics_form = True
        except OnnxpruneError as e:
            warnings.warn(f"calibrating without the statistics form ({e}): memory grows with length²", stacklevel=3)
            loaded = load_model(loaded.info.path)  # the file as it was
            model, self.sites = probe_model(loaded, granularity)
            self.sess = _session(model, loaded.info, threads, False)
            self.statistics_form = False
        self.names = [o.name for o in self.sess.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], valid: np.ndarray) -> list[tuple[np.ndarray, int]]:
        outputs = self.sess.run(self.names, with_empty_cache(self.info, feeds))  # a with-past LM: no past
        if self.statistics_form:
            # Summed over the batch here: each input's sums do not depend on its batch.
            return [(pooled.sum(axis=0), int(sq[0])) for pooled, sq in zip(outputs[0::2], outputs[1::2])]
        sums = []
        for pooled in outputs:
            sq = pooled.shape[2]
            valid_q = valid if sq == valid.shape[1] else np.ones((valid.shape[0], sq))
            sums.append((_pool_queries(pooled.astype(np.float64), valid_q, self.granularity), sq))
        return sums


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


@dataclasses.dataclass(frozen=True)
class CalibrationSession:
    """A model ready to calibrate (its statistics form in an ORT session), for several
    ``calibrate`` calls: a worker calibrating shard after shard loads the model and starts the
    session once."""

    runner: _Runner
    model_sha256: str
    granularity: int


def calibration_session(model: str | os.PathLike | LoadedModel, granularity: int,
                        threads: int | None = None) -> CalibrationSession:
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    return CalibrationSession(_Runner(loaded, granularity, threads), loaded.info.sha256, granularity)


def _valid_tokens(example) -> int:
    if isinstance(example, dict):
        mask = example.get("attention_mask")
        return int(next(iter(example.values())).shape[-1] if mask is None else np.count_nonzero(mask))
    return len(example)


def calibrate(
    model: str | os.PathLike | LoadedModel | CalibrationSession,
    dataset: Dataset,
    granularity: int | None = None,
    max_length: int = 256,
    batch_size: int = 8,
    threads: int | None = None,
    show_progress: bool = True,
) -> Stats:
    """Average attention statistics of every site of ``model`` over ``dataset``.

    ``model``: a path, or the ``load_model`` of one (a caller that read the file for its input
    names), whose graph calibration changes, or a ``calibration_session`` (then ``threads`` is
    its own). ``granularity``: None for :func:`default_granularity` of ``max_length``.
    ``batch_size`` is capped so that a batch holds at most ``BATCH_TOKENS`` positions of
    ``max_length``.
    """
    if isinstance(model, CalibrationSession):
        if granularity is not None and granularity != model.granularity:
            raise OnnxpruneError(f"the calibration session pools {model.granularity} positions, not granularity "
                                 f"{granularity}")
        granularity, runner, sha = model.granularity, model.runner, model.model_sha256
    else:
        granularity = default_granularity(max_length) if granularity is None else granularity
        loaded = model if isinstance(model, LoadedModel) else load_model(model)
        runner, sha = _Runner(loaded, granularity, threads), loaded.info.sha256
    sites = runner.sites
    stats: Stats | None = None
    batches = dataset.batches(max(1, min(batch_size, BATCH_TOKENS // max_length)))
    extents: dict[str, list] = {}  # site → [queries follow the input, keys do, query cells, key cells]
    total = sum(_valid_tokens(e) for e in dataset.examples)
    with counter(total=total, desc="calibrating", unit="tok", enabled=show_progress) as bar:
        for feeds in batches:
            length = next(iter(feeds.values())).shape[1]
            if length > max_length:
                raise OnnxpruneError(f"an input has {length} positions, more than --max-length {max_length}")
            valid = feeds.get("attention_mask")
            valid = (np.ones((next(iter(feeds.values())).shape[0], length)) if valid is None
                     else (valid != 0).astype(np.float64))
            sums = runner.run(feeds, valid)
            if stats is None:
                stats = Stats.empty({s.name: summed.shape[0] for s, (summed, _) in zip(sites, sums)}, granularity,
                                    max_length, sha)
            for site, (summed, sq) in zip(sites, sums):
                # Self-attention sites follow the input's mask; other lengths count every position.
                mk = summed.shape[2]
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
                counts = np.einsum("ba,bc->ac", _group_counts(valid_q, granularity), _group_counts(valid_k, granularity))
                mq, mk = summed.shape[1], summed.shape[2]
                stats.sums[site.name][:, :mq, :mk] += summed
                stats.counts[site.name][:mq, :mk] += counts[:mq, :mk]
            np.add.at(stats.lengths, _input_lengths(feeds, valid, sums, stats.max_length), 1)
            stats.num_samples += valid.shape[0]
            bar.update(int(valid.sum()))
    if stats is None:
        raise OnnxpruneError("no calibration data")
    return _trim_to_extents(stats, extents)


def _input_lengths(feeds: dict[str, np.ndarray], valid: np.ndarray, sums, max_length: int) -> np.ndarray:
    """Each input's length for the statistics' histogram: its valid tokens, or for an input that is
    not a token sequence (images, audio features) the positions its attention saw (patches,
    frames) — its second axis is channels or features, not positions."""
    first = next(iter(feeds.values()))
    if "attention_mask" in feeds or first.ndim == 2:
        return valid.sum(axis=1).astype(np.int64)
    seen = min(max(sq for _, sq in sums), max_length)
    return np.full(first.shape[0], seen, np.int64)


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
