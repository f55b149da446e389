"""Turn every ``BlockSparseAttention`` node into its statistics form for calibration.

``onnxprune.BlockSparseAttentionStatistics`` computes the same Y and, beside it, the site's
attention probabilities summed over ``g × g`` cells of valid queries (float64
``[B, Hq, ⌈Sq/g⌉, ⌈Sk/g⌉]``), without ever holding an ``S × S`` matrix. The graph's outputs
become, per site in the given order, those sums and the site's number of queries (calibration
tells self-attention from other sites by it); the model's own outputs are dropped so that
ONNX Runtime neither computes what only they need nor keeps them.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxprune import op_schema
from onnxprune.errors import OnnxpruneError
from onnxprune.layouts import attention_nodes, node_site

#: The graph input whose nonzero positions are the valid queries (the transformers convention).
QUERY_VALID_INPUT = "attention_mask"


def pooled_name(prefix: str, index: int) -> str:
    return f"{prefix}{index}"


def queries_name(prefix: str, index: int) -> str:
    return f"{prefix}{index}.queries"


class StatisticsFormPass(ir.passes.InPlacePass):
    """``sites``: the site names in the order of the outputs; ``prefix`` names the outputs."""

    def __init__(self, granularity: int, sites: list[str], prefix: str):
        super().__init__()
        self.granularity = granularity
        self.sites = sites
        self.prefix = prefix

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {node_site(n): n for n in attention_nodes(graph)}
        missing = [s for s in self.sites if s not in nodes]
        if missing:
            raise OnnxpruneError(f"no BlockSparseAttention node for site {missing[0]}")
        query_valid = self._query_valid(graph)
        graph.outputs.clear()  # before the nodes go: an attention output may be a graph output
        outputs = []
        for index, site in enumerate(self.sites):
            node = nodes[site]
            inputs = list(node.inputs) + [None] * (len(op_schema.INPUTS) - len(node.inputs)) + [query_valid]
            attributes = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]
            stats = ir.Node(op_schema.DOMAIN, op_schema.STATISTICS_OP_TYPE, inputs,
                            attributes=[*attributes, ir.AttrInt64("granularity", self.granularity)],
                            num_outputs=2, name=f"{node.name}/statistics", version=node.version)
            queries = ir.Node("", "Shape", [node.inputs[0]], attributes=[ir.AttrInt64("start", 2), ir.AttrInt64("end", 3)],
                              name=f"{node.name}/queries")
            graph.insert_before(node, [stats, queries])
            y, pooled = stats.outputs
            old = node.outputs[0]
            ir.convenience.replace_all_uses_with(old, y)
            graph.remove(node, safe=True)
            y.name, y.type, y.shape = old.name, old.type, old.shape
            pooled.name, pooled.dtype = pooled_name(self.prefix, index), ir.DataType.DOUBLE
            count = queries.outputs[0]
            count.name, count.dtype = queries_name(self.prefix, index), ir.DataType.INT64
            outputs += [pooled, count]
        graph.outputs.extend(outputs)
        return ir.passes.PassResult(model, True)

    @staticmethod
    def _query_valid(graph: ir.Graph) -> ir.Value | None:
        mask = next((v for v in graph.inputs if v.name == QUERY_VALID_INPUT), None)
        if mask is None or mask.dtype in (ir.DataType.INT64, ir.DataType.BOOL):
            return mask
        cast = ir.Node("", "Cast", [mask], attributes=[ir.AttrInt64("to", ir.DataType.INT64)],
                       name="onnxprune.query_valid")
        graph.insert_before(next(iter(graph)), cast)
        cast.outputs[0].dtype = ir.DataType.INT64
        return cast.outputs[0]
