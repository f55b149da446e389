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


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def load_ir(path: str | os.PathLike, load_external_data: bool = False) -> ir.Model:
    """The model as onnx_ir, with shapes inferred and every node named.

    External weights stay on disk (onnx_ir reads a tensor when asked for its values), so a model
    over 2 GB loads in moments; only tensors of at most ``SMALL_TENSOR_BYTES`` are read up front,
    so that shape inference and the rules see shapes and scales. ``load_external_data=True``
    reads every weight into memory instead.
    """
    proto = load_proto(path, load_external_data=load_external_data)
    if has_external_data(proto):
        _load_small_external_tensors(proto, Path(path).resolve().parent)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - shapes are a help for matching, not a requirement
        pass
    ensure_node_names(proto)
    model = ir.serde.deserialize_model(proto)
    if has_external_data(proto):
        ir.external_data.set_base_dir(model.graph, Path(path).resolve().parent)
    return model


def uses_domain(path: str | os.PathLike, domain: str) -> bool:
    """Whether the model imports ``domain`` or has a node in it (weights not loaded)."""
    proto = load_proto(path, load_external_data=False)
    return any(o.domain == domain for o in proto.opset_import) or any(n.domain == domain for n in proto.graph.node)


def uses_external_data(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


#: Larger tensors of a model saved with external data go to the data file (layouts stay inline).
EXTERNAL_DATA_THRESHOLD = 1024
#: Protobuf cannot serialise a model of 2 GiB or more: such models always get external data.
PROTOBUF_LIMIT = 2**31 - 2**26


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
    """Write ``model`` atomically. An ``ir.Model`` whose weights came from external data, or that
    is too large for protobuf, is written with its weights in ``<name>.data`` beside it."""
    if isinstance(model, ir.Model):
        weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
        if uses_external_data(model) or weight_bytes >= PROTOBUF_LIMIT:
            _save_with_external_data(model, Path(path))
            return
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))


def _save_with_external_data(model: ir.Model, path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise OnnxpruneError(f"{parent}: output directory does not exist")
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=parent) as staging:
        staged = Path(staging) / path.name
        ir.save(model, staged, external_data=data_name, size_threshold_bytes=EXTERNAL_DATA_THRESHOLD)
        # The data first: a model file never points at data that is not there yet.
        os.replace(Path(staging) / data_name, parent / data_name)
        os.replace(staged, path)
