"""Why a Softmax that no rule matched is not an attention site, said as specifically as the graph
allows: the first place where it leaves the shape every rule expects,

    MatMul(Q, Kᵀ) → [Mul | Div] → [Add …] → Softmax(-1) → [Cast | Where(IsNaN) …] → MatMul(·, V)
"""

from __future__ import annotations

import onnx_ir as ir

#: Ops that may sit between the scores MatMul and the Softmax (scaling, masks, biases).
_SCORE_STEPS = {"Mul", "Div", "Add", "Where", "Cast"}
#: Ops that may sit between the Softmax and the MatMul with V.
_PROBS_STEPS = {"Cast", "Where", "IsNaN"}


def _described(node: ir.Node | None) -> str:
    if node is None:
        return "a graph input"
    domain = f"{node.domain}." if node.domain not in ("", "ai.onnx") else ""
    return f"{domain}{node.op_type} ({node.name})"


def _scores_source(softmax: ir.Node) -> ir.Node | None:
    """The node the scores come from, past scaling, masks and biases."""
    node = softmax.inputs[0].producer()
    while node is not None and node.op_type in _SCORE_STEPS and node.domain in ("", "ai.onnx"):
        inputs = node.inputs[1:] if node.op_type == "Where" else node.inputs  # Where's condition is a mask
        operands = [v for v in inputs if v is not None and v.producer() is not None]
        if not operands:
            return None
        # The running scores: the operand a MatMul made, else the first (Where: the last, as masked_fill has it).
        matmuls = [v for v in operands if v.producer().op_type == "MatMul"]
        chosen = matmuls[0] if matmuls else (operands[-1] if node.op_type == "Where" else operands[0])
        node = chosen.producer()
    return node


def _probs_sink(softmax: ir.Node) -> list[ir.Node]:
    frontier, sinks = [softmax.outputs[0]], []
    while frontier:
        value = frontier.pop()
        for use in value.uses():
            if use.node.op_type in _PROBS_STEPS and use.node.domain in ("", "ai.onnx"):
                frontier.extend(use.node.outputs)
            else:
                sinks.append(use.node)
    return sinks


def explain_unmatched_softmax(softmax: ir.Node) -> str:
    """A one-line reason; the generic one only when the graph has the expected shape throughout."""
    axis = softmax.attributes.get("axis")
    scores = softmax.inputs[0]
    rank = len(scores.shape) if scores.shape is not None else None
    if axis is not None and rank is not None and axis.as_int() not in (-1, rank - 1):
        return "Softmax is not over the last axis"
    if rank is not None and rank != 4:
        return f"the scores have rank {rank}, not 4 ([B, H, Sq, Sk])"
    source = _scores_source(softmax)
    if source is None or source.op_type != "MatMul":
        return f"the scores come from {_described(source)}, not MatMul(Q, Kᵀ)"
    if softmax.outputs[0].is_graph_output():
        return "the probabilities are also a graph output (attention weights returned)"
    sinks = _probs_sink(softmax)
    if not sinks:
        return "the probabilities are not used"
    others = [n for n in sinks if n.op_type != "MatMul"]
    if others:
        return f"the probabilities go to {_described(others[0])}, not only to MatMul(·, V)"
    if len(sinks) > 1:
        return f"the probabilities feed {len(sinks)} MatMuls (attention weights used elsewhere)"
    return (
        "not part of a known attention pattern (MatMul → [scale] → [mask] → Softmax → MatMul, Attention-23, "
        "or com.microsoft Attention/MultiHeadAttention)"
    )
