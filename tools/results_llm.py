"""tools/results.py's LLM section: SmolLM2-135M-Instruct at 2k–8k tokens, measured by tools/eval_lm.py,
and its part of docs/RESULTS.md.

The grid: at each length (shortest first), held-out perplexity on both text domains and passkey
retrieval scored both ways, for the dense model, ``select`` and ``streaming`` at each kept share,
and ``duo`` (eval_lm's methods, all at the same budgets). eval_lm keeps every window and trial in
``out/results/llm/measurements.json``, so a stopped run loses nothing and a rerun adds what is
missing; ``llm.json`` holds the summary the report reads, with what did not run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from result_plots import Curve, plot

DOMAINS = ("pydoc", "stdlib")
SCORINGS = ("teacher-forced", "greedy")
BLOCK_SIZE = 64
RECOVERED = "select after recover"
#: Why the grid has no recovered rows (checked against onnxprune/recover.py; the time is an
#: estimate from the dense ONNX forward pass at 2048 tokens, 11.5 s on these 2 cores).
RECOVER_NOT_RUN = (
    "`onnxprune recover` distils the base model (`AutoModel`: hidden states, no LM head) and exports the "
    "recovered model without its logits or KV cache, so it cannot be scored for perplexity or passkey; and "
    "each of its steps (16 inputs, forward and backward in eager PyTorch) at 2048 tokens would take roughly "
    "16 × 3 × 11.5 s ≈ 9 minutes on 2 cores, hours for even a short run.")


@dataclasses.dataclass(frozen=True)
class Grid:
    lengths: tuple[int, ...]
    densities: tuple[float, ...]
    methods: tuple[str, ...]
    windows: int  # perplexity windows per length and domain
    trials: int  # passkey trials per length and scoring
    calibration: tuple[int, int]  # (tokens, windows) of pydoc calibration text


GRIDS = {
    "full": Grid((2048, 4096, 8192), (0.15, 0.25, 0.35), ("select", "streaming", "duo"), 4, 30, (4096, 13)),
    "reduced": Grid((2048, 4096), (0.25,), ("select", "streaming"), 2, 10, (4096, 13)),
    "quick": Grid((512,), (0.25,), ("select",), 1, 2, (1024, 2)),
}


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def calibrated(model: Path, folder: Path, tokens: int, windows: int, threads: int) -> Path:
    """Statistics of ``model`` on ``windows`` windows of ``tokens`` tokens of pydoc calibration
    text (even topics; the evaluation reads odd ones), computed once."""
    path = folder / f"stats.{tokens}x{windows}.safetensors"
    if path.is_file():
        return path
    from transformers import AutoTokenizer

    import eval_lm
    from onnxprune import lm_text
    from onnxprune.calibrate import calibrate
    from onnxprune.data import Dataset
    from onnxprune.lm_feeds import data_input_names
    from onnxprune.model_io import read_info

    tokenizer = AutoTokenizer.from_pretrained(str(eval_lm.tokenizer_dir(model)))
    data = lm_text.token_windows(lm_text.texts("pydoc", "calibration"),
                                 lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], tokens, windows)
    log(f"llm: calibrating {model.name} on {windows} pydoc windows of {tokens} tokens")
    t0 = time.perf_counter()
    stats = calibrate(model, Dataset(list(data), data_input_names(read_info(model))), max_length=tokens, batch_size=1,
                      threads=threads, show_progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    stats.save(path)
    log(f"llm: calibrated in {time.perf_counter() - t0:.0f} s → {path}")
    return path


def run_llm(out: Path, grid_name: str, threads: int, model: Path | None = None, with_past: Path | None = None,
            stats: Path | None = None, lengths: list[int] | None = None, windows: int | None = None,
            trials: int | None = None) -> None:
    """Measure what is missing of the grid (``GRIDS[grid_name]``, with the given overrides) and
    write ``out``/llm.json. ``model``, ``with_past``, ``stats``: SmolLM2's text-generation and
    with-past exports and the former's statistics (default: exported and calibrated here)."""
    import eval_lm

    grid = GRIDS[grid_name]
    grid = dataclasses.replace(grid, lengths=tuple(sorted(lengths or grid.lengths)), windows=windows or grid.windows,
                               trials=grid.trials if trials is None else trials)
    folder = out / "llm"
    model = Path(model) if model else eval_lm.default_model()
    with_past = Path(with_past) if with_past else eval_lm.default_model("text-generation-with-past")
    stats = Path(stats) if stats else calibrated(model, folder, *grid.calibration, threads)
    path = out / "llm.json"
    result = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    result.update(grid=grid_name, plan=dataclasses.asdict(grid), model=str(model), with_past=str(with_past),
                  stats=str(stats), block_size=BLOCK_SIZE, threads=threads, not_run={RECOVERED: RECOVER_NOT_RUN})
    rows = {(r["model"], r["domain"], r["length"]): r for r in result["rows"]}
    for length in grid.lengths:
        argv = [f"dense={model}", "--stats", str(stats), "--block-size", str(BLOCK_SIZE), "--methods", *grid.methods,
                "--densities", *(f"{d:g}" for d in grid.densities), "--lengths", str(length), "--domains", *DOMAINS,
                "--windows", str(grid.windows), "--trials", str(grid.trials), "--with-past", str(with_past),
                "--threads", str(threads), "--json", str(folder / "measurements.json")]
        load_before, t0 = os.getloadavg()[0], time.perf_counter()
        log(f"llm: {length} tokens")
        for row in eval_lm.run(eval_lm.parser().parse_args(argv)):
            rows[row["model"], row["domain"], row["length"]] = row
        result["rows"] = list(rows.values())
        result.setdefault("loads", {})[str(length)] = {"before": load_before, "after": os.getloadavg()[0],
                                                       "seconds": round(time.perf_counter() - t0)}
        folder.mkdir(parents=True, exist_ok=True)
        with eval_lm.atomic_path(path) as tmp:
            tmp.write_text(json.dumps(result, indent=1))


# ---- the report


def _share(value) -> str:
    return "1.00" if value is None else f"{value:.3f}"


def _passkey(row: dict | None, scoring: str) -> str:
    if not row or scoring not in row.get("passkey", {}):
        return "not run"
    correct, trials = row["passkey"][scoring]
    return f"{correct}/{trials}"


def llm_section(llm: dict | None, figures: Path) -> list[str]:
    """The "LLM: SmolLM2 at 2k–8k" section of RESULTS.md from llm.json, with its figures."""
    lines = ["## LLM: SmolLM2 at 2k–8k", ""]
    if not llm:
        return lines + ["Not run (`python tools/results.py llm [--reduced]`).", ""]
    plan = llm["plan"]
    calibration_tokens, calibration_windows = plan["calibration"]
    lines += [f"SmolLM2-135M-Instruct (`onnxprune export --task text-generation`), calibrated on {calibration_windows} "
              f"windows of {calibration_tokens} tokens of Python's documentation (even `pydoc_data.topics` topics), pruned "
              f"with blocks of {llm['block_size']} by each method at the same kept shares, and measured by "
              "`tools/eval_lm.py` on held-out text: perplexity over all positions and over each window's last quarter, "
              f"on {plan['windows']} windows per length of the odd pydoc topics and of the odd standard-library modules' "
              f"sources; passkey retrieval ({plan['trials']} trials per length: a 5-digit key at a random depth in "
              "filler text, asked through the chat template) scored teacher-forced (every key token is the argmax after "
              "\"The pass key is \") and greedy (the first number of the model's own greedy answer is the key; over the "
              "KV cache of the with-past export with the same layouts). Methods: **select** (`onnxprune prune "
              "--density D`), **streaming** (the widest sink + band that fits D), **duo** (streaming heads and full "
              "heads within D). \"kept\": the share of the blocks dense attention computes that the model computes, on "
              f"the calibration length and at the row's length (where the layout rule continues the layout). Grid: "
              f"**{llm['grid']}**; {llm['threads']} threads.", ""]
    rows = llm["rows"]
    find = lambda label, domain, length: next((r for r in rows if (r["model"], r["domain"], r["length"]) ==  # noqa: E731
                                               (label, domain, length)), None)
    # the planned models (eval_lm's labels), then any measured outside the plan
    planned = ["dense"] + [f"{m}@{d:g}" for m in plan["methods"] for d in plan["densities"]]
    labels = list(dict.fromkeys(planned + [r["model"] for r in rows]))
    for length in sorted(set(plan["lengths"]) | {r["length"] for r in rows}):
        load = llm.get("loads", {}).get(str(length))
        lines += [f"### {length} tokens", ""]
        if load:
            lines += [f"Measured in {load['seconds'] / 60:.0f} min; 1-minute load average {load['before']:.1f} before, "
                      f"{load['after']:.1f} after (other jobs on the 2 cores).", ""]
        lines += ["| model | kept (calib.) | kept at length | ppl pydoc | last ¼ pydoc | ppl stdlib | last ¼ stdlib | "
                  "passkey teacher-forced | passkey greedy |", "|---|---|---|---|---|---|---|---|---|"]
        for label in labels:
            by_domain = {d: find(label, d, length) for d in DOMAINS}
            any_row = next((r for r in by_domain.values() if r), None)
            cells = [_share(any_row["kept"]), _share(any_row["kept_at_length"])] if any_row else ["not run"] * 2
            for domain in DOMAINS:
                r = by_domain[domain]
                cells += [f"{r['ppl']:.2f}", f"{r['ppl_last_quarter']:.2f}"] if r else ["not run"] * 2
            cells += [_passkey(any_row, s) for s in SCORINGS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        for label in llm.get("not_run", {}):
            lines.append(f"| {label} | " + " | ".join(["not run"] * 8) + " |")
        lines.append("")
        lines += _figures(rows, length, figures)
    for label, reason in llm.get("not_run", {}).items():
        lines += [f"**{label}: not run.** {reason}", ""]
    return lines


def _figures(rows: list[dict], length: int, figures: Path) -> list[str]:
    """Perplexity and passkey accuracy against the kept share at ``length``, per method (the dense
    model as a level), when a pruned model was measured there."""
    at = [r for r in rows if r["length"] == length]
    pruned = [r for r in at if r.get("method") not in (None, "dense")]
    if not pruned:
        return []
    # A fixed order, so that a method has the same colour and marker in every figure.
    from eval_lm import METHODS

    methods = sorted({r["method"] for r in pruned}, key=lambda m: (METHODS.index(m) if m in METHODS else len(METHODS), m))
    dense = [r for r in at if r.get("method") == "dense"]
    x_label = f"kept share of the causal blocks at {length} tokens"

    def curves(value, keys) -> list[Curve]:
        drawn = []
        for method in methods:
            for key, name in keys:
                points = sorted((r["kept_at_length"], value(r, key)) for r in pruned
                                if r["method"] == method and value(r, key) is not None)
                if points:
                    drawn.append(Curve(f"{method}, {name}", [x for x, _ in points], [y for _, y in points]))
        return drawn

    ppl = lambda r, domain: r["ppl"] if r["domain"] == domain else None  # noqa: E731
    accuracy = lambda r, scoring: (r["passkey"][scoring][0] / r["passkey"][scoring][1]  # noqa: E731
                                   if r["domain"] == DOMAINS[0] and r["passkey"].get(scoring, [0, 0])[1] else None)
    xlim = (0, 1.25 * max(r["kept_at_length"] for r in pruned))
    names = {"perplexity": f"llm_{length}_perplexity.png", "passkey": f"llm_{length}_passkey.png"}
    plot(figures / names["perplexity"], curves(ppl, [(d, d) for d in DOMAINS]),
         f"SmolLM2 at {length} tokens: held-out perplexity", x_label, "perplexity (held-out)", xlim=xlim,
         levels=[(f"dense, {r['domain']}", r["ppl"]) for r in dense])
    plot(figures / names["passkey"], curves(accuracy, [(s, s) for s in SCORINGS]),
         f"SmolLM2 at {length} tokens: passkey retrieval", x_label, "share of trials retrieved", xlim=xlim, ylim=(-0.05, 1.05),
         levels=[(f"dense, {s}", accuracy(r, s)) for r in dense for s in SCORINGS if accuracy(r, s) is not None])
    return [f"![perplexity vs kept share](results/{names['perplexity']})", "",
            f"*Held-out perplexity against the kept share at {length} tokens, by method and text domain; dotted: the "
            "dense model (one line style per domain).*", "", f"![passkey vs kept share](results/{names['passkey']})", "",
            f"*Passkey retrieval at {length} tokens against the kept share, teacher-forced and greedy; dotted: the "
            "dense model (one line style per scoring).*", ""]
