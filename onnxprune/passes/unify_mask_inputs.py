"""Give every ``BlockSparseAttention`` node of a graph the same form of ``attn_mask``.

The op's function body is specialised to one form (see ``op_function``). Where sites differ,
all move to a float additive mask: a bool mask becomes ``Where(m, 0, -inf)`` and a site without
a mask gets a broadcast zero. Returns the form the nodes now share.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxprune import op_schema
from onnxprune.op_function import MaskUse


def attention_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.domain == op_schema.DOMAIN and n.op_type == op_schema.OP_TYPE]


def _mask_kind(node: ir.Node) -> str | None:
    mask = node.inputs[4] if len(node.inputs) > 4 else None
    if mask is None:
        return None
    return "bool" if mask.dtype == ir.DataType.BOOL else "float"


def unify_mask_inputs(graph: ir.Graph) -> MaskUse:
    nodes = attention_nodes(graph)
    kinds = {_mask_kind(n) for n in nodes}
    has_kpm = any(len(n.inputs) > 5 and n.inputs[5] is not None for n in nodes)
    if len(kinds) <= 1:
        return MaskUse(attn_mask=next(iter(kinds), None), key_padding_mask=has_kpm)
    zero = ir.Value(name="onnxprune.zero_mask", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.FLOAT))
    zero.const_value = ir.tensor(np.zeros([1], np.float32), name=zero.name)
    neg_inf = ir.Value(name="onnxprune.neg_inf", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT))
    neg_inf.const_value = ir.tensor(np.array(-np.inf, np.float32), name=neg_inf.name)
    graph.register_initializer(zero)
    graph.register_initializer(neg_inf)
    for node in nodes:
        kind = _mask_kind(node)
        if kind == "float":
            continue
        if kind == "bool":
            where = ir.Node("", "Where", [node.inputs[4], zero, neg_inf], name=f"{node.name}/mask_to_float")
            graph.insert_before(node, where)
            node.replace_input_with(4, where.outputs[0])
            where.outputs[0].dtype = ir.DataType.FLOAT
        else:
            inputs = list(node.inputs[:4]) + [zero] + list(node.inputs[5:])
            replacement = ir.Node(
                node.domain, node.op_type, inputs, attributes=node.attributes.values(), name=node.name,
                num_outputs=1,
            )
            graph.insert_before(node, replacement)
            output_name = node.outputs[0].name
            ir.convenience.replace_all_uses_with(node.outputs[0], replacement.outputs[0], replace_graph_outputs=True)
            graph.remove(node, safe=True)
            replacement.outputs[0].name = output_name
    return MaskUse(attn_mask="float", key_padding_mask=has_kpm)
