"""``onnxprune stats merge`` and ``onnxprune stats show``: statistics files computed anywhere."""

from __future__ import annotations

import argparse

from onnxprune.commands.arguments import common_options
from onnxprune.commands.base import ExitStatus, Log, Verb, print_json
from onnxprune.stats import Stats, merge_all

EXAMPLES = """\
  onnxprune stats merge part-0.safetensors part-1.safetensors -o stats.safetensors
  onnxprune stats show stats.safetensors
  onnxprune stats show stats.safetensors --json"""

DETAILS = """\
merge adds statistics of the same model (by sha256), granularity and attention sites, computed on
any machines; those of different --max-length merge exactly (the shorter has zero counts beyond
its length). Anything else is refused and nothing is written."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    merge = actions.add_parser("merge", parents=[common_options()], help="add statistics files into one")
    merge.add_argument("inputs", nargs="+", metavar="STATS", help="statistics files (.safetensors)")
    merge.add_argument("-o", "--output", required=True, help="merged statistics (.safetensors)")
    show = actions.add_parser("show", parents=[common_options()], help="what a statistics file holds")
    show.add_argument("stats", help="statistics file (.safetensors)")
    show.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def run(args: argparse.Namespace, log: Log) -> int:
    if args.action == "merge":
        merged = merge_all(Stats.load(path) for path in args.inputs)
        merged.save(args.output)
        print(f"wrote {args.output}: {len(args.inputs)} files, {merged.num_samples} inputs, "
              f"{merged.tokens} tokens, max length {merged.max_length}")
        return ExitStatus.SUCCESS
    summary = Stats.load(args.stats).summary()
    if args.json:
        print_json(summary)
        return ExitStatus.SUCCESS
    lengths = summary["lengths"]
    print(f"model sha256   {summary['model_sha256']}")
    print(f"granularity    {summary['granularity']}")
    print(f"max length     {summary['max_length']}")
    print(f"inputs         {summary['num_samples']} ({summary['tokens']} tokens"
          + (f", lengths {lengths['min']}–{lengths['max']}, mean {lengths['mean']:.1f})" if lengths else ")"))
    print(f"in memory      {summary['bytes'] / 2**20:.1f} MiB")
    print(f"sites          {len(summary['sites'])}")
    for site in summary["sites"]:
        cells = "×".join(map(str, site["cells"]))
        print(f"  {site['name']}: {site['heads']} heads, {cells} cells, {site['pairs']:.0f} pairs")
    return ExitStatus.SUCCESS


VERB = Verb("stats", "Merge statistics files computed anywhere, or show what one holds.", EXAMPLES, add_arguments,
            run, DETAILS)
