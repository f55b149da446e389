"""Per-head pattern selection under a block budget (the default ``prune`` method), and the
StreamingLLM and DuoAttention-like baselines in the same terms.

Every head of every site chooses one pattern (:mod:`onnxprune.patterns`): ``s`` sink blocks and
a band of ``w`` blocks around the diagonal, or the full head. A pattern's *loss* is the share of
the head's calibration attention mass it drops. Each query's probabilities sum to one, so this is
the mean over query rows of the share of that row's own mass dropped, every row weighted by how
often it occurred: short early rows (few keys, high probabilities) weigh no more than late ones,
unlike a threshold on average probabilities. A pattern's *cost* is the blocks it computes on
inputs of the calibration lengths (the statistics' length histogram), which is also how the
budget is counted: ``density`` × the blocks dense attention computes there.

The choice is a multiple-choice knapsack, solved greedily on each head's lower convex hull of
(cost, loss): all heads' upgrade steps, steepest loss decrease per block first, while they fit.
What the budget has left is spent on single blocks of the most dropped mass per block (AP-style),
inside the calibrated grid; the rule beyond the grid is the chosen pattern itself.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxprune.errors import OnnxpruneError
from onnxprune.layout_rule import UNBOUNDED
from onnxprune.layouts import Layouts, SiteLayout, block_sum, check_block_size, effective_sparsity, looks_causal
from onnxprune.patterns import band_rule, draw, full_rule
from onnxprune.stats import Stats

METHODS = ("select", "ap")
PATTERNS = ("streaming", "duo")


@dataclasses.dataclass
class _Site:
    mass: np.ndarray  # [H, M, M] calibration attention mass per block
    weight: np.ndarray  # [M, M] how many calibration inputs compute each block densely
    causal: bool


def check_density(density: float) -> float:
    if not 0.0 < density <= 1.0:
        raise OnnxpruneError(f"--density must be in (0, 1], got {density}")
    return density


def block_weights(lengths: np.ndarray, query_blocks: int, key_blocks: int, block_size: int,
                  causal: bool) -> np.ndarray:
    """``[Mq, Mk]``: how many inputs of these lengths compute each block densely — the same
    count ``layouts.effective_sparsity`` makes."""
    weight = np.zeros((query_blocks, key_blocks))
    for length, how_many in enumerate(lengths):
        if how_many and length:
            m = -(-length // block_size)
            weight[:m, :m] += how_many
    if causal:
        weight *= np.tril(np.ones((query_blocks, key_blocks), bool))
    return weight


def _sites(stats: Stats, block_size: int, causal_sites: set[str] | None) -> dict[str, _Site]:
    check_block_size(stats, block_size)
    ratio = block_size // stats.granularity
    sites = {}
    for name in stats.sites:
        mass = block_sum(stats.sums[name], ratio)
        causal = bool(name in (causal_sites or ()) or looks_causal(stats, name))
        sites[name] = _Site(mass, block_weights(stats.lengths, *mass.shape[1:], block_size, causal), causal)
    return sites


def candidates(query_blocks: int, key_blocks: int, causal: bool) -> tuple[list[tuple], np.ndarray]:
    """Each distinct pattern on the grid (rules, bool masks ``[C, Mq, Mk]``); the full head last.
    A band that covers the whole grid is left out: the grid cannot tell it from a full head, and
    beyond the grid the full head is the one the statistics vouch for."""
    rules, masks, seen = [], [], set()
    full = draw(full_rule(causal), query_blocks, key_blocks, causal)
    for sinks in range(key_blocks + 1):
        for window in range(max(query_blocks, key_blocks)):
            rule = band_rule(sinks, window, causal)
            mask = draw(rule, query_blocks, key_blocks, causal)
            key = mask.tobytes()
            if key in seen or (mask == full).all():
                continue
            seen.add(key)
            rules.append(rule)
            masks.append(mask)
    rules.append(full_rule(causal))
    masks.append(full)
    return rules, np.stack(masks)


def _hull(cost: np.ndarray, loss: np.ndarray) -> list[int]:
    """Indices on the lower convex hull of (cost, loss) from the cheapest point, loss decreasing."""
    order = sorted(range(len(cost)), key=lambda i: (cost[i], loss[i]))
    hull: list[int] = []
    for i in order:
        if hull and loss[i] >= loss[hull[-1]] - 1e-15:
            continue  # no cheaper way to drop less
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies above the segment a → i: never the best trade
            if (loss[b] - loss[a]) * (cost[i] - cost[a]) >= (loss[i] - loss[a]) * (cost[b] - cost[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _finish(stats: Stats, block_size: int, sites: dict[str, _Site], layouts: dict[str, np.ndarray],
            rules: dict[str, np.ndarray], **fields) -> Layouts:
    out = {}
    for name, site in sites.items():
        total = site.mass.sum()
        kept = layouts[name].astype(bool)
        layout = SiteLayout(layout=layouts[name].astype(np.uint8), causal=site.causal, rule=rules[name],
                            retained_mass=float(site.mass[kept].sum() / total) if total > 0 else 1.0)
        layout.density = site_density(stats.lengths, layout, block_size)
        out[name] = layout
    return Layouts(block_size=block_size, sites=out,
                   effective_sparsity=effective_sparsity(stats.lengths, out, block_size),
                   calibration_samples=stats.num_samples, **fields)


def site_density(lengths: np.ndarray, site: SiteLayout, block_size: int) -> float:
    """The kept share of the blocks dense attention computes at this site on inputs of these lengths."""
    return 1.0 - effective_sparsity(lengths, {"site": site}, block_size)


def _budget(sites: dict[str, _Site], density: float) -> float:
    return density * sum(s.weight.sum() * s.mass.shape[0] for s in sites.values())


def select_layouts(stats: Stats, density: float, block_size: int = 16, causal_sites: set[str] | None = None,
                   fill: bool = True, full_heads: int | None = 0, scope: str = "global") -> Layouts:
    """Per head, the pattern (sinks + band, or full) that together drop the least calibration
    mass within ``density`` of the dense blocks; leftover budget (``fill``) buys single blocks.

    ``full_heads`` per site are kept full first: those that drop the most mass under one sink
    block and the diagonal. Mass alone never buys them — a band near the diagonal recovers more
    mass per block — yet retrieval far back (a passkey) needs them. ``None``: one per site where
    the budget affords it (:func:`affordable_full_heads`).

    ``scope``: ``global`` (default) one budget for all sites, spent where the mass is; ``layer``
    each site ``density`` of its own blocks (as AP's default does). On SmolLM2 neither wins
    everywhere: the per-layer budget is better at 0.35 and far worse at 0.15
    (docs/SELECTION.md)."""
    check_density(density)
    sites = _sites(stats, block_size, causal_sites)
    if density == 1.0:  # dense: every head full, also beyond the grid
        return duo_layouts(stats, density, 0, 0, block_size, causal_sites, method="select")
    if full_heads is None:
        full_heads = affordable_full_heads(sites, density)
    heads = []  # (site, head, rules, masks, cost, loss, hull)
    for name, site in sites.items():
        rules, masks = candidates(*site.mass.shape[1:], site.causal)
        cost = (masks * site.weight).sum(axis=(1, 2))
        total = site.mass.sum(axis=(1, 2))
        kept = np.einsum("hij,cij->hc", site.mass, masks.astype(float))
        loss = 1.0 - np.divide(kept, total[:, None], out=np.ones_like(kept), where=total[:, None] > 0)
        streaming = rules.index(band_rule(1, 0, site.causal)) if band_rule(1, 0, site.causal) in rules else 0
        forced = set(np.argsort(-loss[:, streaming], kind="stable")[:full_heads].tolist())
        for h in range(site.mass.shape[0]):
            hull = [len(rules) - 1] if h in forced else _hull(cost, loss[h])
            heads.append((name, h, rules, masks, cost, loss[h], hull))
    groups = [list(sites)] if scope == "global" else [[name] for name in sites]
    layouts = {n: np.zeros(s.mass.shape, bool) for n, s in sites.items()}
    rules = {n: np.zeros((s.mass.shape[0], 4), np.int64) for n, s in sites.items()}
    for group in groups:
        members = [head for head in heads if head[0] in group]
        at, left = _choose(members, _budget({n: sites[n] for n in group}, density))
        for position, (name, h, rule_list, masks, _, _, hull) in zip(at, members):
            layouts[name][h] = masks[hull[position]]
            rules[name][h] = rule_list[hull[position]]
        if fill:
            _fill({n: sites[n] for n in group}, layouts, left)
    return _finish(stats, block_size, sites, layouts, rules, sparsity=1.0 - density, method="select")


def affordable_full_heads(sites: dict[str, _Site], density: float) -> int:
    """1 when the budget pays for one full head per site and still leaves every other head a sink
    block, the diagonal and the block before it; else 0.

    On SmolLM2 calibrated at 4096 tokens, one full head per layer keeps perplexity below
    StreamingLLM's at kept shares 0.25 and 0.35 and lifts passkey retrieval from 1/10 to 5–6/10;
    where it leaves the other heads less than that (0.15 at 4096; 0.25 and 0.35 at 1024 tokens,
    where perplexity rose 20–50% over StreamingLLM), it costs more than it brings
    (docs/SELECTION.md)."""
    need = 0.0
    for site in sites.values():
        heads, mq, mk = site.mass.shape
        full = (draw(full_rule(site.causal), mq, mk, site.causal) * site.weight).sum()
        local = (draw(band_rule(1, 1, site.causal), mq, mk, site.causal) * site.weight).sum()
        need += full + (heads - 1) * local
    return int(need <= _budget(sites, density) + 1e-9)


def _choose(heads: list[tuple], budget: float) -> tuple[list[int], float]:
    """Each head's position on its hull, steepest loss decrease per block first while the budget
    lasts; and the budget left."""
    spent = sum(cost[hull[0]] for *_, cost, _, hull in heads)
    steps = []  # (loss decrease per block, head index, position on its hull)
    for i, (*_, cost, loss, hull) in enumerate(heads):
        for j in range(1, len(hull)):
            a, b = hull[j - 1], hull[j]
            steps.append(((loss[a] - loss[b]) / max(cost[b] - cost[a], 1e-12), i, j))
    at = [0] * len(heads)
    for _, i, j in sorted(steps, key=lambda s: -s[0]):
        *_, cost, _, hull = heads[i]
        if at[i] != j - 1:
            continue  # an earlier step of this head did not fit
        extra = cost[hull[j]] - cost[hull[j - 1]]
        if spent + extra <= budget + 1e-9:
            spent += extra
            at[i] = j
    return at, budget - spent


def _fill(sites: dict[str, _Site], layouts: dict[str, np.ndarray], left: float) -> None:
    """Spend ``left`` block-computations on single blocks, most dropped mass per computation first."""
    offers = []
    for name, site in sites.items():
        free = ~layouts[name] & (site.weight > 0)
        h, q, k = np.nonzero(free)
        value = site.mass[h, q, k] / np.maximum(site.mass.sum(axis=(1, 2))[h], 1e-30) / site.weight[q, k]
        offers.extend(zip(value.tolist(), [name] * len(h), h.tolist(), q.tolist(), k.tolist()))
    for value, name, h, q, k in sorted(offers, key=lambda o: -o[0]):
        if value <= 0 or left <= 0:
            break
        w = sites[name].weight[q, k]
        if w <= left + 1e-9:
            layouts[name][h, q, k] = True
            left -= w


def streaming_layouts(stats: Stats, sink_blocks: int, window_blocks: int, block_size: int = 16,
                      causal_sites: set[str] | None = None) -> Layouts:
    """StreamingLLM: ``sink_blocks`` sink columns and a band of ``window_blocks`` on every head."""
    sites = _sites(stats, block_size, causal_sites)
    layouts, rules = {}, {}
    for name, site in sites.items():
        h, mq, mk = site.mass.shape
        rule = band_rule(sink_blocks, window_blocks, site.causal)
        layouts[name] = np.broadcast_to(draw(rule, mq, mk, site.causal), (h, mq, mk)).copy()
        rules[name] = np.tile(np.asarray(rule, np.int64), (h, 1))
    return _finish(stats, block_size, sites, layouts, rules, method="streaming")


def duo_layouts(stats: Stats, density: float, sink_blocks: int, window_blocks: int, block_size: int = 16,
                causal_sites: set[str] | None = None, method: str = "duo") -> Layouts:
    """DuoAttention-like: every head streams (sinks + band) except those that drop the most mass
    per extra block that way, which stay full, as many as ``density`` allows."""
    check_density(density)
    sites = _sites(stats, block_size, causal_sites)
    layouts, rules, offers = {}, {}, []
    spent = 0.0
    for name, site in sites.items():
        h, mq, mk = site.mass.shape
        stream_rule = band_rule(sink_blocks, window_blocks, site.causal)
        stream = draw(stream_rule, mq, mk, site.causal)
        full = draw(full_rule(site.causal), mq, mk, site.causal)
        layouts[name] = np.broadcast_to(stream, (h, mq, mk)).copy()
        rules[name] = np.tile(np.asarray(stream_rule, np.int64), (h, 1))
        stream_cost, extra = (stream * site.weight).sum(), ((full & ~stream) * site.weight).sum()
        spent += h * stream_cost
        total = site.mass.sum(axis=(1, 2))
        dropped = (site.mass * ~stream).sum(axis=(1, 2)) / np.maximum(total, 1e-30)
        offers.extend((dropped[i] / max(extra, 1e-12), extra, name, i) for i in range(h))
    budget = _budget(sites, density)
    for _, extra, name, head in sorted(offers, key=lambda o: -o[0]):
        if spent + extra <= budget + 1e-9:
            spent += extra
            site = sites[name]
            layouts[name][head] = draw(full_rule(site.causal), *site.mass.shape[1:], site.causal)
            rules[name][head] = full_rule(site.causal)
    return _finish(stats, block_size, sites, layouts, rules, sparsity=1.0 - density, method=method)


def head_picture(layouts: Layouts) -> dict[str, list[str]]:
    """Per site, each head's pattern in short words: ``full``, ``s2+w1`` (2 sink blocks, band of
    1 block before the diagonal), with ``+k`` for single blocks added inside the grid."""
    picture = {}
    for name, site in layouts.sites.items():
        words = []
        for h, (sinks, before, _, _) in enumerate(site.rule.tolist()):
            word = "full" if before == UNBOUNDED else f"s{sinks}+w{before}"
            mq, mk = site.layout.shape[1:]
            extra = int((site.layout[h].astype(bool) & ~draw(tuple(site.rule[h]), mq, mk, site.causal)).sum())
            words.append(word + (f"+{extra}" if extra else ""))
        picture[name] = words
    return picture


def learn(stats: Stats, block_size: int, causal_sites: set[str] | None = None, *, method: str | None = "select",
          pattern: str | None = None, density: float | None = None, sink_tokens: int = 0, window_tokens: int = 0,
          scope: str | None = None, keep_diagonal: bool = True, full_heads: int | None = None) -> Layouts:
    """The layouts of one named method (``method``) or baseline pattern (``pattern``), the one
    entry point ``prune`` uses: ``select`` and ``duo`` and ``ap`` meet ``density``; ``streaming``
    is what ``sink_tokens`` and ``window_tokens`` say (rounded up to whole blocks). ``scope``
    defaults to ``global`` for ``select`` and ``layer`` for ``ap``."""
    from onnxprune.layouts import learn_layouts
    from onnxprune.patterns import blocks_for

    if method is not None and pattern is not None:
        raise OnnxpruneError("give --method or --pattern, not both")
    if pattern is not None and pattern not in PATTERNS:
        raise OnnxpruneError(f"--pattern must be one of {PATTERNS}, got {pattern!r}")
    if pattern is None and method not in METHODS:
        raise OnnxpruneError(f"--method must be one of {METHODS}, got {method!r}")
    sinks, window = blocks_for(sink_tokens, block_size), blocks_for(window_tokens, block_size)
    if pattern == "streaming":
        return streaming_layouts(stats, sinks, window, block_size, causal_sites)
    if density is None:
        raise OnnxpruneError("give --density (or --sparsity)")
    check_density(density)
    if pattern == "duo":
        return duo_layouts(stats, density, sinks, window, block_size, causal_sites)
    if method == "select":
        scope = scope or "global"
        if scope not in ("layer", "global"):
            raise OnnxpruneError(f"--method select takes --scope layer or global, got {scope!r}")
        learned = select_layouts(stats, density, block_size, causal_sites, full_heads=full_heads, scope=scope)
        return dataclasses.replace(learned, scope=scope)
    scope = scope or "layer"
    causal = set(causal_sites or ())
    learned = learn_layouts(stats, 1.0 - density if density < 1.0 else 0.0, block_size, scope, keep_diagonal, causal)
    for name, site in learned.sites.items():
        site.density = site_density(stats.lengths, site, block_size)
    return dataclasses.replace(learned, method="ap")
