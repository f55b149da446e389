"""``onnxprune demo --llm`` on a tiny random Llama (not SmolLM2): the whole path, through the CLI,
with the dense model's perplexity checked against PyTorch on the same windows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnxprune.cli import main

pytest.importorskip("torch")
pytest.importorskip("transformers")

LENGTH = 40  # the passkey prompt (about 50 tokens of the word-level tokenizer) and its answer fit 64 positions


@pytest.mark.slow  # one export of a tiny Llama with its cache
def test_llm_demo_on_a_tiny_llama(tmp_path, capsys):
    import torch
    from lm_exports import causal_lm, save_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onnxprune import lm_scores, lm_text

    source = tmp_path / "llama"
    causal_lm("llama").save_pretrained(str(source))
    save_tokenizer(source, chat=True)
    out = tmp_path / "demo"
    assert main(["demo", "--llm", "--model-dir", str(source), "--out", str(out), "--length", str(LENGTH),
                 "--block-size", "16", "--calibration-examples", "2", "--evaluation-examples", "2",
                 "--new-tokens", "4", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    table = captured.out.strip().splitlines()
    assert table[0].startswith("| model | kept | ppl |") and len(table) == 4
    assert table[2].startswith("| dense | 1.000 |") and table[3].startswith("| pruned | ")
    assert "[5/5]" in captured.err and "[5/5]" not in captured.out  # progress on stderr

    report = json.loads((out / "report.json").read_text())
    dense, pruned = report["rows"]["dense"], report["rows"]["pruned"]
    assert 0 < pruned["kept"] < 1 and pruned["ppl"] != dense["ppl"]
    assert all(r["prefill_s"] > 0 for r in (dense, pruned)) and set(report["timings_s"]) >= {"export_s", "generate_s"}

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    windows = lm_text.token_windows(lm_text.texts("pydoc", "evaluation"),
                                    lambda t: tokenizer(t, add_special_tokens=False)["input_ids"], LENGTH, 2)
    model = AutoModelForCausalLM.from_pretrained(str(source)).eval()
    with torch.no_grad():
        per_window = [lm_scores.window_nll(lambda ids: model(torch.as_tensor(ids)[None]).logits[0].numpy(), w)
                      for w in windows]
    expected = lm_scores.pooled_perplexities(per_window)
    np.testing.assert_allclose((dense["ppl"], dense["ppl_last_quarter"]), expected, rtol=1e-4)


def test_llm_demo_without_smollm2_is_one_clear_error(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "models.smollm2", None)  # an installed onnxprune, outside the repository
    assert main(["demo", "--llm", "--out", "unused"]) == 2
    assert "models/smollm2.py" in capsys.readouterr().err


def test_each_demo_gets_its_own_defaults(monkeypatch):
    import onnxprune.commands.demo as command
    import onnxprune.demo_llm

    calls = {}
    monkeypatch.setattr(command, "run_demo", lambda *a, **k: calls.setdefault("minilm", (a, k)))
    monkeypatch.setattr(onnxprune.demo_llm, "run_llm_demo",
                        lambda *a, **k: calls.setdefault("llm", (a, k)) and {"table": ["| model |"]})
    assert main(["demo", "-q"]) == main(["demo", "--llm", "-q"]) == 0
    args, kwargs = calls["minilm"]
    assert args == ("out/demo", (0.5, 0.9), 16)
    assert (kwargs["calibration_examples"], kwargs["evaluation_examples"]) == (256, 200)
    assert calls["llm"][0] == ("out/demo-llm", None, 2048, 0.25, 64, 4, 2, 12)
