"""``onnxprune <verb>``: one clear line and a non-zero exit on bad input (``--debug`` for the
traceback); every output is written atomically."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from onnxprune import __version__
from onnxprune.errors import OnnxpruneError

EXAMPLES = {
    "export": """\
  onnxprune export path/to/bert-dir -o model.onnx --seq-len 128
  onnxprune export mypkg.models:build -o model.onnx --attn sdpa --opset 23""",
    "calibrate": """\
  onnxprune calibrate model.onnx --data lines.txt --tokenizer path/to/bert-dir -o stats.safetensors
  onnxprune calibrate model.onnx --data inputs.npz --max-length 512 -o stats.safetensors""",
    "prune": """\
  onnxprune prune model.onnx --stats stats.safetensors --sparsity 0.9 --block-size 16 -o pruned.onnx
  onnxprune prune model.onnx --stats stats.safetensors -p 0.5 --scope head -o pruned.onnx --report report.json""",
    "inspect": """\
  onnxprune inspect model.onnx                       # any ONNX file: ops, weights, attention sites
  onnxprune inspect pruned.onnx --json | jq '.pruned_sites[] | {site, density, retained_mass}'
  onnxprune inspect pruned.onnx --stats stats.safetensors --heatmaps maps/   # layout + attention PNGs
  onnxprune inspect big.onnx                         # external data is sized, never loaded""",
    "verify": """\
  onnxprune verify model.onnx pruned.onnx --data lines.txt --tokenizer path/to/bert-dir
  onnxprune verify model.onnx pruned.onnx --data inputs.npz --atol 1e-3 --rtol 1e-2 --json
  onnxprune verify model.onnx pruned.onnx --seq-len 128 --limit 16   # random inputs, no data file
  onnxprune verify pruned.onnx pruned.onnx --library b               # function body (A) vs kernel (B)""",
    "bench": """\
  onnxprune bench model.onnx pruned.onnx --seq-len 256 --threads 2
  onnxprune bench model.onnx pruned.onnx --seq-len 1024 --batch 4 --warmup 5 --repeat 50 --json
  onnxprune bench pruned.onnx pruned.onnx --library b                # function body vs kernel""",
    "demo": """\
  onnxprune demo
  onnxprune demo --sparsity 0.5 0.8 0.9 --block-size 32 --out out/demo32""",
    "recover": """\
  onnxprune recover path/to/bert-dir pruned.onnx --data lines.txt --time-budget 30 -o recovered.onnx
  (stop any time: rerunning the same command resumes from recovered.onnx.ckpt)""",
}

EXIT_CODES = """\
exit status:
  0  success
  1  verify: some output is outside the tolerances
  2  bad input, usage, or ONNX Runtime refused the model or its inputs (one line on stderr)
  3  an unexpected error (a bug: rerun with --debug for the traceback)"""

PIPELINE = """\
pipeline:
  onnxprune export path/to/bert-dir -o model.onnx
  onnxprune calibrate model.onnx --data lines.txt --tokenizer path/to/bert-dir -o stats.safetensors
  onnxprune prune model.onnx --stats stats.safetensors --sparsity 0.9 -o pruned.onnx
  onnxprune inspect pruned.onnx --stats stats.safetensors --heatmaps maps/
  onnxprune verify model.onnx pruned.onnx --data lines.txt --tokenizer path/to/bert-dir
  onnxprune bench model.onnx pruned.onnx --seq-len 256

`onnxprune VERB --help` explains each verb with examples.

"""


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _tolerance(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _providers(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one execution provider")
    return names


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    help_text = "text file (one example per line) or .npz of model inputs"
    if not required:
        help_text += "; without it, random inputs of --seq-len (--limit of them, default 8)"
    p.add_argument("--data", required=required, help=help_text)
    p.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (for a text file)")
    p.add_argument("--max-length", type=_positive, default=256, help="tokens per input (default 256)")
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=_positive, default=8,
                   help="inputs per run (default 8)")
    p.add_argument("--limit", type=_positive, help="use at most this many inputs")


def _add_runtime_args(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument("--providers", type=_providers, default=None, metavar="EP[,EP...]",
                   help="ONNX Runtime execution providers in order of preference (default CPUExecutionProvider)")
    first, second = ("A", "B") if verb == "verify" else ("the first model", "the second")
    p.add_argument("--library", choices=("auto", "none", "a", "b"), default="auto",
                   help="which model runs with onnxprune's custom-op library: auto (those with onnxprune ops, "
                        f"default), none (pruned models run their op's function body), a ({first} only), "
                        f"b ({second} only)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout (schema in docs/CLI.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxprune",
        description="Learn data-informed block-sparse attention masks (AP) and ship them as portable ONNX files.",
        epilog=PIPELINE + EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"onnxprune {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars, step messages or warnings")
    common.add_argument("--threads", type=_positive, help="ONNX Runtime intra-op threads (default: all cores)")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, help_text: str, details: str = "") -> argparse.ArgumentParser:
        return verbs.add_parser(
            name, parents=[common], help=help_text, description=help_text + ("\n\n" + details if details else ""),
            epilog=f"examples:\n{EXAMPLES[name]}\n\n{EXIT_CODES}", formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = verb("export", "Export a transformers model directory (or module:function) to ONNX, checked against PyTorch.")
    p.add_argument("model", help="transformers model directory, or module:function returning (nn.Module, inputs dict)")
    p.add_argument("-o", "--output", required=True, help="output .onnx")
    p.add_argument("--seq-len", type=_positive, default=128, help="example sequence length for tracing (default 128)")
    p.add_argument("--opset", type=_positive, default=20, help="ONNX opset (default 20)")
    p.add_argument("--attn", choices=("eager", "sdpa"), default="eager", help="attention implementation (default eager)")

    p = verb("calibrate", "Average each attention site's probabilities over data (ONNX Runtime, no PyTorch).")
    p.add_argument("model", help="dense .onnx")
    _add_data_args(p)
    p.add_argument("--granularity", type=_positive, default=16, help="statistics cell size in positions (default 16)")
    p.add_argument("-o", "--output", required=True, help="output statistics (.safetensors)")

    p = verb("prune", "Learn block layouts (AP) and rewrite every attention site into onnxprune.BlockSparseAttention.")
    p.add_argument("model", help="dense .onnx (the one calibrated)")
    p.add_argument("--stats", required=True, help="statistics from `onnxprune calibrate`")
    p.add_argument("--sparsity", "-p", type=_probability, required=True, help="fraction of blocks to prune, in [0, 1)")
    p.add_argument("--block-size", type=int, choices=(16, 32, 64, 128), default=16, help="block side (default 16)")
    p.add_argument("--scope", choices=("layer", "head", "global"), default="layer", help="threshold scope (default layer)")
    p.add_argument("--no-keep-diagonal", action="store_true", help="allow pruning diagonal blocks")
    p.add_argument("-o", "--output", required=True, help="output pruned .onnx")
    p.add_argument("--report", help="also write the prune report as JSON here")

    p = verb(
        "inspect", "Show what an ONNX file holds: I/O, ops, weights, attention sites, layouts, pruning metadata.",
        "Works on any ONNX file and never loads external weights (their sizes come from the file's\n"
        "external-data entries). Each attention site is listed with its form, heads, head size, scale,\n"
        "mask and causality; each Softmax/Attention that is not a site, with the reason. A pruned\n"
        "model's sites show their block layout, density and retained attention mass.",
    )
    p.add_argument("model", help="any .onnx")
    p.add_argument("--json", action="store_true", help="machine-readable output (schema onnxprune.inspect/1, docs/CLI.md)")
    p.add_argument("--heatmaps", metavar="DIR", help="write PNGs here: each pruned site's layout and, with --stats, "
                                                     "each site's average attention (pruned blocks dimmed)")
    p.add_argument("--stats", metavar="FILE", help="calibration statistics: average attention per site for --heatmaps, "
                                                   "and the mass each pruned layout keeps under them")

    p = verb(
        "verify", "Compare two models' outputs on the same inputs; exit 1 when B is outside the tolerances of A.",
        "Per output: max and mean absolute and relative error (relative to A, the reference) and the\n"
        "cosine similarity per example. An element fails only when it exceeds both --atol and\n"
        "--rtol·|A| (Polygraphy's elementwise rule), or when it is NaN, or infinite in one model only.\n"
        "Padded positions (attention_mask = 0) are left out.",
    )
    p.add_argument("a", help="reference .onnx (dense)")
    p.add_argument("b", help="candidate .onnx (pruned)")
    _add_data_args(p, required=False)
    p.add_argument("--seq-len", type=_positive, default=128, help="positions of the random inputs without --data (default 128)")
    p.add_argument("--atol", type=_tolerance, default=1e-4, help="absolute tolerance (default 1e-4)")
    p.add_argument("--rtol", type=_tolerance, default=1e-3, help="relative tolerance (default 1e-3)")
    _add_runtime_args(p, "verify")

    p = verb(
        "bench", "Latency of one or more models in ONNX Runtime, side by side in one run, with ratios.",
        "Runs are interleaved (A, B, A, B, ...) on the same random inputs, after --warmup untimed runs\n"
        "each; the table gives the median, the spread (p10-p90 and the interquartile range) and each\n"
        "model's speed-up over the first.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="one or more .onnx (the first is the baseline)")
    p.add_argument("--seq-len", type=_positive, default=256, help="tokens (default 256)")
    p.add_argument("--batch", "--batch-size", dest="batch", type=_positive, default=1, help="batch size (default 1)")
    p.add_argument("--repeat", "--repeats", dest="repeat", type=_positive, default=20,
                   help="timed runs per model (default 20)")
    p.add_argument("--warmup", type=_non_negative, default=3, help="untimed runs per model first (default 3)")
    _add_runtime_args(p, "bench")

    p = verb("demo", "The whole pipeline on all-MiniLM-L6-v2 and standard-library docstrings.")
    p.add_argument("--out", default="out/demo", help="output directory (default out/demo)")
    p.add_argument("--sparsity", type=_probability, nargs="+", default=[0.5, 0.9], help="sparsities (default 0.5 0.9)")
    p.add_argument("--block-size", type=int, choices=(16, 32, 64, 128), default=16)
    p.add_argument("--calibration-examples", type=_positive, default=256)
    p.add_argument("--evaluation-examples", type=_positive, default=200)
    _add_recover_parser(verb)
    return parser


def _add_recover_parser(verb) -> None:
    p = verb("recover", "Fine-tune the PyTorch model under a pruned model's layouts to reproduce the dense model "
                        "(self-distillation on unlabelled text), then export and prune it again with the same layouts.")
    p.add_argument("model", help="the transformers model directory that was exported and pruned")
    p.add_argument("pruned", help="the pruned .onnx whose layouts to apply")
    p.add_argument("--data", required=True, help="unlabelled text file (one example per line) or .npz of model inputs")
    p.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the model directory)")
    p.add_argument("--max-length", type=_positive, default=256, help="tokens per input (default 256)")
    p.add_argument("--limit", type=_positive, help="use at most this many inputs")
    p.add_argument("--steps", type=_positive, default=300, help="optimizer steps (default 300)")
    p.add_argument("--batch-size", type=_positive, default=16, help="inputs per step (default 16)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate (default 1e-4)")
    p.add_argument("--objective", choices=("embedding", "hidden", "hidden+attention"), default="hidden",
                   help="what the student matches: pooled embeddings, + every layer's hidden states (default), "
                        "+ attention outputs")
    p.add_argument("--time-budget", type=float, metavar="MIN", help="stop training after this many minutes")
    p.add_argument("--checkpoint", help="resumable checkpoint (default OUTPUT.ckpt; resumed when it exists)")
    p.add_argument("--seed", type=int, default=0, help="data order seed (default 0)")
    p.add_argument("--validation-examples", type=_non_negative, default=128, metavar="N",
                   help="inputs held out of training; the state with the lowest loss on them is kept, the "
                        "untrained one included (default 128, at most a tenth of the data; 0: keep the last)")
    p.add_argument("--validate-every", type=_positive, default=100, metavar="STEPS",
                   help="steps between validation passes (default 100)")
    p.add_argument("--patience", type=_positive, metavar="N",
                   help="stop after N validation passes in a row without a better loss (default: never; "
                        "the time budget or the steps end the run)")
    p.add_argument("-o", "--output", required=True, help="output recovered pruned .onnx")
    p.add_argument("--report", help="also write the recover report as JSON here")


def _recover(args, log, show) -> None:
    import numpy as np

    from onnxprune.data import load_dataset
    from onnxprune.model_io import atomic_path, input_names
    from onnxprune.recover import RecoverConfig, recover

    dataset = load_dataset(args.data, input_names(args.pruned), args.tokenizer or args.model, args.max_length,
                           limit=args.limit)
    examples = [e if isinstance(e, np.ndarray) else e["input_ids"][e["attention_mask"] != 0] for e in dataset.examples]
    config = RecoverConfig(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, objective=args.objective,
        time_budget_s=None if args.time_budget is None else args.time_budget * 60, seed=args.seed,
        checkpoint=args.checkpoint or f"{args.output}.ckpt", validation_examples=args.validation_examples,
        validate_every=args.validate_every, patience=args.patience,
    )
    report = recover(args.model, args.pruned, examples, args.output, config, threads=args.threads, log=log,
                     show_progress=show)
    if args.report:
        with atomic_path(args.report) as tmp:
            tmp.write_text(json.dumps(report.to_json(), indent=2))
    first, last = np.mean(report.losses[:10]), np.mean(report.losses[-10:])
    kept = "" if report.best_step == report.steps else f", kept step {report.best_step} (lowest validation loss)"
    print(f"wrote {args.output}: {report.steps} steps ({report.stopped_by}{kept}), {report.elapsed_s:.0f} s, "
          f"loss {first:.4f} → {last:.4f}; recovered ONNX vs PyTorch max |diff| {report.parity_after:.1e}")


def _dataset(args, model_path):
    from onnxprune.data import load_dataset
    from onnxprune.model_io import input_names

    return load_dataset(args.data, input_names(model_path), args.tokenizer, args.max_length, limit=args.limit)


def _log(args):
    return (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, **k, file=sys.stderr))


def _print_json(value) -> None:
    print(json.dumps(value, indent=2, allow_nan=True))


def _inspect(args, log) -> int:
    from onnxprune.inspect_model import inspect
    from onnxprune.inspect_report import format_report

    info = inspect(args.model, stats=args.stats, heatmaps=args.heatmaps)
    if args.heatmaps and not info["heatmaps"]:
        why = ("the statistics name none of its sites" if args.stats
               else "give --stats to draw each site's average attention")
        log(f"onnxprune inspect: warning: no heatmap written to {args.heatmaps}: the model has no pruned sites; {why}")
    if args.json:
        _print_json(info)
    else:
        print(format_report(info))
    return 0


def _verify(args, log) -> int:
    from onnxprune.bench import check_providers
    from onnxprune.synthetic import synthetic_dataset
    from onnxprune.tables import table
    from onnxprune.verify import compare_outputs, library_use

    providers = check_providers(args.providers)
    if args.data:
        dataset, source = _dataset(args, args.b), args.data
    else:
        count = args.limit or 8
        dataset, source = synthetic_dataset(args.b, count, args.seq_len), f"random ({count} x {args.seq_len} positions)"
    results = compare_outputs(args.a, args.b, dataset, args.atol, args.rtol, args.batch_size, args.threads,
                              not args.quiet, providers=providers, library=args.library)
    passed = all(r.passed for r in results)
    if args.json:
        _print_json({
            "schema": "onnxprune.verify/1", "a": args.a, "b": args.b, "data": source, "examples": len(dataset),
            "atol": args.atol, "rtol": args.rtol, "providers": providers,
            "library": {"a": library_use(args.a, args.library, "a"), "b": library_use(args.b, args.library, "b")},
            "passed": passed, "outputs": [r.to_json() for r in results],
        })
    else:
        print(f"A {args.a}\nB {args.b}\n{len(dataset)} inputs from {source}; "
              f"an element fails when |A - B| > {args.atol:g} and > {args.rtol:g}·|A|")
        print(table(
            ("output", "max abs", "mean abs", "max rel", "mean rel", "cos mean", "cos min", "failed", "result"),
            [(r.name, r.max_abs, r.mean_abs, r.max_rel, r.mean_rel, f"{r.cosine_mean:.6f}", f"{r.cosine_min:.6f}",
              f"{r.failed_elements}/{r.elements}", "PASS" if r.passed else "FAIL") for r in results],
        ))
        print("PASSED" if passed else "FAILED: " + ", ".join(r.name for r in results if not r.passed))
    return 0 if passed else 1


def _bench(args, log) -> int:
    from onnxprune.bench import bench
    from onnxprune.tables import table

    timings = bench(args.models, args.seq_len, args.batch, args.threads, args.warmup, args.repeat, not args.quiet,
                    providers=args.providers, library=args.library)
    base = timings[0].median_ms
    if args.json:
        _print_json({
            "schema": "onnxprune.bench/1", "batch": args.batch, "seq_len": args.seq_len, "threads": args.threads,
            "warmup": args.warmup, "repeat": args.repeat,
            "models": [dict(t.to_json(), speedup_vs_first=base / t.median_ms) for t in timings],
        })
        return 0
    print(f"batch {args.batch}, {args.seq_len} positions, threads {args.threads or 'ORT default'}, "
          f"{args.warmup} warm-up + {args.repeat} timed runs per model, interleaved; "
          f"providers {', '.join(timings[0].providers)}")
    print(table(
        ("#", "model", "library", "median ms", "p10", "p90", "IQR", "min", "speed-up"),
        [(i, t.model, t.library, f"{t.median_ms:.3f}", f"{t.p10_ms:.3f}", f"{t.p90_ms:.3f}", f"{t.iqr_ms:.3f}",
          f"{t.min_ms:.3f}", f"{base / t.median_ms:.2f}x") for i, t in enumerate(timings)],
    ))
    return 0


def run(args) -> int:
    log = _log(args)
    show = not args.quiet
    if args.verb == "export":
        from onnxprune.export import export

        r = export(args.model, args.output, seq_len=args.seq_len, opset=args.opset, attn=args.attn, log=log)
        print(f"wrote {r.path} ({r.exporter} exporter, opset {r.opset}, inputs {r.input_names}); "
              f"max |ONNX - PyTorch| = {r.max_abs_diff:.2e}")
    elif args.verb == "calibrate":
        from onnxprune.calibrate import calibrate

        stats = calibrate(args.model, _dataset(args, args.model), granularity=args.granularity,
                          max_length=args.max_length, batch_size=args.batch_size, threads=args.threads,
                          show_progress=show)
        stats.save(args.output)
        print(f"wrote {args.output}: {len(stats.sites)} sites, {stats.num_samples} inputs, granularity {stats.granularity}")
    elif args.verb == "prune":
        from onnxprune.model_io import atomic_path, file_sha256, save_model
        from onnxprune.prune import prune
        from onnxprune.stats import Stats
        from onnxprune.tables import table

        stats = Stats.load(args.stats)
        model, report = prune(args.model, stats, args.sparsity, args.block_size, args.scope,
                              keep_diagonal=not args.no_keep_diagonal, stats_sha256=file_sha256(args.stats))
        save_model(model, args.output)
        if args.report:
            with atomic_path(args.report) as tmp:
                tmp.write_text(json.dumps(report.to_json(), indent=2))
        pruned_fraction = 1.0 - sum(s.density for s in report.sites) / max(len(report.sites), 1)
        if report.sites and pruned_fraction < args.sparsity - 0.005:
            # Asking beyond the cap is not an error (the layout is still the sparsest AP allows),
            # but a user comparing p's should know that two of them gave the same layout.
            log(f"onnxprune prune: warning: p = {args.sparsity} asked, {pruned_fraction:.3f} pruned: diagonal blocks "
                "(unless --no-keep-diagonal) and blocks no calibration input reached are never pruned")
        print(table(("site", "form", "causal", "density", "retained"),
                    [(s.name, s.form, s.causal, f"{s.density:.3f}", f"{s.retained_mass:.3f}") for s in report.sites]))
        print(f"wrote {args.output}: p = {args.sparsity}, block {args.block_size}, scope {args.scope}, "
              f"effective sparsity on the calibration inputs {report.effective_sparsity:.3f}")
    elif args.verb == "inspect":
        return _inspect(args, log)
    elif args.verb == "verify":
        return _verify(args, log)
    elif args.verb == "bench":
        return _bench(args, log)
    elif args.verb == "recover":
        _recover(args, log, show)

    elif args.verb == "demo":
        from onnxprune.demo import run_demo

        run_demo(args.out, tuple(args.sparsity), args.block_size, calibration_examples=args.calibration_examples,
                 evaluation_examples=args.evaluation_examples, threads=args.threads, log=print, show_progress=show)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except OnnxpruneError as e:
        if args.debug:
            raise
        print(f"onnxprune {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnxprune: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for users; --debug shows the bug's traceback
        if args.debug:
            raise
        message = textwrap.shorten(str(e).replace("\n", " "), 300)
        print(f"onnxprune {args.verb}: error: {type(e).__name__}: {message} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
