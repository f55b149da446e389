"""What every verb shares: its description (``Verb``), the exit statuses, and how it talks to the
user (step messages on stderr, results and JSON on stdout)."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import sys
from collections.abc import Callable

#: ``print``-like; step messages and warnings, silenced by ``--quiet``.
Log = Callable[..., None]


class ExitStatus(enum.IntEnum):
    SUCCESS = 0
    CHECK_FAILED = 1
    BAD_INPUT = 2
    BUG = 3
    INTERRUPTED = 130  # the shell's convention for SIGINT


EXIT_CODES = f"""\
exit status:
  {ExitStatus.SUCCESS:d}  success
  {ExitStatus.CHECK_FAILED:d}  verify: some output is outside the tolerances
  {ExitStatus.BAD_INPUT:d}  bad input, usage, or ONNX Runtime refused the model or its inputs (one line on stderr)
  {ExitStatus.BUG:d}  an unexpected error (a bug: rerun with --debug for the traceback)"""


@dataclasses.dataclass(frozen=True)
class Verb:
    """One ``onnxprune VERB``: its help, examples, arguments and handler.

    ``run(args, log)`` returns the exit status; an ``OnnxpruneError`` it raises becomes one line
    on stderr and status 2 (``onnxprune.cli.main``).
    """

    name: str
    help: str
    examples: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Log], int]
    details: str = ""  # paragraphs under the one-line help in ``VERB --help``


def step_log(args: argparse.Namespace) -> Log:
    if args.quiet:
        return lambda *a, **k: None
    return lambda *a, **k: print(*a, **k, file=sys.stderr)


def print_json(value) -> None:
    print(json.dumps(value, indent=2, allow_nan=True))
