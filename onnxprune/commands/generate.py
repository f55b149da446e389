"""``onnxprune generate``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from onnxprune.commands.arguments import non_negative, positive
from onnxprune.commands.base import ExitStatus, Log, Verb
from onnxprune.errors import OnnxpruneError
from onnxprune.generate import LIBRARY_CHOICES, generate

EXAMPLES = """\
  onnxprune export path/to/llama-dir -o llama/ --task text-generation-with-past
  onnxprune generate llama/ --prompt "The capital of France is" --max-new-tokens 32
  onnxprune generate pruned.onnx --tokenizer llama/ --prompt-file question.txt --chat --json
  onnxprune generate pruned.onnx --tokenizer llama/ --prompt "Once" --temperature 0.8 --top-p 0.95 --seed 1"""

DETAILS = """\
MODEL is a file exported with --task text-generation-with-past (dense or pruned), or a model
directory holding model.onnx, whose tokenizer is then the default. Greedy unless --temperature is
given. The new text streams to stdout; prefill time and decode tokens/s follow on stderr."""


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _temperature(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="with-past .onnx, or a model directory holding model.onnx")
    p.add_argument("--tokenizer", help="tokenizer directory (default: MODEL when it is a directory)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", help="a file holding the prompt")
    p.add_argument("--max-new-tokens", type=positive, default=64, help="at most this many new tokens (default 64)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--temperature", type=_temperature, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--top-p", type=_probability, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--seed", type=non_negative, default=0, help="sampling seed (default 0)")
    p.add_argument("--library", choices=LIBRARY_CHOICES, default="auto",
                   help="auto: a pruned model runs onnxprune's kernel (default); none: the op's function body")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, tokens, timings) instead of streaming")


def _prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    try:
        return Path(args.prompt_file).read_text()
    except OSError as e:
        raise OnnxpruneError(f"{args.prompt_file}: cannot read the prompt ({e.strerror})") from None


def run(args: argparse.Namespace, log: Log) -> int:
    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = generate(args.model, _prompt(args), args.tokenizer, args.max_new_tokens, args.chat, args.temperature,
                      args.top_p, args.seed, args.library, args.threads, on_text=None if args.json else stream)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return ExitStatus.SUCCESS
    print()
    rate = result.decode_tokens_per_second
    log(f"prompt {result.prompt_tokens} tokens, prefill {result.prefill_seconds * 1000:.1f} ms; "
        f"{len(result.token_ids)} new tokens, decode " + (f"{rate:.1f} tokens/s" if rate else "-")
        + f" (stopped: {result.stop_reason})")
    return ExitStatus.SUCCESS


VERB = Verb("generate", "Generate text with a model exported with its KV cache (dense or pruned) in ONNX Runtime.",
            EXAMPLES, add_arguments, run, DETAILS)
