"""``onnxprune bench``: interleaved timing of one or more models, the summary's consistency, the
JSON schema, the library per model, providers, and one-line errors."""

from __future__ import annotations

import json

import pytest

import cli_models as models
from json_schema import assert_valid
from onnxprune.bench import bench
from onnxprune.cli import main


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return models.pruned_encoder(tmp_path_factory.mktemp("bench"))


def test_json_side_by_side(encoder, capsys):
    assert main(["bench", str(encoder["dense"]), str(encoder["pruned"]), "--seq-len", "48", "--batch", "2",
                 "--warmup", "1", "--repeat", "5", "--threads", "1", "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert_valid(report, "bench")
    assert (report["batch"], report["seq_len"], report["threads"], report["repeat"]) == (2, 48, 1, 5)
    first, second = report["models"]
    assert (first["model"], second["model"]) == (str(encoder["dense"]), str(encoder["pruned"]))
    assert (first["library"], second["library"]) == (False, True)
    assert first["speedup_vs_first"] == 1.0
    assert second["speedup_vs_first"] == pytest.approx(first["median_ms"] / second["median_ms"])
    for m in report["models"]:
        assert m["runs"] == 5 and m["providers"] == ["CPUExecutionProvider"]
        assert m["min_ms"] <= m["p10_ms"] <= m["p25_ms"] <= m["median_ms"] <= m["p75_ms"] <= m["p90_ms"]
        assert m["iqr_ms"] == pytest.approx(m["p75_ms"] - m["p25_ms"])


def test_table(encoder, capsys):
    assert main(["bench", str(encoder["dense"]), str(encoder["pruned"]), "--seq-len", "32", "--warmup", "0",
                 "--repeats", "2", "-q"]) == 0
    out = capsys.readouterr().out
    for expected in ("dense.onnx", "pruned.onnx", "median ms", "IQR", "speed-up", "1.00x", "0 warm-up + 2 timed"):
        assert expected in out, expected


def test_function_body_without_library(encoder):
    (with_lib, without) = bench([encoder["pruned"], encoder["pruned"]], seq_len=32, warmup=0, repeats=2,
                                show_progress=False, library="a")
    assert (with_lib.library, without.library) == (True, False)
    (none,) = bench([encoder["pruned"]], seq_len=32, warmup=0, repeats=1, show_progress=False, library="none")
    assert none.library is False


def test_model_without_onnxprune_ops_needs_no_library(tmp_path, monkeypatch):
    # A plain model must not need the library at all (it may not be built where a user runs bench).
    monkeypatch.setenv("ONNXPRUNE_LIBRARY", str(tmp_path / "absent.so"))
    monkeypatch.setattr("onnxprune.runtime._candidates", lambda: [tmp_path / "absent.so"])
    path = models.save(models.mlp(), tmp_path / "mlp.onnx")
    (timing,) = bench([path], seq_len=4, batch=3, warmup=0, repeats=2, show_progress=False)
    assert timing.library is False and timing.runs == 2


def _with_a_negative_rule(pruned, folder):
    """The pruned model with one head's window set to -2: a rule the kernel must refuse."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(pruned))
    tensor = next(t for t in model.graph.initializer if t.name.startswith("onnxprune.layout_rule."))
    rule = numpy_helper.to_array(tensor).copy()
    rule[0, 1] = -2
    tensor.CopyFrom(numpy_helper.from_array(rule, tensor.name))
    onnx.save(model, str(folder / "bad-rule.onnx"))
    return folder / "bad-rule.onnx"


@pytest.mark.parametrize("args, message", [
    (["--providers", "NoSuchExecutionProvider"], "not available"),
    (["--seq-len", "100"], "window_before=-2"),  # the kernel refuses the rule, naming head and value
])
def test_errors_are_one_line(encoder, capsys, tmp_path, args, message):
    pruned = _with_a_negative_rule(encoder["pruned"], tmp_path) if "window" in message else encoder["pruned"]
    assert main(["bench", str(pruned), "--repeat", "1", "--warmup", "0", "-q", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
