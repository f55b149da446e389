"""``onnxprune prune``."""

from __future__ import annotations

import argparse
import json

from onnxprune.commands.arguments import kept_share, non_negative, probability
from onnxprune.commands.base import ExitStatus, Log, Verb
from onnxprune.errors import OnnxpruneError
from onnxprune.layouts import SCOPES
from onnxprune.model_io import atomic_path, file_sha256, save_model
from onnxprune.op_schema import BLOCK_SIZES
from onnxprune.prune import prune
from onnxprune.selection import METHODS, PATTERNS
from onnxprune.stats import Stats
from onnxprune.tables import table

EXAMPLES = """\
  onnxprune prune model.onnx --stats stats.safetensors --density 0.25 --block-size 64 -o pruned.onnx
  onnxprune prune model.onnx --stats stats.safetensors --method ap -p 0.5 --scope head -o ap.onnx --report report.json
  onnxprune prune model.onnx --stats stats.safetensors --pattern streaming --sink 64 --window 64 -o streaming.onnx
  onnxprune prune model.onnx --stats stats.safetensors --pattern duo --density 0.35 -o duo.onnx"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="dense .onnx (the one calibrated)")
    p.add_argument("--stats", required=True, help="statistics from `onnxprune calibrate`")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--density", "-d", type=kept_share,
                        help="kept share of the blocks dense attention computes on the calibration inputs, in (0, 1]")
    budget.add_argument("--sparsity", "-p", type=probability, help="the same as --density 1-p, p in [0, 1)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--method", choices=METHODS,
                     help="select: per-head sinks/band/full patterns under the budget (default); ap: per-scope AP "
                          "thresholds (on encoders with short inputs it kept more quality; docs/SELECTION.md)")
    how.add_argument("--pattern", choices=PATTERNS,
                     help="a baseline instead of --method: streaming (--sink, --window on every head) or duo "
                          "(full heads chosen from the statistics, the others streaming)")
    p.add_argument("--sink", type=non_negative, default=64, help="pattern sink tokens, rounded up to blocks (default 64)")
    p.add_argument("--window", type=non_negative, default=64,
                   help="pattern tokens before the diagonal block, rounded up to blocks (default 64)")
    p.add_argument("--full-heads", type=non_negative,
                   help="select: heads per site kept full first, those with the most mass beyond one sink block and "
                        "the diagonal (retrieval far back needs some). Default: one where the density still leaves "
                        "every other head a sink block, the diagonal and the block before it, else none")
    p.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=16, help="block side (default 16)")
    p.add_argument("--scope", choices=SCOPES,
                   help="where the budget applies: global (one for all sites; select's default), layer (each site "
                        "its own; AP's default), head (AP only)")
    p.add_argument("--no-keep-diagonal", action="store_true", help="AP: allow pruning diagonal blocks")
    p.add_argument("-o", "--output", required=True, help="output pruned .onnx")
    p.add_argument("--report", help="also write the prune report as JSON here")


def run(args: argparse.Namespace, log: Log) -> int:
    density = 1.0 - args.sparsity if args.sparsity is not None else args.density
    if density is None and args.pattern != "streaming":
        raise OnnxpruneError("give --density (or --sparsity)")
    if args.pattern == "streaming" and density is not None:
        raise OnnxpruneError("--pattern streaming is what --sink and --window make it; drop --density/--sparsity")
    method = None if args.pattern else (args.method or "select")
    stats = Stats.load(args.stats)
    model, report = prune(args.model, stats, block_size=args.block_size, scope=args.scope,
                          keep_diagonal=not args.no_keep_diagonal, stats_sha256=file_sha256(args.stats),
                          density=density, method=method, pattern=args.pattern,
                          sink_tokens=args.sink, window_tokens=args.window, full_heads=args.full_heads)
    save_model(model, args.output)
    if args.report:
        with atomic_path(args.report) as tmp:
            tmp.write_text(json.dumps(report.to_json(), indent=2))
    kept = 1.0 - report.effective_sparsity
    if density is not None and kept > density + 0.005:
        # Asking beyond the cap is not an error (the layout is still the sparsest the method allows),
        # but a user comparing densities should know that two of them gave the same layout.
        asked = (f"p = {args.sparsity} asked, {1.0 - kept:.3f} pruned" if args.sparsity is not None
                 else f"density {density:g} asked, {kept:.3f} kept")
        log(f"onnxprune prune: warning: {asked}: diagonal blocks (unless --method ap --no-keep-diagonal), "
            "blocks no calibration input reached and duo's streaming heads are always computed")
    print(table(("site", "form", "causal", "density", "retained"),
                [(s.name, s.form, s.causal, f"{s.density:.3f}", f"{s.retained_mass:.3f}") for s in report.sites]))
    how = f"--pattern {args.pattern}" if args.pattern else f"--method {report.method}"
    print(f"wrote {args.output}: {how}, block {args.block_size}, kept share (density) of the blocks dense attention "
          f"computes on the calibration inputs {kept:.3f}")
    return ExitStatus.SUCCESS


VERB = Verb("prune", "Learn block layouts (per-head selection, AP or a baseline pattern) and rewrite every "
            "attention site into onnxprune.BlockSparseAttention.", EXAMPLES, add_arguments, run)
