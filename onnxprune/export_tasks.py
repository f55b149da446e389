"""What ``export`` traces for each task (Optimum's names): the module wrapping a transformers
model, its example inputs, and the names and dynamic axes of the graph's inputs and outputs.

``feature-extraction`` returns ``last_hidden_state``; ``text-generation`` returns ``logits``;
``text-generation-with-past`` takes and returns the KV cache (``past_key_values.{i}.key|value`` →
``present.{i}.key|value``), so one file does the prefill (a past of length 0) and every decode step.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import sys
from pathlib import Path

from onnxprune import lm_feeds
from onnxprune.errors import OnnxpruneError

#: Optimum's task names: what the exported file computes.
#: ``feature-extraction``: ``last_hidden_state``; ``text-generation``: ``logits``;
#: ``text-generation-with-past``: ``logits`` and the KV cache (``present.{i}.key|value``) from
#: ``past_key_values.{i}.key|value``, so that one file does prefill (past of length 0) and decode.
TASKS = ("feature-extraction", "text-generation", "text-generation-with-past")
#: the class-name endings of transformers' causal language models (``LlamaForCausalLM``, ``GPT2LMHeadModel``)
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def default_task(architectures) -> str:
    """The task ``export`` picks when none is given, from ``config.architectures`` (as Optimum's
    ``auto`` does): a causal LM exports with its KV cache, anything else its hidden states."""
    if any(str(a).endswith(CAUSAL_LM_SUFFIXES) for a in architectures or ()):
        return "text-generation-with-past"
    return "feature-extraction"


def check_task(task: str) -> None:
    if task not in TASKS:
        raise OnnxpruneError(f"unknown task {task!r}; the tasks are {', '.join(TASKS)}")


def _hidden_state_wrapper(model, input_names: list[str]):
    """A module whose forward takes the inputs by name and returns the last hidden state.

    Named parameters (not ``*args``) keep the exported graph's input names and let
    ``dynamic_shapes`` refer to them.
    """
    import torch

    accepts_cache = "use_cache" in inspect.signature(model.forward).parameters

    def hidden(**kwargs):
        if accepts_cache:
            kwargs["use_cache"] = False
        out = model(**kwargs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    class WithTokenTypes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return hidden(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)

    class WithoutTokenTypes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return hidden(input_ids=input_ids, attention_mask=attention_mask)

    if input_names == ["input_ids", "attention_mask", "token_type_ids"]:
        return WithTokenTypes().eval()
    if input_names == ["input_ids", "attention_mask"]:
        return WithoutTokenTypes().eval()
    raise OnnxpruneError(f"the model's forward takes {input_names}; expected input_ids and attention_mask")


def _logits_wrapper(model):
    """``(input_ids, attention_mask) → logits`` of a causal LM, without a cache."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return Logits().eval()


def _with_past_wrapper(model, with_positions: bool):
    """``(input_ids, attention_mask[, position_ids], past_key_values) → (logits, presents)`` of a
    causal LM: ``past_key_values`` and ``presents`` are (key, value) per layer; the exporter
    flattens them to ``past_key_values.{i}.key|value`` and ``present.{i}.key|value``."""
    import torch
    from transformers import DynamicCache

    # transformers 5 renamed the forward's ``past_key_values`` to ``cache``.
    cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def step(input_ids, attention_mask, position_ids, past_key_values):
        cache = DynamicCache(ddp_cache_data=[tuple(kv) for kv in past_key_values], config=model.config)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True, **{cache_argument: cache})
        updated = getattr(out, cache_argument, None) or out.past_key_values
        return out.logits, tuple((layer.keys, layer.values) for layer in updated.layers)

    class WithPositions(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, past_key_values):
            return step(input_ids, attention_mask, position_ids, past_key_values)

    class WithoutPositions(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, past_key_values):
            return step(input_ids, attention_mask, None, past_key_values)

    return (WithPositions() if with_positions else WithoutPositions()).eval()


def _load(model_dir: Path, attn: str, causal_lm: bool):
    """The model of a transformers directory: its base model, or with ``causal_lm`` its LM."""
    from transformers import AutoModel, AutoModelForCausalLM

    architectures = _architectures(model_dir)
    if causal_lm and default_task(architectures) == "feature-extraction":
        # An LM head loaded onto a base model would be random weights, silently.
        raise OnnxpruneError(f"{model_dir}: a text-generation task needs a causal LM (*ForCausalLM "
                             f"or *LMHeadModel); its config.json says {architectures or 'no architecture'}")
    auto = AutoModelForCausalLM if causal_lm else AutoModel
    try:
        model = auto.from_pretrained(str(model_dir), attn_implementation=attn, local_files_only=True)
    except (OSError, ValueError) as e:
        raise OnnxpruneError(f"{model_dir}: cannot load the model ({e})".splitlines()[0]) from None
    return model.eval()


def _architectures(model_dir: Path) -> list[str]:
    if not (model_dir / "config.json").is_file():
        raise OnnxpruneError(f"{model_dir}: no config.json (not a transformers model directory)")
    try:
        return list(json.loads((model_dir / "config.json").read_text()).get("architectures") or [])
    except (ValueError, AttributeError) as e:
        raise OnnxpruneError(f"{model_dir}/config.json: not a JSON object ({e})") from None


def _example_ids(model, batch: int, seq_len: int, seed: int = 0):
    import torch

    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(min(1000, vocab - 1), vocab, (batch, seq_len), generator=generator)


def padded_mask(batch: int, seq_len: int):
    import torch

    mask = torch.ones(batch, seq_len, dtype=torch.int64)
    mask[1, seq_len // 2 :] = 0  # padding in the second example, so the check covers masking
    return mask


def _hidden_state_inputs(model, seq_len: int):
    """The input names of a base model's forward and padded example inputs."""
    import torch

    params = inspect.signature(model.forward).parameters
    input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in params]
    if not getattr(model.config, "type_vocab_size", 0):
        # GPT-2 takes token_type_ids but embeds them with the word embeddings: zeros there would
        # add token 0's embedding to every position. Only models with a token-type table get it.
        input_names = [n for n in input_names if n != "token_type_ids"]
    ids = _example_ids(model, 2, seq_len)
    examples = {"input_ids": ids, "attention_mask": padded_mask(2, seq_len), "token_type_ids": torch.zeros_like(ids)}
    return input_names, tuple(examples[n] for n in input_names)


def _from_factory(spec: str):
    """``module:function`` returning ``(nn.Module, {input name: example tensor})``."""
    module_name, _, func_name = spec.partition(":")
    try:
        sys.path.insert(0, os.getcwd())
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        raise OnnxpruneError(f"{spec}: cannot import ({e})") from None
    finally:
        sys.path.pop(0)
    module, examples = factory()
    return module.eval(), list(examples), tuple(examples.values())


# ---- the KV cache: shapes, names, example values


@dataclasses.dataclass(frozen=True)
class _Cache:
    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> _Cache:
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim)

    def input_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def output_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def example(self, batch: int, length: int, seed: int = 1):
        """Random (key, value) per layer, ``length`` positions."""
        import torch

        generator = torch.Generator().manual_seed(seed)
        shape = (batch, self.kv_heads, length, self.head_dim)
        return [(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
                for _ in range(self.layers)]


#: dimension names of the exported graphs' inputs and outputs (Optimum's, shortened)
BATCH, SEQUENCE, PAST, TOTAL = "batch", "sequence", "past_sequence", "past_sequence + sequence"


@dataclasses.dataclass
class Plan:
    """What to trace and how: the module, its example inputs (in ``input_names`` order, the cache
    as one list) and the names and dynamic axes of the graph's flattened inputs and outputs."""

    module: object
    example: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: dict  # forward parameter → axes, for the dynamo exporter
    axes: dict[str, dict[int, str]]  # graph input or output → {axis: name}


def make_plan(source: str, task: str | None, seq_len: int, attn: str) -> tuple[Plan, str, Path | None]:
    """The trace plan, the task (``task`` or the model's default) and the model directory (None for a factory)."""
    if ":" in source and not Path(source).exists():
        task = task or "feature-extraction"
        return _factory_plan(source, task), task, None
    model_dir = Path(source)
    task = task or default_task(_architectures(model_dir))
    model = _load(model_dir, attn, causal_lm=task != "feature-extraction")
    if task == "feature-extraction":
        names, example = _hidden_state_inputs(model, seq_len)
        axes = {n: {0: BATCH, 1: SEQUENCE} for n in names}
        plan = Plan(_hidden_state_wrapper(model, names), example, names, ["last_hidden_state"], dict(axes), axes)
    elif task == "text-generation":
        names = ["input_ids", "attention_mask"]
        axes = {n: {0: BATCH, 1: SEQUENCE} for n in names}
        example = (_example_ids(model, 2, seq_len), padded_mask(2, seq_len))
        plan = Plan(_logits_wrapper(model), example, names, ["logits"], dict(axes), {**axes, "logits": axes["input_ids"]})
    else:
        plan = _with_past_plan(model, seq_len)
    return plan, task, model_dir


def _factory_plan(source: str, task: str) -> Plan:
    if task == "text-generation-with-past":
        raise OnnxpruneError(f"{source}: a module:function export has no KV cache; "
                             "use --task feature-extraction or text-generation")
    module, names, example = _from_factory(source)
    axes = {n: {0: BATCH, 1: SEQUENCE} for n in names}
    return Plan(module, example, names, ["logits" if task == "text-generation" else "last_hidden_state"],
                 dict(axes), axes)


def _with_past_plan(model, seq_len: int) -> Plan:
    import torch

    cache = _Cache.of(model.config)
    with_positions = "position_ids" in inspect.signature(model.forward).parameters
    # Traced with a past of a length unlike the other axes (torch.export gives equal sizes one symbol).
    past = seq_len // 2 + 1 if seq_len // 2 + 1 not in (2, seq_len) else seq_len + 3
    mask = torch.ones(2, past + seq_len, dtype=torch.int64)
    names = ["input_ids", "attention_mask"] + (["position_ids"] if with_positions else [])
    example = [_example_ids(model, 2, seq_len), mask] + ([positions(mask, seq_len)] if with_positions else [])
    dynamic: dict = {"input_ids": {0: BATCH, 1: SEQUENCE}, "attention_mask": {0: BATCH, 1: TOTAL},
                     "position_ids": {0: BATCH, 1: SEQUENCE}}
    dynamic = {n: dynamic[n] for n in names}
    axes = {**dynamic, "logits": {0: BATCH, 1: SEQUENCE}}
    axes.update({n: {0: BATCH, 2: PAST} for n in cache.input_names()})
    axes.update({n: {0: BATCH, 2: TOTAL} for n in cache.output_names()})
    dynamic["past_key_values"] = [({0: BATCH, 2: PAST}, {0: BATCH, 2: PAST}) for _ in range(cache.layers)]
    return Plan(_with_past_wrapper(model, with_positions), (*example, cache.example(2, past)),
                 names + cache.input_names(), ["logits", *cache.output_names()], dynamic, axes)


def positions(attention_mask, length: int):
    """``lm_feeds.positions`` (what the exported graph is fed at run time) for a torch mask."""
    import torch

    return torch.from_numpy(lm_feeds.positions(attention_mask.numpy(), length))
