"""The key-padding pass: masks that are only the padding (or padding + causal) of the
``attention_mask`` input become ``key_padding_mask`` (+ ``is_causal``), with the same outputs;
any other mask is left alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import random_token_examples
from onnxprune.calibrate import calibrate
from onnxprune.data import Dataset
from onnxprune.model_io import save_model
from onnxprune.passes.key_padding_mask import HUGE_NEGATIVE, is_padding_mask
from onnxprune.prune import prune
from onnxprune.runtime import session

INPUTS = ["input_ids", "attention_mask"]
BLOCK = 16


def _keep(batch=3, length=6, seed=0):
    rng = np.random.default_rng(seed)
    keep = rng.random((batch, length)) < 0.7
    keep[:, 0] = True
    return keep


def _additive(allowed: np.ndarray, fill: float) -> np.ndarray:
    return np.where(allowed, 0.0, fill).astype(np.float32)


@pytest.mark.parametrize("fill", [np.finfo(np.float32).min, -np.inf, -1e31])
@pytest.mark.parametrize("per_query", [False, True])
def test_padding_masks_match(fill, per_query):
    keep = _keep()
    length = keep.shape[1]
    mask = _additive(keep[:, None, None, :], fill)
    if per_query:
        mask = np.broadcast_to(mask, (3, 1, length, length)).copy()
    assert is_padding_mask(mask, keep, causal=False)
    assert not is_padding_mask(mask, keep, causal=True)


def test_padding_and_causal_masks_match():
    keep = _keep()
    length = keep.shape[1]
    allowed = keep[:, None, None, :] & np.tril(np.ones((length, length), bool))
    assert is_padding_mask(_additive(allowed, np.finfo(np.float32).min), keep, causal=True)
    assert is_padding_mask(allowed, keep, causal=True)  # a bool mask
    assert not is_padding_mask(allowed, keep, causal=False)


@pytest.mark.parametrize(
    "case",
    ["fill -1e4 (old BERT): not exactly zero probability", "bias on kept keys", "per-head mask", "wrong key axis"],
)
def test_other_masks_do_not_match(case):
    keep = _keep()
    length = keep.shape[1]
    mask = _additive(keep[:, None, None, :], np.finfo(np.float32).min)
    if case.startswith("fill"):
        mask = _additive(keep[:, None, None, :], -1e4)
        assert -1e4 > HUGE_NEGATIVE
    elif case == "bias on kept keys":
        mask = mask + np.linspace(0, 1, length, dtype=np.float32)
    elif case == "per-head mask":
        mask = np.repeat(mask, 2, axis=1)
    else:
        mask = mask[..., :-1]
    assert not is_padding_mask(mask, keep, causal=False)
    assert not is_padding_mask(mask, keep, causal=True)


@pytest.mark.parametrize("arch,form", [("bert", "dynamo-eager-20"), ("bert", "dynamo-sdpa-20"),
                                       ("gpt2", "dynamo-eager-20"), ("gpt2", "dynamo-sdpa-20")])
def test_pruned_models_take_the_padding_mask(tiny_model, tmp_path, arch, form):
    dense = tiny_model(arch, form)
    stats = calibrate(dense, Dataset(random_token_examples(16, seed=3), INPUTS), granularity=BLOCK,
                      max_length=64, show_progress=False)
    batches = list(Dataset(random_token_examples(8, seed=4), INPUTS).batches(4, sort=False))
    assert any((b["attention_mask"] == 0).any() for b in batches)
    dense_sess = session(dense, with_library=False)
    for p in (0.0, 0.9):
        model, _ = prune(dense, stats, p, block_size=BLOCK)
        path = tmp_path / f"p{p}.onnx"
        save_model(model, path)
        nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "BlockSparseAttention"]
        assert nodes and all(list(n.input[4:]) == ["", "attention_mask"] for n in nodes)
        causal = {a.i for n in nodes for a in n.attribute if a.name == "is_causal"}
        assert causal == ({1} if arch == "gpt2" else {0})
        kernel, body = session(path), session(path, with_library=False)
        for feeds in batches:
            valid = feeds["attention_mask"].astype(bool)
            got = kernel.run(None, feeds)[0]
            np.testing.assert_allclose(got[valid], body.run(None, feeds)[0][valid], atol=1e-5)
            if p == 0.0:
                np.testing.assert_allclose(got[valid], dense_sess.run(None, feeds)[0][valid], atol=1e-5)
