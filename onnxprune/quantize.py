"""4-bit (or 8/2-bit) weights for a dense or pruned model: ONNX Runtime's MatMulNBits quantizer.

The quantizer replaces each ``MatMul`` with a constant weight by ``com.microsoft.MatMulNBits``
(block-wise integer weights with a scale and, asymmetric, a zero point per block) and leaves every
other node as it is: a pruned model's ``onnxprune.BlockSparseAttention`` nodes, their layout
initializers and the op's function body pass through, so quantizing composes with pruning in
either order of thought (prune the float model, then quantize the result). ``quantize_weights``
checks that it did: the same onnxprune nodes with the same inputs and attributes, the same
opset imports besides ``com.microsoft``, the same metadata.

The exporter leaves large weights as ``Transpose(W)`` for ONNX Runtime to fold at load (its
optimizer folds only small constants); the quantizer takes only a constant weight, so those
transposes are folded first. The embedding table (a ``Gather``) stays float32.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import onnx

from onnxprune import op_schema
from onnxprune.errors import OnnxpruneError
from onnxprune.model_io import atomic_path

BITS = (2, 4, 8)
MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass
class QuantizeReport:
    matmuls: int  # MatMul nodes whose weight became MatMulNBits
    kept_matmuls: int  # MatMul nodes left in float (no constant weight: attention's Q·Kᵀ, P·V)
    onnxprune_nodes: int  # BlockSparseAttention nodes carried over unchanged
    weight_bytes_before: int
    weight_bytes_after: int


def _custom_nodes(model: onnx.ModelProto) -> list[bytes]:
    """Every onnxprune node of the main graph, serialized: inputs, outputs, attributes and all."""
    return [n.SerializeToString(deterministic=True) for n in model.graph.node if n.domain == op_schema.DOMAIN]


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def fold_transposed_weights(model: onnx.ModelProto) -> int:
    """Replace ``MatMul(x, Transpose(W))`` of a 2-D initializer ``W`` by ``MatMul(x, Wᵀ)`` with
    ``Wᵀ`` an initializer (in place), dropping the transposes and the weights nothing else reads;
    the number of weights folded."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    folded: dict[str, str] = {}  # transpose output (now an initializer) → the weight it transposed
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        transpose = producers.get(node.input[1])
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in initializers:
            continue
        weight = initializers[transpose.input[0]]
        perm = [list(a.ints) for a in transpose.attribute if a.name == "perm"]
        if len(weight.dims) != 2 or perm not in ([], [[1, 0]]) or node.input[1] in folded:
            continue
        # Named as the transpose's output: every reader of it reads the initializer instead.
        array = onnx.numpy_helper.to_array(weight).T.copy()
        graph.initializer.append(onnx.numpy_helper.from_array(array, node.input[1]))
        folded[node.input[1]] = weight.name
    kept = [n for n in graph.node if not (n.op_type == "Transpose" and n.output[0] in folded)]
    del graph.node[:]
    graph.node.extend(kept)
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    unread = set(folded.values()) - read  # the LM head's weight, say; not a tied embedding's table
    kept_initializers = [t for t in graph.initializer if t.name not in unread]
    del graph.initializer[:]
    graph.initializer.extend(kept_initializers)
    return len(folded)


def quantize_model(model: onnx.ModelProto, bits: int = 4, block_size: int = 32, symmetric: bool = False,
                   accuracy_level: int | None = None) -> tuple[onnx.ModelProto, QuantizeReport]:
    """The quantized copy of ``model`` (loaded with its weights) and what changed.

    ``accuracy_level`` is MatMulNBits' compute type on CPU (``None``/0: float32 as the weights
    were; 4: int8 activations, the fast path, as llama.cpp's Q4 kernels do).
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if bits not in BITS:
        raise OnnxpruneError(f"bits must be one of {BITS}, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise OnnxpruneError(f"block_size must be a power of two of at least 16, got {block_size}")
    custom = _custom_nodes(model)
    opsets = {o.domain: o.version for o in model.opset_import}
    metadata = [(p.key, p.value) for p in model.metadata_props]
    functions = [f.SerializeToString(deterministic=True) for f in model.functions]
    before = _initializer_bytes(model)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    fold_transposed_weights(work)
    quantizer = MatMulNBitsQuantizer(work, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                     accuracy_level=accuracy_level)
    # It logs a line per node at INFO, which its module configures to show.
    logger = logging.getLogger(MatMulNBitsQuantizer.__module__)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        quantizer.process()
    finally:
        logger.setLevel(level)
    out = quantizer.model.model
    # What the quantizer must not touch; a newer quantizer that did would give a different function.
    if _custom_nodes(out) != custom:
        raise OnnxpruneError("the MatMulNBits quantizer changed onnxprune's attention nodes")
    changed = {d for d, v in opsets.items() if {o.domain: o.version for o in out.opset_import}.get(d) != v}
    if changed:
        raise OnnxpruneError(f"the MatMulNBits quantizer changed the opset imports of {sorted(changed)}")
    if [(p.key, p.value) for p in out.metadata_props] != metadata:
        raise OnnxpruneError("the MatMulNBits quantizer changed the model's metadata")
    if [f.SerializeToString(deterministic=True) for f in out.functions] != functions:
        raise OnnxpruneError("the MatMulNBits quantizer changed the model's functions")
    report = QuantizeReport(
        matmuls=sum(n.op_type == "MatMulNBits" and n.domain == MS_DOMAIN for n in out.graph.node),
        kept_matmuls=sum(n.op_type == "MatMul" for n in out.graph.node),
        onnxprune_nodes=len(custom),
        weight_bytes_before=before,
        weight_bytes_after=_initializer_bytes(out),
    )
    if report.matmuls == 0:
        raise OnnxpruneError("no MatMul with a constant weight to quantize")
    return out, report


def quantize_weights(src: str | os.PathLike, dst: str | os.PathLike, bits: int = 4, block_size: int = 32,
                     symmetric: bool = False, accuracy_level: int | None = None) -> QuantizeReport:
    """Quantize the MatMul weights of the model file ``src`` into ``dst`` (one file, written
    atomically); see ``quantize_model``."""
    if not os.path.isfile(src):
        raise OnnxpruneError(f"{src}: no such model file")
    try:
        model = onnx.load(str(src))
    except Exception as e:  # protobuf's own errors
        raise OnnxpruneError(f"{src}: not an ONNX model ({e})".splitlines()[0]) from None
    out, report = quantize_model(model, bits, block_size, symmetric, accuracy_level)
    with atomic_path(dst) as tmp:
        onnx.save(out, str(tmp))
    return report
