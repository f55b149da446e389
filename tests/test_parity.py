"""End to end on tiny random-init BERT and GPT-2, for each form an exporter emits.

calibrate → prune at p = 0 must give the dense model's outputs; at p = 0.9 the library's kernel
must equal the op's function body (plain ONNX Runtime, no library), and ONNX Runtime must really
run the kernel when the library is registered.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import EXPORTS, TINY_HEADS, TINY_LAYERS, random_token_examples
from onnxprune import op_schema
from onnxprune.calibrate import calibrate
from onnxprune.data import Dataset
from onnxprune.errors import OnnxpruneError
from onnxprune.model_io import load_model, save_model
from onnxprune.prune import PruneReport, prune
from onnxprune.rules import find_sites
from onnxprune.runtime import session
from onnxprune.stats import Stats

pytest.importorskip("torch")
pytest.importorskip("transformers")

ATOL = 1e-5
BLOCK = 16
MAX_LENGTH = 64
INPUTS = ["input_ids", "attention_mask"]
EXPECTED_FORM = {
    "dynamo-eager-20": "eager",
    "dynamo-sdpa-20": "sdpa-decomposed",
    "dynamo-sdpa-23": "onnx-attention",
    "torchscript-eager-17": "eager",
}
CASES = [(arch, form) for arch in ("bert", "gpt2") for form in EXPORTS]


@dataclasses.dataclass
class Case:
    arch: str
    form: str
    dense: str
    stats: Stats
    pruned: dict[float, str]
    reports: dict[float, PruneReport]


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{f}" for a, f in CASES])
def case(request, tiny_model, tmp_path_factory) -> Case:
    arch, form = request.param
    dense = tiny_model(arch, form)
    dataset = Dataset(random_token_examples(24, seed=1), INPUTS)
    stats = calibrate(dense, dataset, granularity=BLOCK, max_length=MAX_LENGTH, batch_size=8, show_progress=False)
    folder = tmp_path_factory.mktemp(f"pruned-{arch}-{form}")
    pruned, reports = {}, {}
    for p in (0.0, 0.9):
        model, report = prune(dense, stats, p, block_size=BLOCK)
        path = folder / f"p{p}.onnx"
        save_model(model, path)
        pruned[p], reports[p] = str(path), report
    return Case(arch, form, dense, stats, pruned, reports)


@pytest.fixture(scope="module")
def eval_batches():
    """Padded batches of mixed lengths (unsorted, so rows of one batch differ a lot)."""
    batches = list(Dataset(random_token_examples(12, seed=2), INPUTS).batches(4, sort=False))
    assert any((b["attention_mask"] == 0).any() for b in batches)
    return batches


def plain_session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def outputs(sess, batches):
    name = sess.get_outputs()[0].name
    return [sess.run([name], feeds)[0] for feeds in batches]


def layouts_of(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {
        init.name[len(op_schema.LAYOUT_PREFIX):]: onnx.numpy_helper.to_array(init)
        for init in model.graph.initializer
        if init.name.startswith(op_schema.LAYOUT_PREFIX)
    }


def test_sites(case):
    discovery = find_sites(load_model(case.dense).model)
    assert len(discovery.sites) == TINY_LAYERS
    assert {s.form for s in discovery.sites} == {EXPECTED_FORM[case.form]}
    # TorchScript leaves the head dimension symbolic; the heads then come from the statistics.
    assert all(s.num_heads in (TINY_HEADS, None) for s in discovery.sites)
    assert case.stats.sites == [s.name for s in discovery.sites]
    for p, report in case.reports.items():
        assert [s.name for s in report.sites] == case.stats.sites
        assert len(report.sites) == TINY_LAYERS
        assert all(s.form == EXPECTED_FORM[case.form] and s.heads == TINY_HEADS for s in report.sites)


def test_calibration_statistics(case):
    stats = case.stats
    assert stats.num_samples == 24
    assert stats.lengths.sum() == 24
    assert stats.lengths[:5].sum() == 0 and stats.lengths[61:].sum() == 0
    for site in stats.sites:
        assert stats.sums[site].shape == (TINY_HEADS, MAX_LENGTH // BLOCK, MAX_LENGTH // BLOCK)
        # Every valid query's probabilities sum to 1 over the keys.
        valid_queries = stats.lengths @ np.arange(len(stats.lengths))
        np.testing.assert_allclose(stats.sums[site].sum(axis=(1, 2)), [valid_queries] * TINY_HEADS, rtol=1e-4)


def test_pruned_graph_has_one_op_per_site(case):
    for p, path in case.pruned.items():
        model = onnx.load(path)
        ops = [(n.domain, n.op_type) for n in model.graph.node]
        assert ops.count((op_schema.DOMAIN, op_schema.OP_TYPE)) == TINY_LAYERS
        assert ("", "Softmax") not in ops and ("", "Attention") not in ops
        assert [f.name for f in model.functions] == [op_schema.OP_TYPE]
        assert {o.domain: o.version for o in model.opset_import}[op_schema.DOMAIN] == op_schema.OPSET_VERSION


def test_p0_equals_dense(case, eval_batches, ops_library):
    dense = outputs(plain_session(case.dense), eval_batches)
    with_library = outputs(session(case.pruned[0.0], with_library=True), eval_batches)
    function_body = outputs(plain_session(case.pruned[0.0]), eval_batches)
    assert all(r.density == 1.0 and r.retained_mass == pytest.approx(1.0) for r in case.reports[0.0].sites)
    assert case.reports[0.0].effective_sparsity == 0.0
    for d, lib, body in zip(dense, with_library, function_body):
        assert np.all(np.isfinite(d))
        np.testing.assert_allclose(lib, d, atol=ATOL, rtol=0)
        np.testing.assert_allclose(body, d, atol=ATOL, rtol=0)


def test_p09_kernel_equals_function_body(case, eval_batches, ops_library):
    report = case.reports[0.9]
    assert all(s.density < 1.0 for s in report.sites)
    assert report.effective_sparsity > 0.0
    with_library = outputs(session(case.pruned[0.9], with_library=True), eval_batches)
    function_body = outputs(plain_session(case.pruned[0.9]), eval_batches)
    dense = outputs(plain_session(case.dense), eval_batches)
    for lib, body in zip(with_library, function_body):
        assert np.all(np.isfinite(lib))
        np.testing.assert_allclose(lib, body, atol=ATOL, rtol=0)
    # The pruning changes something (inputs longer than a block reach pruned blocks).
    assert max(np.abs(lib - d).max() for lib, d in zip(with_library, dense)) > 1e-4


def _profiled_ops(path, with_library, feeds, tmp_path) -> list[str]:
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / ("lib" if with_library else "plain"))
    sess = session(path, with_library=with_library, options=options)
    sess.run(None, feeds)
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    return [e["args"]["op_name"] for e in events if isinstance(e.get("args"), dict) and "op_name" in e["args"]]


def test_library_runs_the_kernel(case, eval_batches, tmp_path, ops_library):
    ops = _profiled_ops(case.pruned[0.9], True, eval_batches[0], tmp_path)
    assert op_schema.OP_TYPE in ops
    assert "Softmax" not in ops
    ops = _profiled_ops(case.pruned[0.9], False, eval_batches[0], tmp_path)
    assert ops  # profiling did record the nodes
    assert op_schema.OP_TYPE not in ops
    assert "Softmax" in ops  # the function body, inlined


def test_causal(case):
    causal = case.arch == "gpt2"
    for p, report in case.reports.items():
        assert [s.causal for s in report.sites] == [causal] * TINY_LAYERS
        layouts = layouts_of(case.pruned[p])
        assert sorted(layouts) == sorted(case.stats.sites)
        for site, layout in layouts.items():
            assert layout.shape == (TINY_HEADS, MAX_LENGTH // BLOCK, MAX_LENGTH // BLOCK)
            upper = np.triu(np.ones(layout.shape[1:], bool), k=1)
            if causal:
                assert not layout[:, upper].any()
            elif p == 0.0:
                assert layout.all()
            # The diagonal is always kept.
            assert all(layout[:, i, i].all() for i in range(layout.shape[1]))
        metadata = {m.key: m.value for m in onnx.load(case.pruned[p]).metadata_props}
        assert {s: v["causal"] for s, v in json.loads(metadata["onnxprune.sites"]).items()} == {
            s: causal for s in case.stats.sites
        }


# --------------------------------------------------------------------------------------------
# Attention-23 with grouped KV heads, built by hand (torch's SDPA export repeats KV heads).


def grouped_attention_model(path, kv_heads: int, q_heads: int = TINY_HEADS, head_size: int = 8, vocab: int = 100):
    """input_ids → three embeddings → Q [B, Hq, S, D], K and V [B, Hkv, S, D] → causal Attention-23."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(kv_heads)
    nodes, initializers = [], []
    for name, heads in (("q", q_heads), ("k", kv_heads), ("v", kv_heads)):
        table = rng.standard_normal((vocab, heads * head_size)).astype(np.float32)
        initializers += [
            onnx.numpy_helper.from_array(table, f"embedding_{name}"),
            onnx.numpy_helper.from_array(np.array([0, 0, heads, head_size], np.int64), f"shape_{name}"),
        ]
        nodes += [
            helper.make_node("Gather", [f"embedding_{name}", "input_ids"], [f"{name}_flat"]),
            helper.make_node("Reshape", [f"{name}_flat", f"shape_{name}"], [f"{name}_bshd"]),
            helper.make_node("Transpose", [f"{name}_bshd"], [name.upper()], perm=[0, 2, 1, 3]),
        ]
    nodes.append(helper.make_node("Attention", ["Q", "K", "V"], ["Y"], name="attention", is_causal=1))
    graph = helper.make_graph(
        nodes, "grouped", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["b", q_heads, "s", head_size])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    onnx.save(model, str(path))


def check_grouped_attention(kv_heads, tmp_path):
    dense = tmp_path / "dense.onnx"
    grouped_attention_model(dense, kv_heads)
    stats = calibrate(dense, Dataset(random_token_examples(16, seed=5), ["input_ids"]), granularity=BLOCK,
                      max_length=MAX_LENGTH, show_progress=False)
    batches = list(Dataset(random_token_examples(8, seed=6), ["input_ids"]).batches(4, sort=False))
    expected = outputs(plain_session(dense), batches)
    for p in (0.0, 0.9):
        model, report = prune(dense, stats, p, block_size=BLOCK)
        assert [(s.form, s.causal, s.heads) for s in report.sites] == [("onnx-attention", True, TINY_HEADS)]
        path = tmp_path / f"p{p}.onnx"
        save_model(model, path)
        layout = layouts_of(path)["attention"]
        assert not np.triu(layout, k=1).any()
        with_library = outputs(session(path, with_library=True), batches)
        function_body = outputs(plain_session(path), batches)
        for lib, body, d in zip(with_library, function_body, expected):
            np.testing.assert_allclose(lib, body, atol=ATOL, rtol=0)
            if p == 0.0:
                np.testing.assert_allclose(lib, d, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kv_heads", [TINY_HEADS, 1], ids=["mha", "mqa"])
def test_attention23_heads(kv_heads, tmp_path, ops_library):
    check_grouped_attention(kv_heads, tmp_path)


def test_attention23_grouped_heads(tmp_path, ops_library):
    check_grouped_attention(2, tmp_path)
