"""Add the op's function body, specialised to how the model's nodes call it, and its opset import,
so the pruned model also runs where onnxprune's library is absent."""

from __future__ import annotations

import onnx_ir as ir

from onnxprune import op_schema
from onnxprune.errors import OnnxpruneError
from onnxprune.layouts import attention_nodes
from onnxprune.op_function import MaskUse, build_function


def mask_use(nodes: list[ir.Node]) -> MaskUse:
    """The one form of optional inputs the nodes share (``UnifyMaskInputsPass`` makes them share one)."""
    forms = set()
    for node in nodes:
        attn_mask = node.inputs[4] if len(node.inputs) > 4 else None
        kind = None if attn_mask is None else "bool" if attn_mask.dtype == ir.DataType.BOOL else "float"
        forms.add(MaskUse(attn_mask=kind, key_padding_mask=len(node.inputs) > 5 and node.inputs[5] is not None,
                          layout_rule=len(node.inputs) > 6 and node.inputs[6] is not None))
    if len(forms) != 1:
        raise OnnxpruneError(f"the {op_schema.OP_TYPE} nodes pass their optional inputs in {len(forms)} different forms; "
                             "one function body serves one form")
    return forms.pop()


class AttachFunctionPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = attention_nodes(model.graph)
        if not nodes:
            return ir.passes.PassResult(model, False)
        opset = model.opset_imports.get("", 0)
        if opset < op_schema.MIN_MODEL_OPSET:
            raise OnnxpruneError(
                f"the model's opset is {opset}; the pruned op's function body needs >= {op_schema.MIN_MODEL_OPSET}"
                " (export again with a newer opset)"
            )
        function = ir.serde.deserialize_function(build_function(mask_use(nodes), opset))
        model.functions[function.identifier()] = function
        model.opset_imports[op_schema.DOMAIN] = op_schema.OPSET_VERSION
        return ir.passes.PassResult(model, True)
