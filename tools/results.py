"""Quality results: what onnxprune's masks cost on real models and real text, and what recover wins back.

Sections (each writes JSON under --out; `report` turns them into docs/RESULTS.md and PNG plots):

  sweep    all-MiniLM-L6-v2 (real weights), calibrated on single docstrings of one half of the
           stdlib's modules, evaluated on 560 docstrings of the other half: cosine of pruned vs
           dense sentence embeddings, top-1 neighbour agreement, effective sparsity, for
           p × scope × block size, plus the paper's element-level masks.
  recover  `onnxprune recover` at p = 0.9 and 0.5 (block 16, scope layer) within a time budget, on
           unlabelled docstrings parsed from the stdlib's and torch's sources.
  decoder  a small GPT-2 trained here on stdlib source; perplexity vs p post-training, after
           recover, and with the masks applied during language-model fine-tuning.
  speed    the same pruned models timed whole in ONNX Runtime against the dense one.
  llm      SmolLM2-135M-Instruct at 2048, 4096 and 8192 tokens (tools/results_llm.py, measured by
           tools/eval_lm.py): perplexity on two text domains and passkey retrieval (teacher-forced
           and greedy) of the dense model and of select, streaming and duo at equal kept shares;
           resumable window by window and trial by trial. --reduced: fewer lengths, shares,
           windows and trials.
  report   docs/RESULTS.md + docs/results/*.png from the JSON files.

`all` runs every section but llm, which takes hours more (`make results-llm`).

    python tools/results.py all            # what `make results` runs (every section but llm)
    python tools/results.py sweep --quick  # a smoke run (labelled as such in the report)
    python tools/results.py llm --reduced --llm-lengths 2048  # a slice of the LLM grid
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxprune.data import load_tokenizer, tokenize  # noqa: E402
from onnxprune.demo import default_model_dir, nearest_neighbours  # noqa: E402
from onnxprune.model_io import atomic_path  # noqa: E402
from onnxprune.stdlib_text import CALIBRATION_MODULES, EVALUATION_MODULES, docstrings  # noqa: E402
from result_plots import MARKERS, Curve, plot  # noqa: E402
from results_llm import llm_section, run_llm  # noqa: E402

SPARSITIES = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95)
SCOPES = ("layer", "head", "global")
BLOCKS = (16, 32, 64)
EVALUATION_SIZE = 560
MAX_LENGTH = 256
#: Threads per process (--threads): 1 when other jobs share the cores, where two threads per
#: process mostly wait for each other.
THREADS = 2


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def write_json(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


@functools.lru_cache(maxsize=1)
def docstring_lines() -> tuple[list[str], list[str]]:
    """(calibration modules' docstrings, evaluation modules' docstrings), read once per process
    (importing the modules for them takes seconds)."""
    return docstrings(CALIBRATION_MODULES), docstrings(EVALUATION_MODULES)


def minilm_data():
    """Calibration (single docstrings of the calibration modules) and the 560 held-out docstrings."""
    tokenizer = load_tokenizer(default_model_dir())
    calibration_lines, evaluation_lines = docstring_lines()
    seen = set(calibration_lines)
    held_out = [d for d in evaluation_lines if d not in seen]
    chosen = [held_out[i] for i in np.random.default_rng(0).permutation(len(held_out))[:EVALUATION_SIZE]]
    calibration = tokenize(calibration_lines, tokenizer, MAX_LENGTH, chunk=False)
    evaluation = tokenize(chosen, tokenizer, MAX_LENGTH, chunk=False)
    return calibration, evaluation


def minilm_dense(out: Path):
    """The exported dense MiniLM and its granularity-1 statistics (computed once, then reused)."""
    from onnxprune.calibrate import calibrate
    from onnxprune.data import Dataset
    from onnxprune.export import export
    from onnxprune.model_io import read_info
    from onnxprune.stats import Stats

    dense, stats_path = out / "minilm.onnx", out / "minilm.stats.safetensors"
    calibration, evaluation = minilm_data()
    if not dense.is_file():
        export(default_model_dir(), dense, seq_len=64, log=log)
    names = read_info(dense).input_names
    if not stats_path.is_file():
        t0 = time.perf_counter()
        stats = calibrate(dense, Dataset(calibration, names), granularity=1, max_length=MAX_LENGTH,
                          threads=THREADS, show_progress=False)
        stats.save(stats_path)
        log(f"calibrated on {len(calibration)} docstrings in {time.perf_counter() - t0:.0f} s")
    return dense, Stats.load(stats_path), names, calibration, evaluation


def quality(emb: np.ndarray, dense_emb: np.ndarray, dense_nn: np.ndarray) -> dict:
    cos = (emb * dense_emb).sum(axis=1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "top1_agreement": float((nearest_neighbours(emb) == dense_nn).mean())}


# ---------------------------------------------------------------------------------------------
# sweep


def sweep_configs(quick: bool, full: bool) -> list[tuple[str, int, str, float]]:
    """(kind, block, scope, p), most telling first. The full grid (the default; about 13 s per
    configuration on one core) is every p for every block size × scope and element-level masks;
    the reduced one (``--reduced``) every p for block 16 and element masks at scope layer (the
    reference's setup), and p = 0.5 / 0.9 for the other scopes and blocks."""
    every = tuple(sorted(set(SPARSITIES) | {0.5}))
    if quick:
        return [("block", 16, "layer", p) for p in (0.5, 0.9)] + [("element", 1, "layer", p) for p in (0.5, 0.9)]
    configs = [("block", 16, "layer", p) for p in every] + [("element", 1, "layer", p) for p in every if p > 0]
    others = [("block", b, s) for b in BLOCKS for s in SCOPES if (b, s) != (16, "layer")]
    if full:
        configs += [(k, b, s, p) for k, b, s in others for p in every if p > 0]
        configs += [("element", 1, s, p) for s in ("head", "global") for p in every if p > 0]
    else:
        configs += [(k, b, s, p) for k, b, s in others if b == 16 or s == "layer" for p in (0.5, 0.9)]
    return configs


def run_sweep(out: Path, quick: bool, full: bool = False) -> None:
    import torch

    from onnxprune.layouts import effective_sparsity, learn_element_masks, learn_layouts
    from onnxprune.masked_attention import apply_layouts
    from onnxprune.model_io import save_model
    from onnxprune.prune import prune
    from onnxprune.recover import load_pretrained, torch_embeddings
    from onnxprune.verify import sentence_embeddings

    torch.set_num_threads(THREADS)
    dense, stats, names, calibration, evaluation = minilm_dense(out)
    lengths = np.bincount([len(e) for e in evaluation])
    model = load_pretrained(default_model_dir())
    apply_layouts(model, None)
    dense_emb = torch_embeddings(model, evaluation, names)
    dense_nn = nearest_neighbours(dense_emb)
    ort_dense = sentence_embeddings(dense, _dataset(evaluation, names), threads=THREADS, with_library=False)
    path = out / "sweep.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    rows = previous.get("rows", [])
    done = {(r["kind"], r["block"], r["scope"], r["p"]) for r in rows}
    result = {"grid": "quick" if quick else ("full" if full else "reduced"), "calibration_inputs": len(calibration),
              "evaluation_inputs": len(evaluation),
              "calibration_mean_tokens": float(np.mean([len(c) for c in calibration])),
              "evaluation_mean_tokens": float(np.mean([len(e) for e in evaluation])),
              "dense_torch_vs_ort_cosine_min": float((ort_dense * dense_emb).sum(1).min()),
              "rows": rows, "product_path": []}
    configs = [c for c in sweep_configs(quick, full) if c not in done]
    for kind, block, scope, p in configs:
        t0 = time.perf_counter()
        if kind == "block":
            learned = learn_layouts(stats, p, block, scope)
        else:
            learned = learn_element_masks(stats, p, scope)
        apply_layouts(model, learned)
        emb = torch_embeddings(model, evaluation, names)
        row = {"kind": kind, "block": block, "scope": scope, "p": p,
               "effective_sparsity_calibration": learned.effective_sparsity,
               "effective_sparsity_held_out": effective_sparsity(lengths, learned.sites, block),
               "retained_mass": float(np.mean([s.retained_mass for s in learned.sites.values()])),
               **quality(emb, dense_emb, dense_nn), "seconds": time.perf_counter() - t0}
        rows.append(row)
        log(f"{kind:7} b={block:2} {scope:6} p={p:.2f}  eff={row['effective_sparsity_held_out']:.3f} "
            f"cos={row['cosine_mean']:.4f} min={row['cosine_min']:.4f} top1={row['top1_agreement']:.3f} "
            f"({row['seconds']:.0f} s)")
        write_json(path, result)
    # The product path: the pruned .onnx in ONNX Runtime with the library's kernel.
    for p in (0.5, 0.9):
        pruned_model, report = prune(dense, stats, p, block_size=16, scope="layer")
        pruned_path = out / f"minilm.p{int(p * 100):02d}.onnx"
        save_model(pruned_model, pruned_path)
        ort_emb = sentence_embeddings(pruned_path, _dataset(evaluation, names), threads=THREADS)
        learned = report.layouts
        apply_layouts(model, learned)
        torch_emb = torch_embeddings(model, evaluation, names)
        entry = {"p": p, "path": pruned_path.name, **quality(ort_emb, dense_emb, dense_nn),
                 "max_abs_embedding_diff_vs_torch": float(np.abs(ort_emb - torch_emb).max())}
        result["product_path"].append(entry)
        log(f"ORT pruned p={p}: cos={entry['cosine_mean']:.4f}, |ORT - torch masked| {entry['max_abs_embedding_diff_vs_torch']:.1e}")
    write_json(path, result)


def _dataset(examples, names):
    from onnxprune.data import Dataset

    return Dataset(examples, names)


# ---------------------------------------------------------------------------------------------
# recover


@dataclasses.dataclass(frozen=True)
class RecoverRun:
    """One `recover` run: sparsity, objective, step limit, peak learning rate, time budget
    (minutes of training, None: steps only) and training text: ``docstrings`` (the unlabelled
    corpus of :func:`recover_corpus`) or ``calibration`` (only the 1356 calibration docstrings)."""

    p: float
    objective: str
    steps: int
    lr: float = 1e-4
    minutes: float | None = None
    corpus: str = "docstrings"

    @classmethod
    def parse(cls, text: str) -> "RecoverRun":
        """``P:OBJECTIVE:STEPS[:LR[:MINUTES[:CORPUS]]]``, e.g. ``0.9:embedding:5000:1e-4:25:docstrings``."""
        fields = text.split(":")
        casts = (float, str, int, float, lambda m: float(m) if m not in ("", "none") else None, str)
        return cls(*(cast(f) for cast, f in zip(casts, fields)))

    def key(self) -> tuple:
        return (self.p, self.objective, self.steps, self.lr, self.minutes, self.corpus)

    def file_stem(self) -> str:
        budget = f".{self.minutes:g}min" if self.minutes else ""
        return (f"minilm.p{int(self.p * 100):02d}.{self.objective.replace('+', '_')}.{self.steps}steps"
                f".lr{self.lr:g}{budget}.{self.corpus}")


def _run_key(row: dict) -> tuple:
    # rows written before the time budget and the corpus were recorded: steps only, calibration text
    return (row["p"], row["objective"], row["steps_limit"] if "steps_limit" in row else row["steps"],
            row.get("lr", 1e-4), row.get("minutes"), row.get("corpus", "calibration"))


#: What `make results` runs: at p = 0.9 the issue's 30 minutes of training on 2 cores (a step
#: limit that the budget, not the steps, ends), then p = 0.5 for 10; both on the unlabelled
#: docstring corpus with the embedding objective and a peak learning rate of 5e-5. Chosen by
#: 20-minute runs at p = 0.9 recorded in docs/RESULTS.md: the embedding objective edged out
#: `hidden`, and 5e-5 beat 1e-4 on the held-out loss at equal steps (and beat 2e-5 and 3e-4 in runs
#: stopped early, whose numbers are in issue 7's closing note).
RECOVER_RUNS = (
    RecoverRun(0.9, "embedding", 100_000, 5e-5, 30.0),
    RecoverRun(0.5, "embedding", 100_000, 5e-5, 10.0),
)
QUICK_RECOVER_RUNS = (RecoverRun(0.9, "hidden", 5, corpus="calibration"), RecoverRun(0.5, "hidden", 5, corpus="calibration"))


def minilm_pruned(out: Path, dense: Path, stats, p: float) -> Path:
    """``out``/minilm.pXX.onnx (block 16, scope layer), pruned and written on first use."""
    from onnxprune.model_io import save_model
    from onnxprune.prune import prune

    path = out / f"minilm.p{int(p * 100):02d}.onnx"
    if not path.is_file():
        save_model(prune(dense, stats, p, block_size=16, scope="layer")[0], path)
    return path


def recover_corpus(tokenizer) -> list[np.ndarray]:
    """Unlabelled training text for recover: the calibration docstrings plus every docstring parsed
    from the standard library's and torch's sources outside the evaluation modules, with any line
    equal to an evaluation docstring removed (so nothing held out is trained on)."""
    from onnxprune.stdlib_text import source_docstrings

    calibration_lines, held_out = docstring_lines()
    lines = list(dict.fromkeys(calibration_lines + source_docstrings(exclude_lines=held_out)))
    return tokenize(lines, tokenizer, MAX_LENGTH, chunk=False)


def run_recover(out: Path, quick: bool, runs=None, name: str = "recover.json") -> None:
    """``runs``: RecoverRun tuples instead of RECOVER_RUNS."""
    import torch

    from onnxprune.recover import RecoverConfig, recover
    from onnxprune.verify import sentence_embeddings

    torch.set_num_threads(THREADS)
    dense, stats, names, calibration, evaluation = minilm_dense(out)
    corpora = {"calibration": calibration}
    dense_emb = sentence_embeddings(dense, _dataset(evaluation, names), threads=THREADS, with_library=False)
    dense_nn = nearest_neighbours(dense_emb)
    path = out / name
    result = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    result["quick"] = quick
    done = {_run_key(r) for r in result["runs"]}
    before_by_p = result.setdefault("before", {})
    for run_spec in runs or (QUICK_RECOVER_RUNS if quick else RECOVER_RUNS):
        if run_spec.key() in done:
            continue
        p = run_spec.p
        if run_spec.corpus not in corpora:
            corpora[run_spec.corpus] = recover_corpus(load_tokenizer(default_model_dir()))
            result.setdefault("corpus_inputs", {})[run_spec.corpus] = len(corpora[run_spec.corpus])
        examples = corpora[run_spec.corpus]
        pruned = minilm_pruned(out, dense, stats, p)
        if str(p) not in before_by_p:
            before_by_p[str(p)] = quality(sentence_embeddings(pruned, _dataset(evaluation, names), threads=THREADS),
                                          dense_emb, dense_nn)
        before = before_by_p[str(p)]
        output = out / f"{run_spec.file_stem()}.recovered.onnx"
        config = RecoverConfig(steps=run_spec.steps, batch_size=16, learning_rate=run_spec.lr,
                               objective=run_spec.objective, warmup_steps=min(10, run_spec.steps // 5),
                               time_budget_s=run_spec.minutes * 60 if run_spec.minutes else None,
                               checkpoint=str(output) + ".ckpt", log_every=25)
        t0 = time.perf_counter()
        report = recover(default_model_dir(), pruned, examples, output, config, threads=THREADS, log=log,
                         show_progress=False)
        wall = time.perf_counter() - t0
        # The product path: the recovered pruned .onnx in ONNX Runtime with the library's kernel.
        after = quality(sentence_embeddings(output, _dataset(evaluation, names), threads=THREADS), dense_emb, dense_nn)
        run = {"p": p, "objective": run_spec.objective, "steps": report.steps, "steps_limit": run_spec.steps,
               "lr": run_spec.lr, "minutes": run_spec.minutes, "corpus": run_spec.corpus,
               "training_inputs": len(examples), "kept_step": report.best_step, "validation": report.validation,
               "stopped_by": report.stopped_by, "threads": THREADS,
               "train_s": report.elapsed_s, "train_cpu_s": report.cpu_s, "wall_s": wall, "before": before, "after": after,
               "parity_before": report.parity_before, "parity_after": report.parity_after,
               "loss_first10": float(np.mean(report.losses[:10])), "loss_last10": float(np.mean(report.losses[-10:])),
               "losses": report.losses}
        result["runs"].append(run)
        write_json(path, result)
        log(f"recover p={p} {run_spec.objective} on {run_spec.corpus} ({len(examples)} inputs): {report.steps} steps "
            f"in {report.elapsed_s:.0f} s, kept step {report.best_step}, cos {before['cosine_mean']:.4f} → "
            f"{after['cosine_mean']:.4f}, top1 {before['top1_agreement']:.3f} → {after['top1_agreement']:.3f}")


# ---------------------------------------------------------------------------------------------
# decoder: a small GPT-2 on stdlib source, bytes as tokens (no tokenizer needed)

CONTEXT = 512
DECODER_SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95)
#: Sparsities fine-tuned both ways (recover, and the LM objective under the mask).
FINE_TUNE_SPARSITIES = (0.5, 0.8, 0.9, 0.95)


def stdlib_source_windows(held_out: bool, count: int, seed: int) -> list[np.ndarray]:
    """``count`` windows of CONTEXT bytes of stdlib source: evaluation modules' files when
    ``held_out``, else every other top-level module's file."""
    import sysconfig

    folder = Path(sysconfig.get_paths()["stdlib"])
    evaluation = {m.split(".")[0] for m in EVALUATION_MODULES}
    files = [f for f in sorted(folder.glob("*.py")) if (f.stem in evaluation) == held_out]
    text = b"\n".join(f.read_bytes() for f in files)
    data = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
    starts = np.random.default_rng(seed).integers(0, len(data) - CONTEXT, size=count)
    return [data[s : s + CONTEXT] for s in starts]


def lm_loss(lm, ids) -> "torch.Tensor":
    import torch

    ids = torch.as_tensor(np.stack(ids))
    logits = lm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train_lm(lm, windows, steps: int, lr: float, seed: int, batch: int = 8) -> dict:
    """Plain next-byte training for ``steps`` (warm-up, cosine decay)."""
    import math

    import torch

    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    lm.train()
    elapsed, cpu, losses = 0.0, 0.0, []
    for step in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        for group in optimizer.param_groups:
            warm = min(1.0, (step + 1) / 20)
            group["lr"] = lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        loss = lm_loss(lm, [windows[i] for i in rng.integers(0, len(windows), size=batch)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        elapsed += time.perf_counter() - t0
        cpu += time.process_time() - c0
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0:
            log(f"  lm step {step + 1}: loss {np.mean(losses[-50:]):.3f} ({elapsed:.0f} s)")
    lm.eval()
    return {"steps": steps, "seconds": elapsed, "cpu_s": cpu, "loss_last50": float(np.mean(losses[-50:]))}


def onnx_perplexity(path: Path, embedding: np.ndarray, windows, names) -> float:
    """Perplexity of the ONNX model's hidden states through the tied head (the product path)."""
    from onnxprune.data import pad_batch
    from onnxprune.runtime import session

    sess = session(path, threads=THREADS)
    total, count = 0.0, 0
    for start in range(0, len(windows), 4):
        feeds = pad_batch(windows[start : start + 4], names)
        hidden = sess.run(None, feeds)[0].astype(np.float64)
        logits = hidden @ embedding.T
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        ids = feeds["input_ids"]
        picked = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)
        total -= float(picked.sum())
        count += picked.size
    return float(np.exp(total / count))


def export_pruned_base(lm, folder: Path, name: str, layouts) -> Path:
    """Export ``lm``'s base model; with ``layouts`` (Layouts) also prune it with them."""
    from onnxprune.export import export
    from onnxprune.model_io import save_model
    from onnxprune.recover import prune_with_layouts

    weights = folder / f"{name}.base"
    attn = lm.config._attn_implementation
    lm.config._attn_implementation = "eager"
    lm.transformer.save_pretrained(str(weights))
    lm.config._attn_implementation = attn
    dense = folder / f"{name}.onnx"
    export(weights, dense, seq_len=64, log=log)
    if layouts is None:
        return dense
    pruned = folder / f"{name}.pruned.onnx"
    save_model(prune_with_layouts(dense, layouts, {}), pruned)
    return pruned


def run_decoder(out: Path, quick: bool, train_steps: int | None = None) -> None:
    import copy

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from onnxprune.calibrate import calibrate
    from onnxprune.data import Dataset
    from onnxprune.layouts import load_layouts
    from onnxprune.masked_attention import apply_layouts
    from onnxprune.model_io import load_model, save_model
    from onnxprune.prune import prune
    from onnxprune.recover import RecoverConfig, recover

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    folder = out / "decoder"
    folder.mkdir(exist_ok=True)
    default_train, tune_steps = (30, 5) if quick else (600, 60)
    train_steps = train_steps or default_train
    train, held_out = stdlib_source_windows(False, 4000, 0), stdlib_source_windows(True, 48, 1)
    result = {"quick": quick, "context": CONTEXT, "held_out_windows": len(held_out)}
    config = GPT2Config(vocab_size=256, n_positions=CONTEXT, n_embd=128, n_layer=3, n_head=4,
                        attn_implementation="eager")  # eager: faster than SDPA on this CPU (measured)
    trained = folder / "gpt2.lm"
    if (trained / "config.json").is_file():  # a rerun reuses the trained model
        lm = GPT2LMHeadModel.from_pretrained(str(trained), attn_implementation="eager").eval()
        result["train"] = json.loads((folder / "train.json").read_text())
    else:
        lm = GPT2LMHeadModel(config)
        log(f"decoder: training for {train_steps} steps")
        result["train"] = train_lm(lm, train, train_steps, 2e-3, seed=0)
        lm.save_pretrained(str(trained))
        (folder / "train.json").write_text(json.dumps(result["train"]))
    result["parameters"] = sum(p.numel() for p in lm.parameters())
    result["layers"], result["hidden"], result["heads"] = lm.config.n_layer, lm.config.n_embd, lm.config.n_head
    dense = export_pruned_base(lm, folder, "gpt2", None)
    loaded = load_model(dense)
    names = loaded.info.input_names
    embedding = lm.transformer.wte.weight.detach().double().numpy()
    stats = calibrate(loaded, Dataset(train[:64], names), max_length=CONTEXT, threads=THREADS, show_progress=False)
    result["dense_perplexity"] = onnx_perplexity(dense, embedding, held_out, names)
    log(f"dense perplexity {result['dense_perplexity']:.3f} (bytes)")
    rows = result["post_training"] = []
    for p in DECODER_SPARSITIES:
        pruned_model, report = prune(dense, stats, p, block_size=16, scope="layer")
        path = folder / f"gpt2.p{int(p * 100):02d}.onnx"
        save_model(pruned_model, path)
        rows.append({"p": p, "perplexity": onnx_perplexity(path, embedding, held_out, names),
                     "effective_sparsity": report.effective_sparsity,
                     "retained_mass": float(np.mean([s.retained_mass for s in report.sites]))})
        log(f"post-training p={p}: perplexity {rows[-1]['perplexity']:.3f}, effective sparsity {report.effective_sparsity:.3f}")
        write_json(out / "decoder.json", result)
    tuned = result["fine_tuned"] = []
    # Baseline for the LM fine-tunes: the dense model trained for the same extra steps.
    dense_lm = copy.deepcopy(lm)
    extra = train_lm(dense_lm, train, tune_steps, 5e-4, seed=1)
    path = export_pruned_base(dense_lm, folder, "gpt2.dense-tuned", None)
    tuned.append({"p": 0.0, "how": "dense LM fine-tune (baseline)", **extra,
                  "perplexity": onnx_perplexity(path, embedding, held_out, names)})
    for p in (0.9,) if quick else FINE_TUNE_SPARSITIES:
        pruned_path = folder / f"gpt2.p{int(p * 100):02d}.onnx"
        layouts = load_layouts(pruned_path)
        # recover: self-distillation from the dense model's hidden states (no labels)
        base_dir = folder / "gpt2.base"
        output = folder / f"gpt2.p{int(p * 100):02d}.recovered.onnx"
        report = recover(base_dir, pruned_path, train[:2000], output,
                         RecoverConfig(steps=tune_steps, batch_size=8, learning_rate=5e-4, objective="hidden",
                                       log_every=20),
                         threads=THREADS, log=log, show_progress=False)
        tuned.append({"p": p, "how": "recover (self-distillation)", "steps": report.steps, "seconds": report.elapsed_s,
                      "cpu_s": report.cpu_s,
                      "perplexity": onnx_perplexity(output, embedding, held_out, names),
                      "parity_after": report.parity_after})
        log(f"recover p={p}: perplexity {tuned[-1]['perplexity']:.3f}")
        # the paper's way: the language-model objective with the mask applied
        masked_lm = copy.deepcopy(lm)
        apply_layouts(masked_lm, layouts)
        extra = train_lm(masked_lm, train, tune_steps, 5e-4, seed=1)
        path = export_pruned_base(masked_lm, folder, f"gpt2.p{int(p * 100):02d}.lm-tuned", layouts)
        tuned.append({"p": p, "how": "LM fine-tune with the mask", **extra,
                      "perplexity": onnx_perplexity(path, masked_lm.transformer.wte.weight.detach().double().numpy(),
                                                    held_out, names)})
        log(f"masked LM fine-tune p={p}: perplexity {tuned[-1]['perplexity']:.3f}")
        write_json(out / "decoder.json", result)


# ---------------------------------------------------------------------------------------------
# speed: the same pruned models, timed whole in ONNX Runtime (dense beside them in the same run)

#: p = 0 too: the op with nothing pruned separates what replacing the attention subgraph gains
#: (one fused kernel; causal blocks skipped) from what pruning adds.
SPEED_SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95)


def run_speed(out: Path, quick: bool) -> None:
    """Median latency of the dense and the pruned models at full length, interleaved in one run
    (onnxprune.bench, as `onnxprune bench`): MiniLM at 256 tokens (its layouts' length, batch 1)
    and the decoder at 512 bytes. Whole models: attention is only part of each, so this is what a
    user of these models gains, not the kernel's own speed-up (docs/PERFORMANCE.md has that)."""
    from onnxprune.bench import bench

    dense, stats, _, _, _ = minilm_dense(out)
    sparsities = (0.0, 0.9) if quick else SPEED_SPARSITIES
    repeats = 5 if quick else 100
    models = {"minilm": (256, [dense]), "decoder": (CONTEXT, [out / "decoder" / "gpt2.onnx"])}
    for p in sparsities:
        models["minilm"][1].append(minilm_pruned(out, dense, stats, p))
        models["decoder"][1].append(out / "decoder" / f"gpt2.p{int(p * 100):02d}.onnx")
    # The 1-minute load average beside the timings: other jobs on the machine show there.
    result = {"threads": THREADS, "sparsities": list(sparsities), "models": {}, "load_before": os.getloadavg()[0]}
    for name, (length, paths) in models.items():
        if not all(path.is_file() for path in paths):
            log(f"speed: {name} skipped (run its section first)")
            continue
        timings = bench([str(path) for path in paths], seq_len=length, batch=1, threads=THREADS, repeats=repeats,
                        show_progress=False)
        base = timings[0].median_ms
        result["models"][name] = {"length": length, "rows": [
            {"p": p, "median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms, "speedup": base / t.median_ms}
            for p, t in zip((None, *sparsities), timings)]}
        named = [("dense" if r["p"] is None else f"p={r['p']}", r) for r in result["models"][name]["rows"]]
        log(f"speed {name} @ {length}: " + ", ".join(f"{label}: {r['median_ms']:.2f} ms ({r['speedup']:.2f}×)"
                                                   for label, r in named))
    result["load_after"] = os.getloadavg()[0]
    write_json(out / "speed.json", result)


# ---------------------------------------------------------------------------------------------
# report: docs/RESULTS.md and its figures (matplotlib, the `plots` extra)

#: The issue's reference run (plain PyTorch): p → (mean cosine, top-1 agreement).
REFERENCE = {0.2: (0.985, 0.94), 0.5: (0.904, 0.86), 0.8: (0.687, 0.72), 0.9: (0.618, 0.66)}
REFERENCE_RECOVERED = {0.5: 0.986, 0.9: 0.962}
REFERENCE_LABEL = "reference (the issue's PyTorch run), at its nominal p"

def _f(value, digits=4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _machine_note(section: dict | None) -> str:
    if not section or "load_before" not in section:
        return ""
    # after the run the benchmark's own threads are in the 1-minute average; before, only other jobs
    return f"1-minute load average before the run {section['load_before']:.1f} (other jobs on the 2 cores)"


def scale_paragraph(sweep, recovered, decoder, llm=None) -> str:
    parts = []
    if sweep:
        parts.append(f"MiniLM sweep: the **{sweep.get('grid', 'partial')}** grid, {len(sweep['rows'])} configurations")
    if recovered:
        budgets = sorted({r["minutes"] for r in recovered if r.get("minutes")})
        parts.append(f"recover: {len(recovered)} runs" + (f", time budgets of {', '.join(f'{b:g}' for b in budgets)} "
                                                           "minutes" if budgets else ""))
    if decoder:
        parts.append(f"decoder: {decoder.get('layers', 3)} layers trained for {decoder['train']['steps']} steps")
    if llm:
        parts.append(f"LLM: the **{llm['grid']}** grid, {len(llm['rows'])} rows (model × domain × length) measured")
    return ("On the 2-core development machine (AMD EPYC, 2 vCPUs); " + "; ".join(parts) + ". Numbers are exact for "
            "what ran; anything that did not run is absent or marked. Wall-clock times depend on what else the machine "
            "ran; CPU times are listed beside them where it matters.")


def recover_section(runs: list[dict], sweep, figures: Path) -> list[str]:
    runs = sorted(runs, key=lambda r: (r["p"], r.get("corpus", "calibration") != "docstrings", -(r.get("minutes") or 0),
                                       -r["steps"], r["objective"], r.get("lr", 1e-4)))
    corpus_sizes = {r.get("corpus", "calibration"): r.get("training_inputs", sweep["calibration_inputs"] if sweep else 0)
                    for r in runs}
    lines = ["## Recovery without labels: `onnxprune recover`", "",
             "MiniLM, block 16, scope layer. Self-distillation: the masked student learns to reproduce the dense "
             "teacher on unlabelled text, in batches of 16 inputs of similar lengths, with AdamW, warm-up then cosine "
             "decay to the step limit or the time budget, and the token embeddings frozen. Newer runs hold 128 inputs "
             "out of training and keep the state with the lowest loss on them, the untrained one included (the "
             "\"kept\" column). The training text is one of:", ""]
    described = {"calibration": "calibration docstrings only",
                 "docstrings": "docstrings: the calibration ones plus every docstring parsed from the sources of the "
                               "standard library (outside the 54 evaluation modules) and of torch, minus any line "
                               "equal to an evaluation docstring"}
    lines += [f"- `{name}`: {size} {described.get(name, 'inputs')};" for name, size in sorted(corpus_sizes.items())]
    lines += ["",
             "Before/after: the pruned and the recovered `.onnx` in ONNX Runtime with the library's kernel, on the 560 "
             "held-out docstrings. Train min: wall-clock training time (validation passes included), with the threads used.", "",
             "| p | text | objective | budget | steps (kept) | peak lr | train min | cosine before → after | "
             "cosine min after | top-1 before → after | goal | reference (300 steps) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        goal = {0.5: 0.99, 0.9: 0.98}.get(r["p"])
        met = "" if goal is None else (f"≥ {goal}: " + ("**met**" if r["after"]["cosine_mean"] >= goal else "not met"))
        budget = f"{r['minutes']:g} min" if r.get("minutes") else f"{r['steps']} steps"
        kept = (" (last; no hold-out)" if "kept_step" not in r
                else f" ({r['kept_step']})" if r["kept_step"] != r["steps"] else "")
        lines.append(f"| {r['p']} | {r.get('corpus', 'calibration')} | {r['objective']} | {budget} | {r['steps']}{kept} | "
                     f"{r.get('lr', 1e-4):g} | {r['train_s'] / 60:.1f} ({r.get('threads', 1)} thr.) | "
                     f"{r['before']['cosine_mean']:.4f} → {r['after']['cosine_mean']:.4f} | {r['after']['cosine_min']:.4f} | "
                     f"{r['before']['top1_agreement']:.3f} → {r['after']['top1_agreement']:.3f} | {met} | "
                     f"{_f(REFERENCE_RECOVERED.get(r['p']), 3)} |")
    small = [r for r in runs if r["p"] == 0.9 and r.get("corpus", "calibration") == "calibration" and r["objective"] == "embedding"]
    large = [r for r in runs if r["p"] == 0.9 and r.get("corpus") == "docstrings"]
    if small and large:
        best_small = max(small, key=lambda r: r["after"]["cosine_mean"])
        best_large = max(large, key=lambda r: r["after"]["cosine_mean"])
        lines += ["", f"**What the text is worth.** On the calibration docstrings alone, recovery at p = 0.9 stalls at "
                  f"{best_small['after']['cosine_mean']:.4f} ({best_small['steps']} steps): the training loss falls to "
                  f"{best_small['loss_last10']:.4f}, so the student reproduces the teacher on that text almost exactly "
                  "without learning to work under the mask in general. On the larger unlabelled corpus it reaches "
                  f"{best_large['after']['cosine_mean']:.4f} ({best_large['steps']} steps, final training loss "
                  f"{best_large['loss_last10']:.4f}). With little text, more steps do not help; more text does."]
        if best_large.get("validation"):
            tail = best_large["validation"][-4:]
            lines += ["", f"**Where it stops.** In that run the held-out loss was still falling, but slowly: "
                      + ", ".join(f"{v:.4f} at step {int(k)}" for k, v in tail) + ". Part of the gap is the layout "
                      "itself: at p = 0.9 most query blocks of layers 2 to 6 keep only their own block and the first one "
                      "(`onnxprune inspect --heatmaps` shows it), and the first block attends only to itself, so no path "
                      "carries information between two later blocks; fine-tuning cannot restore what the mask "
                      "forbids. The p = 0.8 layouts keep 0.984 without any training (the sweep above)."]
    lines += ["", "Among the objectives compared at equal steps (100 at p = 0.9, calibration text), the embedding-only "
              "loss did best on this metric, per-layer hidden states next, adding attention outputs last, by small "
              "margins. `recover` defaults to `hidden` because it also serves models whose every token's output matters "
              "(the GPT-2 below); `--objective embedding` suits sentence-embedding models."]
    plotted = [r for r in runs if r["p"] == 0.9 and r["objective"] == "embedding"][: len(MARKERS)]
    if plotted:
        curves = []
        for r in plotted:
            losses = np.asarray(r["losses"])
            smooth = [float(losses[max(0, i - 24) : i + 1].mean()) for i in range(len(losses))]
            budget = f"{r['minutes']:g} min ({r['steps']} steps)" if r.get("minutes") else f"{r['steps']} steps"
            curves.append(Curve(f"{r.get('corpus', 'calibration')}, {budget}, peak lr {r.get('lr', 1e-4):g}",
                                list(range(1, len(smooth) + 1)), smooth, markers=12))
        plot(figures / "recover_loss.png", curves, "Recover at p = 0.9, embedding objective: training loss",
             "training step", "training loss, 1 − cosine (mean of the last 25 steps)", ylog=True)
        lines += ["", "![recovery loss](results/recover_loss.png)", "",
                  "*Training loss at p = 0.9, embedding objective, against steps, one curve per run (log scale; each "
                  "point the mean of the last 25 steps). A low training loss on little text is overfitting, not "
                  "recovery: compare the held-out cosine in the table.*", ""]
    return lines


def speed_section(speed, figures: Path) -> list[str]:
    lines = ["## Speed", ""]
    if not speed or not speed.get("models"):
        return lines + ["Not measured in this run (`tools/results.py speed`); `docs/PERFORMANCE.md` has the kernel's "
                        "own numbers.", ""]
    lines += [f"The same pruned models, whole, in ONNX Runtime on the CPU ({speed['threads']} threads, batch 1, at full "
              "length), timed interleaved with the dense model in one run (`onnxprune.bench`, what `onnxprune bench` "
              "runs); median latency and the speed-up over dense. "
              + (_machine_note(speed) + ". " if _machine_note(speed) else "")
              + "The row p = 0 is the rewritten model with nothing pruned: what one fused kernel instead of the "
              "exported attention subgraph gains (for the decoder also the causal blocks it skips) before any pruning. "
              "Attention is only part of each model: at 256 tokens MiniLM spends most of its time in its "
              "feed-forward and projection MatMuls, which pruning does not touch, so the whole-model gain is far below "
              "the kernel's (`docs/PERFORMANCE.md`: 7.7× at 2048 tokens and 10 % kept against ONNX Runtime's fastest "
              "dense attention). Where the p10–p90 ranges overlap, the medians differ by less than the machine's "
              "noise.", "",
              "| model | length | p | median ms | p10–p90 ms | speed-up vs dense |", "|---|---|---|---|---|---|"]
    curves = []
    for name, entry in speed["models"].items():
        for r in entry["rows"]:
            label = "dense" if r["p"] is None else ("0 (the op, nothing pruned)" if r["p"] == 0 else r["p"])
            lines.append(f"| {name} | {entry['length']} | {label} | {r['median_ms']:.2f} | {r['p10_ms']:.2f}–"
                         f"{r['p90_ms']:.2f} | {r['speedup']:.2f}× |")
        pruned = [r for r in entry["rows"] if r["p"] is not None]
        curves.append(Curve(f"{name}, {entry['length']} tokens", [r["p"] for r in pruned], [r["speedup"] for r in pruned]))
    top = max(max(c.ys) for c in curves)
    plot(figures / "speed.png", curves, "Whole models in ONNX Runtime: speed-up over dense", "p of the pruned model",
         "speed-up over the dense model (×)", levels=[("dense (1×)", 1.0)], xlim=(-0.02, 1), ylim=(0, max(top * 1.1, 1.5)))
    lines += ["", "![speed-up vs p](results/speed.png)", "",
              "*Whole-model speed-up over dense against p of the pruned models; p = 0 is the rewritten model with "
              "nothing pruned. The decoder's tokens are bytes.*", ""]
    return lines


def run_report(out: Path, quick: bool, docs: Path = ROOT / "docs") -> None:
    from onnxprune.figures import require_matplotlib

    require_matplotlib()  # before anything is written
    figures = docs / "results"
    figures.mkdir(parents=True, exist_ok=True)
    load = lambda name: json.loads((out / name).read_text()) if (out / name).is_file() else None  # noqa: E731
    sweep, decoder = load("sweep.json"), load("decoder.json")
    recovered = {"runs": [run for f in sorted(out.glob("recover*.json")) for run in json.loads(f.read_text())["runs"]]}
    lines = ["# Quality results", "",
             "Generated by `make results` (`tools/results.py`) on the 2-core development machine. Every number below",
             "comes from the JSON files its sections wrote under `out/results/`; where sections ran side by side, the",
             "threads column says so.", ""]
    lines += ["## Scale of this run", "", scale_paragraph(sweep, recovered["runs"], decoder, load("llm.json")), ""]
    if sweep:
        rows = sweep["rows"]
        pick = lambda kind, block, scope: sorted((r for r in rows if (r["kind"], r["block"], r["scope"]) == (kind, block, scope)),  # noqa: E731
                                                 key=lambda r: r["p"])
        lines += ["## Encoder: all-MiniLM-L6-v2, post-training masks", "",
                  f"Calibration: {sweep['calibration_inputs']} single docstrings (mean {sweep['calibration_mean_tokens']:.0f} tokens, "
                  f"at most {MAX_LENGTH}) of {len(CALIBRATION_MODULES)} stdlib modules. Evaluation: {sweep['evaluation_inputs']} "
                  f"docstrings (mean {sweep['evaluation_mean_tokens']:.0f} tokens) of {len(EVALUATION_MODULES)} other modules. "
                  "Cosine: pruned vs dense mean-pooled, normalised sentence embeddings; top-1: the held-out sentence's nearest "
                  "other sentence is the same as with the dense model; effective sparsity: the fraction of the attention "
                  "blocks that dense attention computes on the held-out inputs that the layouts skip.", "",
                  f"Grid: **{sweep.get('grid', 'partial')}** ({len(rows)} configurations).",
                  "The sweep evaluates with the masked PyTorch model (`onnxprune.masked_attention`), which equals the pruned "
                  "ONNX model run by the library's kernel (checked below and in `tests/test_recover.py`) and is faster to "
                  "re-mask for each configuration.", ""]
        header = ("| p | eff. sparsity (held-out) | retained mass | cosine mean | cosine min | top-1 | "
                  "element-level: eff. sparsity | cosine mean | top-1 | reference: cosine | top-1 |")
        lines += ["### Block 16, scope layer (the reference's setup) beside the paper's element-level mask", "",
                  header, "|" + "---|" * 11]
        element = {r["p"]: r for r in pick("element", 1, "layer")}
        for r in pick("block", 16, "layer"):
            e = element.get(r["p"], {})
            ref = REFERENCE.get(r["p"], (None, None))
            lines.append(f"| {r['p']:.2f} | {r['effective_sparsity_held_out']:.3f} | {r['retained_mass']:.3f} | "
                         f"{r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | {r['top1_agreement']:.3f} | "
                         f"{_f(e.get('effective_sparsity_held_out'), 3)} | {_f(e.get('cosine_mean'))} | "
                         f"{_f(e.get('top1_agreement'), 3)} | {_f(ref[0], 3)} | {_f(ref[1], 2)} |")
        block16 = sorted(pick("block", 16, "layer"), key=lambda r: r["effective_sparsity_held_out"])
        if len(block16) >= 2:
            eff = [r["effective_sparsity_held_out"] for r in block16]
            cos = [r["cosine_mean"] for r in block16]
            top = [r["top1_agreement"] for r in block16]
            matched = [f"{q}: {np.interp(q, eff, cos):.3f} (top-1 {np.interp(q, eff, top):.2f}) against {c:.3f} ({t:.2f})"
                       for q, (c, t) in REFERENCE.items() if q <= max(eff)]
            lines += ["", "**Why these numbers are higher than the reference's at the same p.** In onnxprune, p is the "
                      f"fraction of the layout's blocks that AP prunes, and the layout covers {MAX_LENGTH} tokens "
                      f"({MAX_LENGTH // 16} × {MAX_LENGTH // 16} blocks of 16 per head). Blocks that only long inputs reach "
                      "score low (attention spreads over more keys there) and go first, so on the held-out docstrings, "
                      "most of which fit in four or five blocks, far fewer blocks are skipped than p says: the "
                      "effective-sparsity column. Compared where the held-out effective sparsity equals the reference's p "
                      "(linear interpolation between our rows), mean cosine at " + "; ".join(matched) +
                      " (ours first, reference second). The reference's exact definition of p is not known here; if "
                      "it pruned a fraction of the blocks each input actually computes, this is the like-for-like "
                      "comparison, and ours still stays higher: the reference's code is not available here, so the rest "
                      "of the gap is unexplained.", ""]
        lines += ["", "### Scopes and block sizes", "",
                  "Each cell: mean cosine on the held-out docstrings, with the held-out effective sparsity in brackets. "
                  "Scope: one threshold per layer, per head, or for the whole model (DESIGN.md). A cell equal to the "
                  f"one on its left hit the cap: with the diagonal blocks kept, a {MAX_LENGTH}-token layout of blocks b "
                  f"prunes at most 1 − b/{MAX_LENGTH} of them (" + ", ".join(f"{1 - b / MAX_LENGTH:g} for {b}" for b in BLOCKS)
                  + "), and `onnxprune prune` warns when p asks for more.", "",
                  "| block | scope | " + " | ".join(f"p = {q:g}" for q in SPARSITIES[1:]) + " |",
                  "|---|---|" + "---|" * (len(SPARSITIES) - 1)]
        for kind, block in [("block", b) for b in BLOCKS] + [("element", 1)]:
            for scope in SCOPES:
                by_p = {r["p"]: r for r in pick(kind, block, scope)}
                if not by_p:
                    continue
                cells = [f"{by_p[q]['cosine_mean']:.4f} ({by_p[q]['effective_sparsity_held_out']:.2f})" if q in by_p else "—"
                         for q in SPARSITIES[1:]]
                lines.append(f"| {block if kind == 'block' else 'element'} | {scope} | " + " | ".join(cells) + " |")
        cosine_axis = "mean cosine to the dense embeddings (held-out)"
        p_axis = "p (fraction of the layout's blocks pruned)"
        for name, title, variants, what in (
                ("minilm_blocks.png", "MiniLM, scope layer: block sizes",
                 [(f"block {b}", ("block", b, "layer")) for b in BLOCKS] + [("element-level mask", ("element", 1, "layer"))],
                 "scope layer, by block size and for the element-level mask"),
                ("minilm_scopes.png", "MiniLM, block 16: scopes", [(f"scope {s}", ("block", 16, s)) for s in SCOPES],
                 "block 16, by scope")):
            curves = [Curve(label, [r["p"] for r in pick(*key)], [r["cosine_mean"] for r in pick(*key)])
                      for label, key in variants if len(pick(*key)) >= 2]
            if curves:
                plot(figures / name, curves, title, p_axis, cosine_axis, xlim=(-0.02, 1))
                lines += ["", f"![cosine vs p]({'results/' + name})", "",
                          f"*Mean cosine on the held-out docstrings against p: {what}.*"]
        lines.append("")
        if sweep.get("product_path"):
            lines += ["", "The product path (pruned `.onnx` in ONNX Runtime with the library's kernel, block 16, scope layer):", "",
                      "| p | cosine mean | top-1 | max abs difference of the embeddings vs the masked PyTorch model |",
                      "|---|---|---|---|"]
            for e in sweep["product_path"]:
                lines.append(f"| {e['p']} | {e['cosine_mean']:.4f} | {e['top1_agreement']:.3f} | {e['max_abs_embedding_diff_vs_torch']:.1e} |")
        curves = [Curve(label, [r["effective_sparsity_held_out"] for r in pick(*key)], [r["cosine_mean"] for r in pick(*key)])
                  for label, key in (("block 16, scope layer", ("block", 16, "layer")),
                                     ("element-level mask, scope layer", ("element", 1, "layer"))) if pick(*key)]
        curves.append(Curve(REFERENCE_LABEL, list(REFERENCE), [v[0] for v in REFERENCE.values()], reference=True))
        plot(figures / "minilm_cosine.png", curves, "MiniLM: cosine against the blocks actually skipped",
             "effective sparsity on the held-out docstrings", cosine_axis, xlim=(-0.02, 1))
        lines += ["", "![cosine vs sparsity](results/minilm_cosine.png)", "",
                  "*Mean cosine against effective sparsity on the held-out inputs. The issue's reference is plotted at "
                  "its nominal p (its effective sparsity was not reported).*", ""]
    if recovered and recovered["runs"]:
        lines += recover_section(recovered["runs"], sweep, figures)
    if decoder:
        lines += ["## Decoder: a small GPT-2 trained here", "",
                  f"GPT-2 architecture, {decoder['parameters'] / 1e6:.2f} M parameters ({decoder.get('layers', 3)} layers, hidden "
                  f"{decoder.get('hidden', 128)}, {decoder.get('heads', 4)} heads), bytes as "
                  f"tokens, context {decoder['context']}, trained from scratch for {decoder['train']['steps']} steps of 8 × "
                  f"{decoder['context']} bytes ({decoder['train']['seconds'] / 60:.1f} min wall, {decoder['train']['cpu_s'] / 60:.1f} "
                  "CPU min) on the source of the stdlib's top-level "
                  f"modules outside the evaluation list; perplexity per byte on {decoder['held_out_windows']} windows of the "
                  "evaluation modules' source. Calibrated on 64 training windows; block 16, scope layer (causal blocks are "
                  "not counted in p). All perplexities from the `.onnx` models in ONNX Runtime with the library's kernel.", "",
                  "| p | effective sparsity | retained mass | perplexity | vs dense |", "|---|---|---|---|---|"]
        base = decoder["dense_perplexity"]
        for r in decoder["post_training"]:
            lines.append(f"| {r['p']} | {r['effective_sparsity']:.3f} | {r['retained_mass']:.3f} | {r['perplexity']:.3f} | "
                         f"{(r['perplexity'] / base - 1) * 100:+.1f}% |")
        lines += ["", f"The model is small and short-trained: its training loss was still falling "
                  f"({decoder['train']['loss_last50']:.2f} nats per byte over the last 50 steps), so these numbers say how "
                  "masks behave on a weak model that uses attention, not what they cost a well-trained one."]
        if decoder.get("fine_tuned"):
            dense_tuned = next((r["perplexity"] for r in decoder["fine_tuned"] if r["p"] == 0.0), None)
            lines += ["", "After fine-tuning (the same number of steps each; the LM fine-tunes continue the training "
                      "objective, and the dense one is their baseline; recover distils the dense model's hidden states, no labels):", "",
                      "| p | how | steps | perplexity | vs dense fine-tuned |", "|---|---|---|---|---|"]
            for r in decoder["fine_tuned"]:
                rel = "" if dense_tuned is None else f"{(r['perplexity'] / dense_tuned - 1) * 100:+.1f}%"
                lines.append(f"| {r['p']} | {r['how']} | {r['steps']} | {r['perplexity']:.3f} | {rel} |")
            masked = [r for r in decoder["fine_tuned"] if r["how"] == "LM fine-tune with the mask"]
            if dense_tuned is not None and masked and min(r["perplexity"] for r in masked) < dense_tuned:
                lines += ["", "The language-model fine-tunes with the mask end *below* the dense one, and lower the higher "
                          "p is. On this undertrained byte-level model the masks act as a locality prior (most of what "
                          "predicts the next byte is nearby) that speeds learning; it says the masks cost nothing when "
                          "trained with, as the paper found, not that they would improve a converged model."]
        curves = [Curve("post-training masks", [r["p"] for r in decoder["post_training"]],
                        [r["perplexity"] for r in decoder["post_training"]])]
        for how, label in (("recover (self-distillation)", "after recover (self-distillation)"),
                           ("LM fine-tune with the mask", "after the LM fine-tune with the mask")):
            tuned = [r for r in decoder.get("fine_tuned", []) if r["how"] == how]
            if tuned:
                curves.append(Curve(label, [r["p"] for r in tuned], [r["perplexity"] for r in tuned]))
        baseline = [("dense, LM fine-tuned as long (baseline)", r["perplexity"])
                    for r in decoder.get("fine_tuned", []) if r["p"] == 0.0]
        plot(figures / "decoder_perplexity.png", curves, "Small GPT-2 on stdlib source: perplexity", "p",
             "perplexity per byte (held-out source)", levels=baseline, xlim=(-0.02, 1))
        lines += ["", "![perplexity vs p](results/decoder_perplexity.png)", "",
                  "*Held-out perplexity against p: post-training masks, after recover, and after the language-model "
                  "fine-tune with the mask, beside the dense model fine-tuned for as many steps.*", ""]
    lines += speed_section(load("speed.json"), figures)
    lines += llm_section(load("llm.json"), figures)
    extra = [json.loads(f.read_text()) for f in sorted(out.glob("recover.*.json"))]
    lines += ["## Reproduce", "",
              "`make results` runs every section but llm (sweep, recover, decoder, speed, report; `make results-llm` runs llm and the report) with the defaults that made the "
              "tables above, except for extra recover rows marked as such; `python tools/results.py "
              "sweep|recover|decoder|speed|llm|report [--reduced] [--threads N]` runs one. Each section resumes from the "
              "JSON it already wrote under `out/results/` (delete a file to redo its section)."
              + ("" if not extra else " Extra recover rows came from `--recover-runs` with " + ", ".join(
                  f"`{r['p']}:{r['objective']}:{r.get('steps_limit', r['steps'])}:{r.get('lr', 1e-4):g}"
                  f":{format(r['minutes'], 'g') if r.get('minutes') else 'none'}:{r.get('corpus', 'calibration')}`"
                  for e in extra for r in e["runs"])
                  + " (format `P:OBJECTIVE:STEPS[:LR[:MINUTES[:CORPUS]]]`). Rows marked \"no hold-out\" ran before "
                  "recover held inputs out (every input trained, the last state kept); their specs now run with "
                  "the hold-out."), ""]
    with atomic_path(docs / "RESULTS.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    log(f"wrote {docs / 'RESULTS.md'}")


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=("sweep", "recover", "decoder", "speed", "llm", "report", "all"))
    parser.add_argument("--out", default=str(ROOT / "out" / "results"), help="working directory (default out/results)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (a few configurations, short training)")
    parser.add_argument("--reduced", action="store_true",
                        help="sweep: a reduced grid (every p for block 16 and element masks at scope layer, p = 0.5 and "
                             "0.9 elsewhere) instead of all 85 configurations; llm: 2048 and 4096 tokens, kept share "
                             "0.25, select and streaming, 2 windows and 10 passkey trials")
    llm = parser.add_argument_group("llm (SmolLM2; default: exported under build/eval_lm/, calibrated under --out)")
    llm.add_argument("--llm-model", type=Path, help="its text-generation export")
    llm.add_argument("--llm-with-past", type=Path, help="its text-generation-with-past export")
    llm.add_argument("--llm-stats", type=Path, help="the text-generation export's statistics")
    llm.add_argument("--llm-lengths", type=int, nargs="+", help="these lengths instead of the grid's")
    llm.add_argument("--llm-windows", type=int, help="perplexity windows per length and domain")
    llm.add_argument("--llm-trials", type=int, help="passkey trials per length and scoring")
    parser.add_argument("--threads", type=int, default=2, help="threads per process (default 2)")
    parser.add_argument("--decoder-steps", type=int, help="decoder: training steps (default 600)")
    parser.add_argument("--recover-runs", metavar="P:OBJECTIVE:STEPS[:LR[:MINUTES[:CORPUS]]],...",
                        help="recover: these runs instead of the default list (results in their own JSON file)")
    args = parser.parse_args(argv)
    global THREADS
    THREADS = args.threads
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The LLM grid takes hours more (14 h in full on 2 cores): `make results-llm` runs it on its own.
    sections = ("sweep", "recover", "decoder", "speed", "report") if args.section == "all" else (args.section,)
    for section in sections:
        t0 = time.perf_counter()
        if section == "sweep":
            run_sweep(out, args.quick, not args.reduced)
        elif section == "decoder":
            run_decoder(out, args.quick, args.decoder_steps)
        elif section == "recover" and args.recover_runs:
            runs = [RecoverRun.parse(r) for r in args.recover_runs.split(",")]
            run_recover(out, args.quick, runs, name=f"recover.{args.recover_runs.replace(':', '_').replace(',', '-')}.json")
        elif section == "llm":
            run_llm(out, "quick" if args.quick else "reduced" if args.reduced else "full", THREADS, args.llm_model,
                    args.llm_with_past, args.llm_stats, args.llm_lengths, args.llm_windows, args.llm_trials)
        elif section == "report":
            # A smoke run's report stays beside its JSON: it must not replace the real docs/RESULTS.md.
            run_report(out, args.quick, docs=out / "docs" if args.quick else ROOT / "docs")
        else:
            globals()[f"run_{section}"](out, args.quick)
        log(f"{section} done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
