"""The per-head rule that continues a block layout beyond its explicit region (op version 2).

A pruned model's layout is explicit only up to the lengths it was calibrated at (``[H, Mq, Mk]``
blocks); serving inputs are often longer. Each head then follows a rule stored beside its layout,
one row ``(sink_blocks, window_before, window_after, global_query_blocks)`` per head: block
``(qb, kb)`` outside the explicit region is computed when ``kb < sink_blocks`` (attention sinks),
when ``qb - window_before <= kb <= qb + window_after`` (a local band around the diagonal; ``-1``
leaves that side unbounded, so ``(0, -1, -1, 0)`` is a full head) or when
``qb < global_query_blocks`` (query rows that see every key). Without a rule (files written
before version 2) every block outside the explicit region is computed: the numbers there are the
dense model's. Block indices are absolute positions // block size, also for queries at an offset.
"""

from __future__ import annotations

import numpy as np

from onnxprune.errors import OnnxpruneError
from onnxprune.op_schema import LAYOUT_RULE_COLUMNS as RULE_COLUMNS
#: A window side of this value is unbounded.
UNBOUNDED = -1


def validate_rule(rule: np.ndarray, heads: int) -> np.ndarray:
    """``rule`` as int64 ``[heads, 4]``, or one clear error naming the head and value."""
    rule = np.asarray(rule)
    if rule.shape != (heads, len(RULE_COLUMNS)):
        raise OnnxpruneError(f"a layout rule must have shape [{heads}, {len(RULE_COLUMNS)}], got {list(rule.shape)}")
    if not np.issubdtype(rule.dtype, np.integer):
        raise OnnxpruneError(f"a layout rule must hold integers, got {rule.dtype}")
    for head, row in enumerate(rule.tolist()):
        for column, value in zip(RULE_COLUMNS, row):
            lowest = UNBOUNDED if column.startswith("window") else 0
            if value < lowest:
                raise OnnxpruneError(f"layout rule of head {head}: {column} = {value} (must be >= {lowest})")
    return rule.astype(np.int64)


def _leading(flags: np.ndarray) -> int:
    """How many of ``flags`` are true before the first false one."""
    false = np.flatnonzero(~flags)
    return int(false[0]) if false.size else int(flags.size)


def _band(kept: np.ndarray, below: bool) -> int:
    """Blocks of the band the layout keeps in full on one side of the diagonal: 0 for the diagonal
    alone, ``UNBOUNDED`` when it keeps every block on that side."""
    mq, mk = kept.shape
    offsets = range(mq) if below else range(mk)
    whole = np.array([np.diagonal(kept, -d if below else d).all() for d in offsets])
    if not whole[0]:
        return 0  # no diagonal: no band (the rule computes the diagonal all the same)
    n = _leading(whole)
    return UNBOUNDED if n == whole.size else n - 1


def learn_rule(layout: np.ndarray, causal: bool) -> np.ndarray:
    """The rule that continues each head of ``layout`` (uint8 ``[H, Mq, Mk]``) as it already is:
    the sink columns, the band around the diagonal and the global rows it keeps in full (blocks
    that causal masking excludes count as kept). A head that keeps every block stays full."""
    heads, mq, mk = layout.shape
    allowed = np.tril(np.ones((mq, mk), bool)) if causal else np.ones((mq, mk), bool)
    rows = []
    for head in range(heads):
        kept = layout[head].astype(bool) | ~allowed
        if kept.all():
            rows.append((0, UNBOUNDED, 0 if causal else UNBOUNDED, 0))
            continue
        sinks = _leading(kept.all(axis=0))
        # Under causal masking a global row sees no more than the band does: none are learned.
        globals_ = 0 if causal else _leading(kept.all(axis=1))
        before = _band(kept, below=True)
        after = 0 if causal else _band(kept, below=False)
        rows.append((sinks, before, after, globals_))
    return np.asarray(rows, np.int64).reshape(heads, len(RULE_COLUMNS))


def blocks_at(layout: np.ndarray, rule: np.ndarray | None, query_blocks: int, key_blocks: int,
              first_query_block: int = 0) -> np.ndarray:
    """Bool ``[H, query_blocks, key_blocks]``: which blocks are computed for absolute query block
    rows ``first_query_block …`` and key blocks ``0 …``: the explicit layout inside its region,
    the rule (or, without one, every block) outside it."""
    heads, mq, mk = layout.shape
    q = np.arange(first_query_block, first_query_block + query_blocks)[:, None]
    k = np.arange(key_blocks)[None, :]
    out = np.ones((heads, query_blocks, key_blocks), bool)
    if rule is not None:
        for head, (sinks, before, after, globals_) in enumerate(validate_rule(rule, heads).tolist()):
            band = np.ones_like(q >= k)
            if before != UNBOUNDED:
                band = band & (k >= q - before)
            if after != UNBOUNDED:
                band = band & (k <= q + after)
            out[head] = (k < sinks) | band | (q < globals_)
    # The explicit region is a prefix of the rows and of the columns asked for.
    rows = max(0, min(query_blocks, mq - first_query_block))
    cols = min(key_blocks, mk)
    out[:, :rows, :cols] = layout[:, first_query_block : first_query_block + rows, :cols].astype(bool)
    return out


def describe(row) -> str:
    """One head's rule in words, for ``inspect``."""
    sinks, before, after, globals_ = (int(v) for v in row)
    if before == UNBOUNDED and after in (UNBOUNDED, 0) and sinks == 0 and globals_ == 0:
        return "every block" if after == UNBOUNDED else "every block up to the diagonal"
    parts = []
    if sinks:
        parts.append(f"{sinks} sink block{'s' * (sinks != 1)}")
    if before == after == 0:
        parts.append("the diagonal block")
    else:
        side = lambda n: "all" if n == UNBOUNDED else str(n)  # noqa: E731
        parts.append(f"the diagonal and {side(before)} block(s) before, {side(after)} after it")
    if globals_:
        parts.append(f"{globals_} global query block{'s' * (globals_ != 1)}")
    return ", ".join(parts)
