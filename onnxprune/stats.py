"""Calibration statistics: per-site sums of pooled attention probabilities, and their counts.

Stored as safetensors (no pickle). Sums and counts add, so statistics of several runs merge by
adding (``Stats.merge``). Cell ``(h, a, b)`` pools query positions ``[a·g, (a+1)·g)`` and key
positions ``[b·g, (b+1)·g)``; ``count[a, b]`` is the number of valid (query, key) pairs summed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable

import numpy as np

from onnxprune import __version__
from onnxprune.errors import OnnxpruneError
from onnxprune.model_io import atomic_path


@dataclasses.dataclass
class Stats:
    granularity: int
    max_length: int
    model_sha256: str
    sites: list[str]
    sums: dict[str, np.ndarray]  # float64 [H, Lq, Lk]; Lg = ⌈max_length/g⌉ on axes following the input
    counts: dict[str, np.ndarray]  # float64 [Lq, Lk]
    lengths: np.ndarray  # int64 [max_length + 1]: how many inputs had each valid length
    num_samples: int = 0

    @property
    def cells(self) -> int:
        return -(-self.max_length // self.granularity)

    @classmethod
    def empty(cls, sites: dict[str, int], granularity: int, max_length: int, model_sha256: str) -> Stats:
        """``sites`` maps each site name to its number of heads."""
        lg = -(-max_length // granularity)
        return cls(
            granularity=granularity,
            max_length=max_length,
            model_sha256=model_sha256,
            sites=list(sites),
            sums={s: np.zeros((h, lg, lg)) for s, h in sites.items()},
            counts={s: np.zeros((lg, lg)) for s in sites},
            lengths=np.zeros(max_length + 1, dtype=np.int64),
        )

    def mean(self, site: str) -> np.ndarray:
        """Average attention probability per head and cell (0 where nothing was seen)."""
        count = self.counts[site]
        return np.divide(self.sums[site], count, out=np.zeros_like(self.sums[site]), where=count > 0)

    def merge(self, other: Stats) -> Stats:
        """The statistics of both runs' data. Those of different maximum lengths (or, for axes
        that do not follow the input, of different extents seen) merge exactly: the smaller is
        padded with zero sums and counts. Different models, granularities or sites refuse."""
        self._check_mergeable(other)
        max_length = max(self.max_length, other.max_length)
        sums, counts = {}, {}
        for site in self.sites:
            shape = np.maximum(self.sums[site].shape, other.sums[site].shape)
            sums[site] = _padded(self.sums[site], shape) + _padded(other.sums[site], shape)
            counts[site] = _padded(self.counts[site], shape[1:]) + _padded(other.counts[site], shape[1:])
        return dataclasses.replace(
            self,
            max_length=max_length,
            sums=sums,
            counts=counts,
            lengths=_padded(self.lengths, (max_length + 1,)) + _padded(other.lengths, (max_length + 1,)),
            num_samples=self.num_samples + other.num_samples,
        )

    def add(self, other: Stats) -> Stats:
        """``merge``, adding into this object's own arrays when no padding is needed (a driver
        adding up shards of a long-context model: no new arrays of hundreds of MB per shard).
        Returns the sum: ``self``, or a new object when padding was needed."""
        self._check_mergeable(other)
        if self.max_length != other.max_length or any(
            self.sums[s].shape != other.sums[s].shape for s in self.sites
        ):
            return self.merge(other)
        for site in self.sites:
            self.sums[site] = _add_into(self.sums[site], other.sums[site])
            self.counts[site] = _add_into(self.counts[site], other.counts[site])
        self.lengths = _add_into(self.lengths, other.lengths)
        self.num_samples += other.num_samples
        return self

    def _check_mergeable(self, other: Stats) -> None:
        if self.granularity != other.granularity:
            raise OnnxpruneError(
                f"cannot merge statistics of granularity {self.granularity} with granularity {other.granularity}"
            )
        if self.model_sha256 != other.model_sha256:
            raise OnnxpruneError(
                f"cannot merge statistics computed for different models (sha256 {self.model_sha256[:12]}… "
                f"and {other.model_sha256[:12]}…)"
            )
        if self.sites != other.sites:
            raise OnnxpruneError(
                f"cannot merge statistics computed for different models: their attention sites differ "
                f"({len(self.sites)} and {len(other.sites)} sites, {_first_difference(self.sites, other.sites)})"
            )
        for site in self.sites:
            if self.sums[site].shape[0] != other.sums[site].shape[0]:
                raise OnnxpruneError(
                    f"cannot merge statistics of site {site}: {self.sums[site].shape[0]} and "
                    f"{other.sums[site].shape[0]} heads"
                )

    @property
    def tokens(self) -> int:
        """Valid positions seen (the length histogram's total)."""
        return int(np.dot(self.lengths, np.arange(len(self.lengths))))

    def summary(self) -> dict:
        """What the statistics hold, for people and JSON (``onnxprune stats show``)."""
        seen = np.nonzero(self.lengths)[0]
        return {
            "model_sha256": self.model_sha256,
            "granularity": self.granularity,
            "max_length": self.max_length,
            "num_samples": self.num_samples,
            "tokens": self.tokens,
            "lengths": {"min": int(seen[0]), "max": int(seen[-1]),
                        "mean": self.tokens / self.num_samples} if len(seen) else None,
            "sites": [{"name": s, "heads": int(self.sums[s].shape[0]), "cells": list(self.counts[s].shape),
                       "pairs": float(self.counts[s].sum())} for s in self.sites],
            "bytes": int(sum(self.sums[s].nbytes + self.counts[s].nbytes for s in self.sites) + self.lengths.nbytes),
        }

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.numpy import save_file

        tensors = {"lengths": self.lengths}
        for i, site in enumerate(self.sites):
            # Site names can hold any character; tensors are keyed by index, names go in metadata.
            tensors[f"site{i}.sum"] = self.sums[site]
            tensors[f"site{i}.count"] = self.counts[site]
        metadata = {
            "format": "onnxprune.stats/1",
            "onnxprune_version": __version__,
            "sites": json.dumps(self.sites),
            "granularity": str(self.granularity),
            "max_length": str(self.max_length),
            "num_samples": str(self.num_samples),
            "model_sha256": self.model_sha256,
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Stats:
        from safetensors import SafetensorError, safe_open

        if not os.path.isfile(path):
            raise OnnxpruneError(f"{path}: no such file")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "onnxprune.stats/1":
                    raise OnnxpruneError(f"{path}: not an onnxprune statistics file")
                sites = json.loads(meta["sites"])
                return cls(
                    granularity=int(meta["granularity"]),
                    max_length=int(meta["max_length"]),
                    model_sha256=meta["model_sha256"],
                    sites=sites,
                    sums={s: f.get_tensor(f"site{i}.sum") for i, s in enumerate(sites)},
                    counts={s: f.get_tensor(f"site{i}.count") for i, s in enumerate(sites)},
                    lengths=f.get_tensor("lengths"),
                    num_samples=int(meta["num_samples"]),
                )
        except (SafetensorError, KeyError, ValueError, OSError) as e:
            raise OnnxpruneError(f"{path}: not a readable statistics file ({e})") from None


def merge_all(stats: Iterable[Stats]) -> Stats:
    """The sum of several statistics (``Stats.merge`` in turn)."""
    iterator = iter(stats)
    try:
        total = next(iterator)
    except StopIteration:
        raise OnnxpruneError("no statistics to merge") from None
    for other in iterator:
        total = total.merge(other)
    return total


def _add_into(total: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``total + other``, in ``total``'s memory unless it is read-only (an array Ray handed over
    from its object store)."""
    if not total.flags.writeable:
        return total + other
    total += other
    return total


def _padded(array: np.ndarray, shape) -> np.ndarray:
    """``array`` with zeros after its end on every axis, to ``shape``."""
    if tuple(array.shape) == tuple(shape):
        return array
    return np.pad(array, [(0, int(n) - d) for n, d in zip(shape, array.shape)])


def _first_difference(a: list[str], b: list[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"site {i}: {x!r} and {y!r}"
    return f"one has {abs(len(a) - len(b))} more"
