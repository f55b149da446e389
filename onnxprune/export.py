"""Export a PyTorch / transformers model to ONNX, checked against PyTorch on padded inputs."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from onnxprune.errors import OnnxpruneError
from onnxprune.model_io import atomic_path

#: transformers' ``attn_implementation`` values a model directory is exported with.
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclasses.dataclass
class ExportReport:
    path: str
    exporter: str  # "dynamo" or "torchscript"
    opset: int
    input_names: list[str]
    max_abs_diff: float
    fallback_reason: str = ""


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


def _from_directory(model_dir: Path, seq_len: int, attn: str):
    """A transformers model directory (config.json + weights) and padded example inputs."""
    import torch
    from transformers import AutoModel

    if not (model_dir / "config.json").is_file():
        raise OnnxpruneError(f"{model_dir}: no config.json (not a transformers model directory)")
    try:
        model = AutoModel.from_pretrained(str(model_dir), attn_implementation=attn, local_files_only=True)
    except (OSError, ValueError) as e:
        raise OnnxpruneError(f"{model_dir}: cannot load the model ({e})".splitlines()[0]) from None
    model.eval()
    params = inspect.signature(model.forward).parameters
    input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in params]
    if not getattr(model.config, "type_vocab_size", 0):
        # GPT-2 takes token_type_ids but embeds them with the word embeddings: zeros there would
        # add token 0's embedding to every position. Only models with a token-type table get it.
        input_names = [n for n in input_names if n != "token_type_ids"]
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, vocab - 1), vocab, (2, seq_len), generator=generator)
    mask = torch.ones(2, seq_len, dtype=torch.int64)
    mask[1, seq_len // 2 :] = 0  # padding in the second example, so the check covers masking
    examples = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return model, input_names, tuple(examples[n] for n in input_names)


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


def export(
    model: str | os.PathLike,
    output: str | os.PathLike,
    seq_len: int = 128,
    opset: int = 20,
    attn: str = "eager",
    log=print,
) -> ExportReport:
    """Export ``model`` to ``output`` and check the ONNX model against PyTorch on padded inputs.

    ``model`` is a transformers model directory (loaded with ``attn``, one of
    ``ATTENTION_IMPLEMENTATIONS``, and traced on inputs of ``seq_len`` positions) or
    ``module:function`` returning ``(nn.Module, inputs dict)``. The dynamo exporter is tried
    first, TorchScript's when it fails; the report says which one wrote the file.
    """
    if attn not in ATTENTION_IMPLEMENTATIONS:
        raise OnnxpruneError(f"attn must be one of {ATTENTION_IMPLEMENTATIONS}, got {attn!r}")
    import torch

    source = str(model)
    if ":" in source and not Path(source).exists():
        module, input_names, example = _from_factory(source)
        wrapped = module
    else:
        hf_model, input_names, example = _from_directory(Path(source), seq_len, attn)
        wrapped = _hidden_state_wrapper(hf_model, input_names)
    dynamic = {n: {0: "batch", 1: "sequence"} for n in input_names}
    exporter, fallback_reason = "dynamo", ""
    with atomic_path(output) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _quiet_export(
                wrapped, example, str(tmp), input_names=input_names, output_names=["last_hidden_state"],
                dynamo=True, opset_version=opset, dynamic_shapes=dynamic, external_data=False,
            )
        except Exception as e:  # noqa: BLE001 - any dynamo failure → the TorchScript exporter
            exporter, fallback_reason = "torchscript", f"{type(e).__name__}: {str(e).splitlines()[0]}"
            log(f"dynamo export failed ({fallback_reason}); falling back to the TorchScript exporter")
            torch.onnx.export(
                wrapped, example, str(tmp), input_names=input_names, output_names=["last_hidden_state"],
                dynamo=False, opset_version=min(opset, 17), dynamic_axes=dynamic,
            )
        diff = _check_against_torch(wrapped, example, input_names, tmp)
    return ExportReport(str(output), exporter, opset if exporter == "dynamo" else min(opset, 17), input_names, diff, fallback_reason)


def _quiet_export(*args, **kwargs) -> None:
    """The dynamo exporter prints its progress to stdout; keep ours readable."""
    import contextlib
    import io

    import torch

    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(*args, **kwargs)


def _check_against_torch(module, example, input_names, onnx_path) -> float:
    import onnxruntime as ort
    import torch

    with torch.no_grad():
        expected = module(*example).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: t.numpy() for n, t in zip(input_names, example)})[0]
    if got.shape != expected.shape:
        raise OnnxpruneError(f"exported model gives shape {got.shape}, PyTorch {expected.shape}")
    return float(np.abs(got - expected).max())
