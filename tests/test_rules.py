"""The attention-site rules on tiny graphs built in memory (no torch).

Each form an exporter emits is matched by ``find_sites`` (one site, the right form, scale and mask
kind), then rewritten as a prune does with a full layout: ONNX Runtime must give the same outputs
before and after, both with the library's kernel and with the op's function body (no library).
Graphs that look like attention but are not sites must be reported with the reason.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper

from onnxprune import op_schema
from onnxprune.layouts import Layouts, SiteLayout
from onnxprune.model_io import ensure_node_names
from onnxprune.passes import prune_passes
from onnxprune.rules import find_sites, rewrite_rule_set
from onnxprune.runtime import session

B, H, S, D = 2, 4, 20, 8  # S is not a multiple of the block
BLOCK = 16
ATOL = 1e-5

_NP = {T.FLOAT: np.float32, T.BOOL: np.bool_}


def vi(name, shape, elem=T.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def scalar(name, value):
    return helper.make_tensor(name, T.FLOAT, [], [value])


def make_model(nodes, inputs, initializers=(), opset=20):
    graph = helper.make_graph(nodes, "g", inputs, [vi("Y", None)], initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def to_ir(proto: onnx.ModelProto) -> ir.Model:
    """As ``model_io.load_model`` reads a file: shapes inferred, every node named."""
    proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    ensure_node_names(proto)
    return ir.serde.deserialize_model(proto)


def random_feeds(proto: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in proto.graph.input:
        shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        elem = inp.type.tensor_type.elem_type
        if inp.name == "M" and elem == T.BOOL:
            value = rng.random(shape) > 0.3
            value[..., 0] = True  # no fully masked row
        elif inp.name == "F":  # masked_fill's condition: true = masked; no row fully masked
            value = rng.random(shape) < 0.3
            value[..., 0] = False
        elif inp.name == "M":
            value = np.where(rng.random(shape) < 0.3, -np.inf, rng.standard_normal(shape)).astype(np.float32)
            value[..., 0] = 0.0
        else:
            value = rng.standard_normal(shape).astype(_NP[elem])
        feeds[inp.name] = value
    return feeds


def run_plain(proto: onnx.ModelProto, feeds) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["Y"], feeds)[0]


def full_layouts(names, heads: int = H, sq: int = S, sk: int = S) -> Layouts:
    """An all-ones layout for each site."""
    return Layouts(BLOCK, {name: SiteLayout(np.ones((heads, -(-sq // BLOCK), -(-sk // BLOCK)), np.uint8))
                           for name in names})


def prune_full(proto: onnx.ModelProto, heads: int = H) -> onnx.ModelProto:
    """Rewrite every site with an all-ones layout, as ``prune.prune`` does after learning."""
    model = to_ir(proto)
    prune_passes(full_layouts([s.name for s in find_sites(model).sites], heads))(model)
    return ir.serde.serialize_model(model)


def check_rewrite(proto: onnx.ModelProto, ops_library: str, heads: int = H, expect_no=("Softmax", "Attention"),
                  num_sites: int = 1):
    feeds = random_feeds(proto)
    dense = run_plain(proto, feeds)
    assert np.all(np.isfinite(dense))
    pruned = prune_full(proto, heads)
    ops = [(n.domain, n.op_type) for n in pruned.graph.node]
    assert ops.count((op_schema.DOMAIN, op_schema.OP_TYPE)) == num_sites, ops
    for op_type in expect_no:
        assert ("", op_type) not in ops, ops
    assert [f.name for f in pruned.functions] == [op_schema.OP_TYPE]
    with_library = session(pruned.SerializeToString(), with_library=True).run(["Y"], feeds)[0]
    function_body = run_plain(pruned, feeds)
    np.testing.assert_allclose(with_library, dense, atol=ATOL, rtol=0)
    np.testing.assert_allclose(function_body, dense, atol=ATOL, rtol=0)
    return pruned


# --------------------------------------------------------------------------------------------
# Eager: MatMul(Q, Kᵀ) → [Mul | Div](scale) → [Add](mask) → Softmax(-1) → [Cast] → MatMul(·, V)


def eager_model(scaling="Mul", mask=True, cast=False, commuted=False, scale_node="initializer",
                softmax_axis=-1, q_rank=4, scale_input=False, scale_first=False, bias=False, cast_to=(T.FLOAT,),
                fill=None, cast_scores=False):
    q_shape = [B, H, S, D] if q_rank == 4 else [B * H, S, D]
    kv_shape = [B, H, S, D] if q_rank == 4 else [B * H, S, D]
    perm = [0, 1, 3, 2] if q_rank == 4 else [0, 2, 1]
    value = {"Mul": 1 / math.sqrt(D), "Div": math.sqrt(D)}.get(scaling)
    nodes = [helper.make_node("Transpose", ["K"], ["Kt"], perm=perm), helper.make_node("MatMul", ["Q", "Kt"], ["qk"])]
    inputs = [vi("Q", q_shape), vi("K", kv_shape), vi("V", kv_shape)]
    inits = []
    scores = "qk"
    if scaling != "None":
        if scale_input:
            inputs.append(vi("sc", []))
        elif scale_node == "initializer":
            inits.append(scalar("sc", value))
        else:
            nodes.append(helper.make_node("Constant", [], ["sc"], value=scalar("sc", value)))
        operands = ["sc", scores] if scale_first else [scores, "sc"]
        nodes.append(helper.make_node(scaling, operands, ["scaled"]))
        scores = "scaled"
    if mask:
        inputs.append(vi("M", [B, 1, 1, S] if q_rank == 4 else [1, 1, S]))
        nodes.append(helper.make_node("Add", ["M", scores] if commuted else [scores, "M"], ["masked"]))
        scores = "masked"
    if bias:  # T5: a position bias added after the mask
        inputs.append(vi("PB", [1, H, S, S]))
        nodes.append(helper.make_node("Add", [scores, "PB"], ["biased"]))
        scores = "biased"
    if fill is not None:  # masked_fill(F, fill): F true = masked
        inputs.append(vi("F", [B, 1, 1, S], T.BOOL))
        if fill == "input":
            inputs.append(vi("fill", []))
        else:
            inits.append(scalar("fill", fill))
        nodes.append(helper.make_node("Where", ["F", "fill", scores], ["filled"]))
        scores = "filled"
    if cast_scores:
        nodes.append(helper.make_node("Cast", [scores], ["scores_f32"], to=T.FLOAT))
        scores = "scores_f32"
    nodes.append(helper.make_node("Softmax", [scores], ["probs"], axis=softmax_axis, name="the_softmax"))
    probs = "probs"
    for index in range(int(cast)):  # TorchScript: Cast to float32 (and once more to the value's type)
        nodes.append(helper.make_node("Cast", [probs], [f"probs_cast{index}"], to=cast_to[index % len(cast_to)]))
        probs = f"probs_cast{index}"
    nodes.append(helper.make_node("MatMul", [probs, "V"], ["Y"]))
    return make_model(nodes, inputs, inits)


EAGER_VARIANTS = [
    pytest.param(dict(scaling=s, mask=m, cast=c, commuted=x), id=f"{s}-{'mask' if m else 'nomask'}"
                 f"{'-cast' if c else ''}{'-commuted' if x else ''}")
    for s in ("Mul", "Div", "None")
    for m in (True, False)
    for c in (False, True)
    for x in ((False, True) if m else (False,))
] + [pytest.param(dict(scaling="Mul", scale_node="Constant"), id="Mul-Constant-node"),
     pytest.param(dict(scaling="Mul", cast=2), id="Mul-mask-two-casts"),
     pytest.param(dict(scaling="None", bias=True), id="None-mask-bias"),
     pytest.param(dict(scaling="None", bias=True, commuted=True, cast=2), id="None-mask-bias-commuted-two-casts"),
     pytest.param(dict(scaling="Div", bias=True), id="Div-mask-bias"),
     pytest.param(dict(scaling="Mul", mask=False, fill=float(np.finfo(np.float32).min)), id="Mul-masked-fill"),
     pytest.param(dict(scaling="Mul", bias=True, fill=float(np.finfo(np.float32).min), cast_scores=True, cast=2),
                  id="Mul-mask-alibi-masked-fill-casts"),
     pytest.param(dict(scaling="Div", mask=False, fill=-1e4), id="Div-masked-fill-1e4"),
     pytest.param(dict(scaling="Div", scale_node="Constant", commuted=True), id="Div-Constant-node-commuted"),
     pytest.param(dict(scaling="Mul", scale_first=True), id="Mul-scale-first"),
     pytest.param(dict(scaling="Mul", scale_first=True, commuted=True, cast=True), id="Mul-scale-first-commuted-cast")]


@pytest.mark.parametrize("variant", EAGER_VARIANTS)
def test_eager_found(variant):
    discovery = find_sites(to_ir(eager_model(**variant)))
    assert discovery.unmatched == []
    assert len(discovery.sites) == 1
    site = discovery.sites[0]
    assert site.name == "the_softmax"
    assert site.form == "eager"
    expected_scale = 1.0 if variant["scaling"] == "None" else 1 / math.sqrt(D)
    assert site.scale == pytest.approx(expected_scale, rel=1e-6)
    assert site.mask_kind == ("float" if variant.get("mask", True) or variant.get("fill") else None)
    assert site.is_causal is False
    assert site.q.name == "Q" and site.v.name == "V" and site.k_transposed.name == "Kt"
    assert site.probs is not None and site.probs.name == "probs"
    assert (site.num_heads, site.head_size) == (H, D)


@pytest.mark.parametrize("variant", EAGER_VARIANTS)
def test_eager_rewrite_keeps_outputs(variant, ops_library):
    pruned = check_rewrite(eager_model(**variant), ops_library)
    node = next(n for n in pruned.graph.node if n.op_type == op_schema.OP_TYPE)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["block_size"] == BLOCK and attrs["is_causal"] == 0
    # Kᵀ came from a Transpose of K: the op takes K itself, no transpose added back.
    assert node.input[1] == "K"
    assert (len(node.input) == 5) == (variant.get("mask", True) or variant.get("fill") is not None)


# --------------------------------------------------------------------------------------------
# SDPA decomposed: MatMul(scale(Q), scale(Kᵀ)) → [Add](mask) → Softmax → Where(IsNaN, 0, ·) → MatMul


def sdpa_model(q_scaling="Mul", k_scaling="Mul", mask=True, zero=0.0, scale_input=False, commuted=False,
               scale_first=False):
    root = D ** -0.25  # each side applies √scale
    value = {"Mul": root, "Div": 1 / root, "None": 1.0}
    inputs = [vi("Q", [B, H, S, D]), vi("K", [B, H, S, D]), vi("V", [B, H, S, D])]
    inits = [scalar("zero", zero), scalar("ks", value[k_scaling])]
    if scale_input:
        inputs.append(vi("qs", []))
    else:
        inits.append(scalar("qs", value[q_scaling]))
    nodes = [helper.make_node("Transpose", ["K"], ["Kt"], perm=[0, 1, 3, 2])]
    # OPT scales Q in its projection and passes scale 1: no scaling node on either side.
    operands = []
    for scaling, x, factor, out in ((q_scaling, "Q", "qs", "q_scaled"), (k_scaling, "Kt", "ks", "k_scaled")):
        if scaling != "None":
            nodes.append(helper.make_node(scaling, [factor, x] if scale_first else [x, factor], [out]))
        operands.append(x if scaling == "None" else out)
    nodes.append(helper.make_node("MatMul", operands, ["scores"]))
    scores = "scores"
    if mask:
        inputs.append(vi("M", [B, 1, S, S]))
        nodes.append(helper.make_node("Add", ["M", scores] if commuted else [scores, "M"], ["masked"]))
        scores = "masked"
    nodes += [
        helper.make_node("Softmax", [scores], ["probs"], axis=-1, name="the_softmax"),
        helper.make_node("IsNaN", ["probs"], ["nan"]),
        helper.make_node("Where", ["nan", "zero", "probs"], ["cleaned"]),
        helper.make_node("MatMul", ["cleaned", "V"], ["Y"]),
    ]
    return make_model(nodes, inputs, inits)


SDPA_VARIANTS = [
    pytest.param(dict(q_scaling=qs, k_scaling=ks, mask=m), id=f"q{qs}-k{ks}-{'mask' if m else 'nomask'}")
    for qs in ("Mul", "Div")
    for ks in ("Mul", "Div")
    for m in (True, False)
] + [pytest.param(dict(mask=True, commuted=True), id="mask-commuted"),
     pytest.param(dict(mask=True, scale_first=True), id="scale-first")]
SDPA_UNSCALED = [
    pytest.param(dict(q_scaling="None", k_scaling="None", mask=m), id=f"unscaled-{'mask' if m else 'nomask'}")
    for m in (True, False)
]


@pytest.mark.parametrize("variant", SDPA_VARIANTS)
def test_sdpa_decomposed_found(variant):
    discovery = find_sites(to_ir(sdpa_model(**variant)))
    assert discovery.unmatched == []
    assert len(discovery.sites) == 1
    site = discovery.sites[0]
    assert site.name == "the_softmax"
    assert site.form == "sdpa-decomposed"
    assert site.scale == pytest.approx(1 / math.sqrt(D), rel=1e-6)
    assert site.mask_kind == ("float" if variant["mask"] else None)
    assert site.is_causal is False
    assert site.q.name == "Q" and site.k_transposed.name == "Kt"


@pytest.mark.parametrize("variant", SDPA_VARIANTS)
def test_sdpa_decomposed_rewrite_keeps_outputs(variant, ops_library):
    pruned = check_rewrite(sdpa_model(**variant), ops_library, expect_no=("Softmax", "IsNaN", "Where"))
    node = next(n for n in pruned.graph.node if n.op_type == op_schema.OP_TYPE)
    scale = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "scale")
    assert scale == pytest.approx(1 / math.sqrt(D), rel=1e-6)


def test_eager_cast_to_half_is_not_a_site():
    discovery = find_sites(to_ir(eager_model(cast=2, cast_to=(T.FLOAT16, T.FLOAT))))
    assert discovery.sites == []
    assert discovery.unmatched == [
        ("the_softmax", "the probabilities are cast to another type than float32 before the MatMul with V")
    ]


def test_eager_masked_fill_not_constant():
    discovery = find_sites(to_ir(eager_model(mask=False, fill="input")))
    assert discovery.unmatched == [("the_softmax", "masked_fill with a value that is not a constant")]


def test_eager_scores_cast_to_half_is_not_a_site():
    proto = eager_model(cast_scores=True)
    next(n for n in proto.graph.node if n.op_type == "Cast").attribute[0].i = T.FLOAT16
    discovery = find_sites(to_ir(proto))
    assert discovery.unmatched[0][0] == "the_softmax" and discovery.sites == []


def test_eager_bias_rewrite_sums_the_terms(ops_library):
    pruned = check_rewrite(eager_model(scaling="None", bias=True), ops_library)
    node = next(n for n in pruned.graph.node if n.op_type == op_schema.OP_TYPE)
    producer = next(n for n in pruned.graph.node if node.input[4] in n.output)
    assert producer.op_type == "Add" and sorted(producer.input) == ["M", "PB"]


@pytest.mark.parametrize("variant", SDPA_UNSCALED)
def test_sdpa_decomposed_unscaled(variant, ops_library):
    model = sdpa_model(**variant)
    discovery = find_sites(to_ir(model))
    assert [(s.form, s.scale, s.mask_kind) for s in discovery.sites] == [
        ("sdpa-decomposed", 1.0, "float" if variant["mask"] else None)
    ]
    check_rewrite(model, ops_library, expect_no=("Softmax", "IsNaN", "Where"))


def test_sdpa_decomposed_nan_replacement_not_zero():
    discovery = find_sites(to_ir(sdpa_model(zero=1.0)))
    assert discovery.sites == []
    assert discovery.unmatched == [("the_softmax", "the value replacing NaN probabilities is not 0")]


def test_sdpa_decomposed_scale_not_constant():
    discovery = find_sites(to_ir(sdpa_model(scale_input=True)))
    assert discovery.sites == []
    assert discovery.unmatched == [("the_softmax", "scale is not a constant")]


# --------------------------------------------------------------------------------------------
# ONNX Attention (opset 23)


def attention_model(mask=None, is_causal=0, scale=None, softcap=None, kv_heads=H, extra_output=False):
    inputs = [vi("Q", [B, H, S, D]), vi("K", [B, kv_heads, S, D]), vi("V", [B, kv_heads, S, D])]
    names = ["Q", "K", "V"]
    if mask is not None:
        inputs.append(vi("M", [B, 1, S, S], {"float": T.FLOAT, "bool": T.BOOL}[mask]))
        names.append("M")
    attrs = {"is_causal": is_causal}
    if scale is not None:
        attrs["scale"] = scale
    if softcap is not None:
        attrs["softcap"] = softcap
    node = helper.make_node("Attention", names, ["Y"], name="the_attention", **attrs)
    return make_model([node], inputs, opset=23)


ATTENTION_VARIANTS = [
    pytest.param(dict(mask=m, is_causal=c), id=f"{m or 'nomask'}-causal{c}")
    for m in (None, "float", "bool")
    for c in (0, 1)
] + [
    pytest.param(dict(mask="float", scale=0.2), id="explicit-scale"),
    pytest.param(dict(mask=None, is_causal=1, kv_heads=2), id="grouped-heads"),
    pytest.param(dict(mask="bool", softcap=0.0), id="softcap-zero"),
]


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_onnx_attention_found(variant):
    discovery = find_sites(to_ir(attention_model(**variant)))
    assert discovery.unmatched == []
    assert len(discovery.sites) == 1
    site = discovery.sites[0]
    assert site.name == "the_attention"
    assert site.form == "onnx-attention"
    assert site.scale == pytest.approx(variant.get("scale") or 1 / math.sqrt(D), rel=1e-6)
    assert site.mask_kind == variant["mask"]
    assert site.is_causal is bool(variant.get("is_causal", 0))
    assert site.k is not None and site.k.name == "K"
    assert site.probs is None


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_onnx_attention_rewrite_keeps_outputs(variant, ops_library):
    pruned = check_rewrite(attention_model(**variant), ops_library)
    node = next(n for n in pruned.graph.node if n.op_type == op_schema.OP_TYPE)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["is_causal"] == variant.get("is_causal", 0)


def two_site_model(unmasked_site_is_graph_output: bool):
    inputs = [vi("Q", [B, H, S, D]), vi("K", [B, H, S, D]), vi("V", [B, H, S, D]), vi("M", [B, 1, S, S], T.BOOL)]
    second_out = "Y" if unmasked_site_is_graph_output else "A2"
    nodes = [
        helper.make_node("Attention", ["Q", "K", "V", "M"], ["A"], name="first"),
        helper.make_node("Attention", ["A", "K", "V"], [second_out], name="second", is_causal=1),
    ]
    if not unmasked_site_is_graph_output:
        nodes.append(helper.make_node("Neg", ["A2"], ["Y"]))
    return make_model(nodes, inputs, opset=23)


def check_two_sites(proto, ops_library):
    sites = find_sites(to_ir(proto)).sites
    assert [(s.name, s.mask_kind, s.is_causal) for s in sites] == [("first", "bool", False), ("second", None, True)]
    pruned = check_rewrite(proto, ops_library, num_sites=2)
    bsa = [n for n in pruned.graph.node if n.op_type == op_schema.OP_TYPE]
    # Both nodes now pass a float attn_mask, the form of the one function body.
    assert len(bsa) == 2 and all(len(n.input) == 5 for n in bsa)
    assert "attn_mask=float" in pruned.functions[0].doc_string


def test_two_sites_with_different_masks_share_one_body(ops_library):
    """A bool-masked and an unmasked site in one graph: both move to a float mask."""
    check_two_sites(two_site_model(unmasked_site_is_graph_output=False), ops_library)


def test_two_sites_with_different_masks_unmasked_output_is_graph_output(ops_library):
    check_two_sites(two_site_model(unmasked_site_is_graph_output=True), ops_library)


# --------------------------------------------------------------------------------------------
# Not sites, and why


def test_scale_not_constant():
    discovery = find_sites(to_ir(eager_model(scaling="Mul", scale_input=True)))
    assert discovery.sites == []
    assert discovery.unmatched == [("the_softmax", "scale is not a constant")]


def test_softmax_over_another_axis():
    discovery = find_sites(to_ir(eager_model(softmax_axis=2)))
    assert discovery.sites == []
    assert discovery.unmatched == [("the_softmax", "Softmax is not over the last axis")]


def test_softmax_axis_3_is_the_last_axis():
    discovery = find_sites(to_ir(eager_model(softmax_axis=3)))
    assert [s.name for s in discovery.sites] == ["the_softmax"]


def test_rank3_q():
    discovery = find_sites(to_ir(eager_model(q_rank=3)))
    assert discovery.sites == []
    assert discovery.unmatched == [("the_softmax", "Q has rank 3, not 4 ([B, H, S, D])")]


def test_lone_softmax():
    node = helper.make_node("Softmax", ["X"], ["Y"], axis=-1, name="classifier_softmax")
    discovery = find_sites(to_ir(make_model([node], [vi("X", [B, 10])])))
    assert discovery.sites == []
    assert len(discovery.unmatched) == 1
    assert discovery.unmatched == [("classifier_softmax", "the scores have rank 2, not 4 ([B, H, Sq, Sk])")]


def test_softmax_not_followed_by_matmul():
    nodes = [
        helper.make_node("MatMul", ["Q", "Kt"], ["qk"]),
        helper.make_node("Softmax", ["qk"], ["probs"], axis=-1, name="the_softmax"),
        helper.make_node("Relu", ["probs"], ["Y"]),
    ]
    proto = make_model(nodes, [vi("Q", [B, H, S, D]), vi("Kt", [B, H, D, S])])
    discovery = find_sites(to_ir(proto))
    assert discovery.sites == []
    assert discovery.unmatched == [("the_softmax", "the probabilities go to Relu (Relu_2), not only to MatMul(·, V)")]


def test_probabilities_used_elsewhere():
    """Rewriting would drop a value another consumer (here a graph output) needs."""
    proto = eager_model()
    proto.graph.output.append(vi("probs", None))
    discovery = find_sites(to_ir(proto))
    assert discovery.sites == []
    assert discovery.unmatched == [
        ("the_softmax", "the probabilities are also a graph output (attention weights returned)")
    ]


def test_scores_not_from_a_matmul():
    """BLOOM's form: scores made in 3-D (baddbmm with ALiBi), reshaped to 4-D before the Softmax."""
    inits = [onnx.numpy_helper.from_array(np.array([B, H, S, S], np.int64), "shape4")]
    nodes = [
        helper.make_node("MatMul", ["Q3", "Kt3"], ["qk3"]),
        helper.make_node("Reshape", ["qk3", "shape4"], ["qk"]),
        helper.make_node("Add", ["qk", "M"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1, name="the_softmax"),
        helper.make_node("MatMul", ["probs", "V"], ["Y"]),
    ]
    inputs = [vi("Q3", [B * H, S, D]), vi("Kt3", [B * H, D, S]), vi("M", [B, 1, 1, S]), vi("V", [B, H, S, D])]
    discovery = find_sites(to_ir(make_model(nodes, inputs, inits)))
    assert discovery.unmatched == [("the_softmax", "the scores come from Reshape (Reshape_1), not MatMul(Q, Kᵀ)")]


def test_probabilities_feed_two_matmuls():
    proto = eager_model()
    proto.graph.node.append(helper.make_node("MatMul", ["probs", "V"], ["Y2"]))
    proto.graph.output.append(vi("Y2", None))
    discovery = find_sites(to_ir(proto))
    assert discovery.unmatched == [
        ("the_softmax", "the probabilities feed 2 MatMuls (attention weights used elsewhere)")
    ]


def test_attention_with_softcap():
    discovery = find_sites(to_ir(attention_model(mask="float", softcap=30.0)))
    assert discovery.sites == []
    assert discovery.unmatched == [("the_attention", "Attention uses softcap")]


def test_rewrite_skips_site_without_layout():
    model = to_ir(eager_model())
    count = rewrite_rule_set(full_layouts(["some_other_site"])).apply_to_model(model)
    assert count == 0
    assert [n.op_type for n in model.graph].count("Softmax") == 1


def test_rewrite_carries_the_layout_as_initializer(ops_library):
    model = to_ir(eager_model())
    layout = np.zeros((H, 2, 2), np.uint8)
    layout[:, 0, 0] = layout[:, 1, 1] = layout[:, 1, 0] = 1
    count = rewrite_rule_set(Layouts(BLOCK, {"the_softmax": SiteLayout(layout)})).apply_to_model(model)
    assert count == 1
    name = op_schema.layout_name("the_softmax")
    assert name in model.graph.initializers
    np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), layout)


# --------------------------------------------------------------------------------------------
# Grouped-query attention: K and V repeated per query head (transformers' repeat_kv)


def repeated_kv_model(kv_heads: int, unsqueeze_axis: int = 2):
    """Eager attention over K, V of ``kv_heads`` heads repeated to H heads as repeat_kv does."""
    group = H // kv_heads
    expanded = [B, kv_heads, group, S, D] if unsqueeze_axis == 2 else [B, group, kv_heads, S, D]
    inits = [
        onnx.numpy_helper.from_array(np.array([unsqueeze_axis], np.int64), "axis"),
        onnx.numpy_helper.from_array(np.array(expanded, np.int64), "shape5"),
        onnx.numpy_helper.from_array(np.array([B, H, S, D], np.int64), "shape4"),
        scalar("sc", 1 / math.sqrt(D)),
    ]
    nodes = []
    for name in ("K", "V"):
        nodes += [
            helper.make_node("Unsqueeze", [f"{name}g", "axis"], [f"{name}5"]),
            helper.make_node("Expand", [f"{name}5", "shape5"], [f"{name}e"]),
            helper.make_node("Reshape", [f"{name}e", "shape4"], [name]),
        ]
    nodes += [
        helper.make_node("Transpose", ["K"], ["Kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["Q", "Kt"], ["qk"]),
        helper.make_node("Mul", ["qk", "sc"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1, name="the_softmax"),
        helper.make_node("MatMul", ["probs", "V"], ["Y"]),
    ]
    inputs = [vi("Q", [B, H, S, D]), vi("Kg", [B, kv_heads, S, D]), vi("Vg", [B, kv_heads, S, D])]
    return make_model(nodes, inputs, inits)


@pytest.mark.parametrize("kv_heads", [1, 2], ids=["mqa", "gqa"])
def test_repeated_kv_reads_the_kv_heads(kv_heads, ops_library):
    pruned = check_rewrite(repeated_kv_model(kv_heads), ops_library)
    node = next(n for n in pruned.graph.node if n.op_type == op_schema.OP_TYPE)
    assert list(node.input[1:3]) == ["Kg", "Vg"]
    assert not any(n.op_type == "Expand" for n in pruned.graph.node)


def test_heads_repeated_in_another_order_stay_repeated(ops_library):
    # Unsqueeze at axis 1 gives query head h the KV head h % Hkv, not h // G: not the op's grouping.
    pruned = check_rewrite(repeated_kv_model(2, unsqueeze_axis=1), ops_library)
    node = next(n for n in pruned.graph.node if n.op_type == op_schema.OP_TYPE)
    assert list(node.input[1:3]) == ["K", "V"]
