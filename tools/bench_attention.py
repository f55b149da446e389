"""Op-level benchmark: onnxprune.BlockSparseAttention (CPU kernel) vs ONNX Runtime's dense
attention (MatMul → Mul → Softmax → MatMul) on the same inputs, in one run, interleaved.

    .venv/bin/python tools/bench_attention.py [--threads 2] [--cases 256:32:16 2048:64:64] [--kept 1.0 0.5 0.1]

Each case is S:D:block with B = 1, 12 heads, float32. The layout keeps the diagonal blocks plus
random others up to the asked fraction. Prints one table: median ms, ratio to dense, and the
kernel's GFLOP/s on the blocks it computes (4·bs²·D per kept block, the two products).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from onnxprune.runtime import library_path

HEADS = 12


def block_sparse_model(block: int) -> bytes:
    names = ["Q", "K", "V", "layout"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.UINT8 if n == "layout" else TensorProto.FLOAT, None) for n in names]
    node = helper.make_node("BlockSparseAttention", names, ["Y"], domain="onnxprune", block_size=block)
    graph = helper.make_graph([node], "bsa", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("onnxprune", 1)])
    return model.SerializeToString()


def dense_model(head_size: int) -> bytes:
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Q", "K", "V")]
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / np.sqrt(head_size)])
    nodes = [
        helper.make_node("Transpose", ["K"], ["Kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["Q", "Kt"], ["S"]),
        helper.make_node("Mul", ["S", "scale"], ["S2"]),
        helper.make_node("Softmax", ["S2"], ["P"], axis=-1),
        helper.make_node("MatMul", ["P", "V"], ["Y"]),
    ]
    graph = helper.make_graph(nodes, "dense", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=[scale])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def session(model: bytes, threads: int, with_library: bool):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # No spinning: the contestants alternate, a spinning pool would steal the other's cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if with_library:
        options.register_custom_ops_library(library_path())
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def layout_with(kept: float, blocks: int, rng) -> np.ndarray:
    layout = rng.random((HEADS, blocks, blocks)) < max(kept - 1 / blocks, 0) / (1 - 1 / blocks)
    layout[:, np.arange(blocks), np.arange(blocks)] = True
    return layout.astype(np.uint8)


def time_interleaved(runs: dict, repeats: int) -> dict[str, float]:
    for sess, feeds in runs.values():
        for _ in range(3):
            sess.run(None, feeds)
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (sess, feeds) in runs.items():
            start = time.perf_counter()
            sess.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=["256:32:16", "1024:64:32", "2048:64:64"], help="S:D:block")
    parser.add_argument("--kept", type=float, nargs="+", default=[1.0, 0.5, 0.1], help="fractions of blocks kept")
    parser.add_argument("--repeats", type=int, default=0, help="timed runs per contestant (default: by size)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"B=1, heads {HEADS}, float32, {args.threads} threads; median ms of interleaved runs")
    print(f"{'S':>5} {'D':>4} {'block':>5} {'kept':>6} {'dense ms':>9} {'bsa ms':>9} {'dense/bsa':>9} {'bsa GFLOP/s':>12} {'max |diff|':>10}")
    for case in args.cases:
        s, d, block = (int(x) for x in case.split(":"))
        q, k, v = (rng.standard_normal((1, HEADS, s, d)).astype(np.float32) for _ in range(3))
        dense = session(dense_model(d), args.threads, with_library=False)
        sparse = session(block_sparse_model(block), args.threads, with_library=True)
        repeats = args.repeats or max(5, min(200, int(2e9 / (4 * s * s * d * HEADS) * 3)))
        for kept in args.kept:
            layout = layout_with(kept, -(-s // block), rng)
            runs = {"dense": (dense, {"Q": q, "K": k, "V": v}), "bsa": (sparse, {"Q": q, "K": k, "V": v, "layout": layout})}
            diff = ""
            if layout.all():
                diff = f"{np.abs(dense.run(None, runs['dense'][1])[0] - sparse.run(None, runs['bsa'][1])[0]).max():.1e}"
            ms = time_interleaved(runs, repeats)
            flops = 4.0 * block * block * d * int(layout.sum())
            print(f"{s:>5} {d:>4} {block:>5} {layout.mean():>6.3f} {ms['dense']:>9.3f} {ms['bsa']:>9.3f} "
                  f"{ms['dense'] / ms['bsa']:>8.2f}× {flops / ms['bsa'] / 1e6:>12.1f} {diff:>10}")


if __name__ == "__main__":
    main()
