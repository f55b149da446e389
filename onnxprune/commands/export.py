"""``onnxprune export``."""

from __future__ import annotations

import argparse

from onnxprune.commands.arguments import positive
from onnxprune.commands.base import ExitStatus, Log, Verb
from onnxprune.export import ATTENTION_IMPLEMENTATIONS, export
from onnxprune.export_tasks import TASKS

EXAMPLES = """\
  onnxprune export path/to/bert-dir -o model.onnx --seq-len 128
  onnxprune export path/to/llama-dir -o llama/        # model.onnx + config + tokenizer, with the KV cache
  onnxprune export path/to/llama-dir -o llama.onnx --task text-generation
  onnxprune export mypkg.models:build -o model.onnx --attn sdpa --opset 23"""


def task(value: str) -> str:
    """``--task``: the error names the tasks (argparse's own lists them on a line that wraps)."""
    if value not in TASKS:
        raise argparse.ArgumentTypeError(f"unknown task {value!r}; the tasks are {', '.join(TASKS)}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="transformers model directory, or module:function returning (nn.Module, inputs dict)")
    p.add_argument("-o", "--output", required=True,
                   help="output .onnx, or a model directory (a path ending in / or an existing directory): "
                        "model.onnx with the source's config, generation config and tokenizer files")
    p.add_argument("--task", type=task, default=None, metavar="TASK",
                   help=f"what the file computes: {', '.join(TASKS)} (default: text-generation-with-past "
                        "for a causal LM directory, else feature-extraction)")
    p.add_argument("--seq-len", type=positive, default=128, help="example sequence length for tracing (default 128)")
    p.add_argument("--opset", type=positive, default=20, help="ONNX opset (default 20)")
    p.add_argument("--attn", choices=ATTENTION_IMPLEMENTATIONS, default="eager",
                   help="attention implementation (default eager)")


def run(args: argparse.Namespace, log: Log) -> int:
    r = export(args.model, args.output, seq_len=args.seq_len, opset=args.opset, attn=args.attn, log=log,
               task=args.task)
    inputs = r.input_names if len(r.input_names) <= 4 else [*r.input_names[:3], f"... ({len(r.input_names)} in all)"]
    checks = ", ".join(f"{name} {diff:.2e}" for name, diff in r.checks.items())
    print(f"wrote {r.path} ({r.task}; {r.exporter} exporter, opset {r.opset}, inputs {inputs}); "
          f"max |ONNX - PyTorch|: {checks}")
    return ExitStatus.SUCCESS


VERB = Verb("export", "Export a transformers model directory (or module:function) to ONNX, checked against PyTorch.",
            EXAMPLES, add_arguments, run)
