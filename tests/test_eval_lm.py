"""tools/eval_lm.py: perplexity arithmetic, and a resumable run over a tiny exported LM."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import eval_lm  # noqa: E402

pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_token_nll_is_the_next_tokens_negative_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((7, 11)).astype(np.float32) * 3
    ids = rng.integers(0, 11, 7)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -log_p[np.arange(6), ids[1:]]
    np.testing.assert_allclose(eval_lm.token_nll(logits, ids, chunk=4), expected, rtol=1e-5)


@pytest.mark.slow  # one export of a tiny Llama
def test_a_rerun_skips_the_rows_already_in_the_json(tmp_path, monkeypatch, capsys):
    from test_export_tasks import causal_lm, save_tokenizer

    from onnxprune.export import export

    source = tmp_path / "llama"
    causal_lm("llama").save_pretrained(str(source))
    save_tokenizer(source)
    export(source, f"{tmp_path}/export/", seq_len=12, task="text-generation", log=lambda *a: None)
    model, results = tmp_path / "export" / "model.onnx", tmp_path / "eval.json"
    argv = [f"tiny={model}", "--lengths", "8", "16", "--windows", "2", "--trials", "0", "--json", str(results)]
    assert eval_lm.main(argv) == 0
    rows = json.loads(results.read_text())["rows"]
    assert sorted(r["length"] for r in rows.values()) == [8, 16]
    assert all(np.isfinite(r["ppl"]) and r["ppl"] > 1 for r in rows.values())
    first = capsys.readouterr().out
    assert "tiny" in first and "0/0" in first

    monkeypatch.setattr(eval_lm, "evaluate", lambda *a: pytest.fail("measured again"))
    assert eval_lm.main(argv) == 0
    assert capsys.readouterr().out == first

    monkeypatch.undo()
    assert eval_lm.main([*argv[:-2], "--trials", "1"]) == 2  # the word-level tokenizer has no chat template
    assert "chat template, which the tokenizer lacks" in capsys.readouterr().err


def test_a_model_without_logits_is_one_clear_error(tmp_path, capsys):
    from onnxprune.export import export

    export("models.tiny:gpt2", tmp_path / "hidden.onnx", log=lambda *a: None)
    assert eval_lm.main([str(tmp_path / "hidden.onnx"), "--tokenizer", str(tmp_path), "--trials", "0"]) == 2
    assert "no `logits` output" in capsys.readouterr().err
