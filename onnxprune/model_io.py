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


#: External tensors up to this size are read even when the weights are not (see ``load_ir``).
SMALL_TENSOR_BYTES = 1024


def _load_small_external_tensors(proto: onnx.ModelProto, base_dir: Path) -> None:
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        length = int(entries.get("length", -1))
        file = base_dir / entries.get("location", "")
        if not 0 <= length <= SMALL_TENSOR_BYTES or not file.is_file() or base_dir not in file.resolve().parents:
            continue
        with open(file, "rb") as f:
            f.seek(int(entries.get("offset", 0)))
            data = f.read(length)
        if len(data) != length:
            continue  # a truncated file: leave the tensor external, as it was
        tensor.raw_data = data
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def load_ir(path: str | os.PathLike, load_external_data: bool = True) -> ir.Model:
    """The model as onnx_ir, with shapes inferred and every node named.

    With ``load_external_data=False`` the weights stay on disk: only tensors of at most
    ``SMALL_TENSOR_BYTES`` are read (shapes, scales: what shape inference and the rules need);
    onnx_ir memory-maps any other tensor only if asked for its values, so a model of any size
    can be inspected.
    """
    proto = load_proto(path, load_external_data=load_external_data)
    if not load_external_data:
        _load_small_external_tensors(proto, Path(path).resolve().parent)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - shapes are a help for matching, not a requirement
        pass
    ensure_node_names(proto)
    model = ir.serde.deserialize_model(proto)
    if not load_external_data:
        ir.external_data.set_base_dir(model.graph, Path(path).resolve().parent)
    return model


def uses_domain(path: str | os.PathLike, domain: str) -> bool:
    """Whether the model imports ``domain`` or has a node in it (weights not loaded)."""
    proto = load_proto(path, load_external_data=False)
    return any(o.domain == domain for o in proto.opset_import) or any(n.domain == domain for n in proto.graph.node)


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
