"""``onnxprune prune`` with each method and pattern, end to end on the tiny encoder of
tests/cli_models.py with synthetic statistics: the file runs in ONNX Runtime, records its method,
and bad choices are one line with nothing written."""

from __future__ import annotations

import numpy as np
import pytest

import cli_models
from onnxprune.cli import main
from onnxprune.layouts import load_layouts
from onnxprune.model_io import load_model
from onnxprune.rules import find_sites

METHODS = {
    "select": ["--density", "0.5"],
    "ap": ["--method", "ap", "--density", "0.5"],
    "streaming": ["--pattern", "streaming", "--sink", "16", "--window", "0"],
    "duo": ["--pattern", "duo", "--density", "0.6", "--sink", "16", "--window", "0"],
}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("methods")
    dense = cli_models.save(cli_models.attention_encoder(), folder / "dense.onnx")
    sites = [s.name for s in find_sites(load_model(dense).model).sites]
    stats = folder / "stats.safetensors"
    cli_models.synthetic_stats(dense, sites).save(stats)
    return {"folder": folder, "dense": dense, "stats": stats}


def _prune(encoder, out, *extra) -> int:
    return main(["prune", str(encoder["dense"]), "--stats", str(encoder["stats"]), "-o", str(out), "-q", *extra])


def _outputs(path) -> np.ndarray:
    from onnxprune.runtime import run, session

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 40, cli_models.HIDDEN)).astype(np.float32)
    mask = np.ones((2, 40), np.int64)
    sess = session(path)
    names = [i.name for i in sess.get_inputs()]
    feeds = {n: v for n, v in zip(names, (x, mask))}
    return run(sess, feeds, path)[0]


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_prunes_a_model_that_runs(encoder, method):
    out = encoder["folder"] / f"{method}.onnx"
    assert _prune(encoder, out, "--block-size", "16", *METHODS[method]) == 0
    layouts = load_layouts(out)
    assert layouts.method == method
    assert all(site.rule is not None for site in layouts.sites.values())
    assert np.isfinite(_outputs(out)).all()
    if method == "streaming":  # one sink block, the diagonal; non-causal: the same after it and a global row
        assert all(site.rule.tolist() == [[1, 0, 0, 1]] * cli_models.HEADS for site in layouts.sites.values())


def test_density_equals_one_minus_sparsity(encoder):
    a, b = encoder["folder"] / "d.onnx", encoder["folder"] / "p.onnx"
    assert _prune(encoder, a, "--density", "0.4") == 0
    assert _prune(encoder, b, "--sparsity", "0.6") == 0
    la, lb = load_layouts(a), load_layouts(b)
    for name in la.sites:
        assert (la.sites[name].layout == lb.sites[name].layout).all()
        assert (la.sites[name].rule == lb.sites[name].rule).all()


def test_density_one_is_the_dense_model(encoder):
    out = encoder["folder"] / "one.onnx"
    assert _prune(encoder, out, "--density", "1") == 0
    from onnxprune.runtime import run, session

    rng = np.random.default_rng(0)
    sess = session(encoder["dense"], with_library=False)
    names = [i.name for i in sess.get_inputs()]
    feeds = dict(zip(names, (rng.standard_normal((2, 40, cli_models.HIDDEN)).astype(np.float32),
                             np.ones((2, 40), np.int64))))
    np.testing.assert_allclose(_outputs(out), run(sess, feeds)[0], atol=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--density", "0"], "must be in (0, 1]"),
    (["--density", "1.5"], "must be in (0, 1]"),
    (["--density", "nan"], "must be in (0, 1]"),
    (["--pattern", "streaming", "--window", "-64"], "must be 0 or more"),
    (["--pattern", "streaming", "--sink", "-1"], "must be 0 or more"),
    (["--method", "ap", "--pattern", "duo", "--density", "0.5"], "not allowed with argument"),
    (["--density", "0.5", "--sparsity", "0.5"], "not allowed with argument"),
])
def test_bad_choices_are_one_line_and_nothing_written(encoder, capsys, extra, message):
    out = encoder["folder"] / "bad.onnx"
    with pytest.raises(SystemExit) as exit_info:
        _prune(encoder, out, *extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("onnxprune prune: error:")]
    assert len(errors) == 1 and message in errors[0]  # after argparse's usage
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    ([], "give --density"),
    (["--pattern", "streaming", "--density", "0.5"], "drop --density"),
])
def test_a_missing_or_extra_budget_is_one_line(encoder, capsys, extra, message):
    out = encoder["folder"] / "bad.onnx"
    assert _prune(encoder, out, *extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()

