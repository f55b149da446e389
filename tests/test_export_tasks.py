"""``onnxprune export --task``: hidden states, logits, logits with a KV cache (Optimum's names),
the default task per architecture, model-directory outputs, and the opset-23 rotary embedding.

Tiny random causal LMs from models/tiny.py's configs: Llama with grouped-query attention (4 query
heads, 2 KV heads) and GPT-2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from models import tiny
from onnxprune.cli import main
from onnxprune.errors import OnnxpruneError
from onnxprune.export import export
from onnxprune.export_tasks import TASKS, default_task

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

QUIET = dict(log=lambda *a: None)
LM_CLASSES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}


def causal_lm(family: str):
    """The tiny config with an LM head; weights drawn wider than the default 0.02 so that the
    logits (and their differences) are not all near zero."""
    config_class, _, config = tiny.CONFIGS[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**config, initializer_range=0.3, attn_implementation="eager")
    return getattr(transformers, LM_CLASSES[family])(config).eval()


def save_tokenizer(folder) -> None:
    """A word-level tokenizer over the tiny vocabulary (the files a model directory carries)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(tiny.VOCAB)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """``lm_dir(family)``: a saved tiny causal-LM directory (with a tokenizer)."""
    folder = tmp_path_factory.mktemp("lms")
    made = {}

    def get(family: str):
        if family not in made:
            made[family] = folder / family
            causal_lm(family).save_pretrained(str(made[family]))
            save_tokenizer(made[family])
        return made[family]

    return get


@pytest.fixture(scope="module")
def exported(lm_dir, tmp_path_factory):
    """``exported(family, task)``: (report, path), exported once (``task=None``: the default)."""
    folder = tmp_path_factory.mktemp("exports")
    made = {}

    def get(family: str, task: str | None):
        if (family, task) not in made:
            path = folder / f"{family}-{task}.onnx"
            made[family, task] = export(lm_dir(family), path, seq_len=12, task=task, **QUIET), path
        return made[family, task]

    return get


def session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def graph_names(path):
    import onnx

    graph = onnx.load(str(path)).graph
    return [i.name for i in graph.input], [o.name for o in graph.output]


def cache_names(prefix: str, layers: int = tiny.LAYERS) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


@pytest.mark.parametrize("architectures, task", [
    (["LlamaForCausalLM"], "text-generation-with-past"),
    (["GPT2LMHeadModel"], "text-generation-with-past"),
    (["LlamaModel"], "feature-extraction"),
    (["BertModel"], "feature-extraction"),
    (["BertForMaskedLM"], "feature-extraction"),
    (None, "feature-extraction"),
])
def test_default_task_follows_the_architecture(architectures, task):
    assert default_task(architectures) == task


@pytest.mark.slow  # each export: a few seconds
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_lm_directory_exports_with_its_kv_cache_by_default(family, exported):
    report, path = exported(family, None)
    inputs, outputs = graph_names(path)
    assert report.task == "text-generation-with-past" and report.exporter == "dynamo"
    assert inputs == ["input_ids", "attention_mask", "position_ids", *cache_names("past_key_values")]
    assert outputs == report.output_names == ["logits", *cache_names("present")]
    assert set(report.checks) == {"prefill", "decode"} and report.max_abs_diff < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefill_then_decode_equals_a_full_forward(family, exported, lm_dir):
    """Prefill 9 tokens (empty cache), decode the 10th with the returned cache: the logits are
    PyTorch's full forward over the 10 tokens, within 1e-4; batch 2, the second row left-padded."""
    _, path = exported(family, "text-generation-with-past")
    sess = session(path)
    kv_heads = 2 if family == "llama" else tiny.HEADS
    ids = torch.randint(3, tiny.VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.int64)
    mask[1, :3] = 0  # left padding, as generation pads
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = causal_lm(family)(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    empty = np.zeros((2, kv_heads, 0, tiny.HIDDEN // tiny.HEADS), np.float32)
    feeds = {"input_ids": ids[:, :9].numpy(), "attention_mask": mask[:, :9].numpy(),
             "position_ids": positions[:, :9].numpy(), **{n: empty for n in cache_names("past_key_values")}}
    logits, *presents = sess.run(None, feeds)
    assert presents[0].shape == (2, kv_heads, 9, tiny.HIDDEN // tiny.HEADS)
    real = mask[:, :9].numpy().astype(bool)  # padded positions' logits are not compared
    np.testing.assert_allclose(logits[real], expected[:, :9].numpy()[real], atol=1e-4)
    feeds = {"input_ids": ids[:, 9:].numpy(), "attention_mask": mask.numpy(), "position_ids": positions[:, 9:].numpy(),
             **dict(zip(cache_names("past_key_values"), presents))}
    step, *presents = sess.run(None, feeds)
    assert presents[0].shape[2] == 10 and np.abs(expected[:, 9:].numpy()).max() > 0.1
    np.testing.assert_allclose(step, expected[:, 9:].numpy(), atol=1e-4)


@pytest.mark.slow
def test_kv_cache_export_names_its_dynamic_axes(exported):
    import onnx

    _, path = exported("llama", "text-generation-with-past")
    graph = onnx.load(str(path)).graph
    axes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}
    assert axes["input_ids"] == ["batch", "sequence"]
    assert axes["attention_mask"] == ["batch", "past_sequence + sequence"]
    assert axes["past_key_values.0.key"] == ["batch", 2, "past_sequence", 8]
    assert axes["present.1.value"] == ["batch", 2, "past_sequence + sequence", 8]
    assert axes["logits"] == ["batch", "sequence", tiny.VOCAB]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_text_generation_gives_pytorchs_logits(family, exported):
    report, path = exported(family, "text-generation")
    assert graph_names(path) == (["input_ids", "attention_mask"], ["logits"])
    ids = torch.randint(3, tiny.VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 7, dtype=torch.int64)
    with torch.no_grad():
        expected = causal_lm(family)(input_ids=ids, attention_mask=mask).logits.numpy()
    (got,) = session(path).run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    assert report.checks.keys() == {"forward"} and np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.slow
def test_feature_extraction_of_a_causal_lm_gives_hidden_states(exported):
    report, path = exported("gpt2", "feature-extraction")
    assert graph_names(path) == (["input_ids", "attention_mask"], ["last_hidden_state"])
    assert report.max_abs_diff < 1e-4


@pytest.mark.slow
def test_directory_output_holds_the_model_config_and_tokenizer(lm_dir, tmp_path, capsys):
    out = tmp_path / "llama"
    assert main(["export", str(lm_dir("llama")), "-o", f"{out}/", "--task", "text-generation",
                 "--seq-len", "12", "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert graph_names(out / "model.onnx")[1] == ["logits"]
    assert not [p for p in tmp_path.iterdir() if p.name != "llama"]  # no temporary left behind
    printed = capsys.readouterr().out
    assert f"wrote {out / 'model.onnx'} (text-generation;" in printed and "forward" in printed
    # an existing directory (no trailing /) is written into
    assert main(["export", str(lm_dir("llama")), "-o", str(out), "--task", "text-generation", "--seq-len", "12",
                 "-q"]) == 0
    assert (out / "model.onnx").is_file()


@pytest.mark.slow
def test_sdpa_opset_23_rotary_embedding_takes_any_batch(lm_dir, tmp_path):
    """The exporter's RotaryEmbedding gets cos/sin caches of batch 1 when the model computes its
    own positions; ORT accepts them only for batch 1 unless they are expanded to the batch."""
    import onnx

    path = tmp_path / "llama-sdpa-23.onnx"
    report = export(lm_dir("llama"), path, seq_len=12, opset=23, attn="sdpa", task="text-generation", **QUIET)
    assert report.exporter == "dynamo" and report.max_abs_diff < 1e-4  # the check runs batch 2
    assert "RotaryEmbedding" in {n.op_type for n in onnx.load(str(path)).graph.node}
    ids = np.random.default_rng(0).integers(3, tiny.VOCAB, (3, 5))
    (logits,) = session(path).run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert logits.shape == (3, 5, tiny.VOCAB)


def test_unknown_task_is_one_clear_error(lm_dir, tmp_path, capsys):
    with pytest.raises(OnnxpruneError, match="unknown task 'generation'; the tasks are " + ", ".join(TASKS)):
        export(lm_dir("gpt2"), tmp_path / "x.onnx", task="generation", **QUIET)
    with pytest.raises(SystemExit):
        main(["export", str(lm_dir("gpt2")), "-o", str(tmp_path / "x.onnx"), "--task", "generation"])
    error = capsys.readouterr().err.splitlines()[-1]
    assert error == ("onnxprune export: error: argument --task: unknown task 'generation'; the tasks are "
                     + ", ".join(TASKS))


def test_text_generation_needs_a_causal_lm(tmp_path):
    tiny.transformers_model("llama").save_pretrained(str(tmp_path / "base"))
    with pytest.raises(OnnxpruneError, match=r"needs a causal LM .*\['LlamaModel'\]"):
        export(tmp_path / "base", tmp_path / "x.onnx", task="text-generation", **QUIET)


def test_a_factory_has_no_kv_cache_nor_a_directory_output(tmp_path):
    with pytest.raises(OnnxpruneError, match="module:function export has no KV cache"):
        export("models.tiny:gpt2", tmp_path / "x.onnx", task="text-generation-with-past", **QUIET)
    with pytest.raises(OnnxpruneError, match="needs a transformers model directory"):
        export("models.tiny:gpt2", f"{tmp_path}/out/", **QUIET)


@pytest.mark.slow
def test_a_factory_exports_its_output_under_the_tasks_name(tmp_path):
    report = export("models.tiny:gpt2", tmp_path / "x.onnx", task="text-generation", **QUIET)
    assert graph_names(tmp_path / "x.onnx")[1] == report.output_names == ["logits"]


def test_missing_output_folder_is_refused_before_exporting(lm_dir, tmp_path, monkeypatch):
    import sys

    # the module, not the function that onnxprune/__init__ exports under the same name
    monkeypatch.setattr(sys.modules["onnxprune.export"], "make_plan", lambda *a: pytest.fail("exported anyway"))
    with pytest.raises(OnnxpruneError, match="output directory does not exist"):
        export(lm_dir("gpt2"), tmp_path / "missing" / "x.onnx", **QUIET)
