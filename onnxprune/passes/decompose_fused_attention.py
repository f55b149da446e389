"""ONNX Runtime's fused attention ops (``com.microsoft.Attention``/``MultiHeadAttention``) into the
eager form that the site rules rewrite; the rules themselves live in ``onnxprune.rules``."""

from __future__ import annotations

import onnx_ir as ir

from onnxprune.rules import decompose_fused_attention


class DecomposeFusedAttentionPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, decompose_fused_attention(model) > 0)
