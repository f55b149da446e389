"""tools/eval_lm.py: perplexity arithmetic, and resumable runs over a tiny exported LM (perplexity
windows and passkey trials extend earlier ones; greedy answers over the KV cache of a with-past
twin equal those of a whole forward per token)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from onnxprune import lm_scores

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
    np.testing.assert_allclose(lm_scores.token_nll(logits, ids, chunk=4), expected, rtol=1e-5)


def test_windows_pool_into_the_perplexity_of_all_their_positions():
    rng = np.random.default_rng(1)
    windows = rng.integers(0, 11, (3, 8))
    logits = {tuple(w): rng.standard_normal((8, 11)) for w in windows}
    per_window = [lm_scores.window_nll(lambda ids: logits[tuple(ids)], w) for w in windows]
    every = np.concatenate([lm_scores.token_nll(logits[tuple(w)], w) for w in windows])
    last = np.concatenate([lm_scores.token_nll(logits[tuple(w)], w)[-2:] for w in windows])
    assert lm_scores.pooled_perplexities(per_window) == pytest.approx((np.exp(every.mean()), np.exp(last.mean())))


def test_greedy_stops_when_told_and_at_the_limit():
    vocab = np.eye(10)
    step = lambda tokens: vocab[(tokens[-1] + 1) % 10]  # noqa: E731 - the next token is the last one + 1
    assert lm_scores.greedy(step, [3], 8, lambda new: new[-1] == 6) == [4, 5, 6]
    assert lm_scores.greedy(step, [3], 2, lambda new: False) == [4, 5]
    assert lm_scores.first_number("The pass key is 40213. Remember") == "40213"
    assert lm_scores.first_number("I do not know.") == ""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama with a chat template: its text-generation and with-past exports, and the
    text-generation one's statistics."""
    from lm_exports import causal_lm, save_tokenizer

    from onnxprune.calibrate import calibrate
    from onnxprune.data import Dataset
    from onnxprune.export import export

    folder = tmp_path_factory.mktemp("eval_lm")
    source = folder / "llama"
    causal_lm("llama").save_pretrained(str(source))
    save_tokenizer(source, chat=True)
    for task in ("text-generation", "text-generation-with-past"):
        export(source, f"{folder}/{task}/", seq_len=12, task=task, log=lambda *a: None)
    model = folder / "text-generation" / "model.onnx"
    rng = np.random.default_rng(0)
    stats = calibrate(model, Dataset([rng.integers(3, 100, 64) for _ in range(4)], ["input_ids", "attention_mask"]),
                      granularity=16, max_length=64, show_progress=False)
    stats.save(folder / "stats.safetensors")
    return {"model": model, "with_past": folder / "text-generation-with-past" / "model.onnx",
            "stats": folder / "stats.safetensors", "folder": folder}


@pytest.mark.slow  # exports of a tiny Llama
def test_a_rerun_measures_only_what_is_missing(tiny, tmp_path, monkeypatch, capsys):
    results = tmp_path / "new" / "eval.json"  # its folder is made
    argv = [f"tiny={tiny['model']}", "--lengths", "16", "32", "--windows", "1", "--trials", "0", "--json", str(results)]
    assert eval_lm.main(argv) == 0
    rows = json.loads(results.read_text())["rows"]
    assert sorted((r["kind"], r["length"], len(r["windows"])) for r in rows.values()) == [("ppl", 16, 1), ("ppl", 32, 1)]
    first = capsys.readouterr().out
    assert "tiny" in first and "passkey" not in first

    monkeypatch.setattr(lm_scores, "window_nll", lambda *a: pytest.fail("measured again"))
    assert eval_lm.main(argv) == 0
    assert capsys.readouterr().out == first

    monkeypatch.undo()
    measured = []
    monkeypatch.setattr(lm_scores, "window_nll", lambda logits, w: measured.append(len(w)) or [1.0, 1, 1.0, 1])
    assert eval_lm.main([*argv[:4], "--windows", "2", *argv[6:]]) == 0  # one more window per length, only that
    assert measured == [16, 32]


@pytest.mark.slow
def test_passkey_trials_extend_and_greedy_answers_agree_with_and_without_a_cache(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lm_scores, "GREEDY_TOKENS", 4)  # the tiny model has 64 positions
    monkeypatch.setattr(eval_lm, "PRUNED_DIR", tmp_path / "pruned")
    common = ["--stats", str(tiny["stats"]), "--block-size", "16", "--methods", "select", "--densities", "0.5",
              "--lengths", "60", "--windows", "1"]
    without, with_past = tmp_path / "without.json", tmp_path / "with.json"
    assert eval_lm.main([f"dense={tiny['model']}", *common, "--trials", "2", "--json", str(without)]) == 0
    assert eval_lm.main([f"dense={tiny['model']}", *common, "--trials", "3", "--json", str(with_past),
                         "--with-past", str(tiny["with_past"])]) == 0
    assert "passkey (teacher-forced)" in capsys.readouterr().out
    assert len(list((tmp_path / "pruned").glob("*.with-past.*.onnx"))) == 1  # the pruned model's twin

    def passkey_rows(path):
        rows = [r for r in json.loads(path.read_text())["rows"].values() if r["kind"] == "passkey"]
        return {(r["model"], r["scoring"]): r for r in rows}

    plain, cached = passkey_rows(without), passkey_rows(with_past)
    assert sorted(plain) == [(m, s) for m in ("dense", "select@0.5") for s in ("greedy", "teacher-forced")]
    for key, row in plain.items():
        assert len(row["outcomes"]) == 2 and len(cached[key]["outcomes"]) == 3
        assert cached[key]["answers"][:2] == row["answers"], key  # the same trials, the same answers
    assert plain["dense", "greedy"]["answers"] != plain["select@0.5", "greedy"]["answers"]  # pruning shows

    monkeypatch.setattr(lm_scores.Passkey, "greedy", lambda *a: pytest.fail("answered again"))
    assert eval_lm.main([f"dense={tiny['model']}", *common, "--trials", "3", "--json", str(without), "--passkey",
                         "teacher-forced"]) == 0  # only teacher-forced trials were missing
    assert len(passkey_rows(without)["dense", "teacher-forced"]["outcomes"]) == 3


@pytest.mark.slow
def test_a_with_past_model_scores_as_its_text_generation_export(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(lm_scores, "GREEDY_TOKENS", 4)
    results = tmp_path / "eval.json"
    assert eval_lm.main([f"plain={tiny['model']}", f"cached={tiny['with_past']}", "--lengths", "60", "--windows", "1",
                         "--trials", "2", "--json", str(results)]) == 0
    rows = json.loads(results.read_text())["rows"].values()
    by = {(r["model"], r["kind"], r.get("scoring")): r for r in rows}
    np.testing.assert_allclose(by["cached", "ppl", None]["windows"], by["plain", "ppl", None]["windows"], rtol=1e-4)
    for scoring in lm_scores.SCORINGS:
        assert by["cached", "passkey", scoring]["answers"] == by["plain", "passkey", scoring]["answers"]


def test_a_model_without_logits_is_one_clear_error(tmp_path, capsys):
    from onnxprune.export import export

    export("models.tiny:gpt2", tmp_path / "hidden.onnx", log=lambda *a: None)
    assert eval_lm.main([str(tmp_path / "hidden.onnx"), "--tokenizer", str(tmp_path), "--trials", "0"]) == 2
    assert "no `logits` output" in capsys.readouterr().err


def test_passkey_needs_a_chat_template(tiny, capsys):
    from lm_exports import save_tokenizer

    plain = tiny["folder"] / "plain-tokenizer"
    plain.mkdir()
    save_tokenizer(plain)
    assert eval_lm.main([str(tiny["model"]), "--tokenizer", str(plain), "--lengths", "16", "--windows", "1",
                         "--trials", "1"]) == 2
    assert "chat template, which the tokenizer lacks" in capsys.readouterr().err
