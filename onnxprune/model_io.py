"""Loading models with clear errors, and writing every output atomically."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxprune.errors import OnnxpruneError


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_proto(path: str | os.PathLike, load_external_data: bool = True) -> onnx.ModelProto:
    path = Path(path)
    if not path.exists():
        raise OnnxpruneError(f"{path}: no such file")
    if path.is_dir():
        raise OnnxpruneError(f"{path}: is a directory, not an ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise OnnxpruneError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    if not model.graph.node:
        raise OnnxpruneError(f"{path}: not an ONNX model (no graph nodes)")
    return model


def input_names(path: str | os.PathLike) -> list[str]:
    """The model's runtime inputs (graph inputs that are not initializers), weights not loaded."""
    graph = load_proto(path, load_external_data=False).graph
    constants = {t.name for t in graph.initializer}
    return [i.name for i in graph.input if i.name not in constants]


def ensure_node_names(model: onnx.ModelProto) -> None:
    """Give every unnamed or duplicate-named node of the main graph a stable name.

    Sites are named after their nodes; the names must be the same each time the same file is
    read (calibrate and prune read it separately), so they derive from position and op type only.
    """
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
        seen.add(node.name)


def load_ir(path: str | os.PathLike) -> ir.Model:
    """The model as onnx_ir, with shapes inferred and every node named."""
    proto = load_proto(path)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - shapes are a help for matching, not a requirement
        pass
    ensure_node_names(proto)
    return ir.serde.deserialize_model(proto)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise OnnxpruneError(f"{parent}: output directory does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_model(model: ir.Model | onnx.ModelProto, path: str | os.PathLike) -> None:
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
