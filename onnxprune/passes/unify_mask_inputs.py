"""Give every ``BlockSparseAttention`` node of a graph the same form of ``attn_mask``.

The op's function body is specialised to one form (see ``op_function``). Where sites differ,
all move to a float additive mask: a bool mask becomes ``Where(m, 0, -inf)`` and a site without
a mask gets a broadcast zero.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxprune.layouts import attention_nodes


def _mask_kind(node: ir.Node) -> str | None:
    mask = node.inputs[4] if len(node.inputs) > 4 else None
    if mask is None:
        return None
    return "bool" if mask.dtype == ir.DataType.BOOL else "float"


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT))
    value.const_value = ir.tensor(array, name=name)
    graph.register_initializer(value)
    return value


class UnifyMaskInputsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = attention_nodes(graph)
        if len({_mask_kind(n) for n in nodes}) <= 1:
            return ir.passes.PassResult(model, False)
        zero = _constant(graph, "onnxprune.zero_mask", np.zeros([1], np.float32))
        neg_inf = _constant(graph, "onnxprune.neg_inf", np.array(-np.inf, np.float32))
        for node in nodes:
            kind = _mask_kind(node)
            if kind == "bool":
                where = ir.Node("", "Where", [node.inputs[4], zero, neg_inf], name=f"{node.name}/mask_to_float")
                graph.insert_before(node, where)
                node.replace_input_with(4, where.outputs[0])
                where.outputs[0].dtype = ir.DataType.FLOAT
            elif kind is None:
                node.resize_inputs(max(len(node.inputs), 5))
                node.replace_input_with(4, zero)
        return ir.passes.PassResult(model, True)

