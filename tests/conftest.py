"""Shared fixtures: the custom-op library and tiny models built in memory or exported once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from onnxprune.runtime import library_path

# The recipes in models/ come from the checkout; appended, so that an installed onnxprune (with
# its built library) still wins over the checkout's sources.
sys.path.append(str(Path(__file__).resolve().parents[1]))
from models import tiny  # noqa: E402


@pytest.fixture(scope="session")
def ops_library() -> str:
    return library_path()


# --------------------------------------------------------------------------------------------
# The tiny BERT and GPT-2 of models/tiny.py, exported once per session.

#: (exporter, attn_implementation, opset) per form of attention the rules know.
EXPORTS = {
    "dynamo-eager-20": ("dynamo", "eager", 20),
    "dynamo-sdpa-20": ("dynamo", "sdpa", 20),
    "dynamo-sdpa-23": ("dynamo", "sdpa", 23),
    "torchscript-eager-17": ("torchscript", "eager", 17),
}
TINY_LAYERS, TINY_HEADS = tiny.LAYERS, tiny.HEADS


def export_tiny_model(arch: str, form: str, path) -> None:
    import warnings

    import torch

    exporter, attn, opset = EXPORTS[form]
    wrapper = tiny.RECIPES[arch].build(attn)
    ids = torch.randint(0, tiny.VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 16, dtype=torch.int64)
    mask[1, 11:] = 0
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(
                wrapper, (ids, mask), str(path), input_names=["input_ids", "attention_mask"], dynamo=True,
                opset_version=opset, external_data=False, verbose=False,
                dynamic_shapes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}},
            )
        else:
            torch.onnx.export(
                wrapper, (ids, mask), str(path), input_names=["input_ids", "attention_mask"], dynamo=False,
                opset_version=opset, output_names=["last_hidden_state"],
                dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}},
            )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(arch, form)``: path of the exported model (exported on first use)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    cache: dict[tuple[str, str], str] = {}
    folder = tmp_path_factory.mktemp("tiny_models")

    def get(arch: str, form: str) -> str:
        if (arch, form) not in cache:
            path = folder / f"{arch}-{form}.onnx"
            export_tiny_model(arch, form, path)
            cache[arch, form] = str(path)
        return cache[arch, form]

    return get


def random_token_examples(count: int, seed: int, low: int = 5, high: int = 60):
    """``count`` random token sequences of lengths in [low, high]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, tiny.VOCAB, size=int(n)).astype(np.int64) for n in rng.integers(low, high + 1, size=count)]
