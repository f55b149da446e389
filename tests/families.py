"""The tiny models of every common transformer family (``models/tiny.py``), and how each
exporter sees them.

A ``Family`` is a recipe and what its graph must hold: the number of attention sites and which of
them are causal or cross-attention. ``export_family`` writes one ``FORMS`` form.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import onnx

from models import tiny
from models.tiny import HEADS, HIDDEN, LAYERS

#: form → (exporter, attn_implementation, opset, post-processing); a post-processed form is the
#: export of ``BASE_FORM[form]`` (same exporter settings) stored or optimised differently.
FORMS = {
    "dynamo-eager-20": ("dynamo", "eager", 20, None),
    "dynamo-sdpa-18": ("dynamo", "sdpa", 18, None),
    "dynamo-sdpa-20": ("dynamo", "sdpa", 20, None),
    "dynamo-sdpa-23": ("dynamo", "sdpa", 23, None),
    "torchscript-eager-17": ("torchscript", "eager", 17, None),
    "ort-fused": ("torchscript", "eager", 17, "ort-optimizer"),
    "external-data": ("dynamo", "sdpa", 20, "external-data"),
}
BASE_FORM = {"ort-fused": "torchscript-eager-17", "external-data": "dynamo-sdpa-20"}


@dataclasses.dataclass
class Family:
    """A ``models.tiny`` recipe and what its exported graph must hold."""

    name: str
    sites: int
    causal_sites: int = 0
    cross_sites: int = 0
    #: ``onnxruntime.transformers.optimizer`` model type, None where it has none
    ort_model_type: str | None = None
    #: rotary position embeddings (opset 23 exports them as ``RotaryEmbedding``)
    rotary: bool = False
    #: transformers implements SDPA attention for it
    sdpa: bool = True

    @property
    def recipe(self) -> tiny.Recipe:
        return tiny.RECIPES[self.name]

    def build(self, attn: str):
        return self.recipe.build(attn)

    def inputs(self, rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
        return self.recipe.inputs(rng, batch)

    @property
    def dynamic(self):
        return self.recipe.dynamic


_CAUSAL = dict(sites=LAYERS, causal_sites=LAYERS)
_ENCODER_DECODER = dict(sites=3 * LAYERS, causal_sites=LAYERS, cross_sites=LAYERS)
FAMILIES = {
    f.name: f
    for f in [
        Family("bert", LAYERS, ort_model_type="bert"),
        Family("roberta", LAYERS, ort_model_type="bert"),
        Family("distilbert", LAYERS, ort_model_type="bert"),
        Family("albert", LAYERS, ort_model_type="bert"),
        Family("electra", LAYERS, ort_model_type="bert"),
        Family("vit", LAYERS, ort_model_type="vit"),
        Family("gpt2", **_CAUSAL, ort_model_type="gpt2"),
        Family("gpt_neox", **_CAUSAL, rotary=True, ort_model_type="gpt_neox"),
        Family("opt", **_CAUSAL),
        Family("mpt", **_CAUSAL, sdpa=False),
        Family("bloom", **_CAUSAL, sdpa=False),
        Family("llama", **_CAUSAL, rotary=True),
        Family("qwen2", **_CAUSAL, rotary=True),
        Family("bart", **_ENCODER_DECODER, ort_model_type="bart"),
        Family("t5", **_ENCODER_DECODER, ort_model_type="t5"),
        Family("whisper_encoder", LAYERS),
        Family("torch_encoder", LAYERS),
    ]
}


def export_family(family: Family, form: str, path, base: str | None = None) -> None:
    """Export ``family`` in ``form`` to ``path`` (an ``.onnx`` file). For a post-processed form,
    ``base`` may name the existing export of ``BASE_FORM[form]`` to start from."""
    import torch

    exporter, attn, opset, post = FORMS[form]
    if post is not None and base is None:
        base = str(path) + ".base.onnx"
        export_family(family, BASE_FORM[form], base)
    if post == "external-data":
        model = onnx.load(base)
        onnx.save(model, str(path), save_as_external_data=True, location=Path(path).name + ".data")
        return
    if post == "ort-optimizer":
        from onnxruntime.transformers import optimizer

        optimized = optimizer.optimize_model(
            base, model_type=family.ort_model_type, num_heads=HEADS, hidden_size=HIDDEN, opt_level=1,
            use_gpu=False, only_onnxruntime=False,
        )
        optimized.save_model_to_file(str(path))
        return
    feeds = family.inputs(np.random.default_rng(0), 2)
    names = list(feeds)
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            with torch.no_grad():
                program = torch.onnx.export(
                    family.build(attn), args, input_names=names, output_names=["output"], dynamo=True,
                    opset_version=opset, verbose=False, dynamic_shapes={n: family.dynamic.get(n, {}) for n in names},
                )
            program.save(str(path))
        else:
            # Grad stays enabled: under no_grad nn.TransformerEncoderLayer takes a fused fast path
            # the TorchScript exporter cannot export.
            torch.onnx.export(
                family.build(attn), args, str(path), input_names=names, output_names=["output"], dynamo=False,
                opset_version=opset, dynamic_axes=family.dynamic,
            )
