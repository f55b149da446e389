"""Latency of models in ONNX Runtime, side by side in one run (these machines are noisy)."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from onnxprune.progress import progress
from onnxprune.runtime import session

_NUMPY_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32, "tensor(bool)": np.bool_}


@dataclasses.dataclass
class Timing:
    model: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int


def embedding_rows(model_path: str | os.PathLike, input_name: str) -> int | None:
    """Rows of the embedding table that ``input_name`` indexes (a Gather of an initializer)."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    tables = {t.name: t.dims for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] == input_name and node.input[0] in tables:
            return int(tables[node.input[0]][0])
    return None


def synthetic_inputs(sess, batch: int, seq_len: int, seed: int = 0, vocab: int = 100) -> dict[str, np.ndarray]:
    """Token-like inputs: ids in [1, vocab), a full attention mask."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in sess.get_inputs():
        dtype = _NUMPY_TYPES.get(inp.type, np.float32)
        if "mask" in inp.name:
            feeds[inp.name] = np.ones((batch, seq_len), dtype)
        elif "type" in inp.name:
            feeds[inp.name] = np.zeros((batch, seq_len), dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[inp.name] = rng.integers(1, max(vocab, 2), size=(batch, seq_len)).astype(dtype)
        else:
            feeds[inp.name] = rng.standard_normal((batch, seq_len)).astype(dtype)
    return feeds


def bench(models: list[str | os.PathLike], seq_len: int = 256, batch: int = 1, threads: int | None = None,
          warmup: int = 3, repeats: int = 20, show_progress: bool = True) -> list[Timing]:
    """Time each model; runs are interleaved (A, B, A, B, ...) so drift hits all models alike."""
    sessions = [session(m, threads=threads) for m in models]
    vocab = min((embedding_rows(m, "input_ids") or 100) for m in models)
    feeds = [synthetic_inputs(s, batch, seq_len, vocab=min(vocab, 1000)) for s in sessions]
    for sess, feed in zip(sessions, feeds):
        for _ in range(warmup):
            sess.run(None, feed)
    times: list[list[float]] = [[] for _ in models]
    for _ in progress(range(repeats), total=repeats, desc="benchmarking", unit="round", enabled=show_progress):
        for i, (sess, feed) in enumerate(zip(sessions, feeds)):
            start = time.perf_counter()
            sess.run(None, feed)
            times[i].append((time.perf_counter() - start) * 1e3)
    return [
        Timing(str(m), float(np.median(t)), float(np.percentile(t, 10)), float(np.percentile(t, 90)), len(t))
        for m, t in zip(models, times)
    ]
