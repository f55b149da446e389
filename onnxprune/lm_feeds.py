"""Inputs of a causal LM exported with its KV cache (``export --task text-generation-with-past``,
Optimum's names): which inputs text gives, and the rest for a run over the text alone (an empty
cache and the positions), as calibration needs.
"""

from __future__ import annotations

import re

import numpy as np

from onnxprune.errors import OnnxpruneError
from onnxprune.model_io import ModelInfo, ModelInput

#: ``past_key_values.{layer}.key|value``
PAST_INPUT = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
POSITIONS_INPUT = "position_ids"


def cache_inputs(info: ModelInfo) -> list[ModelInput]:
    """The model's KV cache inputs, in graph order (empty for a model without a cache)."""
    return [i for i in info.inputs if PAST_INPUT.match(i.name)]


def data_input_names(info: ModelInfo) -> list[str]:
    """The inputs a dataset gives (``input_ids``, ``attention_mask``, ...): all but the cache and
    the positions, which ``with_empty_cache`` derives."""
    return [n for n in info.input_names if not PAST_INPUT.match(n) and n != POSITIONS_INPUT]


def positions(attention_mask: np.ndarray, length: int) -> np.ndarray:
    """The position of each of the last ``length`` tokens: the number of attended tokens before it
    (left padding gives the first real token position 0), as transformers' ``generate`` counts."""
    counted = np.cumsum(attention_mask != 0, axis=-1, dtype=np.int64) - 1
    return np.maximum(counted, 0)[:, counted.shape[1] - length:]


def cache_shape(cache_input: ModelInput) -> tuple[int, int]:
    """``(Hkv, D)`` of a cache input ``[batch, Hkv, past, D]``."""
    shape = cache_input.shape
    if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise OnnxpruneError(f"cache input {cache_input.name} has shape {list(shape)}; "
                             "expected [batch, kv_heads, past_sequence, head_size] with fixed heads and head size")
    return shape[1], shape[3]


def empty_cache(info: ModelInfo, batch: int) -> dict[str, np.ndarray]:
    """A cache of length 0 for each of the model's cache inputs (a prefill's past)."""
    cache = {}
    for cache_input in cache_inputs(info):
        heads, size = cache_shape(cache_input)
        cache[cache_input.name] = np.zeros((batch, heads, 0, size), _float_type(cache_input))
    return cache


def with_empty_cache(info: ModelInfo, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` (``input_ids`` and ``attention_mask`` ``[B, S]``) plus what a with-past model
    also takes to run over them alone: a cache of length 0 and ``position_ids``. ``feeds`` as they
    are for a model without a cache."""
    if not cache_inputs(info):
        return feeds
    ids = feeds["input_ids"]
    batch, length = ids.shape
    mask = feeds.get("attention_mask")
    mask = np.ones((batch, length), np.int64) if mask is None else mask
    extra = {POSITIONS_INPUT: positions(mask, length)} if POSITIONS_INPUT in info.input_names else {}
    return {**feeds, **extra, **empty_cache(info, batch)}


def _float_type(cache_input: ModelInput):
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(cache_input.elem_type or onnx.TensorProto.FLOAT)
