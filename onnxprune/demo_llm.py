"""``onnxprune demo --llm``: the pipeline on a long-context decoder, SmolLM2-135M-Instruct by default.

export with the KV cache → calibrate on a few windows of Python's documentation → prune (select,
one budget for all layers) → perplexity and prefill time of the dense and the pruned model on
held-out windows of one length (interleaved, so that other jobs on the machine slow both alike) →
each answers a passkey question of that length, greedy, over its cache (``onnxprune generate``'s
``CausalLM``). Progress goes to ``log``; the table is returned (and written to ``report.json``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from onnxprune import lm_scores, lm_text
from onnxprune.errors import OnnxpruneError
from onnxprune.model_io import atomic_path, file_sha256, save_model

Log = Callable[..., None]


def smollm2_dir() -> Path:
    """SmolLM2's transformers directory, converted once (models/smollm2.py, in the repository)."""
    try:
        from models.smollm2 import model_dir
    except ImportError:
        raise OnnxpruneError("SmolLM2's conversion lives in the repository's models/smollm2.py: run "
                             "`python -m onnxprune.cli demo --llm` from the repository root, or give --model-dir") from None
    return model_dir()


def _markdown(headers: tuple[str, ...], rows: list[tuple]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def run_llm_demo(
    out_dir: str | os.PathLike = "out/demo-llm",
    model_dir: str | os.PathLike | None = None,
    length: int = 2048,
    density: float = 0.25,
    block_size: int = 64,
    calibration_windows: int = 4,
    evaluation_windows: int = 2,
    new_tokens: int = 12,
    threads: int | None = None,
    log: Log = print,
) -> dict:
    """Run the demo; ``model_dir``: a transformers causal LM with a tokenizer that has a chat
    template (default: SmolLM2-135M-Instruct). Returns the report, whose ``table`` lists markdown
    lines: model, kept share, perplexities, prefill time, speed-up, passkey answer."""
    from transformers import AutoTokenizer

    from onnxprune.calibrate import calibrate
    from onnxprune.data import Dataset
    from onnxprune.export import export
    from onnxprune.generate import CausalLM
    from onnxprune.lm_feeds import data_input_names
    from onnxprune.model_io import load_model
    from onnxprune.prune import prune

    source = Path(model_dir) if model_dir is not None else smollm2_dir()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    report: dict = {"model": str(source), "length": length, "density": density, "block_size": block_size,
                    "threads": threads, "load_before": os.getloadavg()[0]}

    t0 = time.perf_counter()
    exported = export(source, f"{out}/dense/", seq_len=64, task="text-generation-with-past", log=lambda *a: None)
    dense = out / "dense" / "model.onnx"
    timings["export_s"] = time.perf_counter() - t0
    log(f"[1/5] exported {source.name} with its KV cache → {dense} ({timings['export_s']:.0f} s; max |ONNX - PyTorch| "
        f"{exported.max_abs_diff:.1e})")

    tokenizer = AutoTokenizer.from_pretrained(str(out / "dense"))
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    t0 = time.perf_counter()
    loaded = load_model(dense)
    windows = lm_text.token_windows(lm_text.texts("pydoc", "calibration"), encode, length, calibration_windows)
    stats = calibrate(loaded, Dataset(list(windows), data_input_names(loaded.info)), max_length=length, batch_size=1,
                      threads=threads, show_progress=False)
    del loaded
    stats_path = out / "stats.safetensors"
    stats.save(stats_path)
    timings["calibrate_s"] = time.perf_counter() - t0
    log(f"[2/5] calibrated on {calibration_windows} windows of {length} tokens of Python's documentation "
        f"(even pydoc topics) → {stats_path} ({timings['calibrate_s']:.0f} s)")

    t0 = time.perf_counter()
    model, pruned_report = prune(dense, stats, block_size=block_size, stats_sha256=file_sha256(stats_path),
                                 density=density, method="select")
    pruned = out / "pruned.onnx"
    save_model(model, pruned)
    del model
    kept = 1.0 - pruned_report.effective_sparsity
    timings["prune_s"] = time.perf_counter() - t0
    log(f"[3/5] pruned at density {density:g} (select, blocks of {block_size}): {kept:.3f} of the causal blocks kept "
        f"on the calibration windows → {pruned} ({timings['prune_s']:.0f} s)")

    t0 = time.perf_counter()
    models = {"dense": CausalLM(dense, threads=threads), "pruned": CausalLM(pruned, threads=threads)}
    held_out = lm_text.token_windows(lm_text.texts("pydoc", "evaluation"), encode, length, evaluation_windows)
    nll: dict[str, list] = {name: [] for name in models}
    prefill: dict[str, list[float]] = {name: [] for name in models}
    for index, window in enumerate(held_out):
        for name, lm in models.items():  # interleaved: load on the machine slows both alike
            def logits(ids: np.ndarray, lm=lm, name=name) -> np.ndarray:
                start = time.perf_counter()
                out_logits, _ = lm.step(ids[None].astype(np.int64), np.ones((1, len(ids)), np.int64), lm.empty_cache(1))
                prefill[name].append(time.perf_counter() - start)
                return out_logits[0]

            nll[name].append(lm_scores.window_nll(logits, window))
        log(f"      window {index + 1}/{evaluation_windows}: prefill dense {prefill['dense'][-1]:.1f} s, "
            f"pruned {prefill['pruned'][-1]:.1f} s")
    timings["evaluate_s"] = time.perf_counter() - t0
    log(f"[4/5] perplexity and prefill time on {evaluation_windows} held-out windows of {length} tokens "
        f"(odd pydoc topics) ({timings['evaluate_s']:.0f} s)")

    t0 = time.perf_counter()
    passkey = lm_scores.Passkey(tokenizer, length)
    key, _ = passkey.case(0)
    answers = {}
    for name, lm in models.items():
        tokens = lm_scores.greedy(lm_scores.cached_stepper(lm), passkey.prompt_ids(*passkey.case(0)), new_tokens,
                                  passkey.answered)
        answers[name] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    timings["generate_s"] = time.perf_counter() - t0
    log(f"[5/5] each answered a passkey question of {length} tokens (key {key}), greedy over its KV cache "
        f"({timings['generate_s']:.0f} s)")

    rows = {}
    for name in models:
        ppl, ppl_last = lm_scores.pooled_perplexities(nll[name])
        rows[name] = {"kept": 1.0 if name == "dense" else kept, "ppl": ppl, "ppl_last_quarter": ppl_last,
                      "prefill_s": float(np.median(prefill[name])), "answer": answers[name],
                      "retrieved": lm_scores.first_number(answers[name]) == key}
    headers = ("model", "kept", "ppl", "ppl last ¼", f"prefill s ({length} tokens)", "speed-up", f"passkey {key}: answer")
    table = _markdown(headers, [
        (name, f"{r['kept']:.3f}", f"{r['ppl']:.2f}", f"{r['ppl_last_quarter']:.2f}", f"{r['prefill_s']:.2f}",
         f"{rows['dense']['prefill_s'] / r['prefill_s']:.2f}×",
         ("✓ " if r["retrieved"] else "✗ ") + (r["answer"].replace("|", "\\|").replace("\n", " ") or "(nothing)"))
        for name, r in rows.items()])
    report.update(rows=rows, passkey_key=key, timings_s=timings, table=table, load_after=os.getloadavg()[0])
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    log(f"wrote {out / 'report.json'}")
    return report
