"""Argument types and the option groups several verbs share."""

from __future__ import annotations

import argparse

from onnxprune.data import SHUFFLE_BUFFER
from onnxprune.runtime import LIBRARY_CHOICES


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def kept_share(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def tolerance(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def providers(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one execution provider")
    return names


def common_options() -> argparse.ArgumentParser:
    """The options every verb takes (a parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars, step messages or warnings")
    common.add_argument("--threads", type=positive, help="ONNX Runtime intra-op threads (default: all cores)")
    return common


def add_data_arguments(p: argparse.ArgumentParser, required: bool = True, streaming: bool = False) -> None:
    """Model inputs from a file; read them with ``load_inputs``. ``streaming``: the verb reads
    text as a stream (``--limit`` counts texts before chunking; ``--shuffle-seed``)."""
    help_text = ("text: a text file (one example per line), .jsonl, .parquet, or a datasets save_to_disk folder; "
                 "or an .npz of model inputs")
    if not required:
        help_text += "; without it, random inputs of --seq-len (--limit of them, default 8)"
    p.add_argument("--data", required=required, help=help_text)
    p.add_argument("--text-field", default="text", help="the text's field or column in .jsonl, .parquet or a "
                                                        "datasets folder (default text)")
    p.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (for text)")
    p.add_argument("--max-length", type=positive, default=256, help="tokens per input (default 256)")
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=positive, default=8,
                   help="inputs per run (default 8)")
    if streaming:
        p.add_argument("--limit", type=positive,
                       help="read at most this many examples (texts before long ones are chunked, or .npz rows)")
        p.add_argument("--shuffle-seed", type=int, metavar="S",
                       help=f"read in a random order: a streaming shuffle through a buffer of {SHUFFLE_BUFFER:,} "
                            "examples, seeded with S")
    else:
        p.add_argument("--limit", type=positive, help="use at most this many inputs")


def load_inputs(args: argparse.Namespace, info):
    """The ``Dataset`` that ``add_data_arguments``' options name, for the model ``info`` describes."""
    from onnxprune.data import load_dataset
    from onnxprune.lm_feeds import data_input_names

    return load_dataset(args.data, data_input_names(info), args.tokenizer, args.max_length, limit=args.limit,
                        text_field=args.text_field)


def add_runtime_arguments(p: argparse.ArgumentParser, first: str, second: str) -> None:
    """Execution providers, which models get onnxprune's library, and ``--json``; ``first`` and
    ``second`` name the first two models in the help."""
    p.add_argument("--providers", type=providers, default=None, metavar="EP[,EP...]",
                   help="ONNX Runtime execution providers in order of preference (default CPUExecutionProvider)")
    p.add_argument("--library", choices=LIBRARY_CHOICES, default="auto",
                   help="which model runs with onnxprune's custom-op library: auto (those with onnxprune ops, "
                        f"default), none (pruned models run their op's function body), a ({first} only), "
                        f"b ({second} only)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout (schema in docs/CLI.md)")
