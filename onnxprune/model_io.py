"""Loading models (the model and its record, ``ModelInfo``, from one read of the file) with clear
errors, and writing every output atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxprune.errors import OnnxpruneError


#: Files are read (and hashed) in pieces of this size.
CHUNK_BYTES = 1 << 20


def _chunks(path: str | os.PathLike) -> Iterator[bytes]:
    with open(path, "rb") as f:
        yield from iter(lambda: f.read(CHUNK_BYTES), b"")


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of any file (statistics, layouts). A model's is ``ModelInfo.sha256``: see ``load_model``."""
    digest = hashlib.sha256()
    for chunk in _chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class ModelInput:
    """A runtime input. ``elem_type``: an ``onnx.TensorProto`` data type, ``None`` when the input
    is not a tensor; in ``shape``, a symbolic axis is its name and an unknown one ``None``."""

    name: str
    elem_type: int | None
    shape: tuple[int | str | None, ...]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the verbs need to know about a model file besides its graph, from one read of it."""

    path: str
    sha256: str
    inputs: tuple[ModelInput, ...]  # graph inputs that are not initializers
    domains: frozenset[str]  # imported, or used by a node of the main graph
    opset_imports: tuple[tuple[str, int], ...]
    external_data_files: tuple[str, ...]  # as the model names them, relative to its folder
    #: Rows of the table that ``input_ids`` is looked up in (``Gather(table, input_ids)``), if any.
    vocab_size: int | None = None
    #: Every initializer stored outside the file: (name, data file, bytes), as the file says —
    #: ``load_model`` reads the small ones in, so the loaded model no longer shows them.
    external_tensors: tuple[tuple[str, str, int], ...] = ()

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def has_external_data(self) -> bool:
        return bool(self.external_data_files)

    def uses_domain(self, domain: str) -> bool:
        return domain in self.domains

    def opset(self, domain: str = "") -> int | None:
        """The imported version of ``domain`` (``""`` and ``"ai.onnx"`` alike), ``None`` if not imported."""
        same = ("", "ai.onnx") if domain in ("", "ai.onnx") else (domain,)
        return next((version for d, version in self.opset_imports if d in same), None)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    model: ir.Model
    info: ModelInfo


def _input(value: onnx.ValueInfoProto) -> ModelInput:
    if not value.type.HasField("tensor_type"):
        return ModelInput(value.name, None, ())
    tensor_type = value.type.tensor_type
    shape = tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None)
        for d in tensor_type.shape.dim
    )
    return ModelInput(value.name, tensor_type.elem_type, shape)


def _info(path: str | os.PathLike, sha256: str, proto: onnx.ModelProto) -> ModelInfo:
    graph = proto.graph
    tables = {t.name: t.dims[0] for t in graph.initializer if t.dims}
    vocab = next((int(tables[n.input[0]]) for n in graph.node if n.op_type == "Gather" and len(n.input) == 2
                  and n.input[1] == "input_ids" and n.input[0] in tables), None)
    external = []
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in t.external_data}
            external.append((t.name, entries.get("location", ""), int(entries.get("length", -1))))
    files = [location for _, location, _ in external]
    constants = {t.name for t in graph.initializer}
    return ModelInfo(
        path=os.fspath(path),
        sha256=sha256,
        inputs=tuple(_input(v) for v in graph.input if v.name not in constants),
        domains=frozenset([o.domain for o in proto.opset_import] + [n.domain for n in graph.node]),
        opset_imports=tuple((o.domain, o.version) for o in proto.opset_import),
        external_data_files=tuple(dict.fromkeys(files)),
        vocab_size=vocab,
        external_tensors=tuple(external),
    )


def _read(path: str | os.PathLike, load_external_data: bool = False) -> tuple[onnx.ModelProto, ModelInfo]:
    """The model's proto and record from one read of its file, hashed as it is read."""
    file = Path(path)
    if not file.exists():
        raise OnnxpruneError(f"{file}: no such file")
    if file.is_dir():
        raise OnnxpruneError(f"{file}: is a directory, not an ONNX file")
    digest = hashlib.sha256()
    data = bytearray()
    try:
        for chunk in _chunks(file):
            digest.update(chunk)
            data += chunk
        proto = onnx.ModelProto.FromString(data)
        if not proto.graph.node:
            raise OnnxpruneError(f"{file}: not an ONNX model (no graph nodes)")
        # The record is taken before any weight is read in, while it still says which are external.
        info = _info(path, digest.hexdigest(), proto)
        if load_external_data:
            onnx.load_external_data_for_model(proto, str(file.resolve().parent))
    # ValidationError: an external data file that is missing or outside the model's folder.
    except (DecodeError, onnx.checker.ValidationError, RuntimeError, ValueError, OSError) as e:
        raise OnnxpruneError(f"{file}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    return proto, info


def read_info(model: str | os.PathLike | ModelInfo) -> ModelInfo:
    """The model's record, its weights not loaded; a ``ModelInfo`` (a file already read) as it is."""
    return model if isinstance(model, ModelInfo) else _read(model)[1]


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


#: External tensors up to this size are read even when the weights are not (see ``load_model``).
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


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def load_model(path: str | os.PathLike, load_external_data: bool = False) -> LoadedModel:
    """The model as onnx_ir, with shapes inferred and every node named, and its record, from one
    read of the file.

    External weights stay on disk (onnx_ir reads a tensor when asked for its values), so a model
    over 2 GB loads in moments; only tensors of at most ``SMALL_TENSOR_BYTES`` are read up front,
    so that shape inference and the rules see shapes and scales. ``load_external_data=True``
    reads every weight into memory instead.
    """
    proto, info = _read(path, load_external_data)
    base_dir = Path(path).resolve().parent
    if _has_external_data(proto):
        _load_small_external_tensors(proto, base_dir)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - shapes are a help for matching, not a requirement
        pass
    ensure_node_names(proto)
    model = ir.serde.deserialize_model(proto)
    if _has_external_data(proto):
        ir.external_data.set_base_dir(model.graph, base_dir)
    return LoadedModel(model, info)


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
