"""Every attention site that has a layout becomes one ``onnxprune.BlockSparseAttention`` node
carrying it (the rules of ``onnxprune.rules``); a site the rules no longer match is an error,
never a silently dense site."""

from __future__ import annotations

import onnx_ir as ir

from onnxprune import op_schema
from onnxprune.errors import OnnxpruneError
from onnxprune.layouts import Layouts
from onnxprune.rules import rewrite_rule_set


class RewriteSitesPass(ir.passes.InPlacePass):
    def __init__(self, layouts: Layouts):
        super().__init__()
        self.layouts = layouts

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = rewrite_rule_set(self.layouts).apply_to_model(model)
        # Each rewritten site leaves its layout initializer behind: the sites that have none were not.
        missing = [s for s in self.layouts.sites if op_schema.layout_name(s) not in model.graph.initializers]
        if missing:
            raise OnnxpruneError(
                f"rewrote {len(self.layouts.sites) - len(missing)} of {len(self.layouts.sites)} attention sites; "
                f"no rule matched {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}"
            )
        return ir.passes.PassResult(model, count > 0)
