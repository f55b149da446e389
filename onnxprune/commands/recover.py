"""``onnxprune recover``."""

from __future__ import annotations

import argparse
import json

import numpy as np

from onnxprune.commands.arguments import non_negative, positive
from onnxprune.commands.base import ExitStatus, Log, Verb
from onnxprune.data import load_dataset
from onnxprune.model_io import atomic_path, read_info
from onnxprune.recover import OBJECTIVES, RecoverConfig, recover

EXAMPLES = """\
  onnxprune recover path/to/bert-dir pruned.onnx --data lines.txt --time-budget 30 -o recovered.onnx
  (stop any time: rerunning the same command resumes from recovered.onnx.ckpt)"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the transformers model directory that was exported and pruned")
    p.add_argument("pruned", help="the pruned .onnx whose layouts to apply")
    p.add_argument("--data", required=True, help="unlabelled text file (one example per line) or .npz of model inputs")
    p.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the model directory)")
    p.add_argument("--max-length", type=positive, default=256, help="tokens per input (default 256)")
    p.add_argument("--limit", type=positive, help="use at most this many inputs")
    p.add_argument("--steps", type=positive, default=300, help="optimizer steps (default 300)")
    p.add_argument("--batch-size", type=positive, default=16, help="inputs per step (default 16)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate (default 1e-4)")
    p.add_argument("--objective", choices=OBJECTIVES, default="hidden",
                   help="what the student matches: pooled embeddings, + every layer's hidden states (default), "
                        "+ attention outputs")
    p.add_argument("--time-budget", type=float, metavar="MIN", help="stop training after this many minutes")
    p.add_argument("--checkpoint", help="resumable checkpoint (default OUTPUT.ckpt; resumed when it exists)")
    p.add_argument("--seed", type=int, default=0, help="data order seed (default 0)")
    p.add_argument("--validation-examples", type=non_negative, default=128, metavar="N",
                   help="inputs held out of training; the state with the lowest loss on them is kept, the "
                        "untrained one included (default 128, at most a tenth of the data; 0: keep the last)")
    p.add_argument("--validate-every", type=positive, default=100, metavar="STEPS",
                   help="steps between validation passes (default 100)")
    p.add_argument("--patience", type=positive, metavar="N",
                   help="stop after N validation passes in a row without a better loss (default: never; "
                        "the time budget or the steps end the run)")
    p.add_argument("-o", "--output", required=True, help="output recovered pruned .onnx")
    p.add_argument("--report", help="also write the recover report as JSON here")


def run(args: argparse.Namespace, log: Log) -> int:
    dataset = load_dataset(args.data, read_info(args.pruned).input_names, args.tokenizer or args.model, args.max_length,
                           limit=args.limit)
    # Token ids of the valid positions only: recover batches by length and pads itself.
    examples = [e if isinstance(e, np.ndarray) else e["input_ids"][e["attention_mask"] != 0] for e in dataset.examples]
    config = RecoverConfig(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, objective=args.objective,
        time_budget_s=None if args.time_budget is None else args.time_budget * 60, seed=args.seed,
        checkpoint=args.checkpoint or f"{args.output}.ckpt", validation_examples=args.validation_examples,
        validate_every=args.validate_every, patience=args.patience,
    )
    report = recover(args.model, args.pruned, examples, args.output, config, threads=args.threads, log=log,
                     show_progress=not args.quiet)
    if args.report:
        with atomic_path(args.report) as tmp:
            tmp.write_text(json.dumps(report.to_json(), indent=2))
    first, last = np.mean(report.losses[:10]), np.mean(report.losses[-10:])
    kept = "" if report.best_step == report.steps else f", kept step {report.best_step} (lowest validation loss)"
    print(f"wrote {args.output}: {report.steps} steps ({report.stopped_by}{kept}), {report.elapsed_s:.0f} s, "
          f"loss {first:.4f} → {last:.4f}; recovered ONNX vs PyTorch max |diff| {report.parity_after:.1e}")
    return ExitStatus.SUCCESS


VERB = Verb("recover", "Fine-tune the PyTorch model under a pruned model's layouts to reproduce the dense model "
                       "(self-distillation on unlabelled text), then export and prune it again with the same layouts.",
            EXAMPLES, add_arguments, run)
