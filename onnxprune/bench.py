"""Latency of models in ONNX Runtime, side by side in one run (these machines are noisy).

Runs are interleaved (A, B, A, B, ...) so that drift in the machine's speed hits every model
alike; the summary is the median with the spread (p10/p90 and the interquartile range).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence

import numpy as np

from onnxprune import op_schema
from onnxprune.errors import OnnxpruneError
from onnxprune.model_io import ModelInfo, read_info
from onnxprune.progress import progress
from onnxprune.runtime import run, session
from onnxprune.synthetic import input_specs, synthetic_feeds


@dataclasses.dataclass
class Timing:
    model: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    p25_ms: float = 0.0
    p75_ms: float = 0.0
    mean_ms: float = 0.0
    min_ms: float = 0.0
    library: bool = True
    providers: list[str] = dataclasses.field(default_factory=list)

    @property
    def iqr_ms(self) -> float:
        return self.p75_ms - self.p25_ms

    def to_json(self) -> dict:
        return dict(dataclasses.asdict(self), iqr_ms=self.iqr_ms)


def _library_flags(models: Sequence[ModelInfo], library: str) -> list[bool]:
    """``auto``: the models with onnxprune ops; ``none``; ``a``/``b``: only the first/second model."""
    if library == "auto":
        return [m.uses_domain(op_schema.DOMAIN) for m in models]
    if library == "none":
        return [False] * len(models)
    return [i == "ab".index(library) for i in range(len(models))]


def check_providers(providers: Sequence[str] | None) -> list[str]:
    import onnxruntime as ort

    chosen = list(providers or ["CPUExecutionProvider"])
    available = ort.get_available_providers()
    missing = [p for p in chosen if p not in available]
    if missing:
        raise OnnxpruneError(f"execution provider(s) {missing} not available in this onnxruntime (it has {available})")
    return chosen


def bench(models: Sequence[str | os.PathLike | ModelInfo], seq_len: int = 256, batch: int = 1,
          threads: int | None = None, warmup: int = 3, repeats: int = 20, show_progress: bool = True,
          providers: Sequence[str] | None = None, library: str = "auto") -> list[Timing]:
    """Time each model on the same synthetic inputs (token ids valid for every model's vocabulary)."""
    if not models:
        raise OnnxpruneError("no model to benchmark")
    providers = check_providers(providers)
    models = [read_info(m) for m in models]
    flags = _library_flags(models, library)
    sessions = [session(m, providers=providers, threads=threads, with_library=f) for m, f in zip(models, flags)]
    specs = [input_specs(m) for m in models]
    vocab = min(v for _, v in specs)
    feeds = [synthetic_feeds(s, vocab, batch, seq_len) for s, _ in specs]
    total_warmup = warmup * len(models)
    steps = [(i, False) for _ in range(warmup) for i in range(len(models))]
    steps += [(i, True) for _ in range(repeats) for i in range(len(models))]
    times: list[list[float]] = [[] for _ in models]
    for i, timed in progress(steps, total=len(steps), desc=f"benchmarking ({total_warmup} warm-up runs)",
                             unit="run", enabled=show_progress):
        start = time.perf_counter()
        run(sessions[i], feeds[i], models[i].path)
        if timed:
            times[i].append((time.perf_counter() - start) * 1e3)
    return [
        Timing(
            model=m.path, median_ms=float(np.median(t)), p10_ms=float(np.percentile(t, 10)),
            p90_ms=float(np.percentile(t, 90)), runs=len(t), p25_ms=float(np.percentile(t, 25)),
            p75_ms=float(np.percentile(t, 75)), mean_ms=float(np.mean(t)), min_ms=float(np.min(t)),
            library=f, providers=list(s.get_providers()),
        )
        for m, t, f, s in zip(models, times, flags, sessions)
    ]
