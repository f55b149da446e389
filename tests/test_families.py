"""Every attention of every common transformer family, in every form an exporter emits.

Per family × form (tiny random-init models, see ``families.py``): the sites found are the model's
attention layers (causal ones causal, cross-attention with a rectangular layout); pruning at p = 0
reproduces the dense model within 1e-5, with the library's kernel and with the op's function body;
at p = 0.9 the kernel equals the function body within 1e-5.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from families import DECODER_LENGTH, ENCODER_LENGTH, FAMILIES, FORMS, HEADS, export_family
from onnxprune import op_schema
from onnxprune.calibrate import calibrate
from onnxprune.data import Dataset
from onnxprune.model_io import load_ir, save_model
from onnxprune.prune import prune
from onnxprune.rules import find_sites
from onnxprune.runtime import session

pytest.importorskip("torch")
pytest.importorskip("transformers")

ATOL = 1e-5
BLOCK = 16
MAX_LENGTH = 64

#: (family, form) → why the cell cannot run: only what the exporters themselves cannot do.
NOT_EXPORTABLE: dict[tuple[str, str], str] = {}
CELLS = [(family, form) for family in FAMILIES for form in FORMS]


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """``exported(family, form)``: path of the exported model, exported once per session."""
    folder = tmp_path_factory.mktemp("families")
    cache: dict[tuple[str, str], str] = {}

    def get(family: str, form: str) -> str:
        if (family, form) not in cache:
            path = folder / family / form / "model.onnx"
            path.parent.mkdir(parents=True)
            export_family(FAMILIES[family], form, path)
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
    return {t.name[len(prefix):]: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith(prefix)}


@pytest.mark.parametrize("family,form", CELLS, ids=[f"{a}-{b}" for a, b in CELLS])
def test_family_form(family, form, exported, tmp_path, ops_library):
    if (family, form) in NOT_EXPORTABLE:
        pytest.skip(NOT_EXPORTABLE[family, form])
    spec = FAMILIES[family]
    dense = exported(family, form)

    discovery = find_sites(load_ir(dense))
    assert len(discovery.sites) == spec.sites, discovery.unmatched
    assert not discovery.unmatched

    stats = calibrate(dense, _examples(spec, 8, seed=1), granularity=BLOCK, max_length=MAX_LENGTH, show_progress=False)
    feeds = spec.inputs(np.random.default_rng(2), 3)
    expected = _run(dense, feeds, with_library=False)
    assert np.all(np.isfinite(expected))

    results = {}
    for p in (0.0, 0.9):
        model, report = prune(dense, stats, p, block_size=BLOCK)
        path = tmp_path / f"p{p}.onnx"
        save_model(model, path)
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
        results[p] = (_run(path, feeds, with_library=True), _run(path, feeds, with_library=False), report)

    kernel, body, report = results[0.0]
    np.testing.assert_allclose(kernel, expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(body, expected, atol=ATOL, rtol=0)
    kernel, body, report = results[0.9]
    assert all(s.density < 1.0 for s in report.sites)
    assert np.all(np.isfinite(kernel))
    np.testing.assert_allclose(kernel, body, atol=ATOL, rtol=0)
