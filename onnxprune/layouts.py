"""AP mask learning: block layouts from average attention (Rugina et al., 2020).

A block's score is the average attention probability inside it over valid positions. In each
scope (``layer``: one threshold per site across its heads, the paper's default; ``head``;
``global``) the fraction ``p`` of the scope's blocks with the lowest scores is pruned. Blocks that
causal masking already excludes do not count; diagonal blocks are kept unless asked otherwise,
so no row is left empty and local context survives.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxprune.errors import OnnxpruneError
from onnxprune.op_schema import BLOCK_SIZES
from onnxprune.stats import Stats

SCOPES = ("layer", "head", "global")


@dataclasses.dataclass
class SiteLayout:
    layout: np.ndarray  # uint8 [H, Mq, Mk]
    causal: bool
    density: float  # kept / counted blocks of the layout
    retained_mass: float  # calibration attention mass inside kept blocks / total mass


@dataclasses.dataclass
class LayoutResult:
    block_size: int
    sparsity: float
    scope: str
    sites: dict[str, SiteLayout]
    effective_sparsity: float  # of the blocks dense attention computes on the calibration inputs


def _block_sum(cells: np.ndarray, ratio: int) -> np.ndarray:
    """Sum ``[..., L, L]`` cells into ``[..., L/ratio, L/ratio]`` blocks (zero-padding the edge)."""
    *lead, lq, lk = cells.shape
    mq, mk = -(-lq // ratio), -(-lk // ratio)
    padded = np.zeros((*lead, mq * ratio, mk * ratio))
    padded[..., :lq, :lk] = cells
    return padded.reshape(*lead, mq, ratio, mk, ratio).sum(axis=(-3, -1))


def looks_causal(stats: Stats, site: str) -> bool:
    """True when no attention mass was ever seen above the diagonal: the site masks causally."""
    sums = stats.sums[site].sum(axis=0)
    total = sums.sum()
    upper = np.triu(sums, k=1).sum()
    return total > 0 and upper <= 1e-9 * total


def learn_layouts(
    stats: Stats,
    sparsity: float,
    block_size: int = 16,
    scope: str = "layer",
    keep_diagonal: bool = True,
    causal_sites: set[str] | None = None,
) -> LayoutResult:
    if not 0.0 <= sparsity < 1.0:
        raise OnnxpruneError(f"--sparsity must be in [0, 1), got {sparsity}")
    if block_size not in BLOCK_SIZES:
        raise OnnxpruneError(f"--block-size must be one of {BLOCK_SIZES}, got {block_size}")
    if block_size % stats.granularity:
        raise OnnxpruneError(
            f"--block-size {block_size} is not a multiple of the statistics' granularity {stats.granularity}"
        )
    return _learn(stats, sparsity, block_size, scope, keep_diagonal, causal_sites)


def learn_element_masks(
    stats: Stats, sparsity: float, scope: str = "layer", keep_diagonal: bool = True, causal_sites: set[str] | None = None,
) -> LayoutResult:
    """The paper's element-level masks (block size 1) from statistics of granularity 1.

    No kernel runs these; they show, with a dense masked reference, what blocking costs.
    """
    if stats.granularity != 1:
        raise OnnxpruneError(f"element-level masks need statistics of granularity 1, got {stats.granularity}")
    if not 0.0 <= sparsity < 1.0:
        raise OnnxpruneError(f"--sparsity must be in [0, 1), got {sparsity}")
    return _learn(stats, sparsity, 1, scope, keep_diagonal, causal_sites)


def _learn(stats, sparsity, block_size, scope, keep_diagonal, causal_sites) -> LayoutResult:
    if scope not in SCOPES:
        raise OnnxpruneError(f"--scope must be one of {SCOPES}, got {scope!r}")
    ratio = block_size // stats.granularity
    causal_sites = set(causal_sites or ())

    scores, eligible, candidates, masses = {}, {}, {}, {}
    for site in stats.sites:
        mass = _block_sum(stats.sums[site], ratio)  # [H, M, M]
        count = _block_sum(stats.counts[site], ratio)  # [M, M]
        h, mq, mk = mass.shape
        causal = site in causal_sites or looks_causal(stats, site)
        if causal:
            causal_sites.add(site)
        allowed = np.ones((mq, mk), bool) if not causal else np.tril(np.ones((mq, mk), bool))
        diagonal = np.eye(mq, mk, dtype=bool) if keep_diagonal else np.zeros((mq, mk), bool)
        scores[site] = np.divide(mass, count, out=np.zeros_like(mass), where=count > 0)
        eligible[site] = np.broadcast_to(allowed, (h, mq, mk))
        # Blocks no calibration input reached have no evidence: they stay.
        candidates[site] = np.broadcast_to(allowed & ~diagonal & (count > 0), (h, mq, mk))
        masses[site] = mass

    keep = {site: eligible[site].copy() for site in stats.sites}
    groups: list[list[tuple[str, int | None]]]
    if scope == "global":
        groups = [[(site, None) for site in stats.sites]]
    elif scope == "layer":
        groups = [[(site, None)] for site in stats.sites]
    else:
        groups = [[(site, head)] for site in stats.sites for head in range(scores[site].shape[0])]
    for group in groups:
        views = [(site, slice(None) if head is None else slice(head, head + 1)) for site, head in group]
        total = sum(int(eligible[s][hs].sum()) for s, hs in views)
        flat_scores = np.concatenate([scores[s][hs][candidates[s][hs]] for s, hs in views])
        to_prune = min(int(round(sparsity * total)), flat_scores.size)
        if to_prune == 0:
            continue
        order = np.argsort(flat_scores, kind="stable")
        pruned_flags = np.zeros(flat_scores.size, bool)
        pruned_flags[order[:to_prune]] = True
        offset = 0
        for s, hs in views:
            cand = candidates[s][hs]
            n = int(cand.sum())
            sub = keep[s][hs]
            sub[cand] = ~pruned_flags[offset : offset + n]
            offset += n

    sites = {}
    for site in stats.sites:
        counted = eligible[site]
        kept = keep[site]
        total_mass = masses[site].sum()
        sites[site] = SiteLayout(
            layout=kept.astype(np.uint8),
            causal=site in causal_sites,
            density=float(kept.sum() / max(counted.sum(), 1)),
            retained_mass=float(masses[site][kept].sum() / total_mass) if total_mass > 0 else 1.0,
        )
    return LayoutResult(
        block_size=block_size,
        sparsity=sparsity,
        scope=scope,
        sites=sites,
        effective_sparsity=effective_sparsity(stats.lengths, sites, block_size),
    )


def effective_sparsity(lengths: np.ndarray, sites: dict[str, SiteLayout], block_size: int) -> float:
    """Fraction of the blocks that dense attention computes on inputs of these lengths that the
    layouts skip (causal sites: dense computes only blocks on or below the diagonal)."""
    computed = skipped = 0.0
    for length, how_many in enumerate(lengths):
        if how_many == 0 or length == 0:
            continue
        m = -(-length // block_size)
        for site in sites.values():
            region = site.layout[:, :m, :m]  # a rectangular layout may be smaller on one side
            dense = np.tril(np.ones((m, m), bool)) if site.causal else np.ones((m, m), bool)
            dense = dense[: region.shape[1], : region.shape[2]]
            dense_blocks = dense.sum() * region.shape[0]
            computed += how_many * dense_blocks
            skipped += how_many * (dense_blocks - (region.astype(bool) & dense).sum())
    return float(skipped / computed) if computed else 0.0
