"""``onnxprune inspect`` on tiny models built in memory: a dense encoder, its pruned form, a model
without attention, models whose Softmax is not an attention site, and models with external data
(whose weights must not be needed). Every JSON output is checked against docs/schemas/."""

from __future__ import annotations

import json
import math
import struct
import zlib

import numpy as np
import onnx
import pytest

import cli_models as models
from json_schema import assert_valid
from onnxprune.cli import main
from onnxprune.inspect_model import inspect
from onnxprune.inspect_report import format_report
SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return models.pruned_encoder(tmp_path_factory.mktemp("inspect"))


def run_json(capsys, *args) -> dict:
    assert main(["inspect", *map(str, args), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert_valid(info, "inspect")
    return info


def check_png(path) -> tuple[int, int]:
    """Parse the file as PNG: signature, chunk CRCs, and pixel data of the declared size."""
    data = open(path, "rb").read()
    assert data[:8] == SIGNATURE
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, tag
        chunks[tag] = chunks.get(tag, b"") + body  # image data may span several IDAT chunks
        pos += 12 + length
    assert list(chunks)[-1] == b"IEND"
    width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    channels = {0: 1, 2: 3, 6: 4}[color]  # gray, RGB, RGBA
    assert depth == 8 and width > 0 and height > 0
    assert len(zlib.decompress(chunks[b"IDAT"])) == height * (1 + width * channels)
    return width, height


def test_dense_sites(encoder, capsys):
    info = run_json(capsys, encoder["dense"])
    assert info["opsets"] == {"ai.onnx": 20}
    assert [i["name"] for i in info["inputs"]] == ["X", "attention_mask"]
    assert info["inputs"][0]["shape"] == ["b", "s", models.HIDDEN]
    assert info["op_counts"]["Softmax"] == 2 and info["nodes"] == sum(info["op_counts"].values())
    assert [s["name"] for s in info["attention_sites"]] == ["layer0/softmax", "layer1/softmax"]
    for site in info["attention_sites"]:
        assert (site["form"], site["heads"], site["kv_heads"], site["head_size"]) == ("eager", 2, 2, models.HEAD_SIZE)
        assert site["scale"] == pytest.approx(1 / math.sqrt(models.HEAD_SIZE))
        assert site["mask"]["kind"] == "float" and site["is_causal"] is False
    assert info["unmatched"] == [] and info["pruned_sites"] == [] and info["pruning"] is None


def test_parameter_count_and_bytes(encoder, capsys):
    proto = onnx.load(str(encoder["dense"]))
    arrays = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer]
    info = run_json(capsys, encoder["dense"])
    assert info["parameters"]["tensors"] == len(arrays)
    assert info["parameters"]["count"] == sum(a.size for a in arrays)
    assert info["parameters"]["bytes"] == sum(a.nbytes for a in arrays)
    assert info["parameters"]["by_type"]["FLOAT"]["count"] == sum(a.size for a in arrays if a.dtype == np.float32)
    assert info["external_data"] == {"tensors": 0, "bytes": 0, "files": []}


def test_pruned_sites_and_metadata(encoder, capsys):
    info = run_json(capsys, encoder["pruned"])
    assert info["op_counts"]["onnxprune.BlockSparseAttention"] == 2 and "Softmax" not in info["op_counts"]
    assert info["attention_sites"] == [] and info["functions"] == ["onnxprune.BlockSparseAttention"]
    meta = {p.key: p.value for p in onnx.load(str(encoder["pruned"])).metadata_props}
    recorded = json.loads(meta["onnxprune.sites"])
    assert [p["site"] for p in info["pruned_sites"]] == list(recorded)
    for p in info["pruned_sites"]:
        assert p["layout_shape"] == [models.HEADS, 4, 4] and p["block_size"] == 16
        assert p["density"] == recorded[p["site"]]["density"]
        assert p["retained_mass"] == recorded[p["site"]]["retained_mass"]
        assert 0.4 < p["layout_density"] < 0.7 and 0 < p["retained_mass"] < 1
        assert (p["heads"], p["head_size"], p["attn_mask"]["kind"]) == (models.HEADS, models.HEAD_SIZE, "float")
    assert info["pruning"]["sparsity"] == 0.5 and info["pruning"]["block_size"] == 16
    assert info["pruning"]["calibration_samples"] == 10 and info["pruning"]["keep_diagonal"] is True
    # Layouts are not weights: the pruned model has the dense model's parameters.
    dense = run_json(capsys, encoder["dense"])
    assert info["parameters"]["count"] == dense["parameters"]["count"] - 1  # less the scale constant


def test_stats_and_heatmaps_of_pruned_model(encoder, capsys, tmp_path):
    info = run_json(capsys, encoder["pruned"], "--stats", encoder["stats"], "--heatmaps", tmp_path / "maps")
    assert info["stats"]["matches_model"] is True and info["stats"]["num_samples"] == 10
    assert info["stats"]["sites_not_in_model"] == [] == info["stats"]["model_sites_not_in_stats"]
    for p in info["pruned_sites"]:
        # The same statistics prune used: the same retained mass (metadata rounds to 6 places).
        assert p["retained_mass_under_stats"] == pytest.approx(p["retained_mass"], abs=1e-6)
    kinds = [(h["site"], h["kind"]) for h in info["heatmaps"]]
    assert kinds == [(s, k) for s in ("layer0/softmax", "layer1/softmax") for k in ("layout", "attention")]
    for h in info["heatmaps"]:
        width, height = check_png(h["path"])
        assert width > height  # two heads side by side


def test_heatmaps_of_dense_model_need_stats(encoder, capsys, tmp_path):
    assert main(["inspect", str(encoder["dense"]), "--heatmaps", str(tmp_path / "none")]) == 0
    captured = capsys.readouterr()
    assert "no heatmap written" in captured.err and "--stats" in captured.err
    assert not any((tmp_path / "none").iterdir())
    info = run_json(capsys, encoder["dense"], "--stats", encoder["stats"], "--heatmaps", tmp_path / "maps")
    assert [h["kind"] for h in info["heatmaps"]] == ["attention", "attention"]
    assert info["stats"]["matches_model"] is True
    for h in info["heatmaps"]:
        check_png(h["path"])


def test_stats_of_another_model(encoder, capsys, tmp_path):
    other = models.save(models.attention_encoder(seed=1), tmp_path / "other.onnx")
    info = run_json(capsys, other, "--stats", encoder["stats"])
    assert info["stats"]["matches_model"] is False
    assert "NOT computed for this model" in format_report(info)


def test_model_without_attention(capsys, tmp_path):
    path = models.save(models.mlp(), tmp_path / "mlp.onnx")
    info = run_json(capsys, path)
    assert info["attention_sites"] == [] and info["unmatched"] == [] and info["pruned_sites"] == []
    assert info["parameters"]["count"] == models.HIDDEN * 32 + 32 + 32 * 3
    text = format_report(info)
    assert "Attention sites: 0 found, 0 not matched" in text


@pytest.mark.parametrize("builder, node, reason", [
    (lambda: models.attention_encoder(scale_from_input=True), "layer0/softmax", "scale"),
    (models.softmax_classifier, "class_softmax", "rank 2, not 4"),
])
def test_unmatched_softmax_has_a_reason(builder, node, reason, capsys, tmp_path):
    path = models.save(builder(), tmp_path / "model.onnx")
    info = run_json(capsys, path)
    unmatched = {u["node"]: u for u in info["unmatched"]}
    assert list(unmatched) == [node]
    assert unmatched[node]["op_type"] == "Softmax" and reason in unmatched[node]["reason"]
    assert node not in [s["name"] for s in info["attention_sites"]]
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "not matched" in out and node in out and unmatched[node]["reason"] in out


def test_external_data_is_sized_not_loaded(capsys, tmp_path):
    proto = models.mlp()
    nbytes = sum(onnx.numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)
    path = models.save(proto, tmp_path / "mlp.onnx", external=True)
    data = tmp_path / "mlp.onnx.data"
    info = run_json(capsys, path)
    assert info["external_data"]["tensors"] == 3 and info["external_data"]["bytes"] == nbytes
    assert info["external_data"]["files"] == [
        {"location": "mlp.onnx.data", "tensors": 3, "bytes": nbytes, "exists": True, "file_bytes": data.stat().st_size}
    ]
    assert info["parameters"]["bytes"] == nbytes
    # Without the weights on disk, inspect still gives the whole picture: it never reads them.
    data.unlink()
    missing = run_json(capsys, path)
    assert missing["external_data"]["files"][0]["exists"] is False
    assert missing["parameters"] == info["parameters"]
    assert info["warnings"] == [] and "mlp.onnx.data is missing" in missing["warnings"][0]
    assert "MISSING" in format_report(missing)


def test_external_data_attention_sites(capsys, tmp_path):
    path = models.save(models.attention_encoder(), tmp_path / "enc.onnx", external=True)
    info = run_json(capsys, path)
    assert len(info["attention_sites"]) == 2 and info["external_data"]["tensors"] == len(
        onnx.load(str(path), load_external_data=False).graph.initializer)
    assert info["attention_sites"][0]["scale"] == pytest.approx(1 / math.sqrt(models.HEAD_SIZE))


def test_text_report_sections(encoder):
    text = format_report(inspect(encoder["pruned"], stats=encoder["stats"]))
    for expected in ("Inputs and outputs", "Parameters:", "Pruned sites (onnxprune.BlockSparseAttention): 2",
                     "layer0/softmax", "retained (--stats)", "Pruning (from the model's metadata)", "sparsity"):
        assert expected in text, expected


@pytest.mark.parametrize("problem", ["missing", "not_onnx", "heatmaps_is_file", "bad_stats"])
def test_inspect_errors(problem, encoder, capsys, tmp_path):
    args = ["inspect", str(encoder["dense"])]
    if problem == "missing":
        args[1] = str(tmp_path / "nope.onnx")
    elif problem == "not_onnx":
        (tmp_path / "x.onnx").write_bytes(b"\x00\xffnot onnx" * 20)
        args[1] = str(tmp_path / "x.onnx")
    elif problem == "heatmaps_is_file":
        (tmp_path / "file").write_text("x")
        args += ["--stats", str(encoder["stats"]), "--heatmaps", str(tmp_path / "file")]
    else:
        (tmp_path / "s.safetensors").write_bytes(b"garbage")
        args += ["--stats", str(tmp_path / "s.safetensors")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxprune inspect: error:") and "Traceback" not in err[0]


def test_unreadable_layouts_are_a_warning(encoder, capsys, tmp_path):
    proto = onnx.load(str(encoder["pruned"]))
    node = next(n for n in proto.graph.node if n.op_type == "BlockSparseAttention")
    next(a for a in node.attribute if a.name == "block_size").i = 32
    path = tmp_path / "odd.onnx"
    onnx.save(proto, str(path))
    info = run_json(capsys, path)
    assert info["warnings"] == ["the layouts cannot be read: the attention nodes disagree on block_size ([16, 32])"]
    assert len(info["pruned_sites"]) == 2 and info["pruning"] is None
    assert all(p["layout_shape"] is None and p["density"] is None for p in info["pruned_sites"])
