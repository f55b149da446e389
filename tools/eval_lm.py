"""Perplexity and passkey retrieval of ONNX language models (dense or pruned), by context length.

Any ONNX file with a ``logits`` output (``onnxprune export --task text-generation`` or
``text-generation-with-past``, before or after ``onnxprune prune``) runs in ONNX Runtime, with
onnxprune's op library registered when the file uses the onnxprune domain. Without models, the
dense SmolLM2-135M-Instruct (models/smollm2.py) is exported once under build/eval_lm/.

  perplexity  held-out windows of N tokens (--windows per length) of Python's documentation
              (pydoc_data.topics, odd topics) and/or the standard library's sources (odd modules);
              over all positions and over each window's last quarter (long-range context)
  passkey     a 5-digit key at a random depth in filler text of about N tokens, asked through the
              tokenizer's chat template, scored (--passkey) two ways:
              teacher-forced  "The pass key is <key>" is appended; a trial counts when every key
                              token is the argmax given its prefix
              greedy          the model answers by itself (greedy, up to 16 tokens); a trial counts
                              when the first number of its answer is the key

Greedy answers run over a KV cache: a with-past model's own, or for a text-generation model the
with-past export of its dense weights (--with-past; a pruned model's layouts are laid onto it,
cached under build/eval_lm/pruned/). Without one, each new token reruns the whole sequence.

One table (model, kept share, domain, length, ppl all, ppl last quarter, passkey k/N per scoring)
for all models and lengths. With --json every window's and every trial's result is kept there, and
a rerun measures only what is missing (more --windows or --trials extend the earlier ones); rows
are keyed by the model file's sha256, the domain (perplexity) or the scoring and seed (passkey),
and the length.

With --stats, the first model (the dense export that was calibrated) is also pruned by each of
--methods at each of --densities (files cached under build/eval_lm/pruned/), so that every method
is compared at the same budget: ``select`` (the default selection), ``ap``, ``duo`` (streaming
heads: --sink tokens of sinks and the diagonal) and ``streaming`` (the widest StreamingLLM band, with --sink tokens
of sinks, that keeps no more than the density; with none, the diagonal alone). "kept" is the
share of the blocks dense attention computes that the model computes, on the calibration lengths
and at the row's length (where the rule continues the layout).

    python tools/eval_lm.py --lengths 1024 --windows 4 --json eval.json
    python tools/eval_lm.py dense=out/dense.onnx pruned=out/pruned.onnx --lengths 1024 4096 8192
    python tools/eval_lm.py dense=build/smollm2.onnx --stats build/stats.safetensors --block-size 64 \\
        --methods select ap streaming duo --densities 0.15 0.25 0.35 --json docs/results/selection.json \\
        --with-past build/smollm2-kv/model.onnx --trials 30
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxprune import lm_scores, lm_text  # noqa: E402
from onnxprune.errors import OnnxpruneError  # noqa: E402
from onnxprune.lm_feeds import cache_inputs  # noqa: E402
from onnxprune.model_io import ModelInfo, atomic_path, read_info  # noqa: E402
from onnxprune.tables import table  # noqa: E402

DEFAULT_EXPORT = ROOT / "build" / "eval_lm" / "smollm2-text-generation.onnx"
DEFAULT_WITH_PAST = ROOT / "build" / "eval_lm" / "smollm2-text-generation-with-past.onnx"
#: what the domain ids in the table mean
DOMAINS = {"pydoc": "Python documentation (pydoc_data.topics)", "stdlib": "standard-library sources"}
HEADERS = ("model", "kept (calib.)", "kept (length)", "domain", "length", "ppl all", "ppl last quarter")
METHODS = ("select", "ap", "streaming", "duo")
PRUNED_DIR = ROOT / "build" / "eval_lm" / "pruned"


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


# ---- the model


class LanguageModel:
    """An ONNX LM without a KV cache in ONNX Runtime: token ids (1, n) → logits (n, vocab), float32
    (a with-past model runs as ``generate.CausalLM``)."""

    def __init__(self, path: Path, info: ModelInfo, threads: int):
        from onnxprune.runtime import session

        self.path, self.info = path, info
        self.session = session(path, threads=threads, with_library=info.uses_domain("onnxprune"))
        outputs = [o.name for o in self.session.get_outputs()]
        if "logits" not in outputs:
            raise OnnxpruneError(f"{path}: no `logits` output (export with --task text-generation)")
        self.logits_index = outputs.index("logits")

    def logits(self, ids: np.ndarray) -> np.ndarray:
        from onnxprune.runtime import run

        length = ids.shape[-1]
        feeds = {"input_ids": ids.reshape(1, length).astype(np.int64), "attention_mask": np.ones((1, length), np.int64)}
        unknown = [n for n in self.info.input_names if n not in feeds]
        if unknown:
            raise OnnxpruneError(f"{self.path}: cannot feed input {unknown[0]!r}")
        return run(self.session, {n: feeds[n] for n in self.info.input_names}, self.path)[self.logits_index][0]


def default_model(task: str = "text-generation") -> Path:
    """The dense SmolLM2 export for ``task`` (``text-generation`` or ``text-generation-with-past``),
    made on first use."""
    path = DEFAULT_WITH_PAST if task.endswith("with-past") else DEFAULT_EXPORT
    if not path.is_file():
        from models.smollm2 import model_dir
        from onnxprune.export import export

        path.parent.mkdir(parents=True, exist_ok=True)
        log(f"exporting SmolLM2 ({task}) to {path}")
        report = export(model_dir(), path, seq_len=64, task=task, log=log)
        log(f"max |ONNX - PyTorch| = {report.max_abs_diff:.2e}")
    return path


def tokenizer_dir(model: Path) -> Path:
    """The tokenizer beside the model (an ``export -o DIR/`` directory), else SmolLM2's."""
    if (model.parent / "tokenizer.json").is_file():
        return model.parent
    from models.smollm2 import model_dir

    return model_dir()


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


def pruned_models(dense: Path, args) -> list[tuple[str, Path, str, float]]:
    """Each method at each density: (label, file, method, density), pruned once and cached by the
    statistics' sha256."""
    from onnxprune.model_io import file_sha256, save_model
    from onnxprune.prune import prune
    from onnxprune.stats import Stats

    stats = Stats.load(args.stats)
    stats_sha = file_sha256(args.stats)
    models = []
    for method in args.methods:
        for density in args.densities:
            label = f"{method}-f{args.full_heads}" if method == "select" and args.full_heads is not None else method
            # The file name says how it was pruned: plain select is the default's auto full heads.
            how = f"select-f{'auto' if args.full_heads is None else args.full_heads}" if method == "select" else label
            path = PRUNED_DIR / f"{stats_sha[:12]}-b{args.block_size}-{how}-{density:g}.onnx"
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
            models.append((f"{label}@{density:g}", path, label, density))
    return models


@functools.lru_cache(maxsize=2)
def _layouts(path: Path):
    from onnxprune.layouts import load_layouts

    try:
        return load_layouts(path)
    except OnnxpruneError:
        return None


def kept_shares(path: Path, length: int) -> tuple[float | None, float | None]:
    """(kept share on the calibration lengths, as recorded; kept share on causal inputs of
    ``length``, the rule continuing the layout), None for a dense model."""
    from onnxprune.layouts import effective_sparsity

    layouts = _layouts(path)
    if layouts is None:
        return None, None
    one_length = np.zeros(length + 1, np.int64)
    one_length[length] = 1
    calibration = None if layouts.effective_sparsity is None else 1.0 - layouts.effective_sparsity
    return calibration, 1.0 - effective_sparsity(one_length, layouts.sites, layouts.block_size)


# ---- greedy answers over a cache


def with_past_twin(path: Path, info: ModelInfo, with_past: Path) -> Path:
    """``with_past`` (the with-past export of ``path``'s dense weights) with ``path``'s layouts laid
    on it, made once under PRUNED_DIR; ``with_past`` itself for a dense model."""
    from onnxprune.layouts import load_layouts
    from onnxprune.model_io import save_model
    from onnxprune.recover import prune_with_layouts

    if not info.uses_domain("onnxprune"):
        return with_past
    twin = PRUNED_DIR / f"{info.sha256[:12]}.with-past.{read_info(with_past).sha256[:12]}.onnx"
    if not twin.is_file():
        log(f"laying the layouts of {path.name} onto {with_past.name}")
        PRUNED_DIR.mkdir(parents=True, exist_ok=True)
        save_model(prune_with_layouts(with_past, load_layouts(path), {}), twin)
    return twin


# ---- the run


class Subject:
    """One model to score. Everything runs in one session of one file: the model itself, or with
    --with-past (for a model without a cache) its with-past twin."""

    def __init__(self, label: str, path: Path, method: str, density: float | None, args, with_past_sha: str | None,
                 tokenizer: Path):
        self.label, self.path, self.method, self.density, self.args = label, path, method, density, args
        self.tokenizer_dir = tokenizer
        self.info = read_info(path)
        self.on_twin = bool(args.with_past) and not cache_inputs(self.info)
        self.with_past_sha = with_past_sha if self.on_twin else None

    def key(self, *fields) -> str:
        return json.dumps([self.info.sha256, self.with_past_sha, *fields])

    @functools.cached_property
    def scored(self) -> Path:
        return with_past_twin(self.path, self.info, self.args.with_past) if self.on_twin else self.path

    @functools.cached_property
    def causal(self):
        """The with-past model in a session (None for a model without a cache)."""
        from onnxprune.generate import CausalLM

        info = read_info(self.scored) if self.on_twin else self.info
        return CausalLM(info, threads=self.args.threads) if cache_inputs(info) else None

    @functools.cached_property
    def lm(self) -> LanguageModel:
        return LanguageModel(self.path, self.info, self.args.threads)

    @functools.cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_dir))

    def open(self) -> None:
        """The session, before the tokenizer: a file that cannot be scored is the first error."""
        if self.causal is None:
            self.lm  # noqa: B018 - made here

    def logits(self, ids: np.ndarray) -> np.ndarray:
        if self.causal is None:
            return self.lm.logits(ids)
        out, _ = self.causal.step(ids.reshape(1, -1).astype(np.int64), np.ones((1, len(ids)), np.int64),
                                  self.causal.empty_cache(1))
        return out[0]

    def stepper(self) -> lm_scores.Stepper:
        if self.causal is None:
            return lm_scores.full_forward_stepper(self.logits)
        return lm_scores.cached_stepper(self.causal)


class Store:
    """The --json file's measurements by key, written after each new window or trial."""

    def __init__(self, path: Path | None):
        self.path = path
        self.rows = json.loads(path.read_text())["rows"] if path and path.is_file() else {}

    def save(self) -> None:
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps({"rows": self.rows}, indent=1))


def perplexity_row(subject: Subject, domain: str, length: int, store: Store) -> dict:
    """The row of (model, domain, length), extended to --windows windows."""
    row = store.rows.setdefault(subject.key("ppl", domain, length), {
        "kind": "ppl", "model": subject.label, "domain": domain, "length": length, "windows": [], "seconds": 0.0})
    if len(row["windows"]) < subject.args.windows:
        subject.open()
        encode = lambda text: subject.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        windows = lm_text.token_windows(lm_text.texts(domain, "evaluation"), encode, length, subject.args.windows)
        log(f"{subject.label}: {domain}, {length} tokens, windows {len(row['windows']) + 1}–{len(windows)}")
        for window in windows[len(row["windows"]):]:
            t0 = time.perf_counter()
            row["windows"].append(lm_scores.window_nll(subject.logits, window))
            row["seconds"] = round(row["seconds"] + time.perf_counter() - t0, 1)
            store.save()
    return row


def passkey_row(subject: Subject, scoring: str, length: int, store: Store) -> dict:
    """The row of (model, scoring, length, seed), extended to --trials trials."""
    args = subject.args
    row = store.rows.setdefault(subject.key("passkey", scoring, length, args.seed), {
        "kind": "passkey", "model": subject.label, "scoring": scoring, "length": length, "seed": args.seed,
        "outcomes": [], "answers": [], "seconds": 0.0})
    if len(row["outcomes"]) < args.trials:
        subject.open()
        passkey = lm_scores.Passkey(subject.tokenizer, length, args.seed)
        log(f"{subject.label}: passkey ({scoring}), {length} tokens, trials {len(row['outcomes']) + 1}–{args.trials}")
        if scoring == "greedy" and subject.causal is None:
            log("  no KV cache (--with-past): each answer token reruns the whole prompt")
        for index in range(len(row["outcomes"]), args.trials):
            t0 = time.perf_counter()
            if scoring == "greedy":
                correct, answer = passkey.greedy(subject.stepper(), index)
            else:
                correct, answer = passkey.teacher_forced(subject.logits, index)
            row["outcomes"].append(correct)
            row["answers"].append(answer)
            row["seconds"] = round(row["seconds"] + time.perf_counter() - t0, 1)
            store.save()
    return row


def summary(subject: Subject, domain: str, length: int, store: Store) -> dict:
    """One table row: perplexities over the first --windows windows, passkey over the first
    --trials trials of each scoring."""
    args = subject.args
    ppl = perplexity_row(subject, domain, length, store)
    ppl_all, ppl_last = lm_scores.pooled_perplexities(ppl["windows"][:args.windows])
    passkey = {}
    for scoring in args.passkey if args.trials else ():
        outcomes = passkey_row(subject, scoring, length, store)["outcomes"][:args.trials]
        passkey[scoring] = [int(sum(outcomes)), len(outcomes)]
    kept, kept_at_length = kept_shares(subject.path, length)
    return {"model": subject.label, "method": subject.method, "density": subject.density, "path": str(subject.path),
            "with_past": str(subject.args.with_past) if subject.on_twin else None,
            "kept": kept, "kept_at_length": kept_at_length, "domain": domain, "length": length,
            "windows": args.windows, "ppl": ppl_all, "ppl_last_quarter": ppl_last, "passkey": passkey,
            "seed": args.seed}


def parse_models(specs: list[str]) -> list[tuple[str, Path, str, None]]:
    """``[label=]path.onnx`` → (label, path, "dense", None); the label defaults to the file's stem
    (its folder's name for a model directory's model.onnx)."""
    models = []
    for spec in specs or [str(default_model())]:
        label, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        path = Path(path)
        models.append((label or (path.parent.name if path.name == "model.onnx" else path.stem), path, "dense", None))
    return models


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="[label=]model.onnx (default: the dense SmolLM2, exported once)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024], help="window lengths in tokens (default 1024)")
    p.add_argument("--windows", type=int, default=4, help="perplexity windows per length (default 4)")
    p.add_argument("--trials", type=int, default=20, help="passkey trials per length and scoring (default 20; 0: none)")
    p.add_argument("--passkey", nargs="+", choices=lm_scores.SCORINGS, default=list(lm_scores.SCORINGS),
                   help="how passkey trials are scored (default: both)")
    p.add_argument("--with-past", type=Path,
                   help="the with-past export of the models' dense weights: every score of a model without a "
                        "cache runs on it (with the model's layouts laid on it), greedy answers over its cache")
    p.add_argument("--domains", nargs="+", choices=list(DOMAINS), default=["pydoc"],
                   help="held-out text: " + "; ".join(f"{k}: {v}" for k, v in DOMAINS.items()) + " (default pydoc)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: beside the model, else SmolLM2's)")
    p.add_argument("--seed", type=int, default=0, help="passkey keys and depths (default 0)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default 2)")
    p.add_argument("--json", type=Path, help="measurements are kept here; a rerun measures only what is missing")
    p.add_argument("--stats", type=Path, help="the first model's statistics: also prune it by --methods at --densities")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="with --stats (default: all)")
    p.add_argument("--densities", type=float, nargs="+", default=[0.15, 0.25, 0.35],
                   help="with --stats: kept shares (default 0.15 0.25 0.35)")
    p.add_argument("--block-size", type=int, default=64, help="with --stats (default 64)")
    p.add_argument("--sink", type=int, default=64, help="with --stats: sink tokens of streaming and duo (default 64)")
    p.add_argument("--full-heads", type=int,
                   help="with --stats: select's full heads per site (default: prune's auto, labelled plain select)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        rows = run(args)
    except OnnxpruneError as e:
        print(f"eval_lm: error: {e}", file=sys.stderr)
        return 2
    share = lambda v: "1.00" if v is None else f"{v:.3f}"  # noqa: E731 - a dense model keeps every block
    scorings = args.passkey if args.trials else []
    print(table(HEADERS + tuple(f"passkey ({s})" for s in scorings),
                [(r["model"], share(r.get("kept")), share(r.get("kept_at_length")), r["domain"], r["length"], r["ppl"],
                  r["ppl_last_quarter"], *(f"{r['passkey'][s][0]}/{r['passkey'][s][1]}" for s in scorings))
                 for r in rows]))
    return 0


def run(args) -> list[dict]:
    """The summary rows (``summary``) of every model × length × domain, measuring what is missing."""
    store = Store(args.json)
    models = parse_models(args.models)
    if args.stats:
        models += pruned_models(models[0][1], args)
    with_past_sha = read_info(args.with_past).sha256 if args.with_past else None
    rows = []
    for label, path, method, density in models:
        # a pruned model (under PRUNED_DIR) reads the tokenizer of the model it was pruned from
        tokenizer = args.tokenizer or tokenizer_dir(path if method == "dense" else models[0][1])
        subject = Subject(label, path, method, density, args, with_past_sha, tokenizer)
        rows += [summary(subject, domain, length, store) for length in args.lengths for domain in args.domains]
    return rows


if __name__ == "__main__":
    sys.exit(main())
