"""Calibration through the op's statistics form (bounded memory at any length): the same
statistics as the probe path, independent of batch and threads, batches bounded by tokens, and
the default granularity for long inputs."""

from __future__ import annotations

import importlib

import numpy as np
import onnx
import pytest

from conftest import random_token_examples
from onnxprune import op_schema
from onnxprune.data import Dataset
from onnxprune.errors import OnnxpruneError
from onnxprune.model_io import load_model

calibration = importlib.import_module("onnxprune.calibrate")  # the module; the package exports the function

INPUTS = ["input_ids", "attention_mask"]
MAX_LENGTH = 64


def run(path, examples, granularity=16, batch_size=4, threads=None):
    return calibration.calibrate(path, Dataset(examples, INPUTS), granularity=granularity, max_length=MAX_LENGTH,
                                 batch_size=batch_size, threads=threads, show_progress=False)


def probe_path(monkeypatch, path, examples, granularity):
    """Statistics from the probe path (probabilities out of the graph), as before the statistics form."""
    def refuse(*args, **kwargs):
        raise OnnxpruneError("no statistics form in this test")

    with monkeypatch.context() as m:
        m.setattr(calibration, "_statistics_form", refuse)
        with pytest.warns(UserWarning, match="calibrating without the statistics form"):
            return run(path, examples, granularity)


@pytest.mark.parametrize("arch,form", [("bert", "dynamo-eager-20"), ("gpt2", "dynamo-sdpa-20"),
                                       ("llama", "dynamo-eager-20"), ("llama", "torchscript-eager-17")])
@pytest.mark.parametrize("granularity", [1, 16])
def test_statistics_form_equals_probe_path(tiny_model, monkeypatch, arch, form, granularity):
    path = tiny_model(arch, form)
    examples = random_token_examples(12, seed=3)
    new = run(path, examples, granularity)
    old = probe_path(monkeypatch, path, examples, granularity)
    assert new.sites == old.sites and new.num_samples == old.num_samples
    np.testing.assert_array_equal(new.lengths, old.lengths)
    for site in old.sites:
        np.testing.assert_array_equal(new.counts[site], old.counts[site])
        assert new.sums[site].shape == old.sums[site].shape
        # Both compute float32 probabilities (measured: 1.5e-8 of the site's largest cell).
        np.testing.assert_allclose(new.sums[site], old.sums[site], rtol=0, atol=1e-6 * np.abs(old.sums[site]).max())


def test_independent_of_batch_size_and_threads(tiny_model):
    path = tiny_model("llama", "dynamo-eager-20")
    examples = random_token_examples(16, seed=4)
    reference = run(path, examples, batch_size=1, threads=1)
    for batch_size, threads in [(3, 1), (8, 2), (1, 2)]:
        other = run(path, examples, batch_size=batch_size, threads=threads)
        for site in reference.sites:
            np.testing.assert_allclose(other.sums[site], reference.sums[site], rtol=1e-14, atol=0)
            np.testing.assert_array_equal(other.counts[site], reference.counts[site])


def test_statistics_model_holds_no_square(tiny_model):
    """One statistics node per site, fed the input's mask as query validity; the outputs are only
    the pooled sums and query counts (the model's own outputs and the nodes only they need go)."""
    path = tiny_model("gpt2", "dynamo-eager-20")
    model, sites = calibration.statistics_model(load_model(path), 8)
    proto = onnx.load_from_string(model)
    nodes = [n for n in proto.graph.node if n.domain == op_schema.DOMAIN]
    assert [n.op_type for n in nodes] == [op_schema.STATISTICS_OP_TYPE] * len(sites)
    assert not any(n.op_type == "Softmax" for n in proto.graph.node)
    for node in nodes:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["granularity"] == 8 and attributes["block_size"] == 16
        assert node.input[7] == "attention_mask"
    assert [o.name for o in proto.graph.output] == [
        name for i in range(len(sites)) for name in (f"{calibration.PROBE_PREFIX}{i}", f"{calibration.PROBE_PREFIX}{i}.queries")
    ]


def test_batches_are_bounded_by_tokens(tiny_model, monkeypatch):
    path = tiny_model("bert", "dynamo-eager-20")
    seen = []

    class Recording(Dataset):
        def batches(self, batch_size, sort=True):
            seen.append(batch_size)
            return super().batches(batch_size, sort)

    examples = random_token_examples(10, seed=5)
    whole = run(path, examples, batch_size=8)
    monkeypatch.setattr(calibration, "BATCH_TOKENS", 2 * MAX_LENGTH)
    bounded = calibration.calibrate(path, Recording(examples, INPUTS), granularity=16, max_length=MAX_LENGTH,
                                    batch_size=8, show_progress=False)
    assert seen == [2]
    for site in whole.sites:
        np.testing.assert_allclose(bounded.sums[site], whole.sums[site], rtol=1e-14)


@pytest.mark.parametrize("max_length,expected", [(256, 16), (512, 16), (4096, 16), (4097, 32), (8192, 32),
                                                 (16384, 64), (10**6, 128)])
def test_default_granularity(max_length, expected):
    assert calibration.default_granularity(max_length) == expected


@pytest.mark.parametrize("granularity,block", [(1, 16), (16, 16), (24, 16), (32, 32), (64, 64), (256, 128)])
def test_statistics_block_size(granularity, block):
    assert calibration.statistics_block_size(granularity) == block
