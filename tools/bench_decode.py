"""Generation speed: prefill latency and decode tokens/s of a with-past export, dense vs pruned,
measured in one run, and the share of a decode step spent copying the KV cache.

    .venv/bin/python tools/bench_decode.py                       # context 2048, p = 0.9, block 64
    .venv/bin/python tools/bench_decode.py --context 512 2048 4096 --threads 2 --repeats 3

What it does (artifacts under --out, reused when present and --fresh is not given):
  1. a random-init Llama with SmolLM2-135M's shapes (30 layers, hidden 576, 9 query / 3 KV heads
     of 64, intermediate 1536, vocabulary 49152, 8192 positions), or with --model a transformers
     model directory (models/smollm2.py's ``model_dir()`` gives the real SmolLM2), exported with
     ``--task text-generation-with-past`` (dynamo, eager attention, opset 20);
  2. "pruned": calibrated on one sequence of random tokens of --calib-length (default: the
     longest context) and pruned at --sparsity with --block, run with the library's CPU kernel;
  3. per context length L: a prompt of L random tokens, prefilled (empty cache) and followed by
     --decode greedy steps, dense and pruned interleaved (dense, pruned, dense, ...) --repeats
     times; median prefill ms and median decode tokens/s;
  4. the cache copy: each decode step's ``Concat(past, new)`` writes the whole cache anew
     (``present.{i}.key|value``); ORT's profiler gives the time of those Concat nodes, of the
     whole graph run, and the step's wall time (the rest is feeding the cache in and fetching it out).
The pruned model is first checked at p = 0 against dense on a short decode (max |diff| of the
logits), so that the comparison is between equal functions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: SmolLM2-135M's shapes (config.json of HuggingFaceTB/SmolLM2-135M), random weights.
SMOLLM2_SHAPES = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
)


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def random_model_dir(folder: Path) -> Path:
    import torch
    import transformers

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMOLLM2_SHAPES, attn_implementation="eager")
    transformers.LlamaForCausalLM(config).eval().save_pretrained(str(folder))
    return folder


def export_dense(source: Path, path: Path) -> None:
    from onnxprune.export import export

    start = time.perf_counter()
    report = export(source, path, seq_len=16, task="text-generation-with-past", log=lambda m: log("  " + m))
    log(f"  exported {path} in {time.perf_counter() - start:.0f} s; checks {report.checks}")


def prune_model(dense: Path, path: Path, sparsity: float, block: int, calib_length: int, threads: int) -> dict:
    from onnxprune.calibrate import calibrate
    from onnxprune.data import Dataset
    from onnxprune.lm_feeds import data_input_names
    from onnxprune.model_io import read_info, save_model
    from onnxprune.prune import prune

    info = read_info(dense)
    ids = np.random.default_rng(0).integers(3, info.vocab_size or 1000, size=calib_length)
    start = time.perf_counter()
    stats = calibrate(dense, Dataset([ids], data_input_names(info)), granularity=min(block, 16),
                      max_length=calib_length, batch_size=1, threads=threads, show_progress=False)
    model, report = prune(dense, stats, sparsity, block_size=block)
    save_model(model, path)
    log(f"  calibrated on {calib_length} tokens and pruned at p = {sparsity} in {time.perf_counter() - start:.0f} s; "
        f"effective sparsity {report.effective_sparsity:.3f}")
    return {"effective_sparsity": report.effective_sparsity}


def timed_generation(lm, prompt: np.ndarray, decode: int) -> tuple[float, list[float]]:
    """Prefill seconds and each decode step's seconds (greedy)."""
    mask = np.ones_like(prompt)
    start = time.perf_counter()
    logits, cache = lm.step(prompt, mask, lm.empty_cache(1))
    prefill = time.perf_counter() - start
    steps = []
    for _ in range(decode):
        token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
        start = time.perf_counter()
        logits, cache = lm.step(token, mask, cache)
        steps.append(time.perf_counter() - start)
    return prefill, steps


def check_equal_at_p0(dense_lm, pruned_lm, vocab: int) -> float:
    prompt = np.random.default_rng(1).integers(3, vocab, size=(1, 200))
    diff = 0.0
    mask = np.ones_like(prompt)
    caches = [dense_lm.empty_cache(1), pruned_lm.empty_cache(1)]
    ids = prompt
    for _ in range(4):
        (la, caches[0]), (lb, caches[1]) = dense_lm.step(ids, mask, caches[0]), pruned_lm.step(ids, mask, caches[1])
        diff = max(diff, float(np.abs(la - lb).max()))
        ids = la[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
    return diff


def cache_copy_share(path: Path, prompt: np.ndarray, threads: int, steps: int, with_library: bool) -> dict:
    """Median over ``steps`` decode steps: the Concat nodes writing ``present.*`` (ms), the graph
    run (ms) and the step's wall time (ms), from ORT's profiler."""
    import onnx

    from onnxprune.generate import CausalLM
    from onnxprune.runtime import session_options

    graph = onnx.load(str(path), load_external_data=False).graph
    concats = {n.name for n in graph.node if n.op_type == "Concat" and any(o.startswith("present.") for o in n.output)}
    options = session_options(threads, with_library)
    options.enable_profiling = True
    options.profile_file_prefix = str(path.parent / f"profile-{path.stem}")
    lm = CausalLM(path, "auto" if with_library else "none", threads)
    import onnxruntime as ort

    lm.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    _, walls = timed_generation(lm, prompt, steps)
    profile = lm.session.end_profiling()
    events = json.loads(Path(profile).read_text())
    os.unlink(profile)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    decode_runs = runs[1:]  # the first run is the prefill
    copies = []
    for run in decode_runs:
        begin, end = run["ts"], run["ts"] + run["dur"]
        copies.append(sum(e["dur"] for e in events if e.get("cat") == "Node" and begin <= e["ts"] <= end
                          and e["name"].removesuffix("_kernel_time") in concats))
    return {
        "concat_ms": statistics.median(copies) / 1000,
        "graph_ms": statistics.median(r["dur"] for r in decode_runs) / 1000,
        "step_ms": statistics.median(walls) * 1000,
        "cache_mb": _cache_bytes(lm, prompt.shape[1] + steps) / 2**20,
    }


def _cache_bytes(lm, length: int) -> int:
    return sum(heads * length * size * 4 for heads, size in lm.kv_shape.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, nargs="+", default=[2048], help="prompt lengths (default 2048)")
    p.add_argument("--decode", type=int, default=16, help="decode steps per run (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per model and length (default 3)")
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--calib-length", type=int, help="calibration tokens (default: the longest --context)")
    p.add_argument("--model", help="a transformers causal-LM directory (default: random SmolLM2-135M shapes)")
    p.add_argument("--out", default="/tmp/onnxprune-bench-decode", help="artifacts folder (reused)")
    p.add_argument("--fresh", action="store_true", help="rebuild the artifacts")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    from onnxprune.generate import CausalLM

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(args.model) if args.model else random_model_dir(out / "source")
    dense, pruned = out / "dense.onnx", out / f"pruned-p{args.sparsity}-b{args.block}.onnx"
    calib = args.calib_length or max(args.context)
    check = out / f"pruned-p0-b{args.block}.onnx"
    if args.fresh or not dense.is_file():
        log("exporting")
        export_dense(source, dense)
    if args.fresh or not check.is_file():
        log("pruning at p = 0 (the check)")
        prune_model(dense, check, 0.0, args.block, min(calib, 256), args.threads)
    if args.fresh or not pruned.is_file():
        log(f"pruning at p = {args.sparsity}")
        prune_model(dense, pruned, args.sparsity, args.block, calib, args.threads)
    models = {"dense": CausalLM(dense, threads=args.threads), "pruned": CausalLM(pruned, threads=args.threads)}
    vocab = models["dense"].info.vocab_size or 1000
    diff = check_equal_at_p0(models["dense"], CausalLM(check, threads=args.threads), vocab)
    log(f"pruned at p = 0 vs dense, 200-token prefill + 3 decode steps: max |diff| = {diff:.1e}")
    if diff > 1e-3:
        log("WARNING: the pruned model at p = 0 is not the dense model: the timings compare different functions")
    rows = []
    for length in args.context:
        prompt = np.random.default_rng(length).integers(3, vocab, size=(1, length))
        prefill = {name: [] for name in models}
        rates = {name: [] for name in models}
        for repeat in range(args.repeats):
            for name, lm in models.items():
                seconds, steps = timed_generation(lm, prompt, args.decode)
                prefill[name].append(seconds)
                rates[name].append(len(steps) / sum(steps))
                log(f"  L={length} run {repeat + 1} {name}: prefill {seconds * 1000:.0f} ms, "
                    f"decode {rates[name][-1]:.1f} tokens/s")
        copies = {name: cache_copy_share(path, prompt, args.threads, min(args.decode, 8), name == "pruned")
                  for name, path in (("dense", dense), ("pruned", pruned))}
        for name in models:
            rows.append({"context": length, "model": name, "prefill_ms": statistics.median(prefill[name]) * 1000,
                         "decode_tokens_per_s": statistics.median(rates[name]), **copies[name]})
    print(f"threads {args.threads}, p = {args.sparsity}, block {args.block}, calibrated on {calib} tokens, "
          f"{args.decode} decode steps, median of {args.repeats}; p = 0 check max |diff| {diff:.1e}")
    print("| context | model | prefill ms | decode tokens/s | decode step ms | graph ms | cache Concat ms "
          "| Concat share of the step | cache MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']} | {r['model']} | {r['prefill_ms']:.0f} | {r['decode_tokens_per_s']:.1f} | "
              f"{r['step_ms']:.1f} | {r['graph_ms']:.1f} | {r['concat_ms']:.1f} | "
              f"{r['concat_ms'] / r['step_ms']:.0%} | {r['cache_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"p0_max_abs_diff": diff, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
