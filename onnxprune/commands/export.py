"""``onnxprune export``."""

from __future__ import annotations

import argparse

from onnxprune.commands.arguments import positive
from onnxprune.commands.base import ExitStatus, Log, Verb
from onnxprune.export import ATTENTION_IMPLEMENTATIONS, export

EXAMPLES = """\
  onnxprune export path/to/bert-dir -o model.onnx --seq-len 128
  onnxprune export mypkg.models:build -o model.onnx --attn sdpa --opset 23"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="transformers model directory, or module:function returning (nn.Module, inputs dict)")
    p.add_argument("-o", "--output", required=True, help="output .onnx")
    p.add_argument("--seq-len", type=positive, default=128, help="example sequence length for tracing (default 128)")
    p.add_argument("--opset", type=positive, default=20, help="ONNX opset (default 20)")
    p.add_argument("--attn", choices=ATTENTION_IMPLEMENTATIONS, default="eager",
                   help="attention implementation (default eager)")


def run(args: argparse.Namespace, log: Log) -> int:
    r = export(args.model, args.output, seq_len=args.seq_len, opset=args.opset, attn=args.attn, log=log)
    print(f"wrote {r.path} ({r.exporter} exporter, opset {r.opset}, inputs {r.input_names}); "
          f"max |ONNX - PyTorch| = {r.max_abs_diff:.2e}")
    return ExitStatus.SUCCESS


VERB = Verb("export", "Export a transformers model directory (or module:function) to ONNX, checked against PyTorch.",
            EXAMPLES, add_arguments, run)
