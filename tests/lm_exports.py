"""Tiny random causal LMs exported with their KV cache, once per test session (shared by
test_kv_cache.py and test_generate.py): Llama with grouped-query attention (4 query heads, 2 KV
heads), GPT-2 and GPT-NeoX, from models/tiny.py's configs, each as a model directory
(model.onnx, config, tokenizer), in the dynamo eager and SDPA forms (opset 20: decomposed; 23: the
``Attention`` op)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from models import tiny

LM_CLASSES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM"}
KV_HEADS = {"llama": 2, "gpt2": tiny.HEADS, "gpt_neox": tiny.HEADS}
EXPORT_LENGTH = 12

_folder: Path | None = None
_made: dict = {}


def _root() -> Path:
    global _folder
    if _folder is None:
        _folder = Path(tempfile.mkdtemp(prefix="onnxprune-lms-"))
    return _folder


def causal_lm(family: str, attn: str = "eager"):
    """The tiny config with an LM head; weights drawn wider than the default 0.02 so that the
    logits (and their differences) are not all near zero."""
    import torch
    import transformers

    config_class, _, config = tiny.CONFIGS[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**config, initializer_range=0.3, attn_implementation=attn)
    return getattr(transformers, LM_CLASSES[family])(config).eval()


def save_tokenizer(folder: Path, chat: bool = False) -> None:
    """A word-level tokenizer over the tiny vocabulary: ``"w5 w7"`` is tokens 5, 7."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(tiny.VOCAB)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    tokenizer.save(str(folder / "tokenizer.json"))
    # a causal LM's tokenizer gives no token_type_ids, which generate() would refuse
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_input_names": ["input_ids", "attention_mask"]}
    if chat:
        config["chat_template"] = "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}w3"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def lm_directory(family: str) -> Path:
    """The saved transformers model directory (with a tokenizer)."""
    key = ("source", family)
    if key not in _made:
        folder = _root() / f"{family}-source"
        causal_lm(family).save_pretrained(str(folder))
        save_tokenizer(folder)
        _made[key] = folder
    return _made[key]


#: form → (attn_implementation, opset) of the dynamo export; SDPA at opset 23 is the ``Attention`` op
FORMS = {"eager": ("eager", 20), "sdpa": ("sdpa", 20), "sdpa23": ("sdpa", 23)}


def exported_lm(family: str, form: str = "eager") -> Path:
    """The model directory ``export -o DIR/ --task text-generation-with-past`` writes (``FORMS``)."""
    from onnxprune.export import export

    key = ("export", family, form)
    if key not in _made:
        folder = _root() / f"{family}-{form}"
        attn, opset = FORMS[form]
        export(lm_directory(family), f"{folder}/", seq_len=EXPORT_LENGTH, attn=attn, opset=opset,
               task="text-generation-with-past", log=lambda *a: None)
        _made[key] = folder
    return _made[key]


#: calibration inputs are at most this long: decode steps run beyond the explicit layouts
CALIBRATION_LENGTH = 32


def pruned_lm(family: str, form: str, sparsity: float) -> Path:
    """The export pruned at ``sparsity`` (block 16) from statistics of random token inputs of
    at most ``CALIBRATION_LENGTH`` tokens, saved beside it."""
    import numpy as np

    from onnxprune.calibrate import calibrate
    from onnxprune.data import Dataset
    from onnxprune.lm_feeds import data_input_names
    from onnxprune.model_io import read_info, save_model
    from onnxprune.prune import prune

    key = ("pruned", family, form, sparsity)
    if key not in _made:
        path = exported_lm(family, form) / "model.onnx"
        rng = np.random.default_rng(0)
        examples = [rng.integers(3, tiny.VOCAB, size=n) for n in (CALIBRATION_LENGTH, 27, 20, 31)]
        dataset = Dataset(examples, data_input_names(read_info(path)))
        stats = calibrate(path, dataset, granularity=16, max_length=CALIBRATION_LENGTH, batch_size=2,
                          show_progress=False)
        model, _ = prune(path, stats, sparsity, block_size=16)
        _made[key] = _root() / f"{family}-{form}-p{sparsity}.onnx"
        save_model(model, _made[key])
    return _made[key]
