"""``onnxprune stats merge`` and ``onnxprune stats show``; ``calibrate`` from the new data formats."""

from __future__ import annotations

import json

import numpy as np
import pytest

import cli_models
import text_models
from onnxprune.cli import main
from onnxprune.stats import Stats


@pytest.fixture()
def parts(tmp_path):
    """Statistics of one model in three files: two of max length 64, one of 32."""
    model = cli_models.save(cli_models.attention_encoder(), tmp_path / "encoder.onnx")
    sites = ["layer0/softmax", "layer1/softmax"]
    paths = []
    for seed in range(2):
        path = tmp_path / f"part{seed}.safetensors"
        cli_models.synthetic_stats(model, sites, seed=seed).save(path)
        paths.append(path)
    short = Stats.empty({s: cli_models.HEADS for s in sites}, 16, 32, Stats.load(paths[0]).model_sha256)
    for site in sites:
        short.sums[site][...], short.counts[site][...] = 1.0, 4.0
    short.lengths[32], short.num_samples = 4, 4
    short.save(tmp_path / "short.safetensors")
    return {"model": model, "paths": paths, "short": tmp_path / "short.safetensors", "sites": sites}


def test_merge_adds_and_pads(parts, tmp_path, capsys):
    out = tmp_path / "all.safetensors"
    assert main(["stats", "merge", *map(str, parts["paths"]), str(parts["short"]), "-o", str(out), "-q"]) == 0
    assert f"wrote {out}: 3 files, 24 inputs" in capsys.readouterr().out
    merged, a, b = Stats.load(out), Stats.load(parts["paths"][0]), Stats.load(parts["paths"][1])
    assert merged.max_length == 64 and merged.num_samples == 24
    for site in parts["sites"]:
        expected = a.sums[site] + b.sums[site]
        expected[:, :2, :2] += 1.0
        np.testing.assert_allclose(merged.sums[site], expected, rtol=1e-12)
        assert merged.counts[site][0, 0] == 24 and merged.counts[site][3, 3] == 20


@pytest.mark.parametrize("change", ["model", "granularity", "sites"])
def test_merge_refuses_in_one_line_and_writes_nothing(parts, tmp_path, capsys, change):
    other = Stats.load(parts["paths"][1])
    if change == "model":
        other.model_sha256 = "f" * 64
    elif change == "granularity":
        other = Stats.empty({s: cli_models.HEADS for s in other.sites}, 8, 64, other.model_sha256)
    else:
        other.sites = other.sites[:1]
    odd = tmp_path / "odd.safetensors"
    other.save(odd)
    out = tmp_path / "all.safetensors"
    assert main(["stats", "merge", str(parts["paths"][0]), str(odd), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("onnxprune stats: error: cannot merge statistics")
    assert {"model": "different models (sha256", "granularity": "granularity 16 with granularity 8",
            "sites": "attention sites differ"}[change] in err
    assert not out.exists()


def test_merge_of_a_file_that_is_not_statistics(parts, tmp_path, capsys):
    out = tmp_path / "all.safetensors"
    assert main(["stats", "merge", str(parts["paths"][0]), str(parts["model"]), "-o", str(out)]) == 2
    assert "not" in capsys.readouterr().err and not out.exists()


def test_show(parts, capsys):
    assert main(["stats", "show", str(parts["short"])]) == 0
    text = capsys.readouterr().out
    assert "max length     32" in text and "inputs         4 (128 tokens, lengths 32–32, mean 32.0)" in text
    assert "layer1/softmax: 2 heads, 2×2 cells, 16 pairs" in text
    assert main(["stats", "show", str(parts["short"]), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["granularity"] == 16 and shown["tokens"] == 128 and len(shown["sites"]) == 2


def test_calibrate_from_parquet_with_limit_and_shuffle(tmp_path):
    model = text_models.text_encoder(tmp_path / "model.onnx")
    tokenizer = text_models.tokenizer(tmp_path)
    data = text_models.write_parquet(tmp_path / "data.parquet", text_models.sentences(30, seed=4, longest=20))
    common = ["calibrate", str(model), "--data", str(data), "--tokenizer", str(tokenizer), "--max-length", "32",
              "--limit", "12", "-q"]
    assert main([*common, "-o", str(tmp_path / "a.safetensors")]) == 0
    assert main([*common, "--shuffle-seed", "0", "-o", str(tmp_path / "b.safetensors")]) == 0
    a, b = Stats.load(tmp_path / "a.safetensors"), Stats.load(tmp_path / "b.safetensors")
    assert a.num_samples == b.num_samples == 12  # short texts: no chunking
    assert not np.array_equal(a.lengths, b.lengths)  # another 12 of the 30
