"""MiniLM held-out cosine: select against AP (scope layer) at block 16, at the held-out effective
sparsity each reaches (docs/SELECTION.md, "MiniLM: select against AP"). Reuses tools/results.py's
MiniLM data, export and statistics (made once under build/minilm/); the masked PyTorch model
evaluates each layout, as the sweep of `make results` does.

    .venv/bin/python tools/minilm_select_vs_ap.py   # about 10 minutes on 2 cores
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import results  # noqa: E402

SETTINGS = [("ap", p) for p in (0.5, 0.8, 0.9, 0.95)] + [("select", d) for d in (0.6, 0.4, 0.3, 0.2, 0.15, 0.1)]


def main() -> int:
    import torch

    from onnxprune import selection
    from onnxprune.layouts import effective_sparsity, learn_layouts
    from onnxprune.masked_attention import apply_layouts
    from onnxprune.recover import load_pretrained, torch_embeddings

    torch.set_num_threads(2)
    out = ROOT / "build" / "minilm"
    out.mkdir(parents=True, exist_ok=True)
    dense, stats, names, calibration, evaluation = results.minilm_dense(out)
    lengths = np.bincount([len(e) for e in evaluation])
    model = load_pretrained(results.default_model_dir())
    apply_layouts(model, None)
    dense_emb = torch_embeddings(model, evaluation, names)
    dense_nn = results.nearest_neighbours(dense_emb)
    rows = []
    for method, knob in SETTINGS:
        t0 = time.perf_counter()
        if method == "ap":  # knob: AP's pruned fraction p
            learned = learn_layouts(stats, knob, 16, "layer")
        else:  # knob: the density
            learned = selection.learn(stats, 16, method="select", density=knob)
        apply_layouts(model, learned)
        emb = torch_embeddings(model, evaluation, names)
        row = {"method": method, "knob": knob, "eff_held_out": effective_sparsity(lengths, learned.sites, 16),
               **results.quality(emb, dense_emb, dense_nn), "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "select_vs_ap.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
