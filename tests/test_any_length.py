"""A pruned model accepts every length its dense model accepts: calibrated on 64-token inputs,
it runs up to the model's maximum positions, where its layouts continue by their rules.

At p = 0 that is the dense model at every length (within 1e-5); at p > 0 the kernel and the
op's function body agree at every length. BERT, GPT-2 and a grouped-query Llama, batch 2 with
padding, calibrated from text and from an .npz of inputs.
"""

from __future__ import annotations

import numpy as np
import pytest

from models import tiny
from onnxprune.cli import main
from onnxprune.data import Dataset
from onnxprune.model_io import read_info
from onnxprune.verify import verify

WORDS = "the a of to and in is it that for on with as was by this be are from at or an".split()
POSITIONS = 256
CALIBRATION_LENGTH = 64
#: Below, at and beyond the calibrated length, not multiples of the block, up to the maximum.
LENGTHS = (9, 64, 65, 100, 177, POSITIONS)
#: family → the config entry that sets its maximum positions
POSITION_KEY = {"bert": "max_position_embeddings", "gpt2": "n_positions", "llama": "max_position_embeddings"}


def _model_dir(directory, family: str) -> None:
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *WORDS])}
    model = tiny.transformers_model(family, attn=None, vocab_size=len(vocab), **{POSITION_KEY[family]: POSITIONS})
    model.eval().save_pretrained(directory)
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))


def _examples(names: list[str], length: int, seed: int) -> Dataset:
    """Two inputs of ``length`` positions; the second padded on the right by a third."""
    rng = np.random.default_rng(seed)
    examples = []
    for valid in (length, max(1, length - length // 3)):
        example = {"input_ids": rng.integers(2, 2 + len(WORDS), length).astype(np.int64),
                   "attention_mask": (np.arange(length) < valid).astype(np.int64)}
        if "token_type_ids" in names:
            example["token_type_ids"] = np.zeros(length, np.int64)
        examples.append({n: example[n] for n in names})
    return Dataset(examples, names)


@pytest.fixture(scope="module", params=["bert", "gpt2", "llama"])
def pruned_at_64(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"any-length-{family}")
    model_dir = root / family
    model_dir.mkdir()
    _model_dir(model_dir, family)
    dense = root / "dense.onnx"
    assert main(["export", str(model_dir), "-o", str(dense), "--seq-len", "32", "-q"]) == 0
    names = read_info(dense).input_names
    rng = np.random.default_rng(0)
    # Text for two of the families, an .npz for the third: both calibration paths.
    if family == "gpt2":
        data = root / "inputs.npz"
        examples = _examples(names, CALIBRATION_LENGTH, seed=1).examples + _examples(names, CALIBRATION_LENGTH, seed=2).examples
        np.savez(data, **{n: np.stack([e[n] for e in examples]) for n in names})
        data_args = ["--data", str(data)]
    else:
        data = root / "text.txt"
        data.write_text("\n".join(" ".join(rng.choice(WORDS, size=rng.integers(20, 120))) for _ in range(12)) + "\n")
        data_args = ["--data", str(data), "--tokenizer", str(model_dir)]
    stats = root / "stats.safetensors"
    assert main(["calibrate", str(dense), *data_args, "--max-length", str(CALIBRATION_LENGTH), "-o", str(stats), "-q"]) == 0
    pruned = {}
    for p in (0.0, 0.5):
        pruned[p] = root / f"pruned-{p}.onnx"
        assert main(["prune", str(dense), "--stats", str(stats), "--sparsity", str(p), "-o", str(pruned[p]), "-q"]) == 0
    return {"family": family, "dense": dense, "pruned": pruned, "names": names}


@pytest.mark.parametrize("length", LENGTHS)
def test_at_p0_the_pruned_model_is_dense_at_every_length(pruned_at_64, length):
    dataset = _examples(pruned_at_64["names"], length, seed=length)
    (result,) = verify(pruned_at_64["dense"], pruned_at_64["pruned"][0.0], dataset, atol=1e-5, rtol=0,
                       batch_size=2, show_progress=False)
    assert result.passed, (pruned_at_64["family"], length, result.max_abs)


@pytest.mark.parametrize("length", LENGTHS)
def test_the_kernel_equals_the_function_body_beyond_the_layout(pruned_at_64, length):
    pruned = pruned_at_64["pruned"][0.5]
    dataset = _examples(pruned_at_64["names"], length, seed=length + 1)
    (result,) = verify(pruned, pruned, dataset, atol=1e-5, rtol=1e-4, batch_size=2, show_progress=False,
                       library="b")
    assert result.passed, (pruned_at_64["family"], length, result.max_abs)
