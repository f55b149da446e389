"""What is in an ONNX file: op counts, attention sites (and why others did not match), layouts."""

from __future__ import annotations

import collections
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from onnxprune import op_schema
from onnxprune.model_io import load_ir
from onnxprune.passes.unify_mask_inputs import attention_nodes
from onnxprune.rules import find_sites


def inspect(path: str | os.PathLike) -> dict:
    model = load_ir(path)
    graph = model.graph
    ops = collections.Counter(
        (f"{n.domain}." if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in graph
    )
    discovery = find_sites(model)
    pruned = []
    for node in attention_nodes(graph):
        layout = node.inputs[3].const_value.numpy() if node.inputs[3].const_value is not None else None
        pruned.append(
            {
                "node": node.name,
                "block_size": node.attributes["block_size"].as_int(),
                "is_causal": bool(node.attributes["is_causal"].as_int()),
                "layout_shape": list(layout.shape) if layout is not None else None,
                "layout_density": float((layout != 0).mean()) if layout is not None else None,
                "layout": node.inputs[3].name,
            }
        )
    meta = dict(model.metadata_props)
    site_meta = json.loads(meta.get("onnxprune.sites", "{}"))
    for entry, (_, info) in zip(pruned, site_meta.items()):
        entry.update({"retained_mass": info.get("retained_mass"), "density_counted": info.get("density")})
    return {
        "path": str(path),
        "opsets": dict(model.opset_imports),
        "inputs": [{"name": v.name, "type": str(v.dtype), "shape": _shape(v)} for v in graph.inputs],
        "outputs": [{"name": v.name, "type": str(v.dtype), "shape": _shape(v)} for v in graph.outputs],
        "op_counts": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "attention_sites": [
            {
                "name": s.name, "form": s.form, "heads": s.num_heads, "head_size": s.head_size,
                "scale": s.scale, "mask": s.mask_kind, "is_causal": s.is_causal,
            }
            for s in discovery.sites
        ],
        "unmatched": [{"node": n, "reason": r} for n, r in discovery.unmatched],
        "pruned_sites": pruned,
        "metadata": {k: v for k, v in meta.items() if k.startswith("onnxprune.") and k != "onnxprune.sites"},
    }


def _shape(value) -> list | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else str(d) for d in value.shape]


def format_report(info: dict) -> str:
    lines = [f"{info['path']}", f"  opsets: {info['opsets']}"]
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            lines.append(f"  {kind[:-1]:6} {v['name']}: {v['type']} {v['shape']}")
    lines.append("  ops: " + ", ".join(f"{k}×{v}" for k, v in info["op_counts"].items()))
    lines.append(f"  attention sites found: {len(info['attention_sites'])}")
    for s in info["attention_sites"]:
        lines.append(
            f"    {s['name']}: {s['form']}, heads {s['heads']}, head size {s['head_size']}, "
            f"scale {s['scale']:.4g}, mask {s['mask']}, causal {s['is_causal']}"
        )
    for u in info["unmatched"]:
        lines.append(f"    not matched: {u['node']}: {u['reason']}")
    if info["pruned_sites"]:
        lines.append(f"  {op_schema.DOMAIN}.{op_schema.OP_TYPE} nodes: {len(info['pruned_sites'])}")
        lines.append(f"    {'node':40} {'block':>5} {'layout':>12} {'density':>8} {'retained':>9}")
        for p in info["pruned_sites"]:
            mass = p.get("retained_mass")
            lines.append(
                f"    {p['node'][:40]:40} {p['block_size']:>5} {'x'.join(map(str, p['layout_shape'] or [])):>12} "
                f"{p['layout_density']:>8.3f} {mass if mass is None else f'{mass:.3f}':>9}"
            )
    for k, v in info["metadata"].items():
        lines.append(f"  {k}: {v}")
    return "\n".join(lines)


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """A grayscale PNG from values in [0, 1] (no plotting library needed)."""
    pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", pixels.shape[1], pixels.shape[0], 8, 0, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def write_heatmaps(path: str | os.PathLike, out_dir: str | os.PathLike, scale: int = 8) -> list[str]:
    """One PNG per pruned site: its layout, heads side by side (white = computed block)."""
    model = load_ir(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, node in enumerate(attention_nodes(model.graph)):
        layout = node.inputs[3].const_value
        if layout is None:
            continue
        layout = layout.numpy() != 0
        heads = [np.pad(h, ((0, 0), (0, 1)), constant_values=0.5) for h in layout]
        image = np.concatenate(heads, axis=1).astype(float)
        image = np.kron(image, np.ones((scale, scale)))
        file = out / f"site{index:02d}_layout.png"
        write_png(file, image)
        written.append(str(file))
    return written
