"""``onnxprune calibrate``."""

from __future__ import annotations

import argparse

from onnxprune.calibrate import default_granularity
from onnxprune.commands.arguments import add_data_arguments, positive
from onnxprune.commands.base import ExitStatus, Log, Verb
from onnxprune.data import (check_text_inputs, chunked, is_text_source, npz_examples, read_texts, shuffled,
                            tokenizer_file, tokenizer_from_json)
from onnxprune.distributed import SHARD_EXAMPLES, ShardSpec, calibrate_sharded
from onnxprune.errors import OnnxpruneError
from onnxprune.lm_feeds import data_input_names
from onnxprune.model_io import load_model, read_info

EXAMPLES = """\
  onnxprune calibrate model.onnx --data lines.txt --tokenizer path/to/bert-dir -o stats.safetensors
  onnxprune calibrate model.onnx --data inputs.npz --max-length 512 -o stats.safetensors
  onnxprune calibrate model.onnx --data long.txt --tokenizer DIR --max-length 8192 -o stats.safetensors
  onnxprune calibrate model.onnx --data corpus.parquet --tokenizer tok/ --limit 100000 --shuffle-seed 0 \\
      --workers 8 -o stats.safetensors
  onnxprune calibrate model.onnx --data train/ --tokenizer tok/ --workers 64 --ray-address auto -o stats.safetensors"""

DETAILS = f"""\
Memory stays near a dense forward pass of one --max-length input (batches hold at most 4096
positions; no site's S x S probabilities are ever held): SmolLM2-135M at 8192 positions peaks
below 4 GB (docs/PERFORMANCE.md).

The data is read as a stream and cut into shards of --shard-size examples. Without --workers the
shards run one after another here; with --workers N they run on N Ray actors (pip install
'onnxprune[distributed]'), on a local Ray instance of N CPUs, or on the cluster at --ray-address.
Both give the same statistics (docs/DISTRIBUTED.md). Default shard size: {SHARD_EXAMPLES}."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="dense .onnx (with --workers: a path every worker can read)")
    add_data_arguments(p, streaming=True)
    p.add_argument("--granularity", type=positive, default=None,
                   help="statistics cell size in positions (default 16; above --max-length 4096 the smallest power of "
                        "two giving at most 256 cells, e.g. 32 at 8192, so a file stays small; prune's --block-size "
                        "must be a multiple of it)")
    p.add_argument("--workers", type=positive, metavar="N",
                   help="calibrate on N Ray actors (default: in this process); --threads is then per actor (default 1)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="the Ray cluster to run on (e.g. auto, or ray://head:10001; default: start a local one)")
    p.add_argument("--shard-size", type=positive, default=SHARD_EXAMPLES, metavar="EXAMPLES",
                   help=f"examples per shard (default {SHARD_EXAMPLES})")
    p.add_argument("-o", "--output", required=True, help="output statistics (.safetensors)")


def run(args: argparse.Namespace, log: Log) -> int:
    if args.ray_address and not args.workers:
        raise OnnxpruneError("--ray-address needs --workers N (how many actors to run)")
    # In this process the model is read once; workers read it themselves.
    loaded = None if args.workers else load_model(args.model)
    info = loaded.info if loaded else read_info(args.model)
    tokenizer_json, total = None, args.limit
    if is_text_source(args.data):
        check_text_inputs(args.data, data_input_names(info), args.tokenizer)
        file = tokenizer_file(args.tokenizer)
        tokenizer_json = file.read_text(encoding="utf-8")
        tokenizer_from_json(tokenizer_json, str(file))  # an unreadable one is refused here, not by each worker
        examples = read_texts(args.data, args.text_field, args.limit, args.shuffle_seed)
    else:
        examples = npz_examples(args.data, data_input_names(info))
        if args.shuffle_seed is not None:
            examples = shuffled(examples, args.shuffle_seed)
        examples = list(examples)[: args.limit]
        total = len(examples)
    granularity = default_granularity(args.max_length) if args.granularity is None else args.granularity
    spec = ShardSpec(str(args.model), tuple(data_input_names(info)), tokenizer_json, granularity, args.max_length,
                     args.batch_size, args.threads)
    stats = calibrate_sharded(spec, chunked(examples, args.shard_size), workers=args.workers,
                              address=args.ray_address, total=total, show_progress=not args.quiet,
                              loaded=loaded)
    stats.save(args.output)
    print(f"wrote {args.output}: {len(stats.sites)} sites, {stats.num_samples} inputs, granularity {stats.granularity}")
    return ExitStatus.SUCCESS


VERB = Verb("calibrate", "Average each attention site's probabilities over data (ONNX Runtime, no PyTorch).",
            EXAMPLES, add_arguments, run, DETAILS)
