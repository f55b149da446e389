"""Block layouts: what they are, how AP learns them from statistics, and how a pruned model
carries them.

:class:`Layouts` is the one form a set of layouts takes everywhere: learned here, applied by the
rewrite (``rules``), written by prune (initializers ``onnxprune.layout.<site>`` and
``onnxprune.*`` metadata), read back by :func:`read_layouts` for recover and inspect.

AP mask learning (Rugina et al., 2020): a block's score is the average attention probability
inside it over valid positions. In each scope (``layer``: one threshold per site across its
heads, the paper's default; ``head``; ``global``) the fraction ``p`` of the scope's blocks with
the lowest scores is pruned. Blocks that causal masking already excludes do not count; diagonal
blocks are kept unless asked otherwise, so no row is left empty and local context survives.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxprune import __version__, op_schema
from onnxprune.errors import OnnxpruneError
from onnxprune.layout_rule import blocks_at, learn_rule, validate_rule
from onnxprune.op_schema import BLOCK_SIZES
from onnxprune.stats import Stats

SCOPES = ("layer", "head", "global")
#: The newest layout format this code knows. 1: the explicit ``[Mq, Mk]`` region of each site
#: (longer inputs compute every block beyond it); 2: plus a per-head ``rule`` that continues it.
LAYOUT_VERSION = 2

#: Prefix of every model metadata key onnxprune writes.
METADATA_PREFIX = "onnxprune."
#: Per-site record: ``{site: {"density", "retained_mass", "causal"}}`` as JSON.
SITES_KEY = METADATA_PREFIX + "sites"
#: What recover did to a model (JSON), next to the prune metadata it keeps.
RECOVERED_KEY = METADATA_PREFIX + "recovered"


@dataclasses.dataclass
class SiteLayout:
    """One attention site's layout and what was measured of it when it was learned."""

    layout: np.ndarray  # uint8 [H or 1, Mq, Mk], nonzero = block computed
    causal: bool = False
    density: float | None = None  # kept / counted blocks of the layout
    retained_mass: float | None = None  # calibration attention mass inside kept blocks / total mass
    #: How each head continues beyond the explicit ``[Mq, Mk]`` region (``layout_rule``): int64
    #: ``[H or 1, 4]``, see :mod:`onnxprune.layout_rule`. None: every block beyond it is computed.
    rule: np.ndarray | None = None


@dataclasses.dataclass
class Layouts:
    """The layouts of one model: block size, one :class:`SiteLayout` per attention site in
    execution order, and how they were learned (what prune records in the model's metadata;
    None where unknown)."""

    block_size: int
    sites: dict[str, SiteLayout]
    sparsity: float | None = None
    scope: str | None = None
    keep_diagonal: bool | None = None
    #: Of the blocks dense attention computes on the calibration inputs.
    effective_sparsity: float | None = None
    calibration_samples: int | None = None
    stats_sha256: str | None = None
    #: The onnxprune version that pruned the model.
    onnxprune_version: str | None = None
    #: Layout format version (``LAYOUT_VERSION``; files without one are version 1).
    version: int = LAYOUT_VERSION
    #: How the layouts were chosen: ``select``, ``ap``, ``streaming`` or ``duo`` (``onnxprune.selection``).
    method: str | None = None

    def renamed(self, names: list[str]) -> Layouts:
        """The same layouts, in order, under the site names of another export of the model."""
        if len(names) != len(self.sites):
            raise OnnxpruneError(f"the model has {len(names)} attention sites, the layouts {len(self.sites)}")
        return dataclasses.replace(self, sites=dict(zip(names, self.sites.values())))

    def metadata(self) -> dict[str, object]:
        """The recorded fields by metadata key (without the prefix), None where unknown."""
        return {key: getattr(self, field) for field, (key, _, _) in _METADATA.items()}

    def recorded(self) -> bool:
        """Whether anything beyond the layouts is known (a model pruned without metadata has none)."""
        return any(v is not None for k, v in self.metadata().items() if k not in ("block_size", "layout_version"))

    def metadata_props(self) -> dict[str, str]:
        """The model metadata that records these layouts (read back by :func:`read_layouts`)."""
        props = {METADATA_PREFIX + key: write(getattr(self, field))
                 for field, (key, write, _) in _METADATA.items() if getattr(self, field) is not None}
        props[SITES_KEY] = json.dumps({
            name: {"density": _rounded(s.density), "retained_mass": _rounded(s.retained_mass), "causal": s.causal}
            for name, s in self.sites.items()
        })
        return props


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


#: Layouts field → (metadata key after the prefix, value → text, text → value).
_METADATA: dict[str, tuple[str, Callable, Callable]] = {
    "onnxprune_version": ("version", str, str),
    "sparsity": ("sparsity", lambda v: repr(float(v)), float),
    "scope": ("scope", str, str),
    "block_size": ("block_size", str, int),
    "keep_diagonal": ("keep_diagonal", lambda v: str(int(v)), lambda t: bool(int(t))),
    "stats_sha256": ("stats_sha256", str, str),
    "calibration_samples": ("calibration_samples", str, int),
    "effective_sparsity": ("effective_sparsity", lambda v: f"{v:.6f}", float),
    "version": ("layout_version", str, int),
    "method": ("method", str, str),
}


def attention_nodes(graph: ir.Graph) -> list[ir.Node]:
    """The graph's ``BlockSparseAttention`` nodes, in graph (execution) order."""
    return [n for n in graph if n.domain == op_schema.DOMAIN and n.op_type == op_schema.OP_TYPE]


def node_site(node: ir.Node) -> str | None:
    """The site whose layout a ``BlockSparseAttention`` node reads (its layout initializer's name)."""
    layout = node.inputs[3] if len(node.inputs) > 3 else None
    if layout is None or not layout.name or not layout.name.startswith(op_schema.LAYOUT_PREFIX):
        return None
    return layout.name[len(op_schema.LAYOUT_PREFIX):]


def read_layouts(model: ir.Model) -> Layouts:
    """The layouts a pruned model carries, in the order its attention nodes run, with what its
    metadata records of them."""
    nodes = attention_nodes(model.graph)
    if not nodes:
        raise OnnxpruneError(f"no {op_schema.DOMAIN}.{op_schema.OP_TYPE} node (is it a pruned model?)")
    props = dict(model.metadata_props)
    fields = {}
    for field, (key, _, read) in _METADATA.items():
        try:
            fields[field] = read(props[METADATA_PREFIX + key]) if METADATA_PREFIX + key in props else None
        except ValueError:
            fields[field] = None  # a hand-edited value: unknown rather than unreadable
    try:
        recorded = json.loads(props.get(SITES_KEY, "{}"))
    except json.JSONDecodeError:
        recorded = {}
    version = fields.pop("version") or 1  # written from version 2 on
    if version > LAYOUT_VERSION:
        raise OnnxpruneError(f"layout version {version} is newer than this onnxprune ({__version__}) knows "
                             f"(up to {LAYOUT_VERSION}); upgrade onnxprune")
    sites, block_sizes = {}, set()
    for node in nodes:
        site = node_site(node)
        value = node.inputs[3] if site is not None else None
        if value is None or value.const_value is None:
            raise OnnxpruneError(f"node {node.name!r} has no constant layout initializer")
        block_size = node.attributes.get("block_size")
        if block_size is None:
            raise OnnxpruneError(f"node {node.name!r} has no block_size attribute")
        block_sizes.add(block_size.as_int())
        meta = recorded.get(site, {}) if isinstance(recorded, dict) else {}
        is_causal = node.attributes.get("is_causal")
        layout = value.const_value.numpy().astype(np.uint8)
        rule_value = node.inputs[6] if len(node.inputs) > 6 else None
        rule = None
        if rule_value is not None:
            if rule_value.const_value is None:
                raise OnnxpruneError(f"node {node.name!r}: its layout rule is not a constant initializer")
            rule = validate_rule(rule_value.const_value.numpy(), layout.shape[0])
        sites[site] = SiteLayout(
            layout=layout,
            rule=rule,
            causal=bool(meta.get("causal", is_causal is not None and is_causal.as_int())),
            density=meta.get("density"),
            retained_mass=meta.get("retained_mass"),
        )
    if len(block_sizes) != 1:
        raise OnnxpruneError(f"the attention nodes disagree on block_size ({sorted(block_sizes)})")
    fields["block_size"] = block_sizes.pop()
    return Layouts(sites=sites, version=version, **fields)


def load_layouts(path_or_loaded) -> Layouts:
    """:func:`read_layouts` of the model at a path (its weights stay on disk), or of a
    ``model_io.LoadedModel`` already read."""
    from onnxprune.model_io import LoadedModel, load_model

    loaded = path_or_loaded if isinstance(path_or_loaded, LoadedModel) else load_model(path_or_loaded)
    path = loaded.info.path
    try:
        return read_layouts(loaded.model)
    except OnnxpruneError as e:
        raise OnnxpruneError(f"{path}: {e}") from None


def block_sum(cells: np.ndarray, ratio: int) -> np.ndarray:
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


def check_block_size(stats: Stats, block_size: int) -> None:
    """A block size the op runs whose blocks are whole cells of the statistics."""
    if block_size not in BLOCK_SIZES:
        raise OnnxpruneError(f"--block-size must be one of {BLOCK_SIZES}, got {block_size}")
    if block_size % stats.granularity:
        raise OnnxpruneError(
            f"--block-size {block_size} is not a multiple of the statistics' granularity {stats.granularity}")


def learn_layouts(
    stats: Stats,
    sparsity: float,
    block_size: int = 16,
    scope: str = "layer",
    keep_diagonal: bool = True,
    causal_sites: set[str] | None = None,
) -> Layouts:
    if not 0.0 <= sparsity < 1.0:
        raise OnnxpruneError(f"--sparsity must be in [0, 1), got {sparsity}")
    check_block_size(stats, block_size)
    return _learn(stats, sparsity, block_size, scope, keep_diagonal, causal_sites)


def learn_element_masks(
    stats: Stats, sparsity: float, scope: str = "layer", keep_diagonal: bool = True, causal_sites: set[str] | None = None,
) -> Layouts:
    """The paper's element-level masks (block size 1) from statistics of granularity 1.

    No kernel runs these; they show, with a dense masked reference, what blocking costs.
    """
    if stats.granularity != 1:
        raise OnnxpruneError(f"element-level masks need statistics of granularity 1, got {stats.granularity}")
    if not 0.0 <= sparsity < 1.0:
        raise OnnxpruneError(f"--sparsity must be in [0, 1), got {sparsity}")
    return _learn(stats, sparsity, 1, scope, keep_diagonal, causal_sites)


def _learn(stats, sparsity, block_size, scope, keep_diagonal, causal_sites) -> Layouts:
    if scope not in SCOPES:
        raise OnnxpruneError(f"--scope must be one of {SCOPES}, got {scope!r}")
    ratio = block_size // stats.granularity
    causal_sites = set(causal_sites or ())

    scores, eligible, candidates, masses = {}, {}, {}, {}
    for site in stats.sites:
        mass = block_sum(stats.sums[site], ratio)  # [H, M, M]
        count = block_sum(stats.counts[site], ratio)  # [M, M]
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
        layout = kept.astype(np.uint8)
        sites[site] = SiteLayout(
            layout=layout,
            # Element masks (block 1) are never run by the op: no continuation to learn.
            rule=learn_rule(layout, site in causal_sites) if block_size > 1 else None,
            causal=site in causal_sites,
            density=float(kept.sum() / max(counted.sum(), 1)),
            retained_mass=float(masses[site][kept].sum() / total_mass) if total_mass > 0 else 1.0,
        )
    return Layouts(
        block_size=block_size,
        sites=sites,
        sparsity=sparsity,
        scope=scope,
        keep_diagonal=keep_diagonal,
        effective_sparsity=effective_sparsity(stats.lengths, sites, block_size),
        calibration_samples=stats.num_samples,
    )


def effective_sparsity(lengths: np.ndarray, sites: dict[str, SiteLayout], block_size: int) -> float:
    """Fraction of the blocks that dense attention computes on inputs of these lengths that the
    layouts skip (causal sites: dense computes only blocks on or below the diagonal). A square
    layout (self-attention over the input) continues beyond its explicit region by its rule, as
    the op does; a rectangular one (cross-attention, whose other axis is not the input's) spans
    what it covers."""
    computed = skipped = 0.0
    for length, how_many in enumerate(lengths):
        if how_many == 0 or length == 0:
            continue
        m = -(-length // block_size)
        for site in sites.values():
            heads, mq, mk = site.layout.shape
            if mq == mk:
                kept = blocks_at(site.layout, site.rule, m, m)
            else:
                kept = site.layout[:, :m, :m].astype(bool)
            dense = np.tril(np.ones(kept.shape[1:], bool)) if site.causal else np.ones(kept.shape[1:], bool)
            dense_blocks = dense.sum() * heads
            computed += how_many * dense_blocks
            skipped += how_many * (dense_blocks - (kept & dense).sum())
    return float(skipped / computed) if computed else 0.0
