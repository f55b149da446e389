"""Prune: AP layouts from statistics, then each attention site becomes one
``onnxprune.BlockSparseAttention`` node carrying its layout, with the op's function body in the
file so the model also runs where onnxprune's library is absent."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import onnx_ir as ir
from onnx_ir import passes as ir_passes
from onnx_ir.passes import common as common_passes

from onnxprune import __version__, op_schema
from onnxprune.errors import OnnxpruneError
from onnxprune.layouts import LayoutResult, effective_sparsity, learn_layouts
from onnxprune.model_io import file_sha256, load_ir
from onnxprune.op_function import build_function
from onnxprune.passes.key_padding_mask import use_key_padding_mask
from onnxprune.passes.unify_mask_inputs import unify_mask_inputs
from onnxprune.rules import SiteLayouts, decompose_fused_attention, find_sites, rewrite_rule_set
from onnxprune.stats import Stats

METADATA_PREFIX = "onnxprune."


@dataclasses.dataclass
class SiteReport:
    name: str
    form: str
    heads: int
    causal: bool
    density: float
    retained_mass: float


@dataclasses.dataclass
class PruneReport:
    sparsity: float
    block_size: int
    scope: str
    effective_sparsity: float
    sites: list[SiteReport]
    layouts: LayoutResult | None = dataclasses.field(default=None, repr=False)

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "layouts"}

    def effective_sparsity_on(self, lengths: list[int]) -> float:
        """The effective sparsity on inputs of these lengths (held-out data, say)."""
        histogram = np.bincount(np.asarray(lengths, dtype=np.int64))
        return effective_sparsity(histogram, self.layouts.sites, self.block_size)


def attach_function(model: ir.Model, mask_use) -> None:
    """Add the op's function body (specialised to the nodes' mask form) and its opset import."""
    opset = model.opset_imports.get("", 0)
    if opset < op_schema.MIN_MODEL_OPSET:
        raise OnnxpruneError(
            f"the model's opset is {opset}; the pruned op's function body needs >= {op_schema.MIN_MODEL_OPSET}"
            " (export again with a newer opset)"
        )
    function = ir.serde.deserialize_function(build_function(mask_use, opset))
    model.functions[function.identifier()] = function
    model.opset_imports[op_schema.DOMAIN] = op_schema.OPSET_VERSION


def prune(
    model_path: str | os.PathLike,
    stats: Stats,
    sparsity: float,
    block_size: int = 16,
    scope: str = "layer",
    keep_diagonal: bool = True,
    stats_sha256: str = "",
) -> tuple[ir.Model, PruneReport]:
    """The pruned model (in memory) and its report. ``save_model`` writes it."""
    model = load_ir(model_path)  # first: a missing or malformed file is the clearest error
    model_sha = file_sha256(model_path)
    if stats.model_sha256 != model_sha:
        raise OnnxpruneError(
            f"the statistics were computed for another model (sha256 {stats.model_sha256[:12]}…, "
            f"{model_path} has {model_sha[:12]}…); run calibrate on this model"
        )
    decompose_fused_attention(model)
    discovery = find_sites(model)
    names = [s.name for s in discovery.sites]
    if not names:
        raise OnnxpruneError(f"{model_path}: no attention site found")
    if names != stats.sites:
        raise OnnxpruneError(f"the statistics name sites {stats.sites[:3]}…, the model has {names[:3]}…")
    causal = {s.name for s in discovery.sites if s.is_causal}
    learned: LayoutResult = learn_layouts(stats, sparsity, block_size, scope, keep_diagonal, causal)

    spec = SiteLayouts(block_size, {name: site.layout for name, site in learned.sites.items()})
    rewritten = rewrite_rule_set(spec).apply_to_model(model)
    if rewritten != len(names):
        raise OnnxpruneError(f"rewrote {rewritten} of {len(names)} attention sites; the graph changed under the rules")
    use_key_padding_mask(model, model_path)
    mask_use = unify_mask_inputs(model.graph)
    attach_function(model, mask_use)
    ir_passes.Sequential(common_passes.RemoveUnusedNodesPass(), common_passes.RemoveUnusedOpsetsPass())(model)

    report = PruneReport(
        sparsity=sparsity,
        block_size=block_size,
        scope=scope,
        effective_sparsity=learned.effective_sparsity,
        sites=[
            SiteReport(
                name=s.name,
                form=s.form,
                heads=int(learned.sites[s.name].layout.shape[0]),
                causal=learned.sites[s.name].causal,
                density=learned.sites[s.name].density,
                retained_mass=learned.sites[s.name].retained_mass,
            )
            for s in discovery.sites
        ],
        layouts=learned,
    )
    model.metadata_props.update(
        {
            METADATA_PREFIX + "version": __version__,
            METADATA_PREFIX + "sparsity": repr(sparsity),
            METADATA_PREFIX + "scope": scope,
            METADATA_PREFIX + "block_size": str(block_size),
            METADATA_PREFIX + "keep_diagonal": str(int(keep_diagonal)),
            METADATA_PREFIX + "stats_sha256": stats_sha256,
            METADATA_PREFIX + "calibration_samples": str(stats.num_samples),
            METADATA_PREFIX + "effective_sparsity": f"{learned.effective_sparsity:.6f}",
            METADATA_PREFIX + "sites": json.dumps(
                {s.name: {"density": round(s.density, 6), "retained_mass": round(s.retained_mass, 6), "causal": s.causal}
                 for s in report.sites}
            ),
        }
    )
    return model, report
