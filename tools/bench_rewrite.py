"""How long ``prune`` takes to rewrite a deep model: a random-init BERT with 24 layers (models/bert_base.py).

    .venv/bin/python tools/bench_rewrite.py [--layers 24] [--hidden 1024] [--heads 16] [--form dynamo-sdpa-20]
                                            [--external-data] [--workdir DIR]

Exports the model once (kept in --workdir for later runs), makes statistics with the right site
names and shapes (random values: the rewrite does not depend on them), then times each phase of
``prune`` at p = 0.9 and the save. ``--external-data`` exports the weights to a ``.data`` file
(what a model over 2 GB must use; --hidden 1536 gives ~2.8 GB). Prints one table.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# models/ is the checkout's; appended, so that an installed onnxprune still wins over its sources.
sys.path.append(str(Path(__file__).resolve().parents[1]))
from models import bert_base  # noqa: E402
from onnxprune.model_io import load_model, save_model  # noqa: E402
from onnxprune.rules import decompose_fused_attention, find_sites  # noqa: E402
from onnxprune.stats import Stats  # noqa: E402

prune_module = importlib.import_module("onnxprune.prune")
MAX_LENGTH = 512
GRANULARITY = 16


def export_bert(path: Path, layers: int, hidden: int, heads: int, form: str, external_data: bool) -> None:
    import warnings

    import torch

    attn = "eager" if "eager" in form else "sdpa"
    opset = int(form.rsplit("-", 1)[1])
    module = bert_base.build(MAX_LENGTH, layers, hidden, heads, attn)
    ids = torch.ones(1, 32, dtype=torch.int64)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if form.startswith("dynamo"):
            program = torch.onnx.export(
                module, (ids, torch.ones_like(ids)), input_names=["input_ids", "attention_mask"],
                dynamo=True, opset_version=opset,
                dynamic_shapes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}},
            )
            program.save(str(path), external_data=external_data)
        else:
            torch.onnx.export(module, (ids, torch.ones_like(ids)), str(path), dynamo=False,
                              input_names=["input_ids", "attention_mask"], opset_version=opset,
                              dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}})


def synthetic_stats(path: Path, heads: int) -> Stats:
    loaded = load_model(path)
    decompose_fused_attention(loaded.model)
    sites = [s.name for s in find_sites(loaded.model).sites]
    stats = Stats.empty({s: heads for s in sites}, GRANULARITY, MAX_LENGTH, loaded.info.sha256)
    rng = np.random.default_rng(0)
    for site in sites:
        stats.sums[site][:] = rng.random(stats.sums[site].shape)
        stats.counts[site][:] = 1.0
    stats.lengths[MAX_LENGTH] = 1
    stats.num_samples = 1
    return stats


def timed(phases: dict, name: str, fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    phases[name] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--form", default="dynamo-sdpa-20",
                        choices=["dynamo-sdpa-20", "dynamo-eager-20", "dynamo-sdpa-23", "torchscript-eager-17"])
    parser.add_argument("--external-data", action="store_true")
    parser.add_argument("--workdir", default=None, help="where the exported model is kept (default: a temp dir)")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_rewrite."))
    workdir.mkdir(parents=True, exist_ok=True)
    tag = f"bert-{args.layers}x{args.hidden}-{args.form}{'-ext' if args.external_data else ''}"
    dense = workdir / f"{tag}.onnx"
    if not dense.exists():
        start = time.perf_counter()
        export_bert(dense, args.layers, args.hidden, args.heads, args.form, args.external_data)
        print(f"exported {dense} in {time.perf_counter() - start:.1f} s")
    size = sum(f.stat().st_size for f in workdir.glob(f"{tag}.onnx*"))
    stats = synthetic_stats(dense, args.heads)

    phases: dict[str, float] = {}
    original = {name: getattr(prune_module, name) for name in ("load_model", "find_sites")}
    prune_module.load_model = lambda *a, **k: timed(phases, "load", original["load_model"], *a, **k)
    prune_module.find_sites = lambda *a, **k: timed(phases, "discover", original["find_sites"], *a, **k)
    try:
        model, report = timed(phases, "prune (total)", prune_module.prune, dense, stats, 0.9, block_size=64)
    finally:
        for name, fn in original.items():
            setattr(prune_module, name, fn)
    out = workdir / f"{tag}.pruned.onnx"
    timed(phases, "save", save_model, model, out)

    print(f"\n{tag}: {len(report.sites)} sites, files {size / 2**30:.2f} GiB, p = 0.9, block 64")
    print(f"| {'phase':<16} | {'seconds':>8} |")
    print(f"|{'-' * 18}|{'-' * 10}|")
    for name in ("load", "discover", "prune (total)", "save"):
        print(f"| {name:<16} | {phases[name]:8.2f} |")
    print(f"| {'prune + save':<16} | {phases['prune (total)'] + phases['save']:8.2f} |")


if __name__ == "__main__":
    main()
