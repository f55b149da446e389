"""Attention-site rules: one module per form of attention an exporter emits.

``find_sites`` uses the patterns for discovery (calibration, inspection); ``rewrite_rule_set``
turns each site that has a layout into one ``onnxprune.BlockSparseAttention`` node.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxprune.layouts import Layouts
from onnxprune.rules._common import SiteMatch
from onnxprune.rules._diagnose import explain_unmatched_softmax
from onnxprune.rules._site_rule import SiteRule
from onnxprune.rules._fused_attention import MS_DOMAIN, SITE_KEY
from onnxprune.rules.batched_attention import BatchedAttention
from onnxprune.rules.eager_attention import EagerAttention
from onnxprune.rules.ms_attention import DecomposeMsAttention, MsAttention
from onnxprune.rules.ms_multi_head_attention import DecomposeMsMultiHeadAttention, MsMultiHeadAttention
from onnxprune.rules.onnx_attention import OnnxAttention
from onnxprune.rules.sdpa_decomposed_attention import SdpaDecomposedAttention

__all__ = [
    "Discovery", "SiteMatch", "decompose_fused_attention", "find_sites", "make_site_rules",
    "rewrite_rule_set",
]

#: (domain, op type) of every node that is attention: each is a site or listed as unmatched.
ATTENTION_OPS = {
    ("", "Softmax"), ("", "Attention"), (MS_DOMAIN, "Attention"), (MS_DOMAIN, "MultiHeadAttention"),
}


def make_site_rules(layouts: Layouts | None = None) -> list[SiteRule]:
    # Longer patterns first: the SDPA form also contains an eager-looking tail.
    return [
        SdpaDecomposedAttention("SdpaDecomposedAttention", layouts),
        EagerAttention("EagerAttention", layouts),
        BatchedAttention("BatchedAttention", layouts),
        OnnxAttention("OnnxAttentionWithMask", has_mask=True, layouts=layouts),
        OnnxAttention("OnnxAttention", has_mask=False, layouts=layouts),
        # Fused ONNX Runtime ops: discovery only; calibration and the rewrite decompose them first.
        MsAttention("MsAttention", layouts),
        MsAttention("MsAttentionWithPresent", layouts, with_present=True),
        MsMultiHeadAttention("MsMultiHeadAttention", layouts),
        MsMultiHeadAttention("MsMultiHeadAttentionWithPresent", layouts, with_present=True),
    ]


def decompose_fused_attention(model: ir.Model) -> int:
    """Rewrite ONNX Runtime's fused attention ops into the eager form (in place); the number rewritten.

    Each decomposed Softmax is named after its fused node, so sites keep their names.
    """
    rules = pattern.RewriteRuleSet(
        [
            DecomposeMsAttention.rule("DecomposeMsAttention"),
            DecomposeMsMultiHeadAttention.rule("DecomposeMsMultiHeadAttention"),
        ]
    )
    count = rules.apply_to_model(model)
    for node in model.graph:
        name = node.metadata_props.get(SITE_KEY)
        if node.op_type == "Softmax" and name:
            node.name = name
    return count


def rewrite_rule_set(layouts: Layouts) -> pattern.RewriteRuleSet:
    rules = [
        pattern.RewriteRule(r.pattern, r.rewrite, r.check, name=r.name) for r in make_site_rules(layouts)
    ]
    return pattern.RewriteRuleSet(rules, commute=True)


@dataclasses.dataclass
class Discovery:
    sites: list[SiteMatch]
    #: (Softmax or Attention node name, why it is not a site)
    unmatched: list[tuple[str, str]]


def _structural_variants(rule: SiteRule) -> list[pattern.RewriteRule]:
    # No condition: discovery wants the bindings even when the site check fails, for the reason.
    plain = pattern.RewriteRule(rule.pattern, rule.rewrite, None, name=rule.name)
    return list(plain.commute())


def find_sites(model: ir.Model) -> Discovery:
    """Every attention site of the main graph, in graph order, and why other softmaxes are not."""
    graph = model.graph
    variants = [(rule, v) for rule in make_site_rules() for v in _structural_variants(rule)]
    sites: list[SiteMatch] = []
    claimed: set[str] = set()
    reasons: dict[str, str] = {}
    for node in graph:
        for rule, variant in variants:
            match = variant.match(model, graph, node)
            if not match:
                continue
            site = rule.site(**match.bindings)
            if isinstance(site, str):
                anchor = match.bindings.get("probs") or match.bindings.get("attention_out")
                if anchor is not None and anchor.producer() is not None:
                    reasons.setdefault(anchor.producer().name, site)
                continue
            if site.name not in claimed:
                sites.append(site)
                claimed.add(site.name)
            break
    unmatched = []
    for node in graph:
        domain = "" if node.domain == "ai.onnx" else node.domain
        if (domain, node.op_type) in ATTENTION_OPS and node.name not in claimed:
            if node.name in reasons:
                reason = reasons[node.name]
            elif node.op_type == "Softmax":
                reason = explain_unmatched_softmax(node)
            else:
                reason = f"{node.op_type} with inputs or outputs no rule handles"
            unmatched.append((node.name, reason))
    return Discovery(sites, unmatched)
