"""Op-level benchmark: onnxprune.BlockSparseAttention (CPU kernel) against the dense attention
ONNX Runtime offers on CPU, and against a float32 GEMM ceiling, all measured in the same run.

    .venv/bin/python tools/bench_attention.py                      # the issue's main table
    .venv/bin/python tools/bench_attention.py --seq 2048 --blocks 16 32 64 128 --kept 0.1
    .venv/bin/python tools/bench_attention.py --threads 1 2 --kept 0.05 0.1 0.2 0.5 1
    .venv/bin/python tools/bench_attention.py --flex --blocks 128  # + torch FlexAttention (compiled)
    .venv/bin/python tools/bench_attention.py --memory --seq 8192  # peak working memory instead
    .venv/bin/python tools/bench_attention.py --rule --seq 2048 --threads 1  # layout_rule vs explicit
    .venv/bin/python tools/bench_attention.py --decode --previous-library OLD/libonnxprune_ops.so

Contestants (B = 1, 12 heads, float32, every one with the same intra-op thread count):
  decomposed  ORT: Transpose → MatMul → Mul → Softmax → MatMul (what exporters emit)
  attention   ORT: the standard ONNX Attention op (opset 23), inputs [B, H, S, D]
  mha         ORT: com.microsoft.MultiHeadAttention, inputs [B, S, H·D] (ORT's fused CPU kernel)
  flex        torch.nn.attention.flex_attention under torch.compile, given the same block mask
              (with --flex; compile time is excluded; block 128 is its native size)
  bsa         onnxprune.BlockSparseAttention with the library's CPU kernel
The layout keeps every diagonal block plus random others up to the asked fraction, per head.
With --rule, the table compares instead the same sink + local-window layout given two ways, in one
interleaved run: by a layout_rule beyond an empty explicit region, and written out block by block.
With --decode, a KV-cache decode step of SmolLM2's shapes (9 query heads, 3 KV heads, D = 64,
queries at the end): ORT's Attention (opset 23, grouped K/V), this library's kernel, and with
--previous-library another build of the library (the kernel before the decode path), each
cycling through --layers copies of Q, K and V so that K and V come from memory, not the cache,
as in a model's forward step; plus the K/V bytes a step reads (the blocks some query head of a
KV group keeps, once per KV head) and that rate against numpy's copy bandwidth, same threads.
Runs are interleaved (one of each contestant in turn) so load from other processes hits all
alike; the table gives medians. GEMM is ORT's MatMul on 2048² × 2048² float32 matrices, the
machine's practical float32 rate; "GFLOP/s kept" counts 4·bs²·D per computed block.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from onnxprune.runtime import library_path, session_options  # noqa: E402

HEADS = 12


# ------------------------------------------------------------------------------------------
# Models


def _model(nodes, inputs, initializers=(), extra_opsets=()) -> bytes:
    graph = helper.make_graph(
        nodes, "bench", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=list(initializers),
    )
    opsets = [helper.make_opsetid("", 23)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model.SerializeToString()


def _float_inputs(names, rank=None):
    return [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]


def bsa_model(block: int, with_rule: bool = False) -> bytes:
    inputs = _float_inputs("QKV") + [helper.make_tensor_value_info("layout", TensorProto.UINT8, None)]
    node_inputs = ["Q", "K", "V", "layout"]
    if with_rule:
        inputs.append(helper.make_tensor_value_info("layout_rule", TensorProto.INT64, None))
        node_inputs += ["", "", "layout_rule"]
    node = helper.make_node("BlockSparseAttention", node_inputs, ["Y"], domain="onnxprune", block_size=block)
    return _model([node], inputs, extra_opsets=[("onnxprune", 2)])


def decomposed_model(head_size: int) -> bytes:
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / np.sqrt(head_size)])
    nodes = [
        helper.make_node("Transpose", ["K"], ["Kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["Q", "Kt"], ["S"]),
        helper.make_node("Mul", ["S", "scale"], ["S2"]),
        helper.make_node("Softmax", ["S2"], ["P"], axis=-1),
        helper.make_node("MatMul", ["P", "V"], ["Y"]),
    ]
    return _model(nodes, _float_inputs("QKV"), [scale])


def attention23_model() -> bytes:
    return _model([helper.make_node("Attention", ["Q", "K", "V"], ["Y"])], _float_inputs("QKV"))


def mha_model() -> bytes:
    node = helper.make_node("MultiHeadAttention", ["Q", "K", "V"], ["Y"], domain="com.microsoft",
                            num_heads=HEADS)
    return _model([node], _float_inputs("QKV"), extra_opsets=[("com.microsoft", 1)])


def gemm_model() -> bytes:
    return _model([helper.make_node("MatMul", ["A", "B"], ["Y"])], _float_inputs("AB"))


def session(model: bytes, threads: int, with_library: bool = False, library: str | None = None) -> ort.InferenceSession:
    """``with_library``: this package's op library; ``library``: another build's, instead."""
    options = session_options(threads, with_library and library is None)
    if library is not None:
        options.register_custom_ops_library(library)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No spinning: contestants alternate, and a spinning pool would steal the next one's cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def layout_with(kept: float, blocks: int, rng, heads: int = HEADS) -> np.ndarray:
    """Per head the diagonal blocks plus random others, so that about `kept` of all blocks are kept."""
    layout = rng.random((heads, blocks, blocks)) < max(kept - 1 / blocks, 0) / (1 - 1 / blocks)
    layout[:, np.arange(blocks), np.arange(blocks)] = True
    return layout.astype(np.uint8)


# ------------------------------------------------------------------------------------------
# Timing


class Contestant:
    def __init__(self, name, run):
        self.name, self.run, self.times = name, run, []


def time_interleaved(contestants: list[Contestant], seconds: float, min_repeats: int = 5) -> None:
    for c in contestants:
        c.run()  # warm-up (allocations, first-touch)
        c.run()
    start = time.perf_counter()
    repeats = 0
    while repeats < min_repeats or time.perf_counter() - start < seconds:
        for c in contestants:
            t0 = time.perf_counter()
            c.run()
            c.times.append(time.perf_counter() - t0)
        repeats += 1
        if repeats >= 200:
            break


def median_ms(c: Contestant) -> float:
    return float(np.median(c.times)) * 1e3


def gemm_rate(threads: int, seconds: float) -> float:
    n = 2048
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    sess = session(gemm_model(), threads)
    c = Contestant("gemm", lambda: sess.run(None, {"A": a, "B": b}))
    time_interleaved([c], seconds)
    return 2 * n**3 / (median_ms(c) / 1e3) / 1e9


# ------------------------------------------------------------------------------------------
# torch FlexAttention


class Flex:
    """flex_attention compiled once per (S, block); block masks built from the same layout."""

    def __init__(self, threads: int):
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        torch.set_num_threads(threads)
        self.torch = torch
        self.create_block_mask = create_block_mask
        self.compiled = torch.compile(flex_attention, dynamic=False)

    def runner(self, q, k, v, layout: np.ndarray, block: int):
        torch = self.torch
        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
        lay = torch.from_numpy(layout.astype(bool))

        def mask_mod(b, h, q_idx, kv_idx):
            return lay[h, q_idx // block, kv_idx // block]

        s = q.shape[2]
        mask = self.create_block_mask(mask_mod, None, HEADS, s, s, device="cpu", BLOCK_SIZE=block)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.compiled(tq, tk, tv, block_mask=mask)
        compile_s = time.perf_counter() - t0

        def run():
            with torch.no_grad():
                self.compiled(tq, tk, tv, block_mask=mask)

        return run, out.numpy(), compile_s


# ------------------------------------------------------------------------------------------
# Peak memory (one contestant per child process)


def _child_peak_mib(kind: str, s: int, d: int, block: int, kept: float, threads: int) -> None:
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, HEADS, s, d)).astype(np.float32) for _ in range(3))
    if kind == "bsa":
        sess = session(bsa_model(block), threads, with_library=True)
        feeds = {"Q": q, "K": k, "V": v, "layout": layout_with(kept, -(-s // block), rng)}
    elif kind == "mha":
        sess = session(mha_model(), threads)
        feeds = {n: x.transpose(0, 2, 1, 3).reshape(1, s, HEADS * d).copy() for n, x in zip("QKV", (q, k, v))}
    else:
        sess = session(decomposed_model(d) if kind == "decomposed" else attention23_model(), threads)
        feeds = {"Q": q, "K": k, "V": v}
    # The first run counts: it is when the arena and every working buffer get allocated (later
    # runs reuse them, so their peak above the resident set would hide the working memory).
    rss_mib = _status_kib("VmRSS") / 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    sess.run(None, feeds)
    print(f"{_status_kib('VmHWM') / 1024 - rss_mib:.1f} {rss_mib:.1f}")


def _status_kib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    raise RuntimeError(field)


def memory_table(args) -> None:
    print(f"Peak memory of the first run above the resident set before it (MiB), output included; B=1, {HEADS} heads, "
          f"D={args.head_size}, block {args.blocks[0]}, kept {args.kept[0]}, {args.threads[0]} threads")
    print(f"{'S':>6} " + " ".join(f"{k:>12}" for k in ("decomposed", "attention", "mha", "bsa")) + f" {'bsa/best':>9}")
    for s in args.seq:
        peaks = {}
        for kind in ("decomposed", "attention", "mha", "bsa"):
            cmd = [sys.executable, __file__, "--_child", kind, str(s), str(args.head_size), str(args.blocks[0]),
                   str(args.kept[0]), str(args.threads[0])]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
                peaks[kind] = float(out.split()[0])
            except (subprocess.SubprocessError, ValueError, IndexError) as e:
                print(f"  {kind}: failed ({e})", file=sys.stderr)
                peaks[kind] = float("nan")
        best_dense = np.nanmin([peaks[k] for k in ("decomposed", "attention", "mha")])
        print(f"{s:>6} " + " ".join(f"{peaks[k]:>12.1f}" for k in ("decomposed", "attention", "mha", "bsa"))
              + f" {peaks['bsa'] / best_dense:>9.3f}")
        # The output itself (B·H·S·D floats) is part of every peak; what is left is working memory.
        output_mib = HEADS * s * args.head_size * 4 / 2**20
        print(f"{'−out':>6} " + " ".join(f"{peaks[k] - output_mib:>12.1f}" for k in ("decomposed", "attention", "mha", "bsa"))
              + f"   (minus the {output_mib:.1f} MiB output)")


# ------------------------------------------------------------------------------------------
# Rule-driven layouts against the same layouts written out


def sink_window_rule(kept: float, blocks: int) -> np.ndarray:
    """Per head (sink_blocks, window_before, window_after, global_query_blocks): one sink block
    and a window of past blocks sized so that about `kept` of all blocks are kept."""
    window = max(0, round(kept * blocks) - 2)
    return np.tile(np.array([[1, window, 0, 0]], np.int64), (HEADS, 1))


def expand_rule(rule: np.ndarray, blocks: int) -> np.ndarray:
    """The explicit [H, blocks, blocks] layout the rule describes (every block beyond [H, 0, 0])."""
    r, c = np.arange(blocks)[:, None], np.arange(blocks)[None, :]
    layout = [(c < sink) | (((before < 0) | (c >= r - before)) & ((after < 0) | (c <= r + after))) | (r < glob)
              for sink, before, after, glob in rule]
    return np.stack(layout).astype(np.uint8)


def rule_table(args) -> None:
    print(f"layout_rule against the same layout given explicitly; B=1, {HEADS} heads, D={args.head_size}, "
          "float32; median ms of interleaved runs")
    print(f"{'thr':>3} {'S':>5} {'block':>5} {'kept':>5} {'explicit ms':>11} {'rule ms':>8} {'rule/explicit':>13} "
          f"{'explicit GFLOP/s kept':>21} {'rule GFLOP/s kept':>17}")
    d = args.head_size
    rng = np.random.default_rng(0)
    for threads in args.threads:
        for s in args.seq:
            q, k, v = (rng.standard_normal((1, HEADS, s, d)).astype(np.float32) for _ in range(3))
            for block in args.blocks:
                explicit_sess = session(bsa_model(block), threads, with_library=True)
                rule_sess = session(bsa_model(block, with_rule=True), threads, with_library=True)
                blocks = -(-s // block)
                for kept in args.kept:
                    rule = sink_window_rule(kept, blocks)
                    layout = expand_rule(rule, blocks)
                    explicit_feeds = {"Q": q, "K": k, "V": v, "layout": layout}
                    rule_feeds = {"Q": q, "K": k, "V": v, "layout": np.zeros((HEADS, 0, 0), np.uint8), "layout_rule": rule}
                    a = explicit_sess.run(None, explicit_feeds)[0]
                    b = rule_sess.run(None, rule_feeds)[0]
                    assert np.abs(a - b).max() < 1e-5, "the rule and its expansion give different outputs"
                    contestants = [Contestant("explicit", lambda f=explicit_feeds, e=explicit_sess: e.run(None, f)),
                                   Contestant("rule", lambda f=rule_feeds, r=rule_sess: r.run(None, f))]
                    time_interleaved(contestants, args.seconds)
                    ms = {c.name: median_ms(c) for c in contestants}
                    flops = 4.0 * block * block * d * int(layout.sum())
                    rates = [flops / (ms[n] / 1e3) / 1e9 for n in ("explicit", "rule")]
                    print(f"{threads:>3} {s:>5} {block:>5} {float(layout.mean()):>5.3f} {ms['explicit']:>11.2f} "
                          f"{ms['rule']:>8.2f} {ms['rule'] / ms['explicit']:>13.3f} {rates[0]:>21.1f} {rates[1]:>17.1f}",
                          flush=True)


# ------------------------------------------------------------------------------------------
# KV-cache decode steps (grouped query heads, queries at the end)

DECODE_HEADS, DECODE_KV_HEADS = 9, 3  # SmolLM2-135M


def decode_bsa_model(block: int) -> bytes:
    inputs = _float_inputs("QKV") + [helper.make_tensor_value_info("layout", TensorProto.UINT8, None)]
    node = helper.make_node("BlockSparseAttention", ["Q", "K", "V", "layout"], ["Y"], domain="onnxprune",
                            block_size=block, queries_at_end=1)
    return _model([node], inputs, extra_opsets=[("onnxprune", 2)])


def group_kept_blocks(layout: np.ndarray, sk: int, sq: int, block: int) -> int:
    """Key blocks a step reads, summed over KV heads: those some query head of the group keeps
    in the block rows of the queries (the decode path reads each once per KV head)."""
    rows = sorted({(sk - sq + i) // block for i in range(sq)})
    per_head = layout[:, rows, :].any(axis=1)  # [Hq, blocks]
    group = DECODE_HEADS // DECODE_KV_HEADS
    return int(per_head.reshape(DECODE_KV_HEADS, group, -1).any(axis=1).sum())


def copy_bandwidth(threads: int, seconds: float) -> float:
    """GB/s (bytes read + bytes written) of numpy copying 256 MiB, split among `threads` Python
    threads (numpy releases the GIL while it copies); median of repeats."""
    import threading

    src = np.ones(64 * 2**20, np.float32)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(src.size), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]

    def copy():
        workers = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in bounds]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    c = Contestant("copy", copy)
    time_interleaved([c], seconds)
    return 2 * src.nbytes / (median_ms(c) / 1e3) / 1e9


def decode_table(args) -> None:
    block, d, layers = args.blocks[0], args.head_size, args.layers
    print(f"Decode step: B=1, {DECODE_HEADS} query / {DECODE_KV_HEADS} KV heads, D={d}, block {block}, "
          f"float32, queries at the end; {layers} copies of Q, K, V cycled (K and V of a step come from memory "
          "once the copies exceed the caches); median ms per call of interleaved runs")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    bandwidth = {t: copy_bandwidth(t, args.seconds / 2) for t in sorted(set(args.threads) | {1})}
    print("numpy copy of 256 MiB (read + write): "
          + ", ".join(f"{t} thread(s) {gbs:.1f} GB/s" for t, gbs in bandwidth.items()))
    names = ["attention"] + (["previous"] if args.previous_library else []) + ["bsa"]
    header = (f"{'thr':>3} {'Sq':>3} {'Sk':>5} {'kept':>5} {'group kept':>10} {'K/V MB':>6} "
              + " ".join(f"{n + ' ms':>12}" for n in names)
              + (f" {'previous/bsa':>12}" if args.previous_library else "")
              + f" {'attention/bsa':>13} {'bsa GB/s':>8} {'% of copy':>9}")
    lines = [header]
    print(header, file=sys.stderr, flush=True)
    for threads in args.threads:
        dense = session(attention23_model(), threads)
        bsa = session(decode_bsa_model(block), threads, with_library=True)
        previous = None
        if args.previous_library:
            previous = session(decode_bsa_model(block), threads, library=args.previous_library)
        for sk in args.seq:
            blocks = -(-sk // block)
            for sq in args.queries:
                rng = np.random.default_rng([sk, sq])
                copies = [{"Q": rng.standard_normal((1, DECODE_HEADS, sq, d)).astype(np.float32),
                           "K": rng.standard_normal((1, DECODE_KV_HEADS, sk, d)).astype(np.float32),
                           "V": rng.standard_normal((1, DECODE_KV_HEADS, sk, d)).astype(np.float32)}
                          for _ in range(layers)]
                for kept in args.kept:
                    layout = layout_with(kept, blocks, np.random.default_rng([sk, sq, round(kept * 1000)]), DECODE_HEADS)
                    feeds = [dict(c, layout=layout) for c in copies]
                    out = bsa.run(None, feeds[0])[0]
                    if previous is not None:
                        assert np.abs(previous.run(None, feeds[0])[0] - out).max() < 1e-4, "the two builds differ"
                    if layout.all():
                        ref = dense.run(None, copies[0])[0]
                        assert np.abs(ref - out).max() < 1e-4, "bsa with every block kept differs from dense"
                    step = {"i": 0}

                    def cycled(sess, with_layout=True):
                        def run():
                            step["i"] = (step["i"] + 1) % layers
                            sess.run(None, feeds[step["i"]] if with_layout else copies[step["i"]])
                        return run

                    contestants = [Contestant("attention", cycled(dense, with_layout=False))]
                    if previous is not None:
                        contestants.append(Contestant("previous", cycled(previous)))
                    contestants.append(Contestant("bsa", cycled(bsa)))
                    time_interleaved(contestants, args.seconds, min_repeats=5 * layers)
                    ms = {c.name: median_ms(c) for c in contestants}
                    kept_blocks = group_kept_blocks(layout, sk, sq, block)
                    kv_bytes = kept_blocks * block * 2 * d * 4
                    group_share = kept_blocks / (DECODE_KV_HEADS * blocks)
                    line = (f"{threads:>3} {sq:>3} {sk:>5} {kept:>5.2f} {group_share:>10.2f} "
                            f"{kv_bytes / 1e6:>6.2f} " + " ".join(f"{ms[n]:>12.3f}" for n in names)
                            + (f" {ms['previous'] / ms['bsa']:>11.2f}×" if previous is not None else "")
                            + f" {ms['attention'] / ms['bsa']:>12.2f}× {kv_bytes / (ms['bsa'] / 1e3) / 1e9:>8.1f}"
                            f" {100 * kv_bytes / (ms['bsa'] / 1e3) / 1e9 / bandwidth[threads]:>8.0f}%")
                    lines.append(line)
                    print(line, file=sys.stderr, flush=True)
    print("\n".join(lines))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


# ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", help="sequence lengths (default 2048 4096; --decode: 2048 8192)")
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--blocks", type=int, nargs="+", default=[64], help="block sizes")
    parser.add_argument("--kept", type=float, nargs="+",
                        help="fractions of blocks kept (default 0.1 1; --decode: 1 0.25)")
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="intra-op thread counts")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing budget per table row")
    parser.add_argument("--flex", action="store_true", help="also time torch FlexAttention (compiled)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense ORT contestants")
    parser.add_argument("--memory", action="store_true", help="measure peak memory instead of time")
    parser.add_argument("--rule", action="store_true",
                        help="compare a layout_rule (sink + local window) with the same layout given explicitly")
    parser.add_argument("--decode", action="store_true",
                        help="time KV-cache decode steps (--seq: context lengths, --queries: Sq)")
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 16], help="queries per decode step")
    parser.add_argument("--layers", type=int, default=30, help="copies of a decode step's inputs cycled through")
    parser.add_argument("--previous-library", help="another build of libonnxprune_ops.so to time alongside (--decode)")
    parser.add_argument("--_child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.decode:
        args.seq = args.seq or [2048, 8192]
        args.kept = args.kept or [1.0, 0.25]
        decode_table(args)
        return
    args.seq = args.seq or [2048, 4096]
    args.kept = args.kept or [0.1, 1.0]
    if args._child:
        kind, s, d, block, kept, threads = args._child
        _child_peak_mib(kind, int(s), int(d), int(block), float(kept), int(threads))
        return
    if args.memory:
        memory_table(args)
        return
    if args.rule:
        rule_table(args)
        return

    import ctypes

    isa_of = ctypes.CDLL(library_path()).OnnxpruneCpuIsa
    isa_of.restype = ctypes.c_char_p
    print(f"CPU: {_cpu_model()}, {os.cpu_count()} logical CPUs; onnxruntime {ort.__version__}; "
          f"bsa kernel variant {isa_of().decode()}")
    print(f"B=1, {HEADS} heads, D={args.head_size}, float32; median ms of interleaved runs")
    d = args.head_size
    rng = np.random.default_rng(0)
    flex = None
    rows = []
    for threads in args.threads:
        gemm = gemm_rate(threads, args.seconds / 2)
        print(f"{threads} thread(s): float32 GEMM ceiling (ORT MatMul 2048³) {gemm:.1f} GFLOP/s", flush=True)
        if args.flex:
            flex = Flex(threads)
        for s in args.seq:
            q, k, v = (rng.standard_normal((1, HEADS, s, d)).astype(np.float32) for _ in range(3))
            qkv = {"Q": q, "K": k, "V": v}
            dense = []
            if not args.no_dense:
                dec = session(decomposed_model(d), threads)
                att = session(attention23_model(), threads)
                mha = session(mha_model(), threads)
                flat = {n: x.transpose(0, 2, 1, 3).reshape(1, s, HEADS * d).copy() for n, x in qkv.items()}
                dense = [
                    Contestant("decomposed", lambda dec=dec: dec.run(None, qkv)),
                    Contestant("attention", lambda att=att: att.run(None, qkv)),
                    Contestant("mha", lambda mha=mha, flat=flat: mha.run(None, flat)),
                ]
                ref = dec.run(None, qkv)[0]
                for other in (att.run(None, qkv)[0],
                              mha.run(None, flat)[0].reshape(1, s, HEADS, d).transpose(0, 2, 1, 3)):
                    assert np.abs(other - ref).max() < 1e-4, "dense contestants disagree"
            for block in args.blocks:
                bsa = session(bsa_model(block), threads, with_library=True)
                for kept in args.kept:
                    # Seeded by the case: every thread count and contestant sees the same layout.
                    layout = layout_with(kept, -(-s // block), np.random.default_rng([s, block, round(kept * 1000)]))
                    feeds = dict(qkv, layout=layout)
                    out = bsa.run(None, feeds)[0]
                    if layout.all() and dense:
                        assert np.abs(out - ref).max() < 1e-4, "bsa with every block kept differs from dense"
                    contestants = [c for c in dense] + [Contestant("bsa", lambda f=feeds, b=bsa: b.run(None, f))]
                    flex_note = ""
                    if flex is not None:
                        run, flex_out, compile_s = flex.runner(q, k, v, layout, block)
                        if np.abs(flex_out - out).max() > 1e-3:
                            flex_note = " (flex output differs!)"
                        contestants.append(Contestant("flex", run))
                    for c in contestants:
                        c.times = []
                    time_interleaved(contestants, args.seconds)
                    ms = {c.name: median_ms(c) for c in contestants}
                    rows.append((threads, s, block, float(layout.mean()), ms, gemm,
                                 4.0 * block * block * d * int(layout.sum()), flex_note))
                    _print_row(rows[-1], header=len(rows) == 1, with_flex=flex is not None, file=sys.stderr)
    for i, row in enumerate(rows):
        _print_row(row, header=i == 0, with_flex=flex is not None)
    _print_thread_scaling(rows)


def _print_thread_scaling(rows) -> None:
    """bsa time at the lowest thread count over its time at each higher count, per case."""
    by_case: dict = {}
    for threads, s, block, kept, ms, *_ in rows:
        by_case.setdefault((s, block, round(kept, 3)), {})[threads] = ms["bsa"]
    lines = []
    for (s, block, kept), times in by_case.items():
        if len(times) > 1:
            base = min(times)
            lines.append(f"  S={s} block {block} kept {kept:.3f}: " + ", ".join(
                f"{t} threads {times[base] / times[t]:.2f}×" for t in sorted(times) if t != base) + f" (vs {base})")
    if lines:
        print("bsa speed-up with threads:")
        print("\n".join(lines))


def _print_row(row, header: bool, with_flex: bool, file=None) -> None:
    """One table row; progress rows go to stderr while measuring, the table to stdout at the end."""
    file = file or sys.stdout
    threads, s, block, kept, ms, gemm, flops, note = row
    names = [n for n in ("decomposed", "attention", "mha") if n in ms]
    if header:
        cols = [f"{'thr':>3}", f"{'S':>5}", f"{'block':>5}", f"{'kept':>5}"] + [f"{n + ' ms':>13}" for n in names]
        if with_flex:
            cols.append(f"{'flex ms':>9}")
        cols += [f"{'bsa ms':>8}"]
        if names:
            cols.append(f"{'best dense/bsa':>14}")
        if with_flex:
            cols.append(f"{'flex/bsa':>8}")
        cols += [f"{'GFLOP/s kept':>12}", f"{'% of GEMM':>9}"]
        print(" ".join(cols), file=file)
    cols = [f"{threads:>3}", f"{s:>5}", f"{block:>5}", f"{kept:>5.3f}"] + [f"{ms[n]:>13.2f}" for n in names]
    if with_flex:
        cols.append(f"{ms['flex']:>9.2f}")
    cols.append(f"{ms['bsa']:>8.2f}")
    if names:
        cols.append(f"{min(ms[n] for n in names) / ms['bsa']:>13.2f}×")
    if with_flex:
        cols.append(f"{ms['flex'] / ms['bsa']:>7.2f}×")
    rate = flops / (ms["bsa"] / 1e3) / 1e9
    cols += [f"{rate:>12.1f}", f"{100 * rate / gemm:>8.0f}%"]
    print(" ".join(cols) + note, file=file, flush=True)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
