"""Every attention of every common transformer family, in every form an exporter emits.

Per family × form (tiny random-init models, see ``families.py``): the sites found are the model's
attention layers (causal ones causal, cross-attention with a rectangular layout); pruning at p = 0
reproduces the dense model within 1e-5, with the library's kernel and with the op's function body;
at p = 0.9 the kernel equals the function body within 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from families import BASE_FORM, FAMILIES, FORMS, HEADS, export_family
from onnxprune import op_schema
from onnxprune.calibrate import calibrate
from onnxprune.data import Dataset
from onnxprune.model_io import load_model, save_model
from onnxprune.prune import prune
from onnxprune.rules import find_sites
from onnxprune.runtime import session

pytest.importorskip("torch")
pytest.importorskip("transformers")

ATOL = 1e-5
BLOCK = 16
MAX_LENGTH = 64

#: (family, form) → why the cell cannot run. None is torch's own doing; these are the limits of
#: ONNX Runtime 1.32 (the dense model would not run) and of its optimizer (nothing to fuse).
NOT_RUNNABLE: dict[tuple[str, str], str] = {
    ("torch_encoder", "dynamo-sdpa-23"): (
        "ONNX Runtime 1.32's Attention-23 rejects the [B, H, 1, Sk] key-padding mask torch emits for "
        "nn.MultiheadAttention (attention_helper.h: 'inconsistent q_sequence_length'): the dense model does not run"
    ),
    **{
        (name, "ort-fused"): f"onnxruntime.transformers.optimizer has no model type for {name}: nothing is fused"
        for name, family in FAMILIES.items()
        if family.ort_model_type is None
    },
    **{
        (name, form): f"transformers has no SDPA attention for {name} (attn_implementation='sdpa' is refused)"
        for name, family in FAMILIES.items()
        for form, (_, attn, _, _) in FORMS.items()
        if attn == "sdpa" and not family.sdpa
    },
}
CELLS = [(family, form) for family in FAMILIES for form in FORMS]
#: The ops each form may hold sites in (T5, Whisper and nn.MultiheadAttention keep eager math under SDPA).
FORMS_SEEN = {
    "eager", "sdpa-decomposed", "onnx-attention", "batched-heads", "com.microsoft.Attention",
    "com.microsoft.MultiHeadAttention",
}


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """``exported(family, form)``: path of the exported model, exported once per session."""
    folder = tmp_path_factory.mktemp("families")
    cache: dict[tuple[str, str], str] = {}

    def get(family: str, form: str) -> str:
        if (family, form) not in cache:
            path = folder / family / form / "model.onnx"
            path.parent.mkdir(parents=True)
            base = get(family, BASE_FORM[form]) if form in BASE_FORM else None
            export_family(FAMILIES[family], form, path, base)
            cache[family, form] = str(path)
        return cache[family, form]

    return get


def _examples(family, count: int, seed: int) -> Dataset:
    feeds = family.inputs(np.random.default_rng(seed), count)
    return Dataset([{k: v[i] for k, v in feeds.items()} for i in range(count)], list(feeds))


def _run(path, feeds, with_library: bool) -> np.ndarray:
    if with_library:
        sess = session(path, with_library=True)
    else:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["output"], feeds)[0]


def _layouts(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    prefix = op_schema.LAYOUT_PREFIX
    return {
        t.name[len(prefix):]: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith(prefix)
    }


@pytest.mark.slow  # the exports: ~2 s of CPU per dynamo form; still run by default
@pytest.mark.parametrize("family,form", CELLS, ids=[f"{a}-{b}" for a, b in CELLS])
def test_family_form(family, form, exported, tmp_path, ops_library):
    if (family, form) in NOT_RUNNABLE:
        pytest.skip(NOT_RUNNABLE[family, form])
    spec = FAMILIES[family]
    dense = exported(family, form)

    discovery = find_sites(load_model(dense).model)
    assert len(discovery.sites) == spec.sites, discovery.unmatched
    assert not discovery.unmatched
    assert {s.form for s in discovery.sites} <= FORMS_SEEN
    if form == "ort-fused" and spec.ort_model_type == "bert":
        assert any(s.form == "com.microsoft.Attention" for s in discovery.sites)

    # ONNX Runtime 1.32 runs torch's opset-23 RotaryEmbedding only when cos/sin match the batch,
    # which torch exports as 1: these cells run one example at a time.
    batch = 1 if spec.rotary and form == "dynamo-sdpa-23" else 3
    stats = calibrate(dense, _examples(spec, 8, seed=1), granularity=BLOCK, max_length=MAX_LENGTH,
                      batch_size=min(batch, 8), show_progress=False)
    feeds = spec.inputs(np.random.default_rng(2), batch)
    expected = _run(dense, feeds, with_library=False)
    assert np.all(np.isfinite(expected))

    results = {}
    for p in (0.0, 0.9):
        model, report = prune(dense, stats, p, block_size=BLOCK)
        path = tmp_path / f"p{p}.onnx"
        save_model(model, path)
        left = [(n.domain, n.op_type) for n in onnx.load(str(path)).graph.node
                if "Attention" in n.op_type or n.op_type == "Softmax"]
        assert set(left) == {(op_schema.DOMAIN, op_schema.OP_TYPE)}, left
        assert sum(s.causal for s in report.sites) == spec.causal_sites
        layouts = _layouts(path)
        assert len(layouts) == spec.sites
        for site in report.sites:
            layout = layouts[site.name]
            assert layout.shape[0] in (1, HEADS)
            if site.causal:  # never a block that causal masking excludes
                assert not np.triu(layout[0] if layout.shape[0] == 1 else layout.any(axis=0), k=1).any()
        rectangular = [n for n, lay in layouts.items() if lay.shape[1] != lay.shape[2]]
        assert len(rectangular) == spec.cross_sites
        if form == "external-data":  # the weights stay in a data file beside the pruned model
            assert (tmp_path / f"p{p}.onnx.data").stat().st_size > 0
            assert any(t.data_location == onnx.TensorProto.EXTERNAL
                       for t in onnx.load(str(path), load_external_data=False).graph.initializer)
        results[p] = (_run(path, feeds, with_library=True), _run(path, feeds, with_library=False), report)

    assert not list(Path(dense).parent.glob(".onnxprune-probe.*"))  # calibration cleaned up after itself
    kernel, body, report = results[0.0]
    np.testing.assert_allclose(kernel, expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(body, expected, atol=ATOL, rtol=0)
    kernel, body, report = results[0.9]
    assert all(s.density < 1.0 for s in report.sites)
    assert np.all(np.isfinite(kernel))
    np.testing.assert_allclose(kernel, body, atol=ATOL, rtol=0)
    assert np.abs(kernel - expected).max() > 1e-4  # the pruning did change something
