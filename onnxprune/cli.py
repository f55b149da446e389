"""``onnxprune <verb>``: one clear line and a non-zero exit on bad input (``--debug`` for the
traceback); every output is written atomically. Each verb lives in ``onnxprune.commands``."""

from __future__ import annotations

import argparse
import sys
import textwrap

from onnxprune import __version__
from onnxprune.commands import VERBS
from onnxprune.commands.arguments import common_options
from onnxprune.commands.base import EXIT_CODES, ExitStatus, step_log
from onnxprune.errors import OnnxpruneError

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxprune",
        description="Learn data-informed block-sparse attention masks (AP) and ship them as portable ONNX files.",
        epilog=PIPELINE + EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"onnxprune {__version__}")
    common = common_options()
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb in VERBS:
        p = subparsers.add_parser(
            verb.name, parents=[common], help=verb.help,
            description=verb.help + ("\n\n" + verb.details if verb.details else ""),
            epilog=f"examples:\n{verb.examples}\n\n{EXIT_CODES}", formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        verb.add_arguments(p)
        p.set_defaults(func=verb.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args, step_log(args))
    except OnnxpruneError as e:
        if args.debug:
            raise
        print(f"onnxprune {args.verb}: error: {e}", file=sys.stderr)
        return ExitStatus.BAD_INPUT
    except KeyboardInterrupt:
        print("onnxprune: interrupted", file=sys.stderr)
        return ExitStatus.INTERRUPTED
    except Exception as e:  # noqa: BLE001 - one line for users; --debug shows the bug's traceback
        if args.debug:
            raise
        message = textwrap.shorten(str(e).replace("\n", " "), 300)
        print(f"onnxprune {args.verb}: error: {type(e).__name__}: {message} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return ExitStatus.BUG


if __name__ == "__main__":
    sys.exit(main())
