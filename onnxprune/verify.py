"""Compare two models' outputs on the same data (dense vs pruned, or any two)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from onnxprune.data import Dataset
from onnxprune.errors import OnnxpruneError
from onnxprune.progress import progress
from onnxprune.runtime import session


@dataclasses.dataclass
class OutputComparison:
    name: str
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine_mean: float  # per example, outputs flattened over valid positions
    cosine_min: float
    failed_elements: int
    elements: int

    @property
    def passed(self) -> bool:
        return self.failed_elements == 0


def _valid_rows(output: np.ndarray, mask: np.ndarray | None) -> list[np.ndarray]:
    """Per example, the output restricted to valid (non-padding) positions where that applies."""
    rows = []
    for i in range(output.shape[0]):
        out = output[i]
        if mask is not None and out.ndim >= 1 and out.shape[0] == mask.shape[1]:
            out = out[mask[i] != 0]
        rows.append(out.reshape(-1).astype(np.float64))
    return rows


def compare_outputs(
    a: str | os.PathLike, b: str | os.PathLike, dataset: Dataset, atol: float = 1e-4, rtol: float = 1e-3,
    batch_size: int = 8, threads: int | None = None, show_progress: bool = True,
) -> list[OutputComparison]:
    """Run both models on every batch. An element fails when it exceeds both ``atol`` and
    ``rtol·|b|`` (Polygraphy's rule). Padded positions are left out of the comparison."""
    sess_a, sess_b = session(a, threads=threads), session(b, threads=threads)
    names_a = [o.name for o in sess_a.get_outputs()]
    names_b = [o.name for o in sess_b.get_outputs()]
    if names_a != names_b:
        raise OnnxpruneError(f"the models' outputs differ: {names_a} vs {names_b}")
    stats = {n: {"max_abs": 0.0, "sum_abs": 0.0, "max_rel": 0.0, "cos": [], "failed": 0, "count": 0} for n in names_a}
    total = -(-len(dataset) // batch_size)
    for feeds in progress(dataset.batches(batch_size), total=total, desc="verifying", unit="batch", enabled=show_progress):
        mask = feeds.get("attention_mask")
        for name, x, y in zip(names_a, sess_a.run(None, feeds), sess_b.run(None, feeds)):
            s = stats[name]
            for xa, yb in zip(_valid_rows(x, mask), _valid_rows(y, mask)):
                diff = np.abs(xa - yb)
                s["max_abs"] = max(s["max_abs"], float(diff.max(initial=0)))
                s["sum_abs"] += float(diff.sum())
                rel = diff / np.maximum(np.abs(yb), 1e-12)
                s["max_rel"] = max(s["max_rel"], float(rel.max(initial=0)))
                s["failed"] += int(((diff > atol) & (diff > rtol * np.abs(yb))).sum())
                s["count"] += diff.size
                denom = np.linalg.norm(xa) * np.linalg.norm(yb)
                s["cos"].append(float(xa @ yb / denom) if denom > 0 else 1.0)
    return [
        OutputComparison(
            name=n, max_abs=s["max_abs"], mean_abs=s["sum_abs"] / max(s["count"], 1), max_rel=s["max_rel"],
            cosine_mean=float(np.mean(s["cos"])), cosine_min=float(np.min(s["cos"])),
            failed_elements=s["failed"], elements=s["count"],
        )
        for n, s in stats.items()
    ]


def sentence_embeddings(model: str | os.PathLike, dataset: Dataset, batch_size: int = 8, threads: int | None = None,
                        with_library: bool = True, show_progress: bool = False) -> np.ndarray:
    """Mean-pooled, L2-normalised last hidden states (sentence-transformers' recipe), in dataset order."""
    sess = session(model, threads=threads, with_library=with_library)
    rows = []
    for feeds in progress(dataset.batches(batch_size, sort=False), total=-(-len(dataset) // batch_size),
                          desc="embedding", unit="batch", enabled=show_progress):
        hidden = sess.run(None, feeds)[0]
        mask = feeds["attention_mask"][..., None].astype(np.float64)
        pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        rows.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(rows)
