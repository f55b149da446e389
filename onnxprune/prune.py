"""Prune: layouts from statistics (``onnxprune.selection``: the per-head selection, AP, or a
baseline pattern), then each attention site becomes one
``onnxprune.BlockSparseAttention`` node carrying its layout, with the op's function body in the
file so the model also runs where onnxprune's library is absent."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import onnx_ir as ir

from onnxprune import __version__
from onnxprune.errors import OnnxpruneError
from onnxprune.layouts import Layouts, effective_sparsity
from onnxprune.model_io import load_model
from onnxprune.passes import prune_passes
from onnxprune.rules import decompose_fused_attention, find_sites
from onnxprune.selection import learn
from onnxprune.stats import Stats


@dataclasses.dataclass
class SiteReport:
    name: str
    form: str
    heads: int
    causal: bool
    density: float  # kept share of the blocks dense attention computes on the calibration inputs
    retained_mass: float


@dataclasses.dataclass
class PruneReport:
    sparsity: float
    block_size: int
    scope: str | None  # select: layer or global; ap: layer, head or global; None for the patterns
    effective_sparsity: float
    sites: list[SiteReport]
    method: str = "ap"  # or a pattern: streaming, duo
    density: float | None = None  # asked for (None: streaming, whose pattern sets it)
    layouts: Layouts | None = dataclasses.field(default=None, repr=False)

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "layouts"}

    def effective_sparsity_on(self, lengths: list[int]) -> float:
        """The effective sparsity on inputs of these lengths (held-out data, say)."""
        histogram = np.bincount(np.asarray(lengths, dtype=np.int64))
        return effective_sparsity(histogram, self.layouts.sites, self.block_size)


def prune(
    model_path: str | os.PathLike,
    stats: Stats,
    sparsity: float | None = None,
    block_size: int = 16,
    scope: str | None = None,
    keep_diagonal: bool = True,
    stats_sha256: str = "",
    *,
    density: float | None = None,
    method: str | None = "ap",
    pattern: str | None = None,
    sink_tokens: int = 0,
    window_tokens: int = 0,
    full_heads: int | None = None,
) -> tuple[ir.Model, PruneReport]:
    """The pruned model (in memory) and its report. ``save_model`` writes it.

    ``sparsity`` p is ``density`` 1 − p (give one). ``method``: ``ap`` (this function's default,
    as before) or ``select`` (the CLI's default); or, with ``method=None``, a baseline
    ``pattern`` (``streaming``, ``duo``) of ``sink_tokens`` and ``window_tokens``. ``full_heads``:
    ``select`` keeps that many heads per site full (for retrieval far back); None: one where the
    budget affords it (``selection.affordable_full_heads``)."""
    if sparsity is not None and density is not None:
        raise OnnxpruneError("give --density or --sparsity, not both")
    if sparsity is not None:
        density = 1.0 - sparsity
    loaded = load_model(model_path)  # first: a missing or malformed file is the clearest error
    model, model_sha = loaded.model, loaded.info.sha256
    if stats.model_sha256 != model_sha:
        raise OnnxpruneError(
            f"the statistics were computed for another model (sha256 {stats.model_sha256[:12]}…, "
            f"{model_path} has {model_sha[:12]}…); run calibrate on this model"
        )
    decompose_fused_attention(model)  # the sites as the statistics name them
    discovery = find_sites(model)
    names = [s.name for s in discovery.sites]
    if not names:
        raise OnnxpruneError(f"{model_path}: no attention site found")
    if names != stats.sites:
        raise OnnxpruneError(f"the statistics name sites {stats.sites[:3]}…, the model has {names[:3]}…")
    causal = {s.name for s in discovery.sites if s.is_causal}
    learned = dataclasses.replace(
        learn(stats, block_size, causal, method=method, pattern=pattern, density=density,
              sink_tokens=sink_tokens, window_tokens=window_tokens, scope=scope, keep_diagonal=keep_diagonal,
              full_heads=full_heads),
        stats_sha256=stats_sha256, onnxprune_version=__version__,
    )
    prune_passes(learned)(model)
    model.metadata_props.update(learned.metadata_props())
    report = PruneReport(
        sparsity=1.0 - density if density is not None else learned.effective_sparsity,
        block_size=block_size,
        scope=learned.scope,
        effective_sparsity=learned.effective_sparsity,
        sites=[
            SiteReport(
                name=s.name,
                form=s.form,
                heads=int(learned.sites[s.name].layout.shape[0]),
                causal=learned.sites[s.name].causal,
                density=learned.sites[s.name].density,
                retained_mass=learned.sites[s.name].retained_mass,
            )
            for s in discovery.sites
        ],
        method=learned.method,
        density=density,
        layouts=learned,
    )
    return model, report
