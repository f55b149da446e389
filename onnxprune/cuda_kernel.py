"""ctypes binding of the CUDA kernel's plain C entry point ``onnxprune_bsa_cuda_run``.

It lets torch (or any holder of device pointers) run the op's CUDA kernel without
onnxruntime-gpu: :func:`block_sparse_attention` takes torch CUDA tensors and queues the kernel on
torch's current stream. :func:`run_raw` is the thin layer under it (pointers and shapes), which
also works on a machine without a GPU for shape validation: invalid shapes are reported before
any CUDA call.

No torch import at module level, so the module loads anywhere.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np

from onnxprune.errors import OnnxpruneError

# ONNX element type codes.
FLOAT, INT64, BOOL, FLOAT16, BFLOAT16 = 1, 7, 9, 10, 16

OK, INVALID_ARGUMENT, CUDA_ERROR = 0, 1, 2

_SYMBOL = "onnxprune_bsa_cuda_run"
_ERR_LEN = 1024


class CudaKernelError(OnnxpruneError):
    """The C entry point failed; ``code`` is INVALID_ARGUMENT or CUDA_ERROR."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def has_cuda_kernel(path: str | None = None) -> bool:
    """Whether the custom-op library at ``path`` (default: the package's) was built with CUDA."""
    from onnxprune.runtime import library_path

    return hasattr(ctypes.CDLL(path or library_path()), _SYMBOL)


def load(path: str | None = None) -> ctypes.CDLL:
    """The custom-op library with the entry point's signature declared."""
    from onnxprune.runtime import library_path

    lib = ctypes.CDLL(path or library_path())
    if not hasattr(lib, _SYMBOL):
        raise OnnxpruneError(f"{path or library_path()} was built without the CUDA kernel")
    fn = getattr(lib, _SYMBOL)
    p, shp, i32, i64 = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_int32, ctypes.c_int64
    fn.argtypes = [
        i32, p, shp, p, shp, p, shp, p, shp,  # value type; Q, K, V, layout (pointer, shape)
        p, i32, shp, i32,  # attn_mask, its type, shape, rank
        p, i32, shp,  # key_padding_mask, its type, shape
        shp, shp, i32,  # layout_rule (host memory), its shape, rank
        p, i64, i32, ctypes.c_float, i64, i64,  # Y, block_size, has_scale, scale, is_causal, queries_at_end
        p, ctypes.c_char_p, ctypes.c_size_t,  # stream, err, err_len
    ]
    fn.restype = ctypes.c_int
    return lib


def _shape(dims: Sequence[int] | None):
    if dims is None:
        return None
    return (ctypes.c_int64 * max(len(dims), 1))(*dims)


def run_raw(
    lib: ctypes.CDLL,
    value_type: int,
    q: int | None,
    q_shape: Sequence[int],
    k: int | None,
    k_shape: Sequence[int],
    v: int | None,
    v_shape: Sequence[int],
    layout: int | None,
    layout_shape: Sequence[int],
    y: int | None,
    block_size: int,
    *,
    attn_mask: int | None = None,
    attn_mask_type: int = 0,
    attn_mask_shape: Sequence[int] | None = None,
    key_padding_mask: int | None = None,
    key_padding_mask_type: int = 0,
    key_padding_mask_shape: Sequence[int] | None = None,
    layout_rule=None,
    scale: float | None = None,
    is_causal: int = 0,
    queries_at_end: int = 0,
    stream: int | None = None,
) -> tuple[int, str]:
    """Calls the entry point with raw device addresses; returns (code, message).

    ``layout_rule`` is an int64 array-like ``[Hl, 4]`` in host memory (rows of ``(sink_blocks,
    window_before, window_after, global_query_blocks)``), which the entry point reads there."""
    # The C signature has fixed ranks; report a wrong rank as the op does.
    ranks = [("Q", q_shape, 4, "[B, Hq, Sq, D]"), ("K", k_shape, 4, "[B, Hkv, Sk, D]"),
             ("V", v_shape, 4, "[B, Hkv, Sk, Dv]"), ("layout", layout_shape, 3, "[Hl, Mq, Mk]")]
    if key_padding_mask_shape is not None:
        ranks.append(("key_padding_mask", key_padding_mask_shape, 2, "[B, Sk]"))
    for name, dims, rank, form in ranks:
        if len(dims) != rank:
            shape = "[" + ", ".join(str(int(d)) for d in dims) + "]"
            return INVALID_ARGUMENT, (
                f"BlockSparseAttention: input {name} must have rank {rank} {form}, got shape {shape}"
            )
    rule, rule_shape = None, None
    if layout_rule is not None:
        rule = np.ascontiguousarray(layout_rule)
        if rule.dtype != np.int64:
            return INVALID_ARGUMENT, f"BlockSparseAttention: layout_rule must be int64, got {rule.dtype}"
        rule_shape = rule.shape
    err = ctypes.create_string_buffer(_ERR_LEN)
    code = getattr(lib, _SYMBOL)(
        value_type,
        q, _shape(q_shape), k, _shape(k_shape), v, _shape(v_shape), layout, _shape(layout_shape),
        attn_mask, attn_mask_type, _shape(attn_mask_shape),
        len(attn_mask_shape) if attn_mask_shape is not None else 0,
        key_padding_mask, key_padding_mask_type, _shape(key_padding_mask_shape),
        None if rule is None else rule.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)), _shape(rule_shape),
        0 if rule is None else rule.ndim,
        y, block_size, 0 if scale is None else 1, 0.0 if scale is None else float(scale),
        int(is_causal), int(queries_at_end), stream, err, _ERR_LEN,
    )  # fmt: skip
    return code, err.value.decode("utf-8", "replace")


def _torch_type_code(dtype) -> int:
    import torch

    codes = {torch.float32: FLOAT, torch.float16: FLOAT16, torch.bfloat16: BFLOAT16,
             torch.bool: BOOL, torch.int64: INT64}  # fmt: skip
    if dtype not in codes:
        raise OnnxpruneError(f"unsupported tensor type {dtype}")
    return codes[dtype]


def block_sparse_attention(
    q,
    k,
    v,
    layout,
    block_size: int,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    attn_mask=None,
    key_padding_mask=None,
    layout_rule=None,
    queries_at_end: bool = False,
    out=None,
    lib: ctypes.CDLL | None = None,
):
    """onnxprune.BlockSparseAttention on torch CUDA tensors (queued on the current stream).

    ``out`` (optional) receives Y in place; it is returned. Inputs must be contiguous CUDA
    tensors; ``layout`` uint8 ``[Hl, Mq, Mk]``. ``layout_rule`` (optional) is ``[Hl, 4]``
    integers on the host (a CPU tensor, an array or nested lists), as the op takes it.
    """
    import torch

    if isinstance(layout_rule, torch.Tensor):
        if layout_rule.is_cuda:
            raise OnnxpruneError("layout_rule must be in host memory (a CPU tensor or an array): the kernel reads it there")
        layout_rule = layout_rule.numpy()
    lib = lib or load()
    tensors = {"Q": q, "K": k, "V": v, "layout": layout, "attn_mask": attn_mask,
               "key_padding_mask": key_padding_mask}  # fmt: skip
    for name, t in tensors.items():
        if t is not None and (not t.is_cuda or not t.is_contiguous()):
            raise OnnxpruneError(f"{name} must be a contiguous CUDA tensor")
    if layout.dtype != torch.uint8:
        raise OnnxpruneError(f"layout must be uint8, got {layout.dtype}")
    if out is None:
        out = torch.empty((*q.shape[:3], v.shape[3]), dtype=q.dtype, device=q.device)
    code, msg = run_raw(
        lib,
        _torch_type_code(q.dtype),
        q.data_ptr(), q.shape, k.data_ptr(), k.shape, v.data_ptr(), v.shape,
        layout.data_ptr(), layout.shape, out.data_ptr(), block_size,
        attn_mask=None if attn_mask is None else attn_mask.data_ptr(),
        attn_mask_type=0 if attn_mask is None else _torch_type_code(attn_mask.dtype),
        attn_mask_shape=None if attn_mask is None else attn_mask.shape,
        key_padding_mask=None if key_padding_mask is None else key_padding_mask.data_ptr(),
        key_padding_mask_type=0 if key_padding_mask is None else _torch_type_code(key_padding_mask.dtype),
        key_padding_mask_shape=None if key_padding_mask is None else key_padding_mask.shape,
        layout_rule=layout_rule,
        scale=scale,
        is_causal=int(is_causal),
        queries_at_end=int(queries_at_end),
        stream=torch.cuda.current_stream(q.device).cuda_stream,
    )  # fmt: skip
    if code != OK:
        raise CudaKernelError(code, msg)
    return out
