"""The graph passes of a prune, and the one pipeline that prune and recover run.

Each pass is an ``onnx_ir`` in-place pass in its own module; :func:`prune_passes` chains them:
decompose fused attention → rewrite the sites that have a layout → ``key_padding_mask`` where the
masks are only padding → one ``attn_mask`` form → the op's function body → drop what is unused.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from onnxprune.errors import OnnxpruneError
from onnxprune.layouts import Layouts
from onnxprune.passes.attach_function import AttachFunctionPass
from onnxprune.passes.decompose_fused_attention import DecomposeFusedAttentionPass
from onnxprune.passes.key_padding_mask import KeyPaddingMaskPass
from onnxprune.passes.rewrite_sites import RewriteSitesPass
from onnxprune.passes.unify_mask_inputs import UnifyMaskInputsPass

__all__ = [
    "AttachFunctionPass", "DecomposeFusedAttentionPass", "KeyPaddingMaskPass", "PrunePipeline", "RewriteSitesPass",
    "UnifyMaskInputsPass", "prune_passes",
]


class PrunePipeline(ir.passes.Sequential):
    """``Sequential`` that lets an ``OnnxpruneError`` reach the caller as it is (``Sequential``
    wraps every error in a ``PassError``; the user should see the one-line reason)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        try:
            return super().call(model)
        except ir.passes.PassError as e:
            if isinstance(e.__cause__, OnnxpruneError):
                raise e.__cause__ from None
            raise


def prune_passes(layouts: Layouts) -> PrunePipeline:
    """The passes that turn a dense model into its pruned form with ``layouts`` (in place)."""
    return PrunePipeline(
        DecomposeFusedAttentionPass(),
        RewriteSitesPass(layouts),
        KeyPaddingMaskPass(),
        UnifyMaskInputsPass(),
        AttachFunctionPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.RemoveUnusedOpsetsPass(),
    )
