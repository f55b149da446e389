"""Base class of the attention-site rules: match → ``SiteMatch`` → rewrite with a layout."""

from __future__ import annotations

import abc

from onnxscript.rewriter import pattern

from onnxprune.layouts import Layouts
from onnxprune.rules._common import SiteMatch, emit_block_sparse_attention


class SiteRule(pattern.RewriteRuleClassBase, abc.ABC):
    """A pattern for one form of attention.

    Subclasses define ``pattern`` and ``site(**bindings) -> SiteMatch | str`` (a string is the
    reason the bindings are not a site the op can express). Discovery uses ``match``; the prune
    pass gives the rule the ``Layouts`` and rewrites each site that has one.
    """

    form: str = ""

    def __init__(self, name: str, layouts: Layouts | None = None):
        super().__init__(name)
        self.layouts = layouts
        self._site: SiteMatch | None = None

    @abc.abstractmethod
    def site(self, **bindings) -> SiteMatch | str: ...

    def check(self, context, **bindings) -> pattern.MatchResult:
        result = pattern.MatchResult()
        site = self.site(**bindings)
        if isinstance(site, str):
            return result.fail(site)
        if site.fused:
            return result.fail("a fused op: decompose_fused_attention first")
        if self.layouts is not None and site.name not in self.layouts.sites:
            return result.fail(f"no layout for site {site.name}")
        self._site = site
        return result

    def rewrite(self, op, **_):
        assert self._site is not None and self.layouts is not None
        return emit_block_sparse_attention(op, self._site, self.layouts)
