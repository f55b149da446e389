"""Export a PyTorch / transformers model to ONNX, checked against PyTorch on padded inputs."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from onnxprune.errors import OnnxpruneError

#: transformers' ``attn_implementation`` values a model directory is exported with.
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


#: Optimum's task names: what the exported file computes.
#: ``feature-extraction``: ``last_hidden_state``; ``text-generation``: ``logits``;
#: ``text-generation-with-past``: ``logits`` and the KV cache (``present.{i}.key|value``) from
#: ``past_key_values.{i}.key|value``, so that one file does prefill (past of length 0) and decode.
TASKS = ("feature-extraction", "text-generation", "text-generation-with-past")
#: the class-name endings of transformers' causal language models (``LlamaForCausalLM``, ``GPT2LMHeadModel``)
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
#: the files of a model directory's tokenizer that ``-o DIR/`` copies beside ``model.onnx``
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                   "added_tokens.json")
DIRECTORY_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


@dataclasses.dataclass
class ExportReport:
    path: str  # the .onnx file written
    exporter: str  # "dynamo" or "torchscript"
    opset: int
    input_names: list[str]
    max_abs_diff: float  # the largest of ``checks``
    fallback_reason: str = ""
    task: str = "feature-extraction"
    output_names: list[str] = dataclasses.field(default_factory=list)
    #: max |ONNX - PyTorch| per check: "forward", or "prefill" and "decode" for a KV-cache export
    checks: dict[str, float] = dataclasses.field(default_factory=dict)
    #: the model directory written by ``-o DIR/`` (``path`` is its model.onnx), else ""
    directory: str = ""


def default_task(architectures) -> str:
    """The task ``export`` picks when none is given, from ``config.architectures`` (as Optimum's
    ``auto`` does): a causal LM exports with its KV cache, anything else its hidden states."""
    if any(str(a).endswith(CAUSAL_LM_SUFFIXES) for a in architectures or ()):
        return "text-generation-with-past"
    return "feature-extraction"


def _check_task(task: str) -> None:
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


def _padded_mask(batch: int, seq_len: int):
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
    examples = {"input_ids": ids, "attention_mask": _padded_mask(2, seq_len), "token_type_ids": torch.zeros_like(ids)}
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
class _Plan:
    """What to trace and how: the module, its example inputs (in ``input_names`` order, the cache
    as one list) and the names and dynamic axes of the graph's flattened inputs and outputs."""

    module: object
    example: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: dict  # forward parameter → axes, for the dynamo exporter
    axes: dict[str, dict[int, str]]  # graph input or output → {axis: name}


def _plan(source: str, task: str | None, seq_len: int, attn: str) -> tuple[_Plan, str, Path | None]:
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
        plan = _Plan(_hidden_state_wrapper(model, names), example, names, ["last_hidden_state"], dict(axes), axes)
    elif task == "text-generation":
        names = ["input_ids", "attention_mask"]
        axes = {n: {0: BATCH, 1: SEQUENCE} for n in names}
        example = (_example_ids(model, 2, seq_len), _padded_mask(2, seq_len))
        plan = _Plan(_logits_wrapper(model), example, names, ["logits"], dict(axes), {**axes, "logits": axes["input_ids"]})
    else:
        plan = _with_past_plan(model, seq_len)
    return plan, task, model_dir


def _factory_plan(source: str, task: str) -> _Plan:
    if task == "text-generation-with-past":
        raise OnnxpruneError(f"{source}: a module:function export has no KV cache; "
                             "use --task feature-extraction or text-generation")
    module, names, example = _from_factory(source)
    axes = {n: {0: BATCH, 1: SEQUENCE} for n in names}
    return _Plan(module, example, names, ["logits" if task == "text-generation" else "last_hidden_state"],
                 dict(axes), axes)


def _with_past_plan(model, seq_len: int) -> _Plan:
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
    return _Plan(_with_past_wrapper(model, with_positions), (*example, cache.example(2, past)),
                 names + cache.input_names(), ["logits", *cache.output_names()], dynamic, axes)


def positions(attention_mask, length: int):
    """The position of each of the last ``length`` tokens: the count of attended tokens before it
    (left padding gives the first real token position 0), as transformers' ``generate`` does."""
    import torch

    return (torch.cumsum(attention_mask, -1) - 1).clamp(min=0)[:, -length:]


def export(
    model: str | os.PathLike,
    output: str | os.PathLike,
    seq_len: int = 128,
    opset: int = 20,
    attn: str = "eager",
    log=print,
    task: str | None = None,
) -> ExportReport:
    """Export ``model`` to ``output`` and check the ONNX model against PyTorch on padded inputs.

    ``model`` is a transformers model directory (loaded with ``attn``, one of
    ``ATTENTION_IMPLEMENTATIONS``, and traced on inputs of ``seq_len`` positions) or
    ``module:function`` returning ``(nn.Module, inputs dict)``. ``task`` is one of ``TASKS``;
    None picks the directory's ``default_task`` (a factory's is ``feature-extraction``).
    ``output`` is a ``.onnx`` file, or, when it ends in ``/`` or is a directory, a model
    directory: ``model.onnx`` with the source directory's config, generation config and
    tokenizer files. The dynamo exporter is tried first, TorchScript's when it fails; the report
    says which one wrote the file.
    """
    if attn not in ATTENTION_IMPLEMENTATIONS:
        raise OnnxpruneError(f"attn must be one of {ATTENTION_IMPLEMENTATIONS}, got {attn!r}")
    if task is not None:
        _check_task(task)
    directory = str(output).endswith(("/", os.sep)) or Path(output).is_dir()
    parent = Path(output).parent  # of "out/" too: "."
    if not parent.is_dir():  # before a minute of exporting
        raise OnnxpruneError(f"{parent}: output directory does not exist")
    plan, task, model_dir = _plan(str(model), task, seq_len, attn)
    if directory and model_dir is None:
        raise OnnxpruneError(f"{model}: a model directory output needs a transformers model directory as input")
    # Beside the output: the finished file or directory is renamed into place, not copied.
    with tempfile.TemporaryDirectory(prefix=".onnxprune-export-", dir=parent) as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        exporter, fallback_reason = _export_plan(plan, onnx_path, opset, log)
        _finish(onnx_path, plan.axes)
        checks = _check(plan, task, onnx_path)
        if directory:
            path = _write_directory(Path(output), Path(tmp), model_dir)
        else:
            path = Path(output)
            os.replace(onnx_path, path)
    return ExportReport(str(path), exporter, opset if exporter == "dynamo" else min(opset, 17), plan.input_names,
                        max(checks.values()), fallback_reason, task, plan.output_names, checks,
                        str(output) if directory else "")


def _export_plan(plan: _Plan, path: Path, opset: int, log) -> tuple[str, str]:
    import torch

    exporter, fallback_reason = "dynamo", ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _quiet_export(
                plan.module, plan.example, str(path), input_names=plan.input_names, output_names=plan.output_names,
                dynamo=True, opset_version=opset, dynamic_shapes=plan.dynamic_shapes, external_data=False,
            )
        except Exception as e:  # noqa: BLE001 - any dynamo failure → the TorchScript exporter
            exporter, fallback_reason = "torchscript", f"{type(e).__name__}: {str(e).splitlines()[0]}"
            log(f"dynamo export failed ({fallback_reason}); falling back to the TorchScript exporter")
            torch.onnx.export(
                plan.module, plan.example, str(path), input_names=plan.input_names, output_names=plan.output_names,
                dynamo=False, opset_version=min(opset, 17), dynamic_axes=plan.axes,
            )
    return exporter, fallback_reason


def _finish(path: Path, axes: dict[str, dict[int, str]]) -> None:
    """Name the graph's dynamic axes and let its rotary embeddings take any batch."""
    import onnx

    proto = onnx.load(str(path))
    _name_axes(proto.graph, axes)
    _expand_rotary_caches(proto.graph)
    onnx.save(proto, str(path))


def _name_axes(graph, axes: dict[str, dict[int, str]]) -> None:
    """Give the graph's dynamic axes the plan's names (the dynamo exporter names outputs' axes by
    its symbols, ``s0 + s1``), so that clients can read which axis is which."""
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        for axis, name in axes.get(value.name, {}).items():
            if axis < len(dims) and not dims[axis].HasField("dim_value"):
                dims[axis].dim_param = name


def _expand_rotary_caches(graph) -> None:
    """Expand the cos/sin caches of ONNX ``RotaryEmbedding`` (opset 23) nodes to the batch of their input.

    Without ``position_ids`` the caches must be (batch, sequence, rotary / 2), but transformers
    computes them from positions of batch 1 when the model is not given ``position_ids``: ORT
    rejects such a node for any batch but 1.
    """
    from onnx import helper

    nodes = []
    for node in graph.node:
        positions_given = len(node.input) > 3 and node.input[3]
        if node.op_type == "RotaryEmbedding" and node.domain in ("", "ai.onnx") and not positions_given:
            x, cos, sin = node.input[:3]
            prefix = f"{node.name or node.output[0]}_batched"
            nodes += [
                helper.make_node("Shape", [x], [f"{prefix}_batch"], f"{prefix}_batch", start=0, end=1),
                helper.make_node("Shape", [cos], [f"{prefix}_rest"], f"{prefix}_rest", start=1),
                helper.make_node("Concat", [f"{prefix}_batch", f"{prefix}_rest"], [f"{prefix}_shape"],
                                 f"{prefix}_shape", axis=0),
                helper.make_node("Expand", [cos, f"{prefix}_shape"], [f"{prefix}_cos"], f"{prefix}_cos"),
                helper.make_node("Expand", [sin, f"{prefix}_shape"], [f"{prefix}_sin"], f"{prefix}_sin"),
            ]
            node.input[1], node.input[2] = f"{prefix}_cos", f"{prefix}_sin"
        nodes.append(node)
    if len(nodes) > len(graph.node):
        copies = [type(n)() for n in nodes]
        for copy, original in zip(copies, nodes):
            copy.CopyFrom(original)
        del graph.node[:]
        graph.node.extend(copies)


def _write_directory(output: Path, tmp: Path, model_dir: Path) -> Path:
    """``output/``: model.onnx and the source directory's config and tokenizer files. The
    directory is assembled beside ``output`` and takes its place whole."""
    for name in DIRECTORY_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, tmp / name)
    output = Path(str(output).rstrip("/" + os.sep) or ".")
    if output.exists():
        if not output.is_dir():
            raise OnnxpruneError(f"{output}: exists and is not a directory")
        for name in os.listdir(tmp):
            os.replace(tmp / name, output / name)
    else:
        os.rename(tmp, output)
        tmp.mkdir()  # the TemporaryDirectory's cleanup expects it
        output.chmod(0o777 & ~_umask())  # a temporary directory is made private (0700)
    return output / "model.onnx"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _quiet_export(*args, **kwargs) -> None:
    """The dynamo exporter prints its progress to stdout; keep ours readable."""
    import contextlib
    import io

    import torch

    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(*args, **kwargs)


def _check(plan: _Plan, task: str, onnx_path: Path) -> dict[str, float]:
    """max |ONNX - PyTorch| over all outputs: one forward on the traced inputs, or for a KV-cache
    export a prefill (past of length 0, padded) and a decode step fed the ONNX prefill's cache."""
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    if task != "text-generation-with-past":
        return {"forward": _compare(plan, sess, plan.example)}
    with_positions = "position_ids" in plan.input_names
    ids, _, *rest = plan.example
    past = rest[-1]
    batch, seq_len = ids.shape
    mask = _padded_mask(batch, seq_len)
    empty = [(k[:, :, :0], v[:, :, :0]) for k, v in past]
    prefill = (ids, mask, *([positions(mask, seq_len)] if with_positions else []), empty)
    checks = {"prefill": _compare(plan, sess, prefill)}
    presents = _run(sess, plan, prefill)[1:]
    cache = [(torch.from_numpy(presents[2 * i]), torch.from_numpy(presents[2 * i + 1])) for i in range(len(past))]
    mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
    step = (ids[:, -1:], mask, *([positions(mask, 1)] if with_positions else []), cache)
    checks["decode"] = _compare(plan, sess, step)
    return checks


def _flat(example) -> list:
    """The example inputs as the graph takes them: the cache list flattened."""
    flat = []
    for value in example:
        if isinstance(value, (list, tuple)):
            flat.extend(t for pair in value for t in pair)
        else:
            flat.append(value)
    return flat


def _run(sess, plan: _Plan, example) -> list:
    return sess.run(None, {n: t.numpy() for n, t in zip(plan.input_names, _flat(example))})


def _compare(plan: _Plan, sess, example) -> float:
    import torch

    with torch.no_grad():
        expected = plan.module(*example)
    expected = [t.numpy() for t in _flat(expected if isinstance(expected, tuple) else (expected,))]
    got = _run(sess, plan, example)
    diff = 0.0
    for name, g, e in zip(plan.output_names, got, expected):
        if g.shape != e.shape:
            raise OnnxpruneError(f"exported model gives {name} of shape {g.shape}, PyTorch {e.shape}")
        diff = max(diff, float(np.abs(g - e).max()) if g.size else 0.0)
    return diff
