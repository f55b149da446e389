"""Export a PyTorch / transformers model to ONNX (what to trace per task: ``export_tasks``),
checked against PyTorch on padded inputs; ``-o DIR/`` writes a model directory."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from onnxprune.errors import OnnxpruneError
from onnxprune.export_tasks import Plan, check_task, make_plan, padded_mask, positions

#: transformers' ``attn_implementation`` values a model directory is exported with.
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


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
    ``module:function`` returning ``(nn.Module, inputs dict)``. ``task`` is one of ``export_tasks.TASKS``;
    None picks the directory's ``default_task`` (a factory's is ``feature-extraction``).
    ``output`` is a ``.onnx`` file, or, when it ends in ``/`` or is a directory, a model
    directory: ``model.onnx`` with the source directory's config, generation config and
    tokenizer files. The dynamo exporter is tried first, TorchScript's when it fails; the report
    says which one wrote the file.
    """
    if attn not in ATTENTION_IMPLEMENTATIONS:
        raise OnnxpruneError(f"attn must be one of {ATTENTION_IMPLEMENTATIONS}, got {attn!r}")
    if task is not None:
        check_task(task)
    directory = str(output).endswith(("/", os.sep)) or Path(output).is_dir()
    parent = Path(output).parent  # of "out/" too: "."
    if not parent.is_dir():  # before a minute of exporting
        raise OnnxpruneError(f"{parent}: output directory does not exist")
    plan, task, model_dir = make_plan(str(model), task, seq_len, attn)
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


def _export_plan(plan: Plan, path: Path, opset: int, log) -> tuple[str, str]:
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


def _check(plan: Plan, task: str, onnx_path: Path) -> dict[str, float]:
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
    mask = padded_mask(batch, seq_len)
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


def _run(sess, plan: Plan, example) -> list:
    return sess.run(None, {n: t.numpy() for n, t in zip(plan.input_names, _flat(example))})


def _compare(plan: Plan, sess, example) -> float:
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
