"""Pass the model's ``attention_mask`` input as ``key_padding_mask`` where that is all the
attention mask of every site encodes.

Exporters turn ``attention_mask [B, S]`` into an additive ``[B, 1, S, S]`` float mask (0 for
kept keys, a huge negative number for padding, a causal triangle added in decoders). Kept as
``attn_mask``, that costs the graph an ``S × S`` tensor per run and the kernel a mask read per
element of every kept block; as ``key_padding_mask`` (plus ``is_causal``) the kernel reads B·S
values. Whether a site's mask is only that is decided from its values, not its structure: the
mask's subgraph is evaluated on probe inputs (several lengths, random padding), because how the
mask is built differs between exporters and transformers versions while what it must equal does
not. A mask passes only if, on every probe, kept keys get exactly 0 (or True) and padded keys
(and, for the causal form, keys after the query) get -inf or at most -1e30 (or False): then
``softmax`` gives exactly the same probabilities, except for a row with every key padded, which
the op makes 0 where a finite fill makes it uniform. All sites are converted or none (the op's
function body is specialised to one set of inputs).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune.layouts import attention_nodes
from onnxprune.lm_feeds import PAST_INPUT

#: The graph input that carries the padding, by the transformers convention.
PADDING_INPUT = "attention_mask"
#: An additive fill at or below this gives probability exactly 0 in float32 (exp underflows).
HUGE_NEGATIVE = -1e30

#: (new positions, cached positions) per probe. A model with a KV cache (``past_key_values.*``
#: inputs, its attention ``queries_at_end``) is also probed with a past, where the causal part
#: must be bottom-right aligned: the query at new position ``i`` sees keys up to ``past + i``.
_PROBE_LENGTHS = ((5, 0), (11, 0))
_CACHE_PROBE_LENGTHS = (*_PROBE_LENGTHS, (1, 6), (4, 9))
_PROBE_BATCH = 3


class KeyPaddingMaskPass(ir.passes.InPlacePass):
    """Rewires every ``BlockSparseAttention`` node to ``key_padding_mask`` when each site's mask is
    the padding (or padding + causal) mask of the graph input ``attention_mask``; all or none."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = attention_nodes(model.graph)
        padding = next((v for v in model.graph.inputs if v.name == PADDING_INPUT), None)
        if not nodes or padding is None or padding.shape is None or len(padding.shape) != 2:
            return ir.passes.PassResult(model, False)
        masks = [n.inputs[4] if len(n.inputs) > 4 else None for n in nodes]
        if any(m is None or m.producer() is None for m in masks):
            # no mask, or one that is a graph input or a constant: nothing to gain or know
            return ir.passes.PassResult(model, False)
        at_end = {_attribute(n, "queries_at_end") for n in nodes}
        if len(at_end) != 1:
            return ir.passes.PassResult(model, False)
        kinds = _mask_kinds(model, list(dict.fromkeys(masks)), queries_at_end=at_end.pop() == 1)
        if kinds is None or any(kinds[m] is None for m in masks):
            return ir.passes.PassResult(model, False)
        for node, mask in zip(nodes, masks):
            node.resize_inputs(max(len(node.inputs), 6))
            node.replace_input_with(4, None)
            node.replace_input_with(5, padding)
            if kinds[mask] == "padding+causal":
                node.attributes["is_causal"] = ir.AttrInt64("is_causal", 1)
        return ir.passes.PassResult(model, True)


def _attribute(node: ir.Node, name: str) -> int:
    attribute = node.attributes.get(name)
    return 0 if attribute is None else attribute.as_int()


def mask_subgraph(model: ir.Model, outputs: list[ir.Value]) -> onnx.ModelProto | None:
    """The nodes of ``model`` that compute ``outputs``, as a model of their own with the graph
    inputs and constants they read; None when they cannot stand alone (a control-flow node may
    read outer values; a value without a name or type)."""
    needed: set[ir.Node] = set()
    inputs: dict[str, ir.Value] = {}
    constants: dict[str, ir.Value] = {}
    stack = list(outputs)
    while stack:
        value = stack.pop()
        node = value.producer()
        if node is None:
            (constants if value.const_value is not None else inputs)[value.name] = value
        elif node not in needed:
            if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
                return None
            needed.add(node)
            stack.extend(v for v in node.inputs if v is not None)
    named = [*inputs.values(), *constants.values(), *(o for n in needed for o in n.outputs)]
    if not all(v.name for v in named) or any(v.type is None for v in [*inputs.values(), *outputs]):
        return None
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in model.graph if n in needed],
        "masks",
        [ir.serde.serialize_value(v) for v in inputs.values()],
        [onnx.helper.make_tensor_value_info(v.name, v.dtype.value, None) for v in outputs],
        initializer=[onnx.numpy_helper.from_array(v.const_value.numpy(), name) for name, v in constants.items()],
    )
    called = {(n.domain, n.op_type, n.overload) for n in needed}
    functions = [f for key, f in model.functions.items() if key in called]
    domains = {""} | {n.domain for n in needed} | {d for f in functions for d in f.opset_imports}
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items() if d in domains]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)
    proto.functions.extend(ir.serde.serialize_function(f) for f in functions)
    return proto


def _mask_kinds(model: ir.Model, masks: list[ir.Value], queries_at_end: bool = False
                ) -> dict[ir.Value, str | None] | None:
    """For each mask value: "padding", "padding+causal" or None, from probe runs of the masks'
    subgraph; None when the subgraph cannot be run on probe inputs at all. A subgraph that reads
    a KV cache input is probed with cached positions too, and only for ``queries_at_end`` sites."""
    import onnxruntime as ort

    sub = mask_subgraph(model, masks)
    if sub is None:
        return None
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4
        sess = ort.InferenceSession(sub.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - a subgraph ORT cannot load: keep the masks as they are
        return None
    names = [m.name for m in masks]
    kinds: dict[str, set[str]] = {name: {"padding", "padding+causal"} for name in names}
    rng = np.random.default_rng(0)
    cached = {i.name for i in sess.get_inputs() if PAST_INPUT.match(i.name)}
    if cached and not queries_at_end:
        return None  # a cache read by sites whose queries start at 0: not a form we know
    for new, past in _CACHE_PROBE_LENGTHS if cached else _PROBE_LENGTHS:
        keep = _probe_padding(rng, past + new)
        feeds = {}
        for graph_input in sess.get_inputs():
            if graph_input.name in cached:
                feeds[graph_input.name] = _empty_cache_probe(graph_input, past)
                if feeds[graph_input.name] is None:
                    return None
                continue
            dtype = _numpy_dtype(graph_input.type)
            if dtype is None or not _is_batch_by_length(graph_input.shape):
                return None  # an input we cannot probe (images, extra axes)
            feeds[graph_input.name] = (keep.astype(dtype) if graph_input.name == PADDING_INPUT
                                       else np.zeros((_PROBE_BATCH, new), dtype))
        if PADDING_INPUT not in feeds:
            return dict.fromkeys(masks)  # the masks do not depend on the padding
        try:
            values = sess.run(names, feeds)
        except Exception:  # noqa: BLE001 - the subgraph rejects probe inputs: keep the masks
            return None
        for name, value in zip(names, values):
            kinds[name] = {k for k in kinds[name]
                           if is_padding_mask(value, keep, causal=k == "padding+causal", queries=new)}
    # "padding" is preferred when both fit (a mask that is the same for every query).
    return {mask: ("padding" if "padding" in kinds[name] else next(iter(kinds[name]), None))
            for mask, name in zip(masks, names)}


def _probe_padding(rng, length: int) -> np.ndarray:
    keep = np.ones((_PROBE_BATCH, length), bool)
    keep[1, length // 2 + 1 :] = False  # right padding
    keep[2] = rng.random(length) < 0.6  # anywhere
    keep[2, 0] = True
    return keep


def is_padding_mask(mask: np.ndarray, keep: np.ndarray, causal: bool, queries: int | None = None) -> bool:
    """Whether ``mask`` (additive or bool) keeps exactly the keys ``keep`` marks (and, ``causal``,
    no key after its query), with fills that make a probability exactly 0. ``queries``: the
    number of queries, the last of the keys' positions (default: as many as keys)."""
    batch, length = keep.shape
    queries = length if queries is None else queries
    if mask.ndim != 4 or mask.shape[0] not in (1, batch) or mask.shape[1] != 1:
        return False
    if mask.shape[2] not in (1, queries) or mask.shape[3] != length:
        return False
    allowed = np.broadcast_to(keep[:, None, None, :], (batch, 1, queries, length))
    if causal:  # bottom-right: query i is at position i + length - queries
        allowed = allowed & np.tri(queries, length, k=length - queries, dtype=bool)
    full = np.broadcast_to(mask, (batch, 1, queries, length))
    if mask.dtype == np.bool_:
        return bool(np.array_equal(full, allowed))
    return bool(np.all(full[allowed] == 0) and np.all(full[~allowed] <= HUGE_NEGATIVE))


def _empty_cache_probe(cache_input, past: int) -> np.ndarray | None:
    """Zeros for a cache input ``[batch, heads, past, head_size]`` with ``past`` positions."""
    shape = cache_input.shape
    if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        return None
    dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(cache_input.type)
    return None if dtype is None else np.zeros((_PROBE_BATCH, shape[1], past, shape[3]), dtype)


def _numpy_dtype(ort_type: str):
    return {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}.get(ort_type)


def _is_batch_by_length(shape) -> bool:
    return len(shape) == 2
