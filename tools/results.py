"""Quality results: what onnxprune's masks cost on real models and real text, and what recover wins back.

Sections (each writes JSON under --out; `report` turns them into docs/RESULTS.md and PNG plots):

  sweep    all-MiniLM-L6-v2 (real weights), calibrated on single docstrings of one half of the
           stdlib's modules, evaluated on 560 docstrings of the other half: cosine of pruned vs
           dense sentence embeddings, top-1 neighbour agreement, effective sparsity, for
           p × scope × block size, plus the paper's element-level masks.
  recover  `onnxprune recover` at p = 0.5 and 0.9 (block 16, scope layer), objectives compared.
  decoder  a small GPT-2 trained here on stdlib source; perplexity vs p post-training, after
           recover, and with the masks applied during language-model fine-tuning.
  report   docs/RESULTS.md + docs/results/*.png from the JSON files.

    python tools/results.py all            # what `make results` runs
    python tools/results.py sweep --quick  # a reduced run (labelled as such in the report)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxprune.data import load_tokenizer, tokenize  # noqa: E402
from onnxprune.demo import default_model_dir, nearest_neighbours  # noqa: E402
from onnxprune.model_io import atomic_path  # noqa: E402
from onnxprune.stdlib_text import CALIBRATION_MODULES, EVALUATION_MODULES, docstrings  # noqa: E402

SPARSITIES = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95)
SCOPES = ("layer", "head", "global")
BLOCKS = (16, 32, 64)
EVALUATION_SIZE = 560
MAX_LENGTH = 256


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def write_json(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def minilm_data():
    """Calibration (single docstrings of the calibration modules) and the 560 held-out docstrings."""
    tokenizer = load_tokenizer(default_model_dir())
    calibration_lines = docstrings(CALIBRATION_MODULES)
    seen = set(calibration_lines)
    held_out = [d for d in docstrings(EVALUATION_MODULES) if d not in seen]
    chosen = [held_out[i] for i in np.random.default_rng(0).permutation(len(held_out))[:EVALUATION_SIZE]]
    calibration = tokenize(calibration_lines, tokenizer, MAX_LENGTH, chunk=False)
    evaluation = tokenize(chosen, tokenizer, MAX_LENGTH, chunk=False)
    return calibration, evaluation


def minilm_dense(out: Path):
    """The exported dense MiniLM and its granularity-1 statistics (computed once, then reused)."""
    from onnxprune.calibrate import calibrate
    from onnxprune.data import Dataset
    from onnxprune.export import export
    from onnxprune.model_io import input_names
    from onnxprune.stats import Stats

    dense, stats_path = out / "minilm.onnx", out / "minilm.stats.safetensors"
    calibration, evaluation = minilm_data()
    if not dense.is_file():
        export(default_model_dir(), dense, seq_len=64, log=log)
    names = input_names(dense)
    if not stats_path.is_file():
        t0 = time.perf_counter()
        stats = calibrate(dense, Dataset(calibration, names), granularity=1, max_length=MAX_LENGTH,
                          threads=2, show_progress=False)
        stats.save(stats_path)
        log(f"calibrated on {len(calibration)} docstrings in {time.perf_counter() - t0:.0f} s")
    return dense, Stats.load(stats_path), names, calibration, evaluation


def quality(emb: np.ndarray, dense_emb: np.ndarray, dense_nn: np.ndarray) -> dict:
    cos = (emb * dense_emb).sum(axis=1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "top1_agreement": float((nearest_neighbours(emb) == dense_nn).mean())}


# ---------------------------------------------------------------------------------------------
# sweep


def run_sweep(out: Path, quick: bool) -> None:
    import torch

    from onnxprune.layouts import effective_sparsity, learn_element_masks, learn_layouts
    from onnxprune.masked_attention import apply_layouts
    from onnxprune.model_io import save_model
    from onnxprune.prune import prune
    from onnxprune.recover import load_model, torch_embeddings
    from onnxprune.verify import sentence_embeddings

    torch.set_num_threads(2)
    dense, stats, names, calibration, evaluation = minilm_dense(out)
    lengths = np.bincount([len(e) for e in evaluation])
    model = load_model(default_model_dir())
    apply_layouts(model, None)
    dense_emb = torch_embeddings(model, evaluation, names)
    dense_nn = nearest_neighbours(dense_emb)
    ort_dense = sentence_embeddings(dense, _dataset(evaluation, names), threads=2, with_library=False)
    rows = []
    result = {"quick": quick, "calibration_inputs": len(calibration), "evaluation_inputs": len(evaluation),
              "calibration_mean_tokens": float(np.mean([len(c) for c in calibration])),
              "evaluation_mean_tokens": float(np.mean([len(e) for e in evaluation])),
              "dense_torch_vs_ort_cosine_min": float((ort_dense * dense_emb).sum(1).min()),
              "rows": rows, "product_path": []}
    sparsities = (0.2, 0.5, 0.9) if quick else tuple(sorted(set(SPARSITIES) | {0.5}))
    configs = [("block", 16, "layer", p) for p in sparsities] + [("element", 1, "layer", p) for p in sparsities]
    if not quick:
        configs += [("block", b, s, p) for b in BLOCKS for s in SCOPES for p in sparsities
                    if (b, s) != (16, "layer")]
        configs += [("element", 1, s, p) for s in ("head", "global") for p in sparsities]
    for kind, block, scope, p in configs:
        t0 = time.perf_counter()
        if kind == "block":
            learned = learn_layouts(stats, p, block, scope)
        else:
            learned = learn_element_masks(stats, p, scope)
        apply_layouts(model, [learned.sites[s].layout for s in stats.sites], block)
        emb = torch_embeddings(model, evaluation, names)
        row = {"kind": kind, "block": block, "scope": scope, "p": p,
               "effective_sparsity_calibration": learned.effective_sparsity,
               "effective_sparsity_held_out": effective_sparsity(lengths, learned.sites, block),
               "retained_mass": float(np.mean([s.retained_mass for s in learned.sites.values()])),
               **quality(emb, dense_emb, dense_nn), "seconds": time.perf_counter() - t0}
        rows.append(row)
        log(f"{kind:7} b={block:2} {scope:6} p={p:.2f}  eff={row['effective_sparsity_held_out']:.3f} "
            f"cos={row['cosine_mean']:.4f} min={row['cosine_min']:.4f} top1={row['top1_agreement']:.3f} "
            f"({row['seconds']:.0f} s)")
        write_json(out / "sweep.json", result)
    # The product path: the pruned .onnx in ONNX Runtime with the library's kernel.
    for p in (0.5, 0.9):
        pruned_model, report = prune(dense, stats, p, block_size=16, scope="layer")
        path = out / f"minilm.p{int(p * 100):02d}.onnx"
        save_model(pruned_model, path)
        ort_emb = sentence_embeddings(path, _dataset(evaluation, names), threads=2)
        learned = report.layouts
        apply_layouts(model, [learned.sites[s].layout for s in stats.sites], 16)
        torch_emb = torch_embeddings(model, evaluation, names)
        entry = {"p": p, "path": path.name, **quality(ort_emb, dense_emb, dense_nn),
                 "max_abs_embedding_diff_vs_torch": float(np.abs(ort_emb - torch_emb).max())}
        result["product_path"].append(entry)
        log(f"ORT pruned p={p}: cos={entry['cosine_mean']:.4f}, |ORT - torch masked| {entry['max_abs_embedding_diff_vs_torch']:.1e}")
    write_json(out / "sweep.json", result)


def _dataset(examples, names):
    from onnxprune.data import Dataset

    return Dataset(examples, names)


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=("sweep", "recover", "decoder", "report", "all"))
    parser.add_argument("--out", default=str(ROOT / "out" / "results"), help="working directory (default out/results)")
    parser.add_argument("--quick", action="store_true", help="reduced run (fewer configurations and steps)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = ("sweep", "recover", "decoder", "report") if args.section == "all" else (args.section,)
    for section in sections:
        t0 = time.perf_counter()
        globals()[f"run_{section}"](out, args.quick)
        log(f"{section} done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
