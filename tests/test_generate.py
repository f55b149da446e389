"""``onnxprune generate`` and ``onnxprune.generate``: greedy tokens as PyTorch's ``generate``,
prefill plus decode as one full forward, left-padded batches, the command line and its errors.
Tiny random causal LMs exported with their cache (tests/lm_exports.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper

from models import tiny
from json_schema import assert_valid
from onnxprune.cli import main
from onnxprune.errors import OnnxpruneError
from onnxprune.generate import CausalLM, generate, generate_ids

torch = pytest.importorskip("torch")
from lm_exports import causal_lm, exported_lm, pruned_lm, save_tokenizer  # noqa: E402

NEW_TOKENS = 32
TOOLS = Path(__file__).resolve().parents[1] / "tools"


def prompt_ids(length: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, tiny.VOCAB, size=length)]


def torch_greedy(family: str, prompt: list[int]) -> list[int]:
    model = causal_lm(family)
    model.generation_config.eos_token_id = None  # 32 tokens whatever comes
    model.generation_config.pad_token_id = 0
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_tokens_equal_pytorch_generate(family, ops_library):
    prompt = prompt_ids(9)
    expected = torch_greedy(family, prompt)
    for path in (exported_lm(family) / "model.onnx", pruned_lm(family, "eager", 0.0)):
        got = generate_ids(CausalLM(path), [prompt], NEW_TOKENS)
        assert got.token_ids == [expected] and got.stop_reason == "max_new_tokens"
        assert got.decode_steps == NEW_TOKENS - 1 and got.prefill_seconds > 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefill_and_decode_logits_equal_one_full_forward(family, ops_library):
    """Prefill 10 tokens, decode 8 one at a time: the logits are those of one forward pass over
    the 18 tokens (PyTorch), within 1e-4, for the dense and the p = 0 pruned export."""
    tokens = prompt_ids(18, seed=1)
    with torch.no_grad():
        full = causal_lm(family)(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].numpy()
    for path in (exported_lm(family) / "model.onnx", pruned_lm(family, "eager", 0.0)):
        lm = CausalLM(path)
        logits, cache = lm.step(np.array([tokens[:10]]), np.ones((1, 10), np.int64), lm.empty_cache(1))
        rows = [logits[0]]
        for i in range(10, 18):
            logits, cache = lm.step(np.array([[tokens[i]]]), np.ones((1, i + 1), np.int64), cache)
            rows.append(logits[0])
        assert np.abs(np.concatenate(rows) - full).max() < 1e-4


def test_left_padded_batch_generates_as_single_runs():
    lm = CausalLM(exported_lm("llama") / "model.onnx")
    prompts = [prompt_ids(12, seed=2), prompt_ids(7, seed=3)]
    batch = generate_ids(lm, prompts, 16)
    assert batch.token_ids == [generate_ids(lm, [p], 16).token_ids[0] for p in prompts]


def test_pruned_model_refuses_prompts_of_different_lengths(ops_library):
    lm = CausalLM(pruned_lm("llama", "eager", 0.0))
    with pytest.raises(OnnxpruneError, match="one at a time"):
        generate_ids(lm, [prompt_ids(12), prompt_ids(7)], 4)
    same = generate_ids(lm, [prompt_ids(7, seed=1), prompt_ids(7, seed=2)], 4)  # no padding: allowed
    assert [len(t) for t in same.token_ids] == [4, 4]


def test_generation_stops_at_an_end_token():
    lm = CausalLM(exported_lm("gpt2") / "model.onnx")
    first = generate_ids(lm, [prompt_ids(5)], 8).token_ids[0]
    stopped = generate_ids(lm, [prompt_ids(5)], 8, eos_token_ids=[first[2]])
    assert stopped.token_ids == [first[:first.index(first[2]) + 1]] and stopped.stop_reason == "eos"


def test_sampling_is_seeded():
    lm = CausalLM(exported_lm("gpt2") / "model.onnx")
    runs = [generate_ids(lm, [prompt_ids(5)], 12, temperature=1.5, top_p=0.9, seed=s).token_ids for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]


def words(tokens: list[int]) -> str:
    return " ".join(f"w{t}" for t in tokens)


def test_api_on_a_model_directory_streams_the_text():
    pieces = []
    result = generate(exported_lm("gpt2"), words(prompt_ids(6)), max_new_tokens=10, on_text=pieces.append)
    assert result.text == words(result.token_ids) == "".join(pieces).strip()
    assert result.prompt_tokens == 6 and len(result.token_ids) == 10


def test_cli_json(capsys, ops_library):
    folder = exported_lm("llama")
    prompt = prompt_ids(9)
    assert main(["generate", str(pruned_lm("llama", "eager", 0.0)), "--tokenizer", str(folder), "--prompt",
                 words(prompt), "--max-new-tokens", str(NEW_TOKENS), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert_valid(out, "generate")
    assert out["token_ids"] == torch_greedy("llama", prompt) and out["kernel"]
    assert out["text"] == words(out["token_ids"]) and out["prompt_tokens"] == 9
    assert out["decode_tokens_per_second"] > 0 and out["stop_reason"] == "max_new_tokens"


def test_cli_streams_to_stdout_and_times_on_stderr(capsys, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(words(prompt_ids(4)))
    assert main(["generate", str(exported_lm("gpt2")), "--prompt-file", str(prompt), "--max-new-tokens", "5",
                 "--library", "none"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.split()) == 5
    assert "prefill" in captured.err and "tokens/s" in captured.err


def test_cli_chat_template(capsys, tmp_path):
    import shutil

    folder = tmp_path / "chat"
    shutil.copytree(exported_lm("gpt2"), folder)
    one_line_error(capsys, ["generate", str(folder), "--prompt", "w5", "--chat"],
                   "--chat needs a tokenizer with a chat template; this one has none")
    save_tokenizer(folder, chat=True)
    assert main(["generate", str(folder), "--prompt", "w5", "--chat", "--max-new-tokens", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert_valid(out, "generate")
    assert out["prompt_tokens"] == 4 and out["decode_steps"] == 1  # w1 w5 w2 w3
    assert main(["generate", str(folder), "--prompt", "w5", "--max-new-tokens", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert_valid(out, "generate")
    assert out["decode_tokens_per_second"] is None and not out["kernel"]


def one_line_error(capsys, argv, match):
    capsys.readouterr()  # what exporting the models in argv printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_cli_refuses_a_prompt_longer_than_the_positions(capsys):
    one_line_error(capsys, ["generate", str(exported_lm("gpt2")), "--prompt", words([5] * (tiny.MAX_POSITIONS + 1))],
                   f"the prompt has {tiny.MAX_POSITIONS + 1} tokens, more than the model's {tiny.MAX_POSITIONS} positions")


def test_generation_stops_at_the_last_position():
    result = generate(exported_lm("gpt2"), words(prompt_ids(tiny.MAX_POSITIONS - 3)), max_new_tokens=10)
    assert result.stop_reason == "positions" and len(result.token_ids) == 4


def tiny_graph(path, inputs, outputs):
    """A model with the given (name, shape) inputs and outputs: each output is the first input, cast."""
    nodes = [helper.make_node("Cast", [inputs[0][0]], [name], to=T.FLOAT) for name, _ in outputs]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, T.INT64 if n == "input_ids" else T.FLOAT, s)
                                           for n, s in inputs],
                              [helper.make_tensor_value_info(n, T.FLOAT, s) for n, s in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def test_cli_says_which_task_to_export_with(capsys, tmp_path):
    tokenizer = exported_lm("gpt2")
    no_cache = tiny_graph(tmp_path / "no_cache.onnx", [("input_ids", ["b", "s"])], [("logits", ["b", "s"])])
    one_line_error(capsys, ["generate", str(no_cache), "--tokenizer", str(tokenizer), "--prompt", "w5"],
                   "has no KV cache inputs (past_key_values.*); export it with --task text-generation-with-past")
    no_logits = tiny_graph(tmp_path / "no_logits.onnx",
                           [("input_ids", ["b", "s"]), ("past_key_values.0.key", ["b", 2, "p", 8]),
                            ("past_key_values.0.value", ["b", 2, "p", 8])],
                           [("last_hidden_state", ["b", "s"]), ("present.0.key", None), ("present.0.value", None)])
    one_line_error(capsys, ["generate", str(no_logits), "--tokenizer", str(tokenizer), "--prompt", "w5"],
                   "has no logits output; export it with --task text-generation-with-past")
    one_line_error(capsys, ["generate", str(tmp_path / "missing.onnx"), "--tokenizer", str(tokenizer), "--prompt", "w5"],
                   "no such model file")


def wrong_present_graph(path):
    """A with-past model whose present.0.key is its past_key_values.0.key transposed: [b, 8, p, 2]
    where [b, 2, p + s, 8] is due."""
    nodes = [helper.make_node("Unsqueeze", ["input_ids", "last"], ["ids3"]),
             helper.make_node("Cast", ["ids3"], ["logits"], to=T.FLOAT),
             helper.make_node("Transpose", ["past_key_values.0.key"], ["present.0.key"], perm=[0, 3, 2, 1]),
             helper.make_node("Identity", ["past_key_values.0.value"], ["present.0.value"])]
    cache = [helper.make_tensor_value_info(f"past_key_values.0.{kind}", T.FLOAT, ["b", 2, "p", 8])
             for kind in ("key", "value")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", T.INT64, ["b", "s"]), *cache],
                              [helper.make_tensor_value_info(n, T.FLOAT, None)
                               for n in ("logits", "present.0.key", "present.0.value")],
                              initializer=[helper.make_tensor("last", T.INT64, [1], [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def test_cli_refuses_a_cache_of_the_wrong_shape(capsys, tmp_path):
    """The command line makes the cache, from the model's cache inputs and then its present outputs:
    inputs without fixed heads and head size, or presents of another shape, are one line each."""
    tokenizer = exported_lm("gpt2")
    free_heads = tiny_graph(tmp_path / "free_heads.onnx",
                            [("input_ids", ["b", "s"]), ("past_key_values.0.key", ["b", "h", "p", 8]),
                             ("past_key_values.0.value", ["b", "h", "p", 8])],
                            [("logits", ["b", "s"]), ("present.0.key", None), ("present.0.value", None)])
    one_line_error(capsys, ["generate", str(free_heads), "--tokenizer", str(tokenizer), "--prompt", "w5"],
                   "cache input past_key_values.0.key has shape ['b', 'h', 'p', 8]; expected [batch, kv_heads, "
                   "past_sequence, head_size] with fixed heads and head size")
    wrong_present = wrong_present_graph(tmp_path / "wrong_present.onnx")
    one_line_error(capsys, ["generate", str(wrong_present), "--tokenizer", str(tokenizer), "--prompt", "w5 w6"],
                   "output present.0.key has shape [1, 8, 0, 2]; expected [1, 2, 2, 8] (past_key_values.0.key plus "
                   "the new tokens)")


def test_a_cache_of_the_wrong_shape_is_one_clear_error():
    lm = CausalLM(exported_lm("llama") / "model.onnx")
    cache = lm.empty_cache(1)
    cache["past_key_values.1.value"] = np.zeros((1, 4, 0, 8), np.float32)  # 4 heads: the query heads
    with pytest.raises(OnnxpruneError, match=r"cache past_key_values.1.value has shape \[1, 4, 0, 8\]; "
                                             r"the model takes \[1, 2, past_sequence, 8\]"):
        lm.step(np.array([[5]]), np.ones((1, 1), np.int64), cache)


@pytest.mark.skipif(not os.environ.get("ONNXPRUNE_OPTIMUM_PYTHON"),
                    reason="ONNXPRUNE_OPTIMUM_PYTHON names no python with optimum-onnx (make client)")
def test_optimum_client_generates_our_tokens(tmp_path, ops_library):
    """Optimum's ORTModelForCausalLM, in its own environment (tools/optimum_generate.py), given
    session options with onnxprune's library, generates from the Llama (GQA) directory, dense and
    pruned at p = 0, PyTorch's greedy tokens, and pruned at p = 0.5 (other tokens) those of
    ``generate_ids`` on it."""
    import shutil
    import subprocess

    prompt = prompt_ids(9)
    folders = []
    for name, path in (("dense", exported_lm("llama") / "model.onnx"), ("p0", pruned_lm("llama", "eager", 0.0)),
                       ("p0.5", pruned_lm("llama", "eager", 0.5))):
        folders.append(tmp_path / name)
        shutil.copytree(exported_lm("llama"), folders[-1])
        shutil.copyfile(path, folders[-1] / "model.onnx")
    run = subprocess.run([os.environ["ONNXPRUNE_OPTIMUM_PYTHON"], str(TOOLS / "optimum_generate.py"), *map(str, folders),
                          "--prompt", words(prompt), "--max-new-tokens", str(NEW_TOKENS)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.splitlines()[-1])["token_ids"]
    ours = [generate_ids(CausalLM(folder / "model.onnx"), [prompt], NEW_TOKENS).token_ids[0] for folder in folders]
    expected = torch_greedy("llama", prompt)
    assert got == ours and ours[:2] == [expected, expected] and ours[2] != expected
