"""``onnxprune inspect`` for people: the inspection dict as sections of aligned tables."""

from __future__ import annotations

from onnxprune import op_schema
from onnxprune.layout_rule import describe
from onnxprune.layouts import METADATA_PREFIX
from onnxprune.tables import human_bytes, human_count, table

#: Op types shown by name in the op-count line before the rest are summed up.
_TOP_OPS = 12


def _shape(shape) -> str:
    return "?" if shape is None else "[" + ", ".join(map(str, shape)) + "]"


def _rule_text(rule: list | None) -> str:
    """Heads grouped by what they compute beyond the explicit layout."""
    if rule is None:
        return "every block (no rule: layout version 1)"
    groups: dict[str, list[int]] = {}
    for head, row in enumerate(rule):
        groups.setdefault(describe(row), []).append(head)
    if len(groups) == 1:
        return next(iter(groups))
    return " | ".join(f"head{'s' * (len(h) > 1)} {','.join(map(str, h))}: {text}" for text, h in groups.items())


def _mask(mask) -> str:
    if mask is None:
        return "-"
    return f"{mask['kind']} {_shape(mask['shape'])}"


def format_report(info: dict) -> str:
    out = [f"{info['path']}  ({human_bytes(info['file_bytes'])}, IR {info['ir_version']}"
           + (f", {info['producer']}" if info["producer"] else "") + ")"]
    out.append("  opsets: " + ", ".join(f"{d} {v}" for d, v in info["opsets"].items()))

    out.append("\nInputs and outputs")
    rows = [("input", v["name"], v["type"], _shape(v["shape"])) for v in info["inputs"]]
    rows += [("output", v["name"], v["type"], _shape(v["shape"])) for v in info["outputs"]]
    out.append(table(("", "name", "type", "shape"), rows))

    ops = list(info["op_counts"].items())
    shown = ", ".join(f"{k} {v}" for k, v in ops[:_TOP_OPS])
    rest = sum(v for _, v in ops[_TOP_OPS:])
    out.append(f"\nNodes: {info['nodes']} ({len(ops)} op types)")
    out.append("  " + shown + (f", {len(ops) - _TOP_OPS} other types {rest}" if rest else ""))
    if info["functions"]:
        out.append("  local functions: " + ", ".join(info["functions"]))

    p = info["parameters"]
    out.append(f"\nParameters: {human_count(p['count'])} in {p['tensors']} tensors, {human_bytes(p['bytes'])}")
    if p["by_type"]:
        out.append(table(("type", "tensors", "elements", "bytes"),
                         [(t, e["tensors"], e["count"], human_bytes(e["bytes"])) for t, e in p["by_type"].items()]))
    ext = info["external_data"]
    if ext["files"]:
        out.append(f"\nExternal data: {ext['tensors']} tensors, {human_bytes(ext['bytes'])} (not loaded)")
        out.append(table(("file", "tensors", "bytes", "on disk"),
                         [(f["location"], f["tensors"], human_bytes(f["bytes"]),
                           human_bytes(f["file_bytes"]) if f["exists"] else "MISSING") for f in ext["files"]]))

    sites = info["attention_sites"]
    out.append(f"\nAttention sites: {len(sites)} found, {len(info['unmatched'])} not matched")
    if sites:
        out.append(table(
            ("#", "site", "form", "heads", "kv heads", "head size", "scale", "mask", "causal"),
            [(i, s["name"], s["form"], s["heads"], s["kv_heads"], s["head_size"], s["scale"], _mask(s["mask"]),
              s["is_causal"]) for i, s in enumerate(sites)],
        ))
    if info["unmatched"]:
        out.append("  not matched:")
        out.append(table(("node", "op", "reason"), [(u["node"], u["op_type"], u["reason"]) for u in info["unmatched"]],
                         indent="    "))

    pruned = info["pruned_sites"]
    if pruned:
        out.append(f"\nPruned sites ({op_schema.DOMAIN}.{op_schema.OP_TYPE}): {len(pruned)}")
        with_stats = any("retained_mass_under_stats" in s for s in pruned)
        headers = ["#", "site", "heads", "head size", "block", "layout", "density", "retained", "causal", "mask"]
        if with_stats:
            headers.insert(8, "retained (--stats)")
        rows = []
        for i, s in enumerate(pruned):
            row = [i, s["site"], s["heads"], s["head_size"], s["block_size"],
                   "x".join(map(str, s["layout_shape"] or [])) or "?",
                   s["density"] if s["density"] is not None else s["layout_density"], s["retained_mass"],
                   s["is_causal"], _mask(s["attn_mask"]) + (" + key padding" if s["key_padding_mask"] else "")]
            if with_stats:
                row.insert(8, s.get("retained_mass_under_stats"))
            rows.append(row)
        out.append(table(headers, rows))
        out.append("  density: kept share of the blocks that causal masking does not already exclude")
        out.append("\nBeyond each explicit layout (longer inputs), per head:")
        for s in pruned:
            out.append(f"  {s['site']}: {_rule_text(s['rule'])}")

    pruning = info["pruning"]
    if pruning:
        out.append("\nPruning (from the model's metadata)")
        out.append(table(("key", "value"), [(k, "-" if v is None else str(v)) for k, v in pruning.items()]))
    others = {k: v for k, v in info["metadata"].items() if not k.startswith(METADATA_PREFIX)}
    if others:
        out.append("\nOther metadata")
        out.append(table(("key", "value"), list(others.items())))

    stats = info["stats"]
    if stats:
        verdict = {True: "matches this model", False: "was NOT computed for this model", None: "unknown"}
        out.append(f"\nStatistics {stats['path']}: {stats['num_samples']} inputs, granularity {stats['granularity']}, "
                   f"max length {stats['max_length']}; {verdict[stats['matches_model']]}")
        for key, text in (("sites_not_in_model", "sites not in the model"),
                          ("model_sites_not_in_stats", "model sites without statistics")):
            if stats[key]:
                out.append(f"  {text}: " + ", ".join(stats[key]))
    for warning in info["warnings"]:
        out.append(f"\nwarning: {warning}")
    if info["heatmaps"]:
        out.append(f"\nHeatmaps: {len(info['heatmaps'])} PNG files")
        out.extend(f"  {h['path']}" for h in info["heatmaps"])
    return "\n".join(out)
