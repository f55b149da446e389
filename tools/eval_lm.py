"""Perplexity and passkey retrieval of ONNX language models (dense or pruned), by context length.

Any ONNX file with a ``logits`` output (``onnxprune export --task text-generation`` or
``text-generation-with-past``, before or after ``onnxprune prune``) runs in ONNX Runtime, with
onnxprune's op library registered when the file uses the onnxprune domain. Without models, the
dense SmolLM2-135M-Instruct (models/smollm2.py) is exported once under build/eval_lm/.

  perplexity  held-out windows of N tokens (--windows per length) of Python's documentation
              (pydoc_data.topics, odd topics) and/or the standard library's sources (odd modules);
              over all positions and over each window's last quarter (long-range context)
  passkey     a 5-digit key at a random depth in filler text of about N tokens, asked through the
              tokenizer's chat template; teacher-forced: the answer "The pass key is <key>" is
              appended and a trial counts when every key token is the argmax given its prefix

One table (model, kept share, domain, length, ppl all, ppl last quarter, passkey k/N) for all
models and lengths; with --json the rows are kept there and a rerun skips those already measured
(keyed by the model file's sha256, the domain, the length and the settings).

With --stats, the first model (the dense export that was calibrated) is also pruned by each of
--methods at each of --densities (files cached under build/eval_lm/pruned/), so that every method
is compared at the same budget: ``select`` (the default selection), ``ap``, ``duo`` (streaming
heads: --sink tokens of sinks and the diagonal) and ``streaming`` (the widest StreamingLLM band, with --sink tokens
of sinks, that keeps no more than the density; with none, the diagonal alone). "kept" is the
share of the blocks dense attention computes that the model computes, on the calibration lengths
and at the row's length (where the rule continues the layout).

    python tools/eval_lm.py --lengths 1024 --windows 4 --json eval.json
    python tools/eval_lm.py dense=out/dense.onnx pruned=out/pruned.onnx --lengths 1024 4096 8192
    python tools/eval_lm.py dense=build/smollm2.onnx --stats build/stats.safetensors --block-size 64 \
        --methods select ap streaming duo --densities 0.15 0.25 0.35 --json docs/results/selection.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxprune import lm_text  # noqa: E402
from onnxprune.errors import OnnxpruneError  # noqa: E402
from onnxprune.model_io import ModelInfo, atomic_path, read_info  # noqa: E402
from onnxprune.tables import table  # noqa: E402

DEFAULT_EXPORT = ROOT / "build" / "eval_lm" / "smollm2-text-generation.onnx"
#: what the domain ids in the table mean
DOMAINS = {"pydoc": "Python documentation (pydoc_data.topics)", "stdlib": "standard-library sources"}
HEADERS = ("model", "kept (calib.)", "kept (length)", "domain", "length", "ppl all", "ppl last quarter", "passkey")
METHODS = ("select", "ap", "streaming", "duo")
PRUNED_DIR = ROOT / "build" / "eval_lm" / "pruned"


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


# ---- the model


class LanguageModel:
    """An ONNX LM in ONNX Runtime: token ids (1, n) → logits (n, vocab), float32."""

    def __init__(self, path: Path, info: ModelInfo, threads: int):
        from onnxprune.runtime import session

        self.path, self.info = path, info
        self.session = session(path, threads=threads, with_library=info.uses_domain("onnxprune"))
        outputs = [o.name for o in self.session.get_outputs()]
        if "logits" not in outputs:
            raise OnnxpruneError(f"{path}: no `logits` output (export with --task text-generation)")
        self.logits_index = outputs.index("logits")

    def logits(self, ids: np.ndarray) -> np.ndarray:
        from onnxprune.lm_feeds import with_empty_cache
        from onnxprune.runtime import run

        length = ids.shape[-1]
        # A KV-cache export gets an empty cache (a prefill) and positions 0 … length-1.
        feeds = with_empty_cache(self.info, {"input_ids": ids.reshape(1, length).astype(np.int64),
                                             "attention_mask": np.ones((1, length), np.int64)})
        unknown = [n for n in self.info.input_names if n not in feeds]
        if unknown:
            raise OnnxpruneError(f"{self.path}: cannot feed input {unknown[0]!r}")
        return run(self.session, {n: feeds[n] for n in self.info.input_names}, self.path)[self.logits_index][0]


def default_model() -> Path:
    """The dense SmolLM2 ``text-generation`` export, made on first use."""
    if not DEFAULT_EXPORT.is_file():
        from models.smollm2 import model_dir
        from onnxprune.export import export

        DEFAULT_EXPORT.parent.mkdir(parents=True, exist_ok=True)
        log(f"exporting SmolLM2 to {DEFAULT_EXPORT}")
        report = export(model_dir(), DEFAULT_EXPORT, seq_len=64, task="text-generation", log=log)
        log(f"max |ONNX - PyTorch| = {report.max_abs_diff:.2e}")
    return DEFAULT_EXPORT


def tokenizer_dir(model: Path) -> Path:
    """The tokenizer beside the model (an ``export -o DIR/`` directory), else SmolLM2's."""
    if (model.parent / "tokenizer.json").is_file():
        return model.parent
    from models.smollm2 import model_dir

    return model_dir()


# ---- scores


def token_nll(logits: np.ndarray, ids: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Negative log-likelihood of ``ids[1:]`` given the logits of the positions before them
    (float64, chunked: the logits of a long window are large)."""
    nll = np.empty(len(ids) - 1)
    for start in range(0, len(ids) - 1, chunk):
        rows = logits[start:min(start + chunk, len(ids) - 1)].astype(np.float64)
        peak = rows.max(-1, keepdims=True)
        log_z = np.log(np.exp(rows - peak).sum(-1)) + peak[:, 0]
        targets = ids[start + 1:start + 1 + len(rows)]
        nll[start:start + len(rows)] = log_z - rows[np.arange(len(rows)), targets]
    return nll


def perplexities(lm: LanguageModel, windows: np.ndarray) -> tuple[float, float]:
    """(over all predicted positions, over each window's last quarter), pooled over the windows."""
    every, last = [], []
    for window in windows:
        nll = token_nll(lm.logits(window), window)
        every.append(nll)
        last.append(nll[-(len(window) // 4):])
    return float(np.exp(np.concatenate(every).mean())), float(np.exp(np.concatenate(last).mean()))


class Passkey:
    """Passkey prompts of about ``length`` tokens in the tokenizer's chat template."""

    def __init__(self, tokenizer, length: int):
        if not getattr(tokenizer, "chat_template", None):
            raise OnnxpruneError("the passkey is asked through a chat template, which the tokenizer lacks "
                                 "(--trials 0, or --tokenizer DIR with one)")
        self.tokenizer, self.length = tokenizer, length
        base, ten = (len(self.tokens("00000", 0.5, r)[0]) for r in (0, 10))
        per_repeat = max((ten - base) / 10, 1e-9)
        self.repeats = max(0, int((length - base) / per_repeat))
        while self.repeats and len(self.tokens("00000", 0.5, self.repeats)[0]) > length:
            self.repeats -= 1

    def prompt(self, key: str, depth: float, repeats: int) -> str:
        message = lm_text.passkey_message(key, depth, repeats)
        return self.tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                  add_generation_prompt=True) + lm_text.PASSKEY_ANSWER

    def tokens(self, key: str, depth: float, repeats: int | None = None) -> tuple[list[int], int]:
        """The ids of prompt + answer + key, and where the key's tokens start."""
        repeats = self.repeats if repeats is None else repeats
        prefix = self.prompt(key, depth, repeats)
        head = self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
        # the answer's trailing space is the prefix's: only the key's own tokens are scored
        full = self.tokenizer(prefix + key, add_special_tokens=False)["input_ids"]
        if full[:len(head)] != head:
            raise OnnxpruneError("the tokenizer merges the key with the answer before it")
        return full, len(head)

    def trial(self, lm: LanguageModel, rng: np.random.Generator) -> bool:
        ids, start = self.tokens(lm_text.passkey(rng), float(rng.uniform(0, 1)))
        ids = np.asarray(ids, np.int64)
        predicted = lm.logits(ids[:-1])[start - 1:].argmax(-1)
        return bool((predicted == ids[start:]).all())


# ---- the methods at equal densities


def streaming_window(stats, density: float, block_size: int, sink_tokens: int) -> tuple[int, int]:
    """(sink tokens, window tokens) of the widest StreamingLLM band that keeps at most ``density``
    on the calibration lengths; (0, 0), the diagonal alone, when no band with sinks fits."""
    from onnxprune.selection import streaming_layouts

    best = (0, 0)
    sinks = -(-sink_tokens // block_size)
    for window in range(-(-stats.max_length // block_size)):
        kept = 1.0 - streaming_layouts(stats, sinks, window, block_size).effective_sparsity
        if kept > density + 1e-9:
            break
        best = (sink_tokens, window * block_size)
    return best


def pruned_models(dense: Path, args) -> list[tuple[str, Path]]:
    """Each method at each density: (label, file), pruned once and cached by the statistics' sha256."""
    from onnxprune.model_io import file_sha256, save_model
    from onnxprune.prune import prune
    from onnxprune.stats import Stats

    stats = Stats.load(args.stats)
    stats_sha = file_sha256(args.stats)
    models = []
    for method in args.methods:
        for density in args.densities:
            label = f"{method}-f{args.full_heads}" if method == "select" and args.full_heads else method
            path = PRUNED_DIR / f"{stats_sha[:12]}-b{args.block_size}-{label}-{density:g}.onnx"
            if not path.is_file():
                if method == "streaming":
                    sink, window = streaming_window(stats, density, args.block_size, args.sink)
                    choice = dict(method=None, pattern="streaming", sink_tokens=sink, window_tokens=window)
                elif method == "duo":
                    choice = dict(method=None, pattern="duo", density=density, sink_tokens=args.sink)
                else:
                    choice = dict(method=method, density=density,
                                  full_heads=args.full_heads if method == "select" else 0)
                log(f"pruning: {method} at density {density:g}")
                model, _ = prune(dense, stats, block_size=args.block_size, stats_sha256=stats_sha, **choice)
                PRUNED_DIR.mkdir(parents=True, exist_ok=True)
                save_model(model, path)
            models.append((f"{label}@{density:g}", path))
    return models


def kept_shares(path: Path, length: int) -> tuple[float | None, float | None]:
    """(kept share on the calibration lengths, as recorded; kept share on causal inputs of
    ``length``, the rule continuing the layout), None for a dense model."""
    from onnxprune.layouts import effective_sparsity, load_layouts

    try:
        layouts = load_layouts(path)
    except OnnxpruneError:
        return None, None
    one_length = np.zeros(length + 1, np.int64)
    one_length[length] = 1
    calibration = None if layouts.effective_sparsity is None else 1.0 - layouts.effective_sparsity
    return calibration, 1.0 - effective_sparsity(one_length, layouts.sites, layouts.block_size)


# ---- the run


def row_key(info: ModelInfo, domain: str, length: int, args) -> str:
    return json.dumps([info.sha256, domain, length, args.windows, args.trials, args.seed])


def evaluate(label: str, lm: LanguageModel, tokenizer, domain: str, length: int, args) -> dict:
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    t0 = time.perf_counter()
    windows = lm_text.token_windows(lm_text.texts(domain, "evaluation"), encode, length, args.windows)
    ppl, ppl_last = perplexities(lm, windows)
    correct = 0
    if args.trials:
        passkey = Passkey(tokenizer, length)
        rng = np.random.default_rng(args.seed)
        correct = sum(passkey.trial(lm, rng) for _ in range(args.trials))
    kept, kept_at_length = kept_shares(lm.path, length)
    return {"model": label, "path": str(lm.path), "kept": kept, "kept_at_length": kept_at_length,
            "domain": domain, "length": length, "windows": args.windows,
            "ppl": ppl, "ppl_last_quarter": ppl_last, "passkey_correct": correct, "passkey_trials": args.trials,
            "seed": args.seed, "seconds": round(time.perf_counter() - t0, 1)}


def parse_models(specs: list[str]) -> list[tuple[str, Path]]:
    """``[label=]path.onnx`` → (label, path); the label defaults to the file's stem (its folder's
    name for a model directory's model.onnx)."""
    models = []
    for spec in specs or [str(default_model())]:
        label, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        path = Path(path)
        models.append((label or (path.parent.name if path.name == "model.onnx" else path.stem), path))
    return models


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="[label=]model.onnx (default: the dense SmolLM2, exported once)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024], help="window lengths in tokens (default 1024)")
    p.add_argument("--windows", type=int, default=4, help="perplexity windows per length (default 4)")
    p.add_argument("--trials", type=int, default=20, help="passkey trials per length (default 20; 0: none)")
    p.add_argument("--domains", nargs="+", choices=list(DOMAINS), default=["pydoc"],
                   help="held-out text: " + "; ".join(f"{k}: {v}" for k, v in DOMAINS.items()) + " (default pydoc)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: beside the model, else SmolLM2's)")
    p.add_argument("--seed", type=int, default=0, help="passkey keys and depths (default 0)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default 2)")
    p.add_argument("--json", type=Path, help="rows are kept here; rows already in it are not measured again")
    p.add_argument("--stats", type=Path, help="the first model's statistics: also prune it by --methods at --densities")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="with --stats (default: all)")
    p.add_argument("--densities", type=float, nargs="+", default=[0.15, 0.25, 0.35],
                   help="with --stats: kept shares (default 0.15 0.25 0.35)")
    p.add_argument("--block-size", type=int, default=64, help="with --stats (default 64)")
    p.add_argument("--sink", type=int, default=64, help="with --stats: sink tokens of streaming and duo (default 64)")
    p.add_argument("--full-heads", type=int, default=0, help="with --stats: select's full heads per site (default 0)")
    args = p.parse_args(argv)
    try:
        rows = run(args)
    except OnnxpruneError as e:
        print(f"eval_lm: error: {e}", file=sys.stderr)
        return 2
    share = lambda v: "1.00" if v is None else f"{v:.3f}"  # noqa: E731 - a dense model keeps every block
    print(table(HEADERS, [(r["model"], share(r.get("kept")), share(r.get("kept_at_length")), r["domain"],
                           r["length"], r["ppl"], r["ppl_last_quarter"],
                           f"{r['passkey_correct']}/{r['passkey_trials']}") for r in rows]))
    return 0


def run(args) -> list[dict]:
    from transformers import AutoTokenizer

    done = json.loads(args.json.read_text())["rows"] if args.json and args.json.is_file() else {}
    rows = []
    models = parse_models(args.models)
    if args.stats:
        models += pruned_models(models[0][1], args)
    for label, path in models:
        info = read_info(path)
        lm = tokenizer = None  # loaded for the first row not measured yet
        for domain in args.domains:
            for length in args.lengths:
                key = row_key(info, domain, length, args)
                if key not in done:
                    if lm is None:
                        lm = LanguageModel(path, info, args.threads)
                        tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer or tokenizer_dir(path)))
                    log(f"{label}: {domain}, {length} tokens")
                    done[key] = evaluate(label, lm, tokenizer, domain, length, args)
                    if args.json:
                        with atomic_path(args.json) as tmp:
                            tmp.write_text(json.dumps({"rows": done}, indent=1))
                rows.append({**done[key], "model": label})
    return rows


if __name__ == "__main__":
    sys.exit(main())
