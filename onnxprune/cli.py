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
    "export": "onnxprune export path/to/bert-dir -o model.onnx --seq-len 128",
    "calibrate": "onnxprune calibrate model.onnx --data lines.txt --tokenizer path/to/bert-dir -o stats.safetensors",
    "prune": "onnxprune prune model.onnx --stats stats.safetensors --sparsity 0.9 --block-size 16 -o pruned.onnx",
    "inspect": "onnxprune inspect pruned.onnx --json",
    "verify": "onnxprune verify model.onnx pruned.onnx --data lines.txt --tokenizer path/to/bert-dir",
    "bench": "onnxprune bench model.onnx pruned.onnx --seq-len 256 --threads 2",
    "demo": "onnxprune demo",
    "recover": "onnxprune recover path/to/bert-dir pruned.onnx --data lines.txt --time-budget 30 -o recovered.onnx\n"
               "  (stop any time: rerunning the same command resumes from recovered.onnx.ckpt)",
}


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


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="text file (one example per line) or .npz of model inputs")
    p.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (for a text file)")
    p.add_argument("--max-length", type=_positive, default=256, help="tokens per input (default 256)")
    p.add_argument("--batch-size", type=_positive, default=8, help="inputs per run (default 8)")
    p.add_argument("--limit", type=_positive, help="use at most this many inputs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxprune",
        description="Learn data-informed block-sparse attention masks (AP) and ship them as portable ONNX files.",
        epilog="Pipeline: export → calibrate → prune → verify / bench. `onnxprune VERB --help` for each verb.",
    )
    parser.add_argument("--version", action="version", version=f"onnxprune {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars or step messages")
    common.add_argument("--threads", type=_positive, help="ONNX Runtime intra-op threads (default: all cores)")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, help_text: str) -> argparse.ArgumentParser:
        return verbs.add_parser(
            name, parents=[common], help=help_text, description=help_text,
            epilog=f"example:\n  {EXAMPLES[name]}", formatter_class=argparse.RawDescriptionHelpFormatter,
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

    p = verb("inspect", "Show ops, attention sites (and why others did not match), layouts and metadata.")
    p.add_argument("model", help="any .onnx")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--heatmaps", metavar="DIR", help="write one PNG per pruned site's layout here")

    p = verb("verify", "Compare two models' outputs on data (an element fails only when over --atol and --rtol).")
    p.add_argument("a", help="reference .onnx (dense)")
    p.add_argument("b", help="candidate .onnx (pruned)")
    _add_data_args(p)
    p.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance (default 1e-4)")
    p.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance (default 1e-3)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = verb("bench", "Latency of one or two models in ONNX Runtime, side by side in one run.")
    p.add_argument("models", nargs="+", help="one or more .onnx")
    p.add_argument("--seq-len", type=_positive, default=256, help="tokens (default 256)")
    p.add_argument("--batch", type=_positive, default=1, help="batch size (default 1)")
    p.add_argument("--repeats", type=_positive, default=20, help="timed runs per model (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per model (default 3)")

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
        checkpoint=args.checkpoint or f"{args.output}.ckpt",
    )
    report = recover(args.model, args.pruned, examples, args.output, config, threads=args.threads, log=log,
                     show_progress=show)
    if args.report:
        with atomic_path(args.report) as tmp:
            tmp.write_text(json.dumps(report.to_json(), indent=2))
    first, last = np.mean(report.losses[:10]), np.mean(report.losses[-10:])
    print(f"wrote {args.output}: {report.steps} steps ({report.stopped_by}), {report.elapsed_s:.0f} s, "
          f"loss {first:.4f} → {last:.4f}; recovered ONNX vs PyTorch max |diff| {report.parity_after:.1e}")


def _dataset(args, model_path):
    from onnxprune.data import load_dataset
    from onnxprune.model_io import input_names

    return load_dataset(args.data, input_names(model_path), args.tokenizer, args.max_length, limit=args.limit)


def _log(args):
    return (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, **k, file=sys.stderr))


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

        stats = Stats.load(args.stats)
        model, report = prune(args.model, stats, args.sparsity, args.block_size, args.scope,
                              keep_diagonal=not args.no_keep_diagonal, stats_sha256=file_sha256(args.stats))
        save_model(model, args.output)
        if args.report:
            with atomic_path(args.report) as tmp:
                tmp.write_text(json.dumps(report.to_json(), indent=2))
        print(f"{'site':40} {'form':16} {'causal':>6} {'density':>8} {'retained':>9}")
        for s in report.sites:
            print(f"{s.name[:40]:40} {s.form:16} {str(s.causal):>6} {s.density:>8.3f} {s.retained_mass:>9.3f}")
        print(f"wrote {args.output}: p = {args.sparsity}, block {args.block_size}, scope {args.scope}, "
              f"effective sparsity on the calibration inputs {report.effective_sparsity:.3f}")
    elif args.verb == "inspect":
        from onnxprune.inspect_model import format_report, inspect, write_heatmaps

        info = inspect(args.model)
        if args.heatmaps:
            info["heatmaps"] = write_heatmaps(args.model, args.heatmaps)
        print(json.dumps(info, indent=2) if args.json else format_report(info))
    elif args.verb == "verify":
        from onnxprune.verify import compare_outputs

        results = compare_outputs(args.a, args.b, _dataset(args, args.b), args.atol, args.rtol,
                                  args.batch_size, args.threads, show)
        if args.json:
            print(json.dumps([dict(r.__dict__, passed=r.passed) for r in results], indent=2))
        else:
            print(f"{'output':24} {'max abs':>10} {'mean abs':>10} {'max rel':>10} {'cos mean':>9} {'cos min':>9}  result")
            for r in results:
                print(f"{r.name[:24]:24} {r.max_abs:>10.3e} {r.mean_abs:>10.3e} {r.max_rel:>10.3e} "
                      f"{r.cosine_mean:>9.5f} {r.cosine_min:>9.5f}  "
                      + ("PASS" if r.passed else f"FAIL ({r.failed_elements}/{r.elements} elements over atol {args.atol} and rtol {args.rtol})"))
        return 0 if all(r.passed for r in results) else 1
    elif args.verb == "bench":
        from onnxprune.bench import bench

        timings = bench(args.models, args.seq_len, args.batch, args.threads, args.warmup, args.repeats, show)
        base = timings[0].median_ms
        print(f"batch {args.batch}, {args.seq_len} tokens, threads {args.threads or 'default'}, {args.repeats} interleaved runs")
        print(f"{'model':40} {'median ms':>10} {'p10':>8} {'p90':>8} {'vs first':>9}")
        for t in timings:
            print(f"{t.model[-40:]:40} {t.median_ms:>10.2f} {t.p10_ms:>8.2f} {t.p90_ms:>8.2f} {base / t.median_ms:>8.2f}×")
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
        return 1


if __name__ == "__main__":
    sys.exit(main())
