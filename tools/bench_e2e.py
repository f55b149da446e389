"""End-to-end benchmark: a BERT-base-shaped encoder pruned by onnxprune vs the same model dense
in ONNX Runtime, with and without ORT's transformers optimizer, measured in one run.

    .venv/bin/python tools/bench_e2e.py                    # S = 2048 and 4096, p = 0.9, block 64
    .venv/bin/python tools/bench_e2e.py --seq 4096 --repeats 5 --threads 2

What it does (artifacts under --out, reused when present and --fresh is not given):
  1. a random-init BERT (models/bert_base.py: 12 layers, hidden 768, 12 heads, 4096
     positions) exported by onnxprune.export (dynamo, opset 20);
  2. "dense": that file in ORT with every graph optimization (ORT_ENABLE_ALL);
  3. "fused": the same weights exported by the TorchScript exporter (ORT's BERT fusions match
     its graph, not the dynamo export's) after onnxruntime.transformers.optimizer (model_type
     bert), which fuses attention into com.microsoft.Attention (the count is printed);
  4. "pruned": onnxprune calibrate (random token ids, one sequence of max(--seq) tokens) and
     prune at --sparsity with --block, run with the library's CPU kernel.
Runs are interleaved (dense, fused, pruned, dense, ...) with one warm-up each; the table gives
median ms and the speed-up of the pruned model over each baseline, and checks the pruned model at
p = 0 against dense first (max |diff|) so that the comparison is between equal functions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import bert_base  # noqa: E402


def export_dense(path: Path, max_positions: int) -> None:
    from onnxprune.export import export

    # onnxprune.export takes a "module:function" factory; register this one under a module name.
    import types

    factory = types.ModuleType("_bench_e2e_factory")
    factory.make = lambda: bert_base.make(max_positions)
    sys.modules["_bench_e2e_factory"] = factory
    report = export("_bench_e2e_factory:make", path, opset=20, log=lambda m: print("  " + m))
    print(f"  exported {path} ({report.exporter}, opset {report.opset}); max |ONNX - torch| = {report.max_abs_diff:.1e}")


def fuse(fused: Path, max_positions: int) -> None:
    """The same weights exported by the TorchScript exporter (opset 17), the form ORT's BERT
    fusions are written for (they find no attention in the dynamo export), then optimized."""
    import warnings

    import torch
    from onnxruntime.transformers.optimizer import optimize_model

    from onnxprune.model_io import atomic_path

    module, example = bert_base.make(max_positions)
    with atomic_path(fused) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, tuple(example.values()), str(tmp), input_names=list(example),
                              output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                              dynamic_axes={n: {0: "batch", 1: "sequence"} for n in example})
        opt = optimize_model(str(tmp), model_type="bert", num_heads=12, hidden_size=768, opt_level=1)
        opt.save_model_to_file(str(tmp))


def fused_attention_nodes(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sum(1 for n in model.graph.node if n.domain == "com.microsoft" and "Attention" in n.op_type)


def prune_model(dense: Path, pruned: Path, seq: int, sparsity: float, block: int) -> str:
    from onnxprune.calibrate import calibrate
    from onnxprune.data import Dataset
    from onnxprune.model_io import load_model, save_model
    from onnxprune.prune import prune

    rng = np.random.default_rng(0)
    loaded = load_model(dense)
    names = loaded.info.input_names
    example = {"input_ids": rng.integers(1000, 2000, (seq,), dtype=np.int64),
               "attention_mask": np.ones(seq, np.int64)}
    stats = calibrate(loaded, Dataset([example], names), granularity=block, max_length=seq, batch_size=1)
    model, report = prune(dense, stats, sparsity, block_size=block)
    save_model(model, pruned)
    density = np.mean([s.density for s in report.sites])
    return f"{len(report.sites)} sites, mean density {density:.3f}"


def make_session(path: Path, threads: int, with_library: bool):
    import onnxruntime as ort

    from onnxprune.runtime import session_options

    options = session_options(threads, with_library)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No spinning: the models alternate, and a spinning pool would steal the next one's cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per sequence length")
    parser.add_argument("--out", default="out/bench_e2e")
    parser.add_argument("--fresh", action="store_true", help="rebuild every artifact")
    args = parser.parse_args()

    import onnxruntime as ort

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    max_seq = max(args.seq)
    dense = out / f"bert_base_{max_seq}.onnx"
    fused = out / f"bert_base_{max_seq}.fused.onnx"
    pruned = out / f"bert_base_{max_seq}.p{int(round(args.sparsity * 100)):02d}.b{args.block}.onnx"
    check = out / f"bert_base_{max_seq}.p00.b{args.block}.onnx"
    t0 = time.perf_counter()
    if args.fresh or not dense.exists():
        print("[1/4] exporting BERT-base (random init)", flush=True)
        export_dense(dense, max_seq)
    if args.fresh or not fused.exists():
        print("[2/4] ORT transformers optimizer", flush=True)
        fuse(fused, max_seq)
    n_fused = fused_attention_nodes(fused)
    if args.fresh or not pruned.exists() or not check.exists():
        print(f"[3/4] calibrating on one {max_seq}-token sequence and pruning", flush=True)
        print("  p=0:", prune_model(dense, check, max_seq, 0.0, args.block))
        print(f"  p={args.sparsity}:", prune_model(dense, pruned, max_seq, args.sparsity, args.block))
    print(f"  artifacts ready in {time.perf_counter() - t0:.0f} s; fused attention nodes: {n_fused}", flush=True)

    sessions = {
        "dense": make_session(dense, args.threads, False),
        "fused": make_session(fused, args.threads, False),
        "pruned": make_session(pruned, args.threads, True),
    }
    p0 = make_session(check, args.threads, True)
    rows = []
    rng = np.random.default_rng(1)
    for seq in args.seq:
        feeds = {"input_ids": rng.integers(1000, 2000, (1, seq), dtype=np.int64),
                 "attention_mask": np.ones((1, seq), np.int64)}
        ref = sessions["dense"].run(None, feeds)[0]
        p0_diff = float(np.abs(p0.run(None, feeds)[0] - ref).max())
        fused_diff = float(np.abs(sessions["fused"].run(None, feeds)[0] - ref).max())
        for sess in sessions.values():  # warm-up
            sess.run(None, feeds)
        times = {name: [] for name in sessions}
        print(f"[4/4] S={seq}: timing {args.repeats} interleaved rounds", flush=True)
        for _ in range(args.repeats):
            for name, sess in sessions.items():
                start = time.perf_counter()
                sess.run(None, feeds)
                times[name].append((time.perf_counter() - start) * 1e3)
        ms = {name: float(np.median(t)) for name, t in times.items()}
        rows.append((seq, ms, p0_diff, fused_diff))

    print()
    print(f"BERT-base shape (12 layers, hidden 768, 12 heads), batch 1, float32, {args.threads} threads, "
          f"onnxruntime {ort.__version__}; pruned: p={args.sparsity}, block {args.block}; median of "
          f"{args.repeats} interleaved runs; fused = ORT transformers optimizer ({n_fused} attention nodes fused)")
    print(f"{'S':>5} {'dense ms':>10} {'fused ms':>10} {'pruned ms':>10} {'dense/pruned':>12} {'fused/pruned':>12} "
          f"{'|p0 - dense|':>12} {'|fused - dense|':>15}")
    for seq, ms, p0_diff, fused_diff in rows:
        print(f"{seq:>5} {ms['dense']:>10.0f} {ms['fused']:>10.0f} {ms['pruned']:>10.0f} "
              f"{ms['dense'] / ms['pruned']:>11.2f}× {ms['fused'] / ms['pruned']:>11.2f}× {p0_diff:>12.1e} {fused_diff:>15.1e}")


if __name__ == "__main__":
    main()
