"""Compare two models' outputs on the same data (dense vs pruned, or any two)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from onnxprune import op_schema
from onnxprune.data import Dataset
from onnxprune.errors import OnnxpruneError
from onnxprune.model_io import ModelInfo, read_info
from onnxprune.progress import progress
from onnxprune.runtime import run, session


@dataclasses.dataclass
class OutputComparison:
    """One output of B against the same output of A (the reference), over every example."""

    name: str
    max_abs: float
    mean_abs: float
    max_rel: float  # |A - B| / |A|, where A is not 0
    mean_rel: float
    cosine_mean: float  # per example, outputs flattened over valid positions
    cosine_min: float
    failed_elements: int  # over both --atol and --rtol·|A|, or a non-finite mismatch
    elements: int
    nonfinite_mismatches: int = 0  # NaN anywhere, or ±inf where the other model differs

    @property
    def passed(self) -> bool:
        return self.failed_elements == 0

    def to_json(self) -> dict:
        return dict(dataclasses.asdict(self), passed=self.passed)


def _valid_rows(output: np.ndarray, mask: np.ndarray | None) -> list[np.ndarray]:
    """Per example, the output restricted to valid (non-padding) positions where that applies."""
    rows = []
    for i in range(output.shape[0]):
        out = output[i]
        if mask is not None and out.ndim >= 1 and mask.ndim == 2 and out.shape[0] == mask.shape[1]:
            out = out[mask[i] != 0]
        rows.append(out.reshape(-1).astype(np.float64))
    return rows


def library_use(model: str | os.PathLike | ModelInfo, choice: str, which: str) -> bool:
    """``choice``: ``auto`` (where the model has onnxprune ops), ``none``, or ``a``/``b`` (only that model)."""
    if choice == "auto":
        return read_info(model).uses_domain(op_schema.DOMAIN)
    return choice == which


def verify(
    a: str | os.PathLike | ModelInfo, b: str | os.PathLike | ModelInfo, dataset: Dataset,
    atol: float = 1e-4, rtol: float = 1e-3, batch_size: int = 8, threads: int | None = None, show_progress: bool = True,
    providers: Sequence[str] | None = None, library: str = "auto",
) -> list[OutputComparison]:
    """Run both models on every batch and compare B to A (the reference).

    An element fails only when it exceeds both ``atol`` and ``rtol·|A|`` (Polygraphy's elementwise
    rule), or when one model gives NaN/inf where the other does not give the same value. Padded
    positions are left out. ``library`` says which model runs with onnxprune's library (see
    ``library_use``); without it a pruned model runs its op's function body.
    """
    a, b = read_info(a), read_info(b)
    sess_a = session(a, providers=providers, threads=threads, with_library=library_use(a, library, "a"))
    sess_b = session(b, providers=providers, threads=threads, with_library=library_use(b, library, "b"))
    names_a = [o.name for o in sess_a.get_outputs()]
    names_b = [o.name for o in sess_b.get_outputs()]
    if names_a != names_b:
        raise OnnxpruneError(f"the models' outputs differ: {names_a} vs {names_b}")
    stats = {n: {"max_abs": 0.0, "sum_abs": 0.0, "max_rel": 0.0, "sum_rel": 0.0, "rel_count": 0, "cos": [],
                 "failed": 0, "count": 0, "nonfinite": 0} for n in names_a}
    total = -(-len(dataset) // batch_size)
    for feeds in progress(dataset.batches(batch_size), total=total, desc="verifying", unit="batch", enabled=show_progress):
        mask = feeds.get("attention_mask")
        for name, x, y in zip(names_a, run(sess_a, feeds, a.path), run(sess_b, feeds, b.path)):
            if np.shape(x) != np.shape(y):
                raise OnnxpruneError(f"output {name!r} has shape {list(np.shape(x))} in A but {list(np.shape(y))} in B")
            s = stats[name]
            for xa, yb in zip(_valid_rows(np.asarray(x), mask), _valid_rows(np.asarray(y), mask)):
                with np.errstate(invalid="ignore"):
                    diff = np.where(xa == yb, 0.0, np.abs(xa - yb))  # equal infinities differ by 0
                bad = ~np.isfinite(diff)
                diff_ok = np.where(bad, 0.0, diff)
                s["max_abs"] = max(s["max_abs"], float(diff_ok.max(initial=0)))
                s["sum_abs"] += float(diff_ok.sum())
                nonzero = (np.abs(xa) > 0) & ~bad & np.isfinite(xa)
                rel = diff_ok[nonzero] / np.abs(xa[nonzero])
                s["max_rel"] = max(s["max_rel"], float(rel.max(initial=0)))
                s["sum_rel"] += float(rel.sum())
                s["rel_count"] += rel.size
                s["failed"] += int((bad | ((diff_ok > atol) & (diff_ok > rtol * np.abs(xa)))).sum())
                s["count"] += diff.size
                s["nonfinite"] += int(bad.sum())
                finite = np.isfinite(xa) & np.isfinite(yb)
                xf, yf = xa[finite], yb[finite]
                denom = np.linalg.norm(xf) * np.linalg.norm(yf)
                s["cos"].append(float(xf @ yf / denom) if denom > 0 else float(np.array_equal(xf, yf)))
    return [
        OutputComparison(
            name=n, max_abs=s["max_abs"], mean_abs=s["sum_abs"] / max(s["count"], 1), max_rel=s["max_rel"],
            mean_rel=s["sum_rel"] / max(s["rel_count"], 1),
            cosine_mean=float(np.mean(s["cos"])) if s["cos"] else 1.0,
            cosine_min=float(np.min(s["cos"])) if s["cos"] else 1.0,
            failed_elements=s["failed"], elements=s["count"], nonfinite_mismatches=s["nonfinite"],
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
