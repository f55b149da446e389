"""The command line end to end on a tiny BERT, and its error paths: one clear line on stderr, a
non-zero exit, no output file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models import tiny
from onnxprune.cli import main

WORDS = "the a of to and in is it that for on with as was by this be are from at or an".split()


def _write_tiny_bert(directory) -> None:
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    bert = tiny.transformers_model("bert", attn=None, vocab_size=len(vocab), max_position_embeddings=128)
    bert.eval().save_pretrained(directory)
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tok.save(str(directory / "tokenizer.json"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny BERT directory, its export, a text file, statistics and a pruned model."""
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "bert"
    model_dir.mkdir()
    _write_tiny_bert(model_dir)
    rng = np.random.default_rng(0)
    text = root / "data.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS, size=rng.integers(3, 60))) for _ in range(24)) + "\n")
    model = root / "model.onnx"
    assert main(["export", str(model_dir), "-o", str(model), "--seq-len", "32", "-q"]) == 0
    stats = root / "stats.safetensors"
    assert main(["calibrate", str(model), "--data", str(text), "--tokenizer", str(model_dir),
                 "--max-length", "64", "-o", str(stats), "-q"]) == 0
    pruned = root / "pruned.onnx"
    assert main(["prune", str(model), "--stats", str(stats), "--sparsity", "0.5", "-o", str(pruned),
                 "--report", str(root / "report.json"), "-q"]) == 0
    return {"root": root, "dir": model_dir, "text": text, "model": model, "stats": stats, "pruned": pruned}


def test_pipeline_outputs(workspace, capsys):
    report = json.loads((workspace["root"] / "report.json").read_text())
    assert len(report["sites"]) == 2
    assert all(0 < s["density"] <= 0.6 for s in report["sites"])

    assert main(["inspect", str(workspace["pruned"]), "--json", "--heatmaps", str(workspace["root"] / "png")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["op_counts"]["onnxprune.BlockSparseAttention"] == 2
    assert len(info["pruned_sites"]) == 2 and info["metadata"]["onnxprune.sparsity"] == "0.5"
    assert [h["kind"] for h in info["heatmaps"]] == ["layout", "layout"]
    for png in info["heatmaps"]:
        assert open(png["path"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    assert main(["inspect", str(workspace["model"]), "--json"]) == 0
    dense_info = json.loads(capsys.readouterr().out)
    assert [s["form"] for s in dense_info["attention_sites"]] == ["eager", "eager"]
    assert all((s["heads"], s["head_size"]) == (4, 8) for s in dense_info["attention_sites"])

    # With the statistics: average-attention heatmaps too, and the mass the layouts keep.
    assert main(["inspect", str(workspace["pruned"]), "--json", "--stats", str(workspace["stats"]),
                 "--heatmaps", str(workspace["root"] / "png2")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["stats"]["matches_model"] is True
    assert [h["kind"] for h in info["heatmaps"]] == ["layout", "attention"] * 2
    for site in info["pruned_sites"]:
        assert abs(site["retained_mass_under_stats"] - site["retained_mass"]) < 1e-5


def test_prune_warns_when_p_exceeds_what_the_layout_can_prune(workspace, capsys, tmp_path):
    # 64 tokens in blocks of 16: 4 × 4 blocks per head, the 4 diagonal ones kept, so at most 0.75
    # on the full grid; counted on the calibration inputs' own (shorter) lengths, less.
    args = ["prune", str(workspace["model"]), "--stats", str(workspace["stats"]), "-o", str(tmp_path / "p.onnx")]
    assert main([*args, "-p", "0.95"]) == 0
    assert "p = 0.95 asked, 0.663 pruned" in capsys.readouterr().err
    assert main([*args, "-p", "0.5"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_verify_pass_and_fail(workspace, capsys, tmp_path):
    p0 = tmp_path / "p0.onnx"
    assert main(["prune", str(workspace["model"]), "--stats", str(workspace["stats"]), "-p", "0", "-o", str(p0), "-q"]) == 0
    args = ["--data", str(workspace["text"]), "--tokenizer", str(workspace["dir"]), "--max-length", "64", "-q"]
    assert main(["verify", str(workspace["model"]), str(p0), *args, "--atol", "1e-5", "--rtol", "1e-5"]) == 0
    assert "PASS" in capsys.readouterr().out
    # p = 0.5 changes outputs: with tight tolerances verify must fail.
    assert main(["verify", str(workspace["model"]), str(workspace["pruned"]), *args, "--atol", "1e-6", "--rtol", "1e-6"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_bench_side_by_side(workspace, capsys):
    assert main(["bench", str(workspace["model"]), str(workspace["pruned"]), "--seq-len", "48",
                 "--repeats", "3", "--warmup", "1", "-q"]) == 0
    out = capsys.readouterr().out
    assert "model.onnx" in out and "pruned.onnx" in out


VERBS = ("export", "calibrate", "prune", "inspect", "verify", "bench", "generate", "demo", "recover", "stats")


@pytest.mark.parametrize("verb", VERBS)
def test_help_has_examples(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"onnxprune {verb}" in out.split("examples:")[1]
    assert "exit status:" in out
    for flag in ("--debug", "--quiet", "--threads"):  # the same everywhere
        assert flag in out


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(verb in out for verb in VERBS) and "pipeline:" in out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_missing_file(workspace, capsys, tmp_path):
    out = tmp_path / "out.onnx"
    assert main(["prune", str(tmp_path / "nope.onnx"), "--stats", str(workspace["stats"]), "-p", "0.5", "-o", str(out)]) == 2
    assert "no such file" in _error_line(capsys)
    assert not out.exists()


def test_not_onnx(workspace, capsys, tmp_path):
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    out = tmp_path / "stats.safetensors"
    assert main(["calibrate", str(bogus), "--data", str(workspace["text"]), "--tokenizer", str(workspace["dir"]), "-o", str(out)]) == 2
    assert "not" in _error_line(capsys)
    assert not out.exists()


def test_stats_of_another_model(workspace, capsys, tmp_path):
    other = tmp_path / "other.onnx"
    other.write_bytes(workspace["model"].read_bytes() + b"")  # same bytes → same model: allowed
    import onnx

    proto = onnx.load(str(workspace["model"]))
    proto.doc_string = "another model"
    onnx.save(proto, str(other))
    out = tmp_path / "pruned.onnx"
    assert main(["prune", str(other), "--stats", str(workspace["stats"]), "-p", "0.5", "-o", str(out)]) == 2
    assert "another model" in _error_line(capsys)
    assert not out.exists()


def test_model_without_attention(workspace, capsys, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["b", "s"])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["y"])], "g", [x], [y])
    plain = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(plain))
    out = tmp_path / "stats.safetensors"
    assert main(["calibrate", str(plain), "--data", str(workspace["text"]), "--tokenizer", str(workspace["dir"]), "-o", str(out)]) == 2
    assert "no attention site" in _error_line(capsys)
    assert not out.exists()


def test_sequence_longer_than_layout_runs(workspace, capsys):
    # The layout covers --max-length 64 positions; beyond them each head follows its rule.
    code = main(["bench", str(workspace["pruned"]), "--seq-len", "100", "--repeats", "1", "--warmup", "0", "-q"])
    assert code == 0


@pytest.mark.parametrize("verb", ["verify", "bench", "recover"])
def test_a_newer_op_or_layout_version_is_refused(workspace, capsys, tmp_path, verb):
    import onnx

    model = onnx.load(str(workspace["pruned"]))
    for opset in model.opset_import:
        if opset.domain == "onnxprune":
            opset.version = 3
    for prop in model.metadata_props:
        if prop.key == "onnxprune.layout_version":
            prop.value = "3"
    newer = tmp_path / "newer.onnx"
    onnx.save(model, str(newer))
    out = tmp_path / "out.onnx"
    args = {
        "verify": ["verify", str(workspace["model"]), str(newer), "--seq-len", "16", "--limit", "1"],
        "bench": ["bench", str(newer), "--seq-len", "16", "--repeats", "1", "--warmup", "0"],
        "recover": ["recover", str(workspace["dir"]), str(newer), "--data", str(workspace["text"]), "-o", str(out)],
    }[verb]
    assert main([*args, "-q"]) == 2
    line = _error_line(capsys)
    assert "upgrade onnxprune" in line and "3" in line
    assert not out.exists()


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5"])
def test_sparsity_out_of_range(workspace, capsys, tmp_path, value):
    out = tmp_path / "pruned.onnx"
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", str(workspace["model"]), "--stats", str(workspace["stats"]), "--sparsity", value, "-o", str(out)])
    assert exit_info.value.code == 2
    assert "must be in [0, 1)" in capsys.readouterr().err
    assert not out.exists()


def test_debug_shows_traceback(workspace, tmp_path):
    from onnxprune.errors import OnnxpruneError

    with pytest.raises(OnnxpruneError):
        main(["prune", str(tmp_path / "nope.onnx"), "--stats", str(workspace["stats"]), "-p", "0.5",
              "-o", str(tmp_path / "x.onnx"), "--debug"])


def test_version(capsys):
    from onnxprune import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"onnxprune {__version__}"


def _subparsers():
    from onnxprune.cli import build_parser

    (action,) = [a for a in build_parser()._actions if a.dest == "verb"]
    return action.choices


def test_each_verb_dispatches_to_its_handler():
    from onnxprune.commands import VERBS as COMMANDS

    subparsers = _subparsers()
    assert list(subparsers) == [v.name for v in COMMANDS] and set(subparsers) == set(VERBS)
    for verb in COMMANDS:
        assert subparsers[verb.name].get_default("func") is verb.run


def _choices(verb: str, flag: str) -> tuple:
    (action,) = [a for a in _subparsers()[verb]._actions if flag in a.option_strings]
    return tuple(action.choices)


def test_choices_are_the_library_constants():
    from onnxprune.export import ATTENTION_IMPLEMENTATIONS
    from onnxprune.layouts import SCOPES
    from onnxprune.op_schema import BLOCK_SIZES
    from onnxprune.recover import OBJECTIVES
    from onnxprune.runtime import LIBRARY_CHOICES

    assert _choices("prune", "--block-size") == _choices("demo", "--block-size") == BLOCK_SIZES
    assert _choices("prune", "--scope") == SCOPES
    assert _choices("export", "--attn") == ATTENTION_IMPLEMENTATIONS
    assert _choices("verify", "--library") == _choices("bench", "--library") == LIBRARY_CHOICES
    assert _choices("recover", "--objective") == OBJECTIVES


def test_block_size_outside_the_op_schema_is_a_usage_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "m.onnx", "--stats", "s.safetensors", "-p", "0.5", "--block-size", "48", "-o", str(tmp_path / "p.onnx")])
    assert exit_info.value.code == 2
    assert "invalid choice: 48" in capsys.readouterr().err


def _raising(error: BaseException):
    def raise_it(*args, **kwargs):
        raise error

    return raise_it


def test_unexpected_error_is_one_line_with_status_3(capsys, monkeypatch):
    monkeypatch.setattr("onnxprune.commands.inspect.inspect", _raising(RuntimeError("a bug\nover two lines")))
    assert main(["inspect", "model.onnx"]) == 3
    line = _error_line(capsys)
    assert line.startswith("onnxprune inspect: error: RuntimeError: a bug over two lines") and "--debug" in line
    with pytest.raises(RuntimeError):
        main(["inspect", "model.onnx", "--debug"])


def test_interrupt_exits_130(capsys, monkeypatch):
    monkeypatch.setattr("onnxprune.commands.inspect.inspect", _raising(KeyboardInterrupt()))
    assert main(["inspect", "model.onnx"]) == 130
    assert _error_line(capsys) == "onnxprune: interrupted"
