"""The CUDA build of the custom-op library: it loads and serves the CPU kernel on machines without
a GPU, its plain C entry point validates like the op, and (on a GPU) the kernel matches the
float64 reference."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxprune import cuda_kernel as ck

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bsa_reference import block_sparse_attention_ref  # noqa: E402

def _library_has_cuda() -> bool:
    try:
        return ck.has_cuda_kernel()
    except OSError:
        return False


pytestmark = pytest.mark.skipif(
    not _library_has_cuda(), reason="custom-op library built without CUDA (no nvcc at build time)"
)


def _gpu_present() -> bool:
    """A GPU the kernel could run on (torch may be a CPU build even where one exists)."""
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


def _torch_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _one_node_model(q_shape, k_shape, v_shape, layout, block_size, is_causal=0, elem=TensorProto.FLOAT,
                    layout_rule=None, queries_at_end=0):
    inputs = ["Q", "K", "V", "layout"] + (["", "", "layout_rule"] if layout_rule is not None else [])
    node = helper.make_node(
        "BlockSparseAttention", inputs, ["Y"], domain="onnxprune",
        block_size=block_size, is_causal=is_causal, queries_at_end=queries_at_end,
    )  # fmt: skip
    inputs = [helper.make_tensor_value_info(n, elem, s) for n, s in zip("QKV", (q_shape, k_shape, v_shape))]
    initializers = [helper.make_tensor("layout", TensorProto.UINT8, layout.shape, layout.tobytes(), raw=True)]
    if layout_rule is not None:
        rule = np.asarray(layout_rule, dtype=np.int64)
        initializers.append(helper.make_tensor("layout_rule", TensorProto.INT64, rule.shape, rule.tobytes(), raw=True))
    graph = helper.make_graph(
        [node], "bsa", inputs, [helper.make_tensor_value_info("Y", elem, None)], initializer=initializers
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("onnxprune", 2)], ir_version=10
    )


def _cpu_session(model, ops_library):
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.register_custom_ops_library(ops_library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


# ---- CPU-only machines (CI) ------------------------------------------------------------------


@pytest.mark.parametrize("is_causal", [0, 1])
def test_cuda_build_runs_the_cpu_kernel(ops_library, is_causal):
    """The library with the CUDA ops registered still loads (no GPU, no driver) and the CPU
    session runs the CPU kernel, matching the reference."""
    rng = np.random.default_rng()
    B, Hq, Hkv, S, D, bs = 2, 4, 2, 50, 24, 16
    m = -(-S // bs)
    layout = (rng.random((Hq, m, m)) < 0.5).astype(np.uint8)
    layout[:, np.arange(m), np.arange(m)] = 1
    q = rng.standard_normal((B, Hq, S, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, S, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, S, D)).astype(np.float32)
    sess = _cpu_session(_one_node_model(q.shape, k.shape, v.shape, layout, bs, is_causal), ops_library)
    (y,) = sess.run(None, {"Q": q, "K": k, "V": v})
    ref = block_sparse_attention_ref(q, k, v, layout, bs, is_causal=bool(is_causal))
    np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_only_entry_points_are_exported(ops_library):
    """A statically linked CUDA runtime (or libstdc++) must not leak symbols into the host process:
    exported, they bind to or interpose other copies there (seen: a crash in std::ostringstream)."""
    out = subprocess.run(["nm", "-D", "--defined-only", ops_library], check=True, capture_output=True, text=True)
    exported = {line.split()[-1] for line in out.stdout.splitlines() if line.strip()}
    assert exported == {"RegisterCustomOps", "onnxprune_bsa_cuda_run", "OnnxpruneCpuIsa"}


#: (overrides of the valid shapes, block_size, layout rule, queries_at_end) that bsa_validate rejects.
_BAD_SHAPES = {
    "more-queries-than-keys-at-end": dict(q=[2, 4, 41, 16], queries_at_end=1),
    "rule-negative-window": dict(rule=[[0, -2, 0, 0]]),
    "rule-negative-sink": dict(rule=[[-1, 0, 0, 0]]),
    "rule-shape": dict(rule=[[0, 0, 0]]),
    "rule-heads": dict(rule=[[0, 0, 0, 0]] * 4),
    "batch": dict(k=[1, 4, 40, 16], v=[1, 4, 40, 16]),
    "head-size": dict(k=[2, 4, 40, 8]),
    "heads-not-divisible": dict(q=[2, 6, 40, 16]),
    "layout-heads": dict(layout=[2, 3, 3]),
    "v-length": dict(v=[2, 4, 30, 16]),
    "block-size": dict(block_size=48),
}


@pytest.mark.parametrize("case", sorted(_BAD_SHAPES))
def test_entry_point_errors_match_the_cpu_op(ops_library, case):
    """The C entry point rejects bad shapes with the same message as the op on the CPU."""
    shapes = dict(q=[2, 4, 40, 16], k=[2, 4, 40, 16], v=[2, 4, 40, 16], layout=[1, 3, 3], block_size=16, rule=None,
                  queries_at_end=0)  # fmt: skip
    shapes.update(_BAD_SHAPES[case])
    layout = np.ones(shapes["layout"], dtype=np.uint8)
    code, msg = ck.run_raw(
        ck.load(ops_library), ck.FLOAT, None, shapes["q"], None, shapes["k"], None, shapes["v"], None,
        shapes["layout"], None, shapes["block_size"], layout_rule=shapes["rule"],
        queries_at_end=shapes["queries_at_end"],
    )  # fmt: skip
    assert code == ck.INVALID_ARGUMENT

    sess = _cpu_session(
        _one_node_model(shapes["q"], shapes["k"], shapes["v"], layout, shapes["block_size"],
                        layout_rule=shapes["rule"], queries_at_end=shapes["queries_at_end"]),
        ops_library,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(shapes[n.lower()]).astype(np.float32) for n in "QKV"}
    with pytest.raises(Exception) as excinfo:
        sess.run(None, feeds)
    assert msg and msg in str(excinfo.value)


@pytest.mark.parametrize(
    "value_type, kwargs, fragment",
    [
        (ck.INT64, {}, "input Q must be float32, float16 or bfloat16, got int64"),
        (ck.FLOAT16, dict(attn_mask=1, attn_mask_type=ck.FLOAT, attn_mask_shape=[40, 40]),
         "attn_mask must be bool or float16 (the type of Q), got float32"),
        (ck.BFLOAT16, dict(attn_mask=1, attn_mask_type=ck.BOOL, attn_mask_shape=[3, 40, 40]),
         "attn_mask shape [3, 40, 40] is not broadcastable to [B, Hq, Sq, Sk] = [2, 4, 40, 40]"),
        (ck.FLOAT16, dict(key_padding_mask=1, key_padding_mask_type=ck.BOOL, key_padding_mask_shape=[2, 41]),
         "key_padding_mask shape [2, 41] must be [B, Sk] = [2, 40]"),
        (ck.FLOAT16, dict(key_padding_mask=1, key_padding_mask_type=ck.BOOL, key_padding_mask_shape=[80]),
         "input key_padding_mask must have rank 2 [B, Sk], got shape [80]"),
        (ck.FLOAT16, dict(layout_rule=np.zeros((1, 4), np.int32)), "layout_rule must be int64"),
        (ck.BFLOAT16, dict(layout_rule=np.zeros(4, np.int64)), "layout_rule shape [4] must be [Hl, 4] = [1, 4]"),
        (ck.FLOAT16, dict(layout_rule=[[0, 0, -1, -1]]), "layout_rule head 0: global_query_blocks=-1 must be >= 0"),
    ],
)  # fmt: skip
def test_entry_point_type_and_mask_errors(ops_library, value_type, kwargs, fragment):
    shape = [2, 4, 40, 16]
    code, msg = ck.run_raw(
        ck.load(ops_library), value_type, None, shape, None, shape, None, shape, None, [1, 3, 3], None, 16, **kwargs
    )
    assert code == ck.INVALID_ARGUMENT
    assert fragment in msg


def test_entry_point_empty_output_needs_no_gpu(ops_library):
    """B = 0: nothing to compute, no CUDA call, success on any machine."""
    shape = [0, 4, 40, 16]
    code, msg = ck.run_raw(ck.load(ops_library), ck.FLOAT16, None, shape, None, shape, None, shape, None, [1, 3, 3], None, 16)
    assert (code, msg) == (ck.OK, "")


@pytest.mark.skipif(_gpu_present(), reason="a GPU is present: the launch would run")
@pytest.mark.parametrize("value_type, D", [(ck.FLOAT, 16), (ck.FLOAT16, 64), (ck.BFLOAT16, 128)])
def test_entry_point_without_gpu_reports_a_cuda_error(ops_library, value_type, D):
    """Valid shapes on a machine without a GPU or driver: a CUDA error code and message, no crash."""
    shape = [1, 2, 40, 64]
    code, msg = ck.run_raw(ck.load(ops_library), value_type, 16, shape, 16, shape, 16, shape, 16, [1, 3, 3], 16, 16)
    assert code == ck.CUDA_ERROR
    assert msg.startswith("BlockSparseAttention (CUDA): ") and "cuda" in msg.lower()


# ---- with a GPU ------------------------------------------------------------------------------


_GPU_CASES = {
    # name: (dtype, B, Hq, Hkv, Sq, Sk, D, block, causal, mask, padding, queries_at_end, rule)
    # rule: a layout of 2 x 2 blocks continued by a per-head layout_rule; otherwise a full layout.
    "f16-d64-bs64": ("float16", 2, 4, 4, 200, 200, 64, 64, False, None, None, False, False),
    "bf16-d128-bs128-causal-gqa": ("bfloat16", 1, 8, 2, 300, 300, 128, 128, True, None, None, False, False),
    "f16-d32-bs16-boolmask-pad": ("float16", 2, 2, 1, 77, 77, 32, 16, False, "bool", "bool", False, False),
    "bf16-d80-bs32-floatmask": ("bfloat16", 1, 2, 2, 100, 130, 80, 32, False, "float", None, False, False),
    "f32-d40-bs16-causal-int64pad": ("float32", 2, 2, 2, 66, 66, 40, 16, True, None, "int64", False, False),
    "f16-d64-bs64-rule-causal": ("float16", 1, 4, 2, 700, 700, 64, 64, True, None, None, False, True),
    "bf16-d128-bs128-decode-rule": ("bfloat16", 2, 4, 1, 1, 900, 128, 128, True, None, "bool", True, True),
    "f16-d64-bs64-chunk-aligned": ("float16", 1, 4, 4, 128, 450, 64, 64, True, None, None, True, True),
    "f16-d32-bs128-chunk-unaligned": ("float16", 1, 2, 2, 77, 500, 32, 128, True, "bool", None, True, True),
    "bf16-d64-bs16-chunk-floatmask": ("bfloat16", 2, 2, 2, 33, 260, 64, 16, False, "float", "bool", True, True),
    "f32-d40-bs32-decode-rule": ("float32", 1, 4, 2, 5, 333, 40, 32, True, None, "int64", True, True),
}


@pytest.mark.gpu
@pytest.mark.skipif(not _torch_cuda(), reason="needs torch with a CUDA device")
@pytest.mark.parametrize("case", sorted(_GPU_CASES))
def test_cuda_kernel_matches_reference(ops_library, case):
    """Through the C entry point (torch tensors, ctypes), fresh random inputs, poisoned output."""
    import torch

    dtype, B, Hq, Hkv, Sq, Sk, D, bs, causal, mask, pad, at_end, with_rule = _GPU_CASES[case]
    rng = np.random.default_rng()
    tdt = getattr(torch, dtype)
    q = rng.standard_normal((B, Hq, Sq, D))
    k = rng.standard_normal((B, Hkv, Sk, D))
    v = rng.standard_normal((B, Hkv, Sk, D))
    mq, mk = (2, 2) if with_rule else (-(-Sk // bs) if at_end else -(-Sq // bs), -(-Sk // bs))
    layout = (rng.random((Hq, mq, mk)) < 0.6).astype(np.uint8)
    rule = None
    if with_rule:
        rule = np.stack([rng.integers(0, 3, Hq), rng.choice([-1, 0, 2], Hq), rng.choice([-1, 0, 1], Hq),
                         rng.integers(0, 2, Hq)], axis=1).astype(np.int64)
        rule[0] = (1, 1, 0, 0)
    attn = None
    if mask == "bool":
        attn = rng.random((Sq, Sk)) < 0.8
    elif mask == "float":
        attn = rng.standard_normal((B, 1, Sq, Sk))
    kpm = None
    if pad is not None:
        lengths = rng.integers(1, Sk + 1, size=B)
        kpm = (np.arange(Sk)[None, :] < lengths[:, None]).astype(np.bool_ if pad == "bool" else np.int64)

    def dev(x, dt=tdt):
        return None if x is None else torch.from_numpy(np.ascontiguousarray(x)).to("cuda", dt)

    tq, tk, tv = dev(q), dev(k), dev(v)
    tattn = None if attn is None else dev(attn, torch.bool if attn.dtype == np.bool_ else tdt)
    tkpm = None if kpm is None else dev(kpm, torch.bool if pad == "bool" else torch.int64)
    out = torch.full((B, Hq, Sq, D), float("nan"), dtype=tdt, device="cuda")
    ck.block_sparse_attention(tq, tk, tv, dev(layout, torch.uint8), bs, is_causal=causal, attn_mask=tattn,
                              key_padding_mask=tkpm, layout_rule=rule, queries_at_end=at_end, out=out,
                              lib=ck.load(ops_library))  # fmt: skip
    torch.cuda.synchronize()
    # The reference sees the inputs as rounded to the kernel's type.
    rounded = [x.double().cpu().numpy() for x in (tq, tk, tv)]
    attn_ref = None if tattn is None else (tattn.cpu().numpy() if mask == "bool" else tattn.double().cpu().numpy())
    ref = block_sparse_attention_ref(*rounded, layout, bs, is_causal=causal, attn_mask=attn_ref, key_padding_mask=kpm,
                                     layout_rule=rule, queries_at_end=at_end)
    got = out.double().cpu().numpy()
    assert np.isfinite(got).all()
    rel = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
    assert rel < {"float32": 2e-5, "float16": 3e-3, "bfloat16": 2e-2}[dtype], rel


@pytest.mark.gpu
@pytest.mark.parametrize("with_rule", [False, True], ids=["layout", "rule-at-end"])
def test_ort_cuda_execution_provider(ops_library, with_rule):
    """End to end through ONNX Runtime's CUDA EP (needs onnxruntime-gpu); the rule reaches the CUDA
    op in host memory."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxprune[gpu])")
    rng = np.random.default_rng()
    B, H, S, D, bs = 1, 4, 256, 64, 64
    m = 2 if with_rule else S // bs
    layout = (rng.random((H, m, m)) < 0.5).astype(np.uint8)
    layout[:, np.arange(m), np.arange(m)] = 1
    rule = np.array([[1, 1, 0, 0]] * H, np.int64) if with_rule else None
    sq = 100 if with_rule else S
    q_shape, shape = [B, H, sq, D], [B, H, S, D]
    model = _one_node_model(q_shape, shape, shape, layout, bs, 1, elem=TensorProto.FLOAT16, layout_rule=rule,
                            queries_at_end=int(with_rule))
    options = ort.SessionOptions()
    options.register_custom_ops_library(ops_library)
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CUDAExecutionProvider"])
    feeds = {n: rng.standard_normal(q_shape if n == "Q" else shape).astype(np.float16) for n in "QKV"}
    (y,) = sess.run(None, feeds)
    ref = block_sparse_attention_ref(*(feeds[n].astype(np.float64) for n in "QKV"), layout, bs, is_causal=True,
                                     layout_rule=rule, queries_at_end=with_rule)
    assert y.dtype == np.float16
    rel = np.linalg.norm(y.astype(np.float64) - ref) / np.linalg.norm(ref)
    assert rel < 3e-3
