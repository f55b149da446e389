"""The KV-cache form of attention (``rules/kv_cache.py``) and calibration of a with-past export.

Sites whose K and V are ``Concat(past, new)`` are rewritten with ``queries_at_end = 1`` over the
concatenated (present) K and V in their ``Hkv`` heads; a prune at p = 0 equals the dense export
for a prefill and for decode steps; at p > 0 the kernel equals the function body at every decode
step, beyond the calibrated length too. Exports: tests/lm_exports.py (tiny random causal LMs).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper

from models import tiny
from onnxprune import op_schema
from onnxprune.lm_feeds import data_input_names, positions, with_empty_cache
from onnxprune.model_io import read_info
from onnxprune.passes.key_padding_mask import is_padding_mask
from onnxprune.rules import find_sites
from onnxprune.rules._common import same_dim
from test_rules import make_model, to_ir, vi

pytest.importorskip("transformers")
from lm_exports import CALIBRATION_LENGTH, KV_HEADS, exported_lm, pruned_lm  # noqa: E402

FAMILIES = ["llama", "gpt2", "gpt_neox"]
FORMS = ["eager", "sdpa", "sdpa23"]
EXPECTED_FORM = {"eager": "eager-kv-cache", "sdpa": "sdpa-decomposed-kv-cache", "sdpa23": "onnx-attention-kv-cache"}


# ---- in-memory graphs: the rule's decisions


def cached_attention(concat_keys: bool = True, concat_values: bool = True, past_is_input: bool = True,
                     reshaped: bool = False):
    """Eager attention over ``Concat(past, new)`` keys/values ``[1, 2, ·, 8]`` (``reshaped``:
    each through a Reshape to its own shape, a path the rule does not follow)."""
    nodes, inputs = [], [vi("Q", [1, 2, 3, 8]), vi("K_new", [1, 2, 3, 8]), vi("V_new", [1, 2, 3, 8])]
    inputs += [vi("past_k", [1, 2, 5, 8]), vi("past_v", [1, 2, 5, 8])]
    if not past_is_input:
        nodes.append(helper.make_node("Neg", ["past_k"], ["past_k_neg"]))
    past_k = "past_k" if past_is_input else "past_k_neg"
    k = v = None
    if concat_keys:
        nodes.append(helper.make_node("Concat", [past_k, "K_new"], ["K"], axis=-2))
        k = "K"
    if concat_values:
        nodes.append(helper.make_node("Concat", ["past_v", "V_new"], ["V"], axis=2))
        v = "V"
    initializers = []
    if reshaped:
        initializers.append(helper.make_tensor("same_shape", T.INT64, [4], [1, 2, 8, 8]))
        nodes += [helper.make_node("Reshape", ["K", "same_shape"], ["K_same"]),
                  helper.make_node("Reshape", ["V", "same_shape"], ["V_same"])]
        k, v = "K_same", "V_same"
    nodes += [
        helper.make_node("Transpose", [k or "K_new"], ["Kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["Q", "Kt"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1, name="the_softmax"),
        helper.make_node("MatMul", ["probs", v or "V_new"], ["Y"]),
    ]
    return make_model(nodes, inputs, initializers)


def test_concatenated_keys_and_values_are_the_cache_form():
    (site,) = find_sites(to_ir(cached_attention())).sites
    assert (site.name, site.form, site.queries_at_end) == ("the_softmax", "eager-kv-cache", True)
    assert (site.k.name, site.v.name, site.k_transposed) == ("K", "V", None)


def test_attention_without_a_cache_keeps_its_form():
    (site,) = find_sites(to_ir(cached_attention(concat_keys=False, concat_values=False))).sites
    assert (site.form, site.queries_at_end) == ("eager", False)


@pytest.mark.parametrize("keys, values", [(True, False), (False, True)])
def test_a_cache_on_one_side_only_is_reported(keys, values):
    discovery = find_sites(to_ir(cached_attention(keys, values)))
    assert discovery.sites == []
    assert discovery.unmatched == [("the_softmax", "only one of the keys and values comes from a KV cache Concat")]


def test_a_concat_of_computed_keys_is_not_a_cache():
    """Only a graph input (the cache the caller feeds back) makes the queries the last positions."""
    discovery = find_sites(to_ir(cached_attention(past_is_input=False)))
    assert discovery.sites == []
    assert "only one of the keys and values" in discovery.unmatched[0][1]


def cached_onnx_attention(is_causal: int):
    """The opset-23 ``Attention`` op over ``Concat(past, new)`` keys and values."""
    inputs = [vi("Q", [1, 2, 3, 8]), vi("K_new", [1, 2, 3, 8]), vi("V_new", [1, 2, 3, 8]),
              vi("past_k", [1, 2, 5, 8]), vi("past_v", [1, 2, 5, 8])]
    nodes = [
        helper.make_node("Concat", ["past_k", "K_new"], ["K"], axis=-2),
        helper.make_node("Concat", ["past_v", "V_new"], ["V"], axis=-2),
        helper.make_node("Attention", ["Q", "K", "V"], ["Y"], is_causal=is_causal, name="attention"),
    ]
    return make_model(nodes, inputs, opset=23)


def test_attention_op_over_a_cache_is_the_cache_form():
    (site,) = find_sites(to_ir(cached_onnx_attention(is_causal=0))).sites
    assert (site.form, site.queries_at_end, site.k.name, site.v.name) == ("onnx-attention-kv-cache", True, "K", "V")


def test_top_left_causal_attention_over_a_cache_is_reported():
    """The op's ``is_causal`` without its own past input is top-left aligned; ours, with the
    queries at the end, would be bottom-right: not the same function."""
    discovery = find_sites(to_ir(cached_onnx_attention(is_causal=1)))
    assert discovery.sites == []
    assert discovery.unmatched == [("attention", "causal attention over a KV cache with the causal mask aligned top-left")]


def test_a_cache_behind_a_path_the_rule_does_not_follow_is_reported_not_misplaced():
    discovery = find_sites(to_ir(cached_attention(reshaped=True)))
    assert discovery.sites == []
    assert discovery.unmatched == [
        ("the_softmax", "the keys or values come from a KV cache by a path the kv-cache rule does not follow")]


def test_symbolic_sums_are_equal_in_any_order():
    """Shape inference names one size ``past_sequence + sequence`` here, ``sequence +
    past_sequence`` there (SmolLM2's export, 8 of 30 layers): repeat_kv must still be seen."""
    assert same_dim(ir.SymbolicDim("past_sequence + sequence"), ir.SymbolicDim("sequence + past_sequence"))
    assert same_dim(64, 64) and not same_dim(64, 32) and not same_dim(ir.SymbolicDim("a"), ir.SymbolicDim("b"))
    assert not same_dim(ir.SymbolicDim(None), ir.SymbolicDim(None))


# ---- calibration feeds


def test_with_empty_cache_adds_positions_and_an_empty_cache():
    info = read_info(exported_lm("llama") / "model.onnx")
    assert data_input_names(info) == ["input_ids", "attention_mask"]
    mask = np.array([[1, 1, 1, 0], [0, 0, 1, 1]])
    feeds = with_empty_cache(info, {"input_ids": np.ones((2, 4), np.int64), "attention_mask": mask})
    assert list(feeds)[:3] == ["input_ids", "attention_mask", "position_ids"]
    np.testing.assert_array_equal(feeds["position_ids"], [[0, 1, 2, 2], [0, 0, 0, 1]])
    assert {feeds[f"past_key_values.{i}.{kv}"].shape for i in range(tiny.LAYERS) for kv in ("key", "value")} == {
        (2, KV_HEADS["llama"], 0, tiny.HIDDEN // tiny.HEADS)}


def test_feeds_of_a_model_without_a_cache_are_unchanged(tmp_path):
    path = tmp_path / "plain.onnx"
    onnx.save(cached_attention(concat_keys=False, concat_values=False), str(path))
    feeds = {"Q": np.zeros((1, 2, 3, 8), np.float32)}
    assert with_empty_cache(read_info(path), feeds) is feeds


def test_positions_of_the_last_tokens():
    np.testing.assert_array_equal(positions(np.array([[0, 1, 1, 1, 1]]), 2), [[2, 3]])


# ---- exported models


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", FAMILIES)
def test_with_past_exports_have_cache_sites(family, form):
    from onnxprune.model_io import load_model

    discovery = find_sites(load_model(exported_lm(family, form) / "model.onnx").model)
    assert discovery.unmatched == []
    assert [s.form for s in discovery.sites] == [EXPECTED_FORM[form]] * tiny.LAYERS
    # K and V are the present tensors, in their grouped heads (Llama: 2 KV heads for 4 query heads)
    assert [s.k.name for s in discovery.sites] == [f"present.{i}.key" for i in range(tiny.LAYERS)]
    assert [s.v.name for s in discovery.sites] == [f"present.{i}.value" for i in range(tiny.LAYERS)]
    assert all(s.queries_at_end and s.k.shape[1] == KV_HEADS[family] for s in discovery.sites)


def attention_nodes(path):
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == op_schema.OP_TYPE]


class Runner:
    """Prefill and greedy decode steps of one with-past model, its logits at every step."""

    def __init__(self, path, library="auto"):
        from onnxprune.generate import CausalLM

        self.lm = CausalLM(path, library)

    def logits(self, prompt: np.ndarray, steps: int, tokens: list[int] | None = None) -> list[np.ndarray]:
        """``steps`` decode steps after the prefill of ``prompt [B, S]``, fed ``tokens`` (else the argmax)."""
        mask = (prompt >= 0).astype(np.int64)
        ids, cache, out = np.maximum(prompt, 0), self.lm.empty_cache(len(prompt)), []
        for step in range(steps + 1):
            logits, cache = self.lm.step(ids, mask, cache)
            out.append(logits)
            if step == steps:
                return out
            nxt = logits[:, -1].argmax(-1) if tokens is None else np.full(len(prompt), tokens[step])
            ids, mask = nxt[:, None].astype(np.int64), np.concatenate([mask, np.ones((len(prompt), 1), np.int64)], 1)


def left_padded_prompt(length: int = 20) -> np.ndarray:
    """Batch 2; -1 marks the second row's left padding."""
    prompt = np.random.default_rng(3).integers(3, tiny.VOCAB, size=(2, length))
    prompt[1, :7] = -1
    return prompt


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", FAMILIES)
def test_prune_at_p0_equals_the_dense_export(family, form, ops_library):
    """Prefill of a left-padded batch and 24 decode steps (past the calibrated 32 positions):
    the pruned model's logits are the dense model's within 1e-4, with the kernel and the body."""
    dense_path, pruned_path = exported_lm(family, form) / "model.onnx", pruned_lm(family, form, 0.0)
    nodes = attention_nodes(pruned_path)
    assert len(nodes) == tiny.LAYERS
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["queries_at_end"] == 1 and node.input[1].startswith("present.")
    prompt, tokens = left_padded_prompt(), list(range(5, 29))
    dense = Runner(dense_path).logits(prompt, 24, tokens)
    for library in ("auto", "none"):
        pruned = Runner(pruned_path, library).logits(prompt, 24, tokens)
        valid = prompt >= 0  # padded queries: the op zeroes a fully masked row, the model averages it
        assert np.abs(pruned[0][valid] - dense[0][valid]).max() < 1e-4
        assert max(np.abs(p - d).max() for p, d in zip(pruned[1:], dense[1:])) < 1e-4


@pytest.mark.parametrize("family, form", [("llama", "eager"), ("gpt2", "sdpa"), ("llama", "sdpa23")])
def test_kernel_equals_body_at_every_decode_step_beyond_the_calibrated_length(family, form, ops_library):
    """p = 0.6 from inputs of at most 32 tokens; a 20-token prompt and 40 greedy steps reach 60."""
    path = pruned_lm(family, form, 0.6)
    prompt = left_padded_prompt()[:1]
    kernel = Runner(path).logits(prompt, 40)
    body = Runner(path, "none").logits(prompt, 40, tokens=[int(k[0, -1].argmax()) for k in kernel])
    assert prompt.shape[1] + 40 > CALIBRATION_LENGTH
    assert max(np.abs(k - b).max() for k, b in zip(kernel, body)) < 1e-4
    dense = Runner(exported_lm(family, form) / "model.onnx").logits(prompt, 40)
    assert max(np.abs(k - d).max() for k, d in zip(kernel, dense)) > 1e-3  # pruning changed something


@pytest.mark.parametrize("form", FORMS)
def test_the_exporters_cache_mask_becomes_key_padding_and_causal(form):
    """The exporter's mask (padding + causal over past + new, from ``attention_mask`` and the
    cache's length) is probed with cached positions too: each node takes ``attention_mask`` as
    its key-padding mask and ``is_causal`` (bottom-right, as its queries are at the end)."""
    for node in attention_nodes(pruned_lm("llama", form, 0.0)):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert (node.input[4], node.input[5], attrs["is_causal"], attrs["queries_at_end"]) == ("", "attention_mask", 1, 1)


def test_causal_probe_is_bottom_right_with_fewer_queries_than_keys():
    keep = np.ones((1, 5), bool)
    bottom_right = np.where(np.tri(2, 5, k=3, dtype=bool), 0.0, -np.inf)[None, None]
    top_left = np.where(np.tri(2, 5, k=0, dtype=bool), 0.0, -np.inf)[None, None]
    assert is_padding_mask(bottom_right, keep, causal=True, queries=2)
    assert not is_padding_mask(top_left, keep, causal=True, queries=2)
    assert not is_padding_mask(bottom_right, keep, causal=False, queries=2)


def test_calibrate_command_reads_text_for_a_with_past_model(tmp_path):
    from onnxprune.cli import main
    from onnxprune.stats import Stats

    folder = exported_lm("gpt2")
    data = tmp_path / "lines.txt"
    data.write_text("\n".join(" ".join(f"w{(7 * i + j) % 90 + 3}" for j in range(10 + i)) for i in range(6)))
    out = tmp_path / "stats.safetensors"
    assert main(["calibrate", str(folder / "model.onnx"), "--data", str(data), "--tokenizer", str(folder),
                 "--max-length", "32", "-o", str(out), "--quiet"]) == 0
    stats = Stats.load(out)
    assert stats.num_samples == 6 and len(stats.sites) == tiny.LAYERS

