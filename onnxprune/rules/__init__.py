"""Attention-site rules: one module per form of attention an exporter emits.

``find_sites`` uses the patterns for discovery (calibration, inspection); ``rewrite_rule_set``
turns each site that has a layout into one ``onnxprune.BlockSparseAttention`` node.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxprune.rules._common import SiteLayouts, SiteMatch
from onnxprune.rules._site_rule import SiteRule
from onnxprune.rules.eager_attention import EagerAttention
from onnxprune.rules.onnx_attention import OnnxAttention
from onnxprune.rules.sdpa_decomposed_attention import SdpaDecomposedAttention

__all__ = ["Discovery", "SiteLayouts", "SiteMatch", "find_sites", "make_site_rules", "rewrite_rule_set"]


def make_site_rules(layouts: SiteLayouts | None = None) -> list[SiteRule]:
    # Longer patterns first: the SDPA form also contains an eager-looking tail.
    return [
        SdpaDecomposedAttention("SdpaDecomposedAttention", layouts),
        EagerAttention("EagerAttention", layouts),
        OnnxAttention("OnnxAttentionWithMask", has_mask=True, layouts=layouts),
        OnnxAttention("OnnxAttention", has_mask=False, layouts=layouts),
    ]


def rewrite_rule_set(layouts: SiteLayouts) -> pattern.RewriteRuleSet:
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
        if node.op_type in ("Softmax", "Attention") and node.domain in ("", "ai.onnx") and node.name not in claimed:
            unmatched.append(
                (
                    node.name,
                    reasons.get(
                        node.name,
                        "not part of a known attention pattern "
                        "(MatMul → [scale] → [mask] → Softmax → MatMul, or Attention-23)",
                    ),
                )
            )
    return Discovery(sites, unmatched)
