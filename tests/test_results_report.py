"""tools/results.py's report: RESULTS.md and its plots from the sections' JSON files (here small
made-up ones with the real schema), so that a broken report fails here and not after an hour of
`make results`."""

from __future__ import annotations

import dataclasses
import json
import struct
import sys
from pathlib import Path

import pytest

from onnxprune.errors import OnnxpruneError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
results = pytest.importorskip("results")


def _row(kind, block, scope, p):
    cos = 1.0 - 0.1 * p**2 * (block / 16 if kind == "block" else 0.5)
    return {"kind": kind, "block": block, "scope": scope, "p": p, "effective_sparsity_calibration": 0.9 * p,
            "effective_sparsity_held_out": 0.8 * p, "retained_mass": 1 - 0.5 * p, "cosine_mean": cos,
            "cosine_min": cos - 0.1, "top1_agreement": cos - 0.05, "seconds": 1.0}


def _write_inputs(out: Path) -> None:
    rows = [_row(k, b, s, p) for k, b, s, p in results.sweep_configs(quick=False, full=True)]
    (out / "sweep.json").write_text(json.dumps({
        "grid": "full", "calibration_inputs": 1356, "evaluation_inputs": 560, "calibration_mean_tokens": 57.0,
        "evaluation_mean_tokens": 61.0, "rows": rows,
        "product_path": [{"p": 0.9, "cosine_mean": 0.947, "top1_agreement": 0.7, "max_abs_embedding_diff_vs_torch": 2e-7}]}))
    quality = lambda c: {"cosine_mean": c, "cosine_min": c - 0.1, "top1_agreement": c - 0.2}  # noqa: E731
    run = lambda p, corpus, minutes, after, kept: {  # noqa: E731
        "p": p, "objective": "embedding", "steps": 50, "steps_limit": 100_000, "lr": 1e-4, "minutes": minutes,
        "corpus": corpus, "training_inputs": 18000 if corpus == "docstrings" else 1356, "kept_step": kept,
        "validation": [[0, 0.07], [50, 0.03]], "stopped_by": "time budget", "threads": 2, "train_s": 600.0,
        "train_cpu_s": 1100.0, "wall_s": 650.0, "before": quality(0.947), "after": quality(after),
        "parity_before": 1e-7, "parity_after": 1e-6, "loss_first10": 0.06, "loss_last10": 0.02,
        "losses": [0.06 - 0.0008 * i for i in range(50)]}
    (out / "recover.json").write_text(json.dumps({"runs": [
        run(0.9, "docstrings", 30.0, 0.975, 50), run(0.5, "docstrings", 10.0, 0.9976, 0)], "before": {}}))
    (out / "recover.extra.json").write_text(json.dumps({"runs": [
        {**run(0.9, "calibration", None, 0.9697, 50), "minutes": None}]}))
    (out / "decoder.json").write_text(json.dumps({
        "context": 512, "held_out_windows": 48, "parameters": 690_000, "layers": 3, "hidden": 128, "heads": 4,
        "train": {"steps": 600, "seconds": 500.0, "cpu_s": 600.0, "loss_last50": 2.3}, "dense_perplexity": 10.7,
        "post_training": [{"p": p, "perplexity": 10.7 + p, "effective_sparsity": p, "retained_mass": 1 - p / 2}
                          for p in (0.0, 0.5, 0.9)],
        "fine_tuned": [{"p": 0.0, "how": "dense LM fine-tune (baseline)", "steps": 60, "perplexity": 10.6},
                       {"p": 0.9, "how": "recover (self-distillation)", "steps": 60, "perplexity": 11.0},
                       {"p": 0.9, "how": "LM fine-tune with the mask", "steps": 60, "perplexity": 10.5}]}))
    (out / "speed.json").write_text(json.dumps({"threads": 2, "sparsities": [0.9], "load_before": 0.1, "load_after": 1.9,
        "models": {"minilm": {"length": 256, "rows": [
            {"p": None, "median_ms": 10.0, "p10_ms": 9.5, "p90_ms": 11.0, "speedup": 1.0},
            {"p": 0.0, "median_ms": 9.0, "p10_ms": 8.5, "p90_ms": 9.5, "speedup": 1.11},
            {"p": 0.9, "median_ms": 8.0, "p10_ms": 7.5, "p90_ms": 9.0, "speedup": 1.25}]}}}))
    (out / "llm.json").write_text(json.dumps(_llm()))


def _llm_row(model, method, density, domain, length, ppl, passkey):
    kept = None if density is None else density
    return {"model": model, "method": method, "density": density, "kept": kept,
            "kept_at_length": None if kept is None else kept * 2048 / length, "domain": domain, "length": length,
            "windows": 2, "ppl": ppl, "ppl_last_quarter": ppl - 1, "passkey": passkey, "seed": 0}


def _llm():
    """A reduced LLM grid at 2048 tokens, whole; at 4096 only the dense model ran."""
    import results_llm

    plan = dataclasses.asdict(results_llm.GRIDS["reduced"])
    rows = [_llm_row("dense", "dense", None, d, 2048, 11.0, {"teacher-forced": [5, 5], "greedy": [4, 5]})
            for d in results_llm.DOMAINS]
    rows += [_llm_row(f"{m}@0.25", m, 0.25, d, 2048, 20.0 if m == "select" else 30.0,
                      {"teacher-forced": [1, 5], "greedy": [0, 5]})
             for m in ("select", "streaming") for d in results_llm.DOMAINS]
    rows.append(_llm_row("dense", "dense", None, "pydoc", 4096, 10.0, {"teacher-forced": [3, 5]}))
    return {"grid": "reduced", "plan": plan, "model": "smollm2.onnx", "with_past": "kv.onnx", "stats": "stats",
            "block_size": 64, "threads": 2, "rows": rows, "not_run": {results_llm.RECOVERED: results_llm.RECOVER_NOT_RUN},
            "loads": {"2048": {"before": 3.2, "after": 4.1, "seconds": 600}}}


def test_report_writes_every_section_and_valid_plots(tmp_path):
    pytest.importorskip("matplotlib")
    out, docs = tmp_path / "out", tmp_path / "docs"
    out.mkdir()
    _write_inputs(out)
    results.run_report(out, quick=False, docs=docs)
    text = (docs / "RESULTS.md").read_text()
    for heading in ("## Encoder", "### Scopes and block sizes", "## Recovery without labels", "## Decoder",
                    "## Speed", "## LLM: SmolLM2 at 2k–8k", "### 2048 tokens", "### 4096 tokens", "## Reproduce"):
        assert heading in text, heading
    # the LLM tables: what ran, and "not run" for the rest of the plan
    assert "| select@0.25 | 0.250 | 0.250 | 20.00 | 19.00 | 20.00 | 19.00 | 1/5 | 0/5 |" in text
    assert "| dense | 1.00 | 1.00 | 10.00 | 9.00 | not run | not run | 3/5 | not run |" in text
    assert "| streaming@0.25 | " + " | ".join(["not run"] * 8) + " |" in text
    assert "| select after recover | " + " | ".join(["not run"] * 8) + " |" in text
    assert "LLM: the **reduced** grid, 7 rows" in text
    assert "**select after recover: not run.**" in text and "1-minute load average 3.2 before" in text
    assert "the **full** grid, 85 configurations" in text
    # recover rows: the budget, the kept step, the goal verdict, and the corpus comparison
    assert "| 0.9 | docstrings | embedding | 30 min | 50 |" in text and "≥ 0.98: not met" in text
    assert "| 0.5 | docstrings | embedding | 10 min | 50 (0) |" in text and "≥ 0.99: **met**" in text
    assert "**What the text is worth.**" in text and "0.9697" in text
    assert "| minilm | 256 | 0.9 | 8.00 | 7.50–9.00 | 1.25× |" in text
    assert "| minilm | 256 | dense | 10.00 |" in text and "| minilm | 256 | 0 (the op, nothing pruned) | 9.00 |" in text
    assert "`0.9:embedding:100000:0.0001:none:calibration`" in text
    images = [image.split(")")[0] for image in text.split("](results/")[1:]]
    assert sorted(images) == sorted(p.name for p in (docs / "results").iterdir()) == FIGURES
    for name in images:
        data = (docs / "results" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        width, height = struct.unpack(">II", data[16:24])
        assert 600 <= width <= 1600 and 400 <= height <= 1000, (name, width, height)


FIGURES = ["decoder_perplexity.png", "llm_2048_passkey.png", "llm_2048_perplexity.png", "minilm_blocks.png",
           "minilm_cosine.png", "minilm_scopes.png", "recover_loss.png", "speed.png"]


def test_figures_have_labelled_axes_and_legends(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import onnxprune.figures

    drawn = {}
    monkeypatch.setattr(onnxprune.figures, "save_figure", lambda figure, path: drawn.__setitem__(Path(path).name, figure))
    out = tmp_path / "out"
    out.mkdir()
    _write_inputs(out)
    results.run_report(out, quick=False, docs=tmp_path / "docs")
    assert sorted(drawn) == FIGURES
    for name, figure in drawn.items():
        (ax,) = figure.axes
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), name
        assert len([t for t in ax.get_yticklabels() if t.get_text()]) >= 3, name
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert len(legend) == len(ax.get_lines()), name  # every line is named
    legend = lambda name: [t.get_text() for t in drawn[name].axes[0].get_legend().get_texts()]  # noqa: E731
    assert results.REFERENCE_LABEL in legend("minilm_cosine.png")
    assert legend("minilm_blocks.png") == ["block 16", "block 32", "block 64", "element-level mask"]
    assert legend("minilm_scopes.png") == ["scope layer", "scope head", "scope global"]
    assert "dense (1×)" in legend("speed.png") and "dense, LM fine-tuned as long (baseline)" in legend("decoder_perplexity.png")
    assert legend("recover_loss.png") == ["docstrings, 30 min (50 steps), peak lr 0.0001", "calibration, 50 steps, peak lr 0.0001"]
    assert drawn["recover_loss.png"].axes[0].get_yscale() == "log"
    assert legend("llm_2048_perplexity.png") == ["select, pydoc", "select, stdlib", "streaming, pydoc",
                                                 "streaming, stdlib", "dense, pydoc", "dense, stdlib"]
    assert legend("llm_2048_passkey.png") == ["select, teacher-forced", "select, greedy", "streaming, teacher-forced",
                                              "streaming, greedy", "dense, teacher-forced", "dense, greedy"]


def test_the_llm_section_says_when_it_did_not_run(tmp_path):
    import results_llm

    assert results_llm.llm_section(None, tmp_path) == ["## LLM: SmolLM2 at 2k–8k", "",
                                                       "Not run (`python tools/results.py llm [--reduced]`).", ""]


def test_the_llm_grid_runs_eval_lm_length_by_length_and_keeps_the_rows(tmp_path, monkeypatch):
    import eval_lm
    import results_llm

    calls = []

    def fake_run(args):
        calls.append(args)
        return [_llm_row(label, label.split("@")[0], None, d, args.lengths[0], 12.0, {"greedy": [1, 2]})
                for label in ("dense", "select@0.25") for d in args.domains]

    monkeypatch.setattr(eval_lm, "run", fake_run)
    files = {name: tmp_path / name for name in ("m.onnx", "kv.onnx", "s.safetensors")}
    options = dict(model=files["m.onnx"], with_past=files["kv.onnx"], stats=files["s.safetensors"])
    results_llm.run_llm(tmp_path, "reduced", 2, lengths=[4096, 2048], trials=30, **options)
    assert [a.lengths for a in calls] == [[2048], [4096]]  # shortest first
    first = calls[0]
    assert (first.models, first.stats, first.with_past) == ([f"dense={files['m.onnx']}"], files["s.safetensors"],
                                                            files["kv.onnx"])
    assert (first.methods, first.densities, first.windows, first.trials, first.block_size) == (
        ["select", "streaming"], [0.25], 2, 30, 64)
    assert first.domains == ["pydoc", "stdlib"] and first.passkey == ["teacher-forced", "greedy"]
    assert first.json == tmp_path / "llm" / "measurements.json"
    saved = json.loads((tmp_path / "llm.json").read_text())
    assert len(saved["rows"]) == 8 and saved["plan"]["trials"] == 30 and set(saved["loads"]) == {"2048", "4096"}
    results_llm.run_llm(tmp_path, "reduced", 2, lengths=[2048], **options)  # rows are replaced, not repeated
    assert len(json.loads((tmp_path / "llm.json").read_text())["rows"]) == 8


def test_report_without_matplotlib_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "out"
    out.mkdir()
    _write_inputs(out)
    with pytest.raises(OnnxpruneError, match=r"pip install 'onnxprune\[plots\]'"):
        results.run_report(out, quick=False, docs=tmp_path / "docs")
    assert not (tmp_path / "docs").exists()


def test_recover_run_specs_parse_and_name_their_files():
    run = results.RecoverRun.parse("0.9:embedding:5000:5e-5:30:docstrings")
    assert run == results.RecoverRun(0.9, "embedding", 5000, 5e-5, 30.0, "docstrings")
    assert results.RecoverRun.parse("0.5:hidden:100") == results.RecoverRun(0.5, "hidden", 100)
    assert run.file_stem() == "minilm.p90.embedding.5000steps.lr5e-05.30min.docstrings"
    # rows written before budgets and corpora were recorded count as calibration-text, steps-only runs
    old = {"p": 0.9, "objective": "embedding", "steps": 800, "lr": 1e-4}
    assert results._run_key(old) == results.RecoverRun(0.9, "embedding", 800, corpus="calibration").key()
