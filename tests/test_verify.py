"""``onnxprune verify``: Polygraphy's elementwise rule (an element fails only over both tolerances,
relative to A), non-finite values, the library chosen per model, the JSON schema, exit codes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import cli_models as models
from json_schema import assert_valid
from onnxprune.cli import main
from onnxprune.data import Dataset
from onnxprune.errors import OnnxpruneError
from onnxprune.model_io import read_info
from onnxprune.verify import verify, library_use

#: A's outputs on the one example below, and how far B is from each.
REFERENCE = np.array([1.0, 100.0, 0.0, 5.0], np.float32)
OFFSETS = np.array([0.5, 0.5, 0.05, 0.0], np.float32)


def offset_model(offsets: np.ndarray, output: str = "Y") -> onnx.ModelProto:
    """``output = X + offsets``."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["X", "offsets"], [output])], "g",
        [helper.make_tensor_value_info("X", T.FLOAT, ["b", len(offsets)])],
        [helper.make_tensor_value_info(output, T.FLOAT, ["b", len(offsets)])],
        initializer=[numpy_helper.from_array(offsets, "offsets")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    a = models.save(offset_model(np.zeros(4, np.float32)), root / "a.onnx")
    b = models.save(offset_model(OFFSETS), root / "b.onnx")
    return a, b


def one_example() -> Dataset:
    return Dataset([{"X": REFERENCE}], ["X"])


@pytest.mark.parametrize("atol, rtol, failed", [
    (0.1, 0.01, 1),   # 1.0 → 1.5 is over both; 100 → 100.5 is within rtol; 0 → 0.05 within atol
    (1.0, 0.01, 0),   # every difference within atol
    (0.1, 0.001, 2),  # 100 → 100.5 is now over rtol too
    (0.01, 0.001, 3),  # 0 → 0.05: over atol, and infinitely over rtol·|A| = 0
    (0.0, 1.0, 1),    # rtol 1 forgives everything but a non-zero offset on A = 0
])
def test_elementwise_rule(pair, atol, rtol, failed):
    (r,) = verify(*pair, one_example(), atol=atol, rtol=rtol, show_progress=False)
    assert (r.failed_elements, r.elements, r.passed) == (failed, 4, failed == 0)
    assert r.max_abs == pytest.approx(0.5) and r.mean_abs == pytest.approx(1.05 / 4)
    # Relative to A, where A is not 0: 0.5/1, 0.5/100, 0/5.
    assert r.max_rel == pytest.approx(0.5) and r.mean_rel == pytest.approx((0.5 + 0.005 + 0) / 3)
    assert r.cosine_min == pytest.approx(float(REFERENCE @ (REFERENCE + OFFSETS)) / (
        np.linalg.norm(REFERENCE) * np.linalg.norm(REFERENCE + OFFSETS)), rel=1e-6)


def test_records_in_place_of_paths(pair):
    by_path = verify(*pair, one_example(), atol=0.1, rtol=0.01, show_progress=False)
    by_record = verify(*map(read_info, pair), one_example(), atol=0.1, rtol=0.01, show_progress=False)
    assert by_record == by_path


def test_missing_model_is_named(pair, tmp_path):
    with pytest.raises(OnnxpruneError, match=f"{tmp_path / 'absent.onnx'}: no such file"):
        verify(pair[0], tmp_path / "absent.onnx", one_example(), show_progress=False)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_values_fail(tmp_path, value):
    a = models.save(offset_model(np.zeros(4, np.float32)), tmp_path / "a.onnx")
    b = models.save(offset_model(np.array([0, 0, value, 0], np.float32)), tmp_path / "b.onnx")
    (r,) = verify(a, b, one_example(), atol=1e9, rtol=1e9, show_progress=False)
    assert (r.failed_elements, r.nonfinite_mismatches, r.passed) == (1, 1, False)
    assert np.isfinite(r.max_abs) and np.isfinite(r.cosine_mean)
    # The same infinity on both sides is no difference.
    (same,) = verify(b, b, one_example(), show_progress=False)
    assert same.passed == (not np.isnan(value))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify_encoder")
    paths = models.pruned_encoder(root)
    paths["p0"] = models.pruned_encoder(_sub(root, "p0"), sparsity=0.0)["pruned"]
    paths["npz"] = models.npz_inputs(root / "inputs.npz")
    return paths


def _sub(root, name):
    folder = root / name
    folder.mkdir()
    return folder


def run_json(capsys, *args, code: int) -> dict:
    assert main(["verify", *map(str, args), "--json", "-q"]) == code
    report = json.loads(capsys.readouterr().out)
    assert_valid(report, "verify")
    return report


def test_dense_vs_p0_passes(encoder, capsys):
    report = run_json(capsys, encoder["dense"], encoder["p0"], "--data", encoder["npz"], "--atol", "1e-5",
                      "--rtol", "1e-5", code=0)
    assert report["passed"] and report["examples"] == 6 and report["library"] == {"a": False, "b": True}
    (out,) = report["outputs"]
    assert out["name"] == "Y" and out["cosine_min"] > 0.99999 and out["failed_elements"] == 0
    # Padded positions are left out: 3 of the 6 examples have a quarter of their 40 positions padded.
    assert out["elements"] == (3 * 40 + 3 * 30) * models.HIDDEN


def test_dense_vs_pruned_fails_with_exit_1(encoder, capsys):
    report = run_json(capsys, encoder["dense"], encoder["pruned"], "--data", encoder["npz"], "--atol", "1e-6",
                      "--rtol", "1e-6", code=1)
    assert report["passed"] is False and report["outputs"][0]["failed_elements"] > 0
    assert main(["verify", str(encoder["dense"]), str(encoder["pruned"]), "--data", str(encoder["npz"]),
                 "--atol", "1e-6", "--rtol", "1e-6", "-q"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "FAILED: Y" in out


@pytest.mark.parametrize("library, expected", [("b", {"a": False, "b": True}), ("a", {"a": True, "b": False}),
                                               ("none", {"a": False, "b": False})])
def test_kernel_against_function_body(encoder, capsys, library, expected):
    # The same pruned file: kernel and function body must agree; random inputs (no --data).
    report = run_json(capsys, encoder["pruned"], encoder["pruned"], "--library", library, "--seq-len", "50",
                      "--limit", "4", "--atol", "1e-5", "--rtol", "1e-5", code=0)
    assert report["library"] == expected and report["examples"] == 4
    assert report["data"].startswith("random")


def test_library_from_the_record(encoder):
    dense, pruned = read_info(encoder["dense"]), read_info(encoder["pruned"])
    assert (library_use(dense, "auto", "a"), library_use(pruned, "auto", "b")) == (False, True)
    assert (library_use(dense, "a", "a"), library_use(pruned, "a", "b"), library_use(pruned, "none", "b")) == (
        True, False, False)


def test_text_table(encoder, capsys):
    assert main(["verify", str(encoder["dense"]), str(encoder["p0"]), "--data", str(encoder["npz"]), "-q"]) == 0
    out = capsys.readouterr().out
    for expected in ("max abs", "mean rel", "cos min", "PASS", "PASSED", "6 inputs"):
        assert expected in out


def test_different_outputs_is_bad_input(pair, capsys, tmp_path):
    other = models.save(offset_model(OFFSETS, output="Z"), tmp_path / "z.onnx")
    assert main(["verify", str(pair[0]), str(other), "--seq-len", "4", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outputs differ" in err[0]


@pytest.mark.parametrize("flag", ["--atol", "--rtol"])
def test_negative_tolerance_is_refused(pair, capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(pair[0]), str(pair[1]), flag, "-1"])
    assert exit_info.value.code == 2 and "must be 0 or more" in capsys.readouterr().err
