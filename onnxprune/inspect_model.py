"""What is in an ONNX file, as a JSON-ready dict (schema ``onnxprune.inspect/1``, docs/CLI.md).

Works on any ONNX file: the weights are never loaded (external data stays on disk; sizes come
from the tensors' headers and external-data entries). Attention sites come from the same rules
that calibrate and prune use; a pruned model's ``onnxprune.BlockSparseAttention`` nodes are read
with their layouts and the metadata prune wrote. With calibration statistics, each site also
gets its average attention (for heatmaps) and, for a pruned site, the attention mass its layout
keeps under those statistics.
"""

from __future__ import annotations

import collections
import math
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune import op_schema
from onnxprune.errors import OnnxpruneError
from onnxprune.heatmaps import SiteHeatmap
from onnxprune.layouts import SITES_KEY, Layouts, attention_nodes, block_sum, node_site, read_layouts
from onnxprune.model_io import ModelInfo, file_sha256, load_model
from onnxprune.rules import find_sites
from onnxprune.stats import Stats

SCHEMA = "onnxprune.inspect/1"


def _op_name(domain: str, op_type: str) -> str:
    return (f"{domain}." if domain not in ("", "ai.onnx") else "") + op_type


def _shape(value: ir.Value) -> list | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else str(d) for d in value.shape]


def _io(value: ir.Value) -> dict:
    return {"name": value.name, "type": str(value.dtype) if value.dtype is not None else None, "shape": _shape(value)}


def _parameters_and_external(graph: ir.Graph, record: ModelInfo, base: Path) -> tuple[dict, dict]:
    """Initializer counts and sizes (layouts apart), and where external data lives."""
    by_type: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"tensors": 0, "count": 0, "bytes": 0})
    files: dict[str, dict] = {}
    external = {name: (location, length) for name, location, length in record.external_tensors}
    for name, value in graph.initializers.items():
        tensor = value.const_value
        count = math.prod(tensor.shape.numpy()) if tensor is not None else 0
        size = tensor.nbytes if tensor is not None else 0
        if name in external:
            location, length = external[name]
            size = length if length >= 0 else size
            entry = files.setdefault(location, {"location": location, "tensors": 0, "bytes": 0})
            entry["tensors"] += 1
            entry["bytes"] += size
        if name.startswith((op_schema.LAYOUT_PREFIX, op_schema.LAYOUT_RULE_PREFIX)):
            continue  # layouts and their rules are the pruning's, not the model's weights: listed per site
        entry = by_type[str(value.dtype)]
        entry["tensors"] += 1
        entry["count"] += count
        entry["bytes"] += size
    for info in files.values():
        path = base / info["location"]
        info["exists"] = path.is_file()
        info["file_bytes"] = path.stat().st_size if path.is_file() else None
    parameters = {
        "tensors": sum(e["tensors"] for e in by_type.values()),
        "count": sum(e["count"] for e in by_type.values()),
        "bytes": sum(e["bytes"] for e in by_type.values()),
        "by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["bytes"])),
    }
    external = {
        "tensors": sum(f["tensors"] for f in files.values()),
        "bytes": sum(f["bytes"] for f in files.values()),
        "files": sorted(files.values(), key=lambda f: f["location"]),
    }
    return parameters, external


def _int_dim(value: ir.Value | None, axis: int) -> int | None:
    if value is None or value.shape is None or len(value.shape) <= axis:
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else None


def _mask(value: ir.Value | None) -> dict | None:
    if value is None:
        return None
    return {"name": value.name, "kind": "bool" if value.dtype == ir.DataType.BOOL else "float", "shape": _shape(value)}


def _dense_site(site) -> dict:
    kv = site.k if site.k is not None else site.k_transposed
    return {
        "name": site.name,
        "form": site.form,
        "heads": site.num_heads,
        "kv_heads": _int_dim(kv, 1),
        "head_size": site.head_size,
        "scale": float(site.scale),
        "mask": _mask(site.mask),
        "is_causal": bool(site.is_causal),
    }


def _pruned_site(node: ir.Node, layouts: Layouts | None) -> tuple[dict, np.ndarray | None]:
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    q, k, _, _, attn_mask, key_padding = inputs[:6]
    site = node_site(node) or node.name
    recorded = layouts.sites.get(site) if layouts is not None else None
    layout = recorded.layout if recorded is not None else None
    attr = node.attributes
    scale = attr["scale"].as_float() if "scale" in attr else None
    head_size = _int_dim(q, 3)
    if scale is None and head_size:
        scale = 1.0 / math.sqrt(head_size)
    entry = {
        "site": site,
        "node": node.name,
        "heads": _int_dim(q, 1),
        "kv_heads": _int_dim(k, 1),
        "head_size": head_size,
        "scale": scale,
        "is_causal": bool(attr["is_causal"].as_int()) if "is_causal" in attr else False,
        "block_size": attr["block_size"].as_int() if "block_size" in attr else None,
        "layout_shape": list(layout.shape) if layout is not None else None,
        "layout_density": float((layout != 0).mean()) if layout is not None else None,
        "density": recorded.density if recorded is not None else None,
        "retained_mass": recorded.retained_mass if recorded is not None else None,
        "rule": recorded.rule.tolist() if recorded is not None and recorded.rule is not None else None,
        "attn_mask": _mask(attn_mask),
        "key_padding_mask": key_padding is not None,
    }
    return entry, layout


def retained_mass(stats: Stats, site: str, layout: np.ndarray, block_size: int) -> float | None:
    """Share of the statistics' attention mass inside the layout's computed blocks."""
    if block_size % stats.granularity:
        return None
    mass = block_sum(stats.sums[site], block_size // stats.granularity)  # [H, M, M]
    heads, mq, mk = mass.shape
    if layout.shape[0] not in (1, heads):
        return None
    kept = np.zeros(mass.shape, bool)
    q, k = min(mq, layout.shape[1]), min(mk, layout.shape[2])
    kept[:, :q, :k] = np.broadcast_to(layout[:, :q, :k] != 0, (heads, q, k))
    total = mass.sum()
    return float(mass[kept].sum() / total) if total > 0 else None


def _stats_section(stats: Stats, stats_path, model_sha256: str, pruning: dict | None, site_names: list[str]) -> dict:
    if pruning is not None and pruning.get("stats_sha256"):
        matches = pruning["stats_sha256"] == file_sha256(stats_path)
    else:
        matches = stats.model_sha256 == model_sha256
    return {
        "path": str(stats_path),
        "granularity": stats.granularity,
        "max_length": stats.max_length,
        "num_samples": stats.num_samples,
        "matches_model": matches,
        "sites_not_in_model": [s for s in stats.sites if s not in site_names],
        "model_sites_not_in_stats": [s for s in site_names if s not in stats.sites],
    }


def inspect_with_heatmaps(path: str | os.PathLike, stats_path: str | os.PathLike | None = None) -> tuple[dict, list[SiteHeatmap]]:
    """The inspection dict and, per site, what a heatmap can show."""
    path = Path(path)
    loaded = load_model(path)
    model, graph = loaded.model, loaded.model.graph
    stats = Stats.load(stats_path) if stats_path is not None else None

    ops = collections.Counter(_op_name(n.domain, n.op_type) for n in graph)
    discovery = find_sites(model)
    op_types = {n.name: n.op_type for n in graph}
    meta = dict(model.metadata_props)
    warnings = []
    layouts = None
    if attention_nodes(graph):
        try:
            layouts = read_layouts(model)
        except OnnxpruneError as e:  # still worth showing what the nodes are
            warnings.append(f"the layouts cannot be read: {e}")
    pruning = layouts.metadata() if layouts is not None and layouts.recorded() else None

    heatmaps: list[SiteHeatmap] = []
    pruned = []
    for node in attention_nodes(graph):
        entry, layout = _pruned_site(node, layouts)
        if stats is not None and entry["site"] in stats.sites and layout is not None and entry["block_size"]:
            entry["retained_mass_under_stats"] = retained_mass(stats, entry["site"], layout, entry["block_size"])
        pruned.append(entry)
        heatmaps.append(SiteHeatmap(entry["site"], layout, entry["block_size"], entry["is_causal"]))
    dense = [_dense_site(s) for s in discovery.sites]
    heatmaps.extend(SiteHeatmap(s["name"], is_causal=s["is_causal"]) for s in dense)
    if stats is not None:
        for h in heatmaps:
            if h.name in stats.sites:
                h.attention, h.granularity = stats.mean(h.name), stats.granularity

    parameters, external = _parameters_and_external(graph, loaded.info, path.resolve().parent)
    info = {
        "schema": SCHEMA,
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "ir_version": model.ir_version,
        "producer": " ".join(p for p in (model.producer_name, model.producer_version) if p) or None,
        "opsets": {(d or "ai.onnx"): v for d, v in sorted(model.opset_imports.items())},
        "inputs": [_io(v) for v in graph.inputs if not v.is_initializer()],
        "outputs": [_io(v) for v in graph.outputs],
        "nodes": len(graph),
        "op_counts": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "functions": sorted(f"{_op_name(d, n)}" for d, n, _ in model.functions),
        "parameters": parameters,
        "external_data": external,
        "attention_sites": dense,
        "unmatched": [{"node": n, "op_type": op_types.get(n), "reason": r} for n, r in discovery.unmatched],
        "pruned_sites": pruned,
        "pruning": pruning,
        "metadata": {k: v for k, v in meta.items() if k != SITES_KEY},
        "stats": None,
        "heatmaps": [],
        "warnings": warnings + [
            f"external data file {f['location']} is missing: constants stored there (scales, shapes) are unknown, "
            "so attention sites that depend on them are reported as not matched"
            for f in external["files"] if not f["exists"]
        ],
    }
    if stats is not None:
        names = [s["name"] for s in dense] + [p["site"] for p in pruned]
        info["stats"] = _stats_section(stats, stats_path, loaded.info.sha256, pruning, names)
    return info, heatmaps


def inspect(path: str | os.PathLike, stats: str | os.PathLike | None = None,
            heatmaps: str | os.PathLike | None = None) -> dict:
    """``onnxprune inspect``: the dict of schema ``onnxprune.inspect/1``; with ``heatmaps`` (a
    directory) also one PNG per site and picture (listed under ``"heatmaps"``)."""
    from onnxprune.heatmaps import write_heatmaps

    info, sites = inspect_with_heatmaps(path, stats)
    if heatmaps is not None:
        drawable = [s for s in sites if s.layout is not None or s.attention is not None]
        if Path(heatmaps).exists() and not Path(heatmaps).is_dir():
            raise OnnxpruneError(f"{heatmaps}: exists and is not a directory")
        info["heatmaps"] = write_heatmaps(drawable, heatmaps)
    return info
