"""Synthetic inputs for any model, read from its record (``ModelInfo``, weights not loaded): token ids
inside the embedding table, attention masks, float tensors; symbolic axes become the batch (the
first axis) or the sequence length (every other one)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import onnx

from onnxprune.data import Dataset
from onnxprune.errors import OnnxpruneError
from onnxprune.model_io import ModelInfo, read_info

#: Token ids stay below this when the embedding table's size cannot be read.
DEFAULT_VOCAB = 100


@dataclasses.dataclass
class InputSpec:
    name: str
    dtype: np.dtype
    dims: list[int | None]  # None: symbolic or unknown


def input_specs(model: str | os.PathLike | ModelInfo) -> tuple[list[InputSpec], int]:
    """The model's runtime inputs, and the number of token ids its ``input_ids`` may take."""
    info = read_info(model)
    specs = []
    for value in info.inputs:
        if value.elem_type is None:
            raise OnnxpruneError(f"input {value.name!r} is not a tensor; synthetic inputs cover tensors only (pass --data)")
        dims = [d if isinstance(d, int) else None for d in value.shape]
        specs.append(InputSpec(value.name, onnx.helper.tensor_dtype_to_np_dtype(value.elem_type), dims))
    return specs, DEFAULT_VOCAB if info.vocab_size is None else info.vocab_size


def _shape(spec: InputSpec, batch: int, seq_len: int) -> tuple[int, ...]:
    return tuple(d if d is not None else (batch if axis == 0 else seq_len) for axis, d in enumerate(spec.dims))


def synthetic_feeds(specs: list[InputSpec], vocab: int, batch: int, seq_len: int, seed: int = 0,
                    padded: bool = False) -> dict[str, np.ndarray]:
    """One batch. With ``padded``, each example's mask ends at a random length in [seq_len/2, seq_len]."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(seq_len // 2, 1), seq_len + 1, size=batch) if padded else np.full(batch, seq_len)
    feeds = {}
    for spec in specs:
        shape = _shape(spec, batch, seq_len)
        if "mask" in spec.name.lower() and len(shape) == 2:
            feeds[spec.name] = (np.arange(shape[1])[None, :] < lengths[:, None]).astype(spec.dtype)
        elif "type" in spec.name.lower() or spec.dtype == np.bool_:
            feeds[spec.name] = np.zeros(shape, spec.dtype)
        elif np.issubdtype(spec.dtype, np.integer):
            feeds[spec.name] = rng.integers(1, max(min(vocab, 1000), 2), size=shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


def synthetic_dataset(model: str | os.PathLike | ModelInfo, count: int, seq_len: int, seed: int = 0) -> Dataset:
    """``count`` random examples of ``seq_len`` positions (padded masks), as a ``Dataset``."""
    specs, vocab = input_specs(model)
    batch = synthetic_feeds(specs, vocab, count, seq_len, seed=seed, padded=True)
    examples = [{name: array[i] for name, array in batch.items()} for i in range(count)]
    return Dataset(examples, [s.name for s in specs])
