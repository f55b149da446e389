#!/usr/bin/env python3
"""The GPU check of onnxprune's CUDA kernel: build, correctness, speed. One run, < 6 minutes.

    python tools/gpu_check.py                      # build custom_ops/ (sm_90), check, time
    python tools/gpu_check.py --library lib.so     # use a built library
    python tools/gpu_check.py --quick              # correctness + the headline case only
    python tools/gpu_check.py --dry-run            # CPU only: exercise the harness itself

Sections, each guarded so that one failure does not lose the rest; results go to
$OUT/gpu_check.json (or --out), rewritten after every case:
 1. build: cmake + ninja of custom_ops/ for sm_90 only (the architectures can be overridden).
 2. correctness: the kernel (through its C entry point, torch tensors, ctypes) against a float64
    torch reference on fresh random inputs: float16 / bfloat16 / float32, head sizes 32, 64, 128
    and odd ones (80, 40, 24), block sizes 16..128, Sq and Sk not multiples of the block, one
    block, batch > 1, key padding, causal, grouped heads, float and bool attn_mask, fully masked
    rows, shared and per-head layouts. Outputs are poisoned (NaN) first. Also bad shapes: the
    entry point must return the op's error message.
 3. ORT CUDA EP end to end, only where onnxruntime-gpu is installed.
 4. speed: S = 4096, 8192, 16384; D = 64, 128; float16 and bfloat16; 50 / 90 / 95 % of blocks
    pruned (random per-head layouts, diagonal kept, the same number of blocks per row): this
    kernel vs dense SDPA (flash backend, and cuDNN where available) vs FlexAttention
    (torch.compile'd; compile time excluded) given the same block mask via create_block_mask;
    the dense matmul rate of the same dtype measured in the same run. Medians of
    triton.testing.do_bench (CUDA events, L2 flushed between runs), inputs rotated over
    several random sets, never zeros.
The table printed last is the summary; the JSON has every number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


class Results:
    """The JSON report, rewritten atomically after every update."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {"sections": {}, "errors": []}

    def set(self, section: str, key: str, value) -> None:
        self.data["sections"].setdefault(section, {})[key] = value
        self.flush()

    def append(self, section: str, value) -> None:
        self.data["sections"].setdefault(section, [])
        self.data["sections"][section].append(value)
        self.flush()

    def error(self, where: str, exc: BaseException) -> None:
        tb = traceback.format_exc(limit=6)
        log(f"ERROR in {where}: {type(exc).__name__}: {exc}")
        self.data["errors"].append({"where": where, "error": f"{type(exc).__name__}: {exc}", "tb": tb})
        self.flush()

    def flush(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


# ---------------------------------------------------------------------------------------------
# 1. build


def build_library(build_dir: Path, archs: str, res: Results) -> Path:
    headers = os.environ.get("ONNXRUNTIME_INCLUDE_DIR") or next(
        (str(p) for p in (ROOT / "ort-headers", ROOT / "build" / "ort-headers") if (p / "onnxruntime_c_api.h").exists()),
        "",
    )
    if not headers:
        raise RuntimeError("ORT headers not found (set ONNXRUNTIME_INCLUDE_DIR or carry ort-headers/)")
    configure = [
        "cmake", "-S", str(ROOT / "custom_ops"), "-B", str(build_dir), "-G", "Ninja",
        f"-DONNXRUNTIME_INCLUDE_DIR={headers}", "-DONNXPRUNE_WITH_CUDA=ON",
        f"-DCMAKE_CUDA_ARCHITECTURES={archs}", "-DCMAKE_BUILD_TYPE=Release",
    ]  # fmt: skip
    t = time.time()
    conf = subprocess.run(configure, check=True, capture_output=True, text=True)
    t_conf = time.time() - t
    res.set("build", "configure_log", conf.stdout[-3000:])
    res.set("build", "env", {k: os.environ.get(k) for k in ("CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS", "CUDAHOSTCXX")})
    t = time.time()
    out = subprocess.run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 4)],
                         check=False, capture_output=True, text=True)  # fmt: skip
    if out.returncode != 0:
        print(out.stdout[-4000:], out.stderr[-4000:])
        raise RuntimeError("library build failed")
    res.set("build", "configure_s", round(t_conf, 1))
    res.set("build", "compile_s", round(time.time() - t, 1))
    res.set("build", "archs", archs)
    lib = build_dir / "libonnxprune_ops.so"
    log(f"built {lib} (configure {t_conf:.1f}s, compile {time.time() - t:.1f}s, {archs})")
    return lib


# ---------------------------------------------------------------------------------------------
# reference and inputs


def reference(q, k, v, layout, bs, scale=None, causal=False, attn_mask=None, kpm=None):
    """Float64 torch reference of onnxprune.BlockSparseAttention (materialises Sq x Sk)."""
    import torch

    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = scale * torch.einsum("bhid,bhjd->bhij", q, k)
    qi = torch.arange(Sq, device=q.device) // bs
    kj = torch.arange(Sk, device=q.device) // bs
    lay = layout.bool()[:, qi][:, :, kj]  # [Hl, Sq, Sk]
    allowed = lay.expand(Hq, Sq, Sk)[None].expand(B, Hq, Sq, Sk).clone()
    if kpm is not None:
        allowed &= (kpm != 0)[:, None, None, :]
    if causal:
        allowed &= torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed &= attn_mask.expand(B, Hq, Sq, Sk)
        else:
            s = s + attn_mask.double().expand(B, Hq, Sq, Sk)
    s = s.masked_fill(~allowed, float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True)
    dead = torch.isneginf(row_max)
    e = torch.exp(s - torch.where(dead, torch.zeros_like(row_max), row_max))
    p = torch.where(dead, torch.zeros_like(e), e / e.sum(-1, keepdim=True).clamp_min(1e-300))
    return torch.einsum("bhij,bhjd->bhid", p, v)


def random_layout(gen, heads, mq, mk, keep, diagonal=True, device="cpu"):
    """uint8 [heads, mq, mk]: about `keep` of each row's blocks, the diagonal kept."""
    import torch

    lay = (torch.rand(heads, mq, mk, generator=gen) < keep).to(torch.uint8)
    if diagonal:
        idx = torch.arange(min(mq, mk))
        lay[:, idx, idx] = 1
    return lay.to(device)


def balanced_layout(gen, heads, m, pruned, device):
    """uint8 [heads, m, m]: exactly round((1 - pruned) * m) kept blocks per row, diagonal included."""
    import torch

    n_keep = max(1, round((1.0 - pruned) * m))
    scores = torch.rand(heads, m, m, generator=gen, device=gen.device).cpu()
    idx = torch.arange(m)
    scores[:, idx, idx] = 2.0  # the diagonal first
    top = scores.topk(n_keep, dim=-1).indices
    lay = torch.zeros(heads, m, m, dtype=torch.uint8)
    lay.scatter_(-1, top, 1)
    return lay.to(device)


# ---------------------------------------------------------------------------------------------
# 2. correctness

TOL = {"float32": 2e-5, "float16": 3e-3, "bfloat16": 2e-2}


def correctness_cases():
    """(name, dict) cases; every option of the op appears in several dtypes and head sizes."""
    cases = []

    def add(name, **kw):
        base = dict(B=1, Hq=2, Hkv=2, Sq=64, Sk=64, D=64, Dv=None, bs=64, keep=0.5, shared=False,
                    causal=False, mask=None, pad=None, scale=None, dead_rows=False, dtype="float16")  # fmt: skip
        base.update(kw)
        cases.append((name, base))

    for dt in ("float16", "bfloat16", "float32"):
        for D in (32, 64, 128, 80):
            add(f"{dt}-D{D}-plain", dtype=dt, D=D, Sq=200, Sk=200, bs=64, keep=0.6)
        add(f"{dt}-odd-S-bs16", dtype=dt, Sq=77, Sk=77, bs=16, keep=0.4)
        add(f"{dt}-odd-S-bs32-causal", dtype=dt, Sq=150, Sk=150, bs=32, keep=0.5, causal=True)
        add(f"{dt}-bs128-gqa-pad", dtype=dt, B=2, Hq=8, Hkv=2, Sq=300, Sk=300, bs=128, keep=0.7, pad="bool")
        add(f"{dt}-one-block", dtype=dt, Sq=16, Sk=16, bs=16, keep=1.0)
        add(f"{dt}-one-row", dtype=dt, Sq=1, Sk=90, bs=32, keep=0.8)
        add(f"{dt}-cross-Sq!=Sk", dtype=dt, B=2, Sq=70, Sk=130, bs=32, keep=0.5, shared=True)
        add(f"{dt}-float-mask-4d", dtype=dt, B=2, Hq=4, Hkv=4, Sq=100, Sk=100, bs=32, mask="float4d")
        add(f"{dt}-bool-mask-2d-causal", dtype=dt, Sq=96, Sk=96, bs=16, mask="bool2d", causal=True)
        add(f"{dt}-float-mask-b1s-int64-pad", dtype=dt, B=2, Sq=130, Sk=130, bs=64, mask="floatB11S", pad="int64")
        add(f"{dt}-dead-rows", dtype=dt, B=2, Hq=4, Hkv=1, Sq=128, Sk=128, bs=32, dead_rows=True, mask="bool4d")
        add(f"{dt}-scale-D40-Dv24", dtype=dt, D=40, Dv=24, Sq=66, Sk=66, bs=16, scale=0.3)
        add(f"{dt}-D128-bs128-causal-long", dtype=dt, Hq=4, Hkv=2, D=128, Sq=520, Sk=520, bs=128, causal=True, keep=0.5)
        add(f"{dt}-D64-bs64-causal-long", dtype=dt, D=64, Sq=700, Sk=700, bs=64, causal=True, keep=0.3)
    return cases


def make_inputs(c, device, gen):
    import torch

    dt = getattr(torch, c["dtype"])
    Dv = c["Dv"] or c["D"]
    bs = c["bs"]
    mq, mk = -(-c["Sq"] // bs), -(-c["Sk"] // bs)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dt)

    q = rnd(c["B"], c["Hq"], c["Sq"], c["D"])
    k = rnd(c["B"], c["Hkv"], c["Sk"], c["D"])
    v = rnd(c["B"], c["Hkv"], c["Sk"], Dv)
    lay = random_layout(gen, 1 if c["shared"] else c["Hq"], mq, mk, c["keep"], device=device)
    if c["dead_rows"]:
        lay[:, 1, :] = 0  # query block 1: nothing kept -> rows of zeros
    mask = None
    if c["mask"] == "float4d":
        mask = (torch.randn(c["B"], c["Hq"], c["Sq"], c["Sk"], generator=gen) * 2).to(device=device, dtype=dt)
        mask[..., 3, :] = float("-inf")  # a row masked by -inf: zeros
    elif c["mask"] == "floatB11S":
        mask = (torch.randn(c["B"], 1, 1, c["Sk"], generator=gen)).to(device=device, dtype=dt)
    elif c["mask"] == "bool2d":
        mask = (torch.rand(c["Sq"], c["Sk"], generator=gen) < 0.7).to(device)
    elif c["mask"] == "bool4d":
        mask = (torch.rand(c["B"], c["Hq"], c["Sq"], c["Sk"], generator=gen) < 0.8).to(device)
        mask[:, :, 5, :] = False  # a fully masked row
    kpm = None
    if c["pad"] is not None:
        lengths = torch.randint(1, c["Sk"] + 1, (c["B"],), generator=gen)
        valid = torch.arange(c["Sk"])[None, :] < lengths[:, None]
        kpm = valid.to(device=device, dtype=torch.bool if c["pad"] == "bool" else torch.int64)
    return q, k, v, lay, mask, kpm


#: Tile shapes the library can be told to use (ONNXPRUNE_CUDA_TILE, for measuring), per block size.
TILE_VARIANTS = {128: ("bm64", "mt2"), 64: ("bm64", "mt2")}


def with_tile(variant, fn):
    """Runs fn() with ONNXPRUNE_CUDA_TILE=variant (None: the library's default)."""
    if variant is None:
        return fn()
    os.environ["ONNXPRUNE_CUDA_TILE"] = variant
    try:
        return fn()
    finally:
        os.environ.pop("ONNXPRUNE_CUDA_TILE", None)


def check_correctness(ck, lib, device, res, dry_run):
    import torch

    gen = torch.Generator().manual_seed(int(time.time()))  # fresh inputs every run
    n_ok = n_fail = 0
    cases = []
    for name, c in correctness_cases():
        cases.append((name, c, None))
        if not dry_run:
            cases += [(f"{name}[tile={v}]", c, v) for v in TILE_VARIANTS.get(c["bs"], ())]
    for name, c, variant in cases:
        try:
            q, k, v, lay, mask, kpm = make_inputs(c, device, gen)
            ref = reference(q, k, v, lay, c["bs"], c["scale"], c["causal"], mask, kpm)
            if dry_run:
                out = ref.to(q.dtype)
            else:
                out = torch.full(ref.shape, float("nan"), dtype=q.dtype, device=device)  # poison
                with_tile(variant, lambda: ck.block_sparse_attention(
                    q, k, v, lay, c["bs"], scale=c["scale"], is_causal=c["causal"], attn_mask=mask,
                    key_padding_mask=kpm, out=out, lib=lib))  # fmt: skip
                torch.cuda.synchronize()
            outd = out.double()
            finite = bool(torch.isfinite(outd).all())
            rel = float((outd - ref).norm() / ref.norm().clamp_min(1e-30))
            dead = ref.abs().amax(-1) == 0  # rows that must be exactly 0
            dead_ok = bool((outd.abs().amax(-1)[dead] == 0).all()) if finite else False
            ok = finite and dead_ok and rel <= TOL[c["dtype"]]
            n_ok += ok
            n_fail += not ok
            res.append("correctness", {"case": name, "ok": ok, "rel_err": rel, "finite": finite,
                                       "n_dead_rows": int(dead.sum()), "dead_rows_zero": dead_ok,
                                       "tol": TOL[c["dtype"]], "params": c})  # fmt: skip
            if not ok:
                log(f"FAIL {name}: rel {rel:.2e} finite {finite} dead_ok {dead_ok}")
        except Exception as e:  # noqa: BLE001
            n_fail += 1
            res.error(f"correctness {name}", e)
    log(f"correctness: {n_ok} passed, {n_fail} failed")
    res.set("summary", "correctness", {"passed": n_ok, "failed": n_fail})
    return n_fail == 0


def check_errors(ck, lib, res):
    """Bad shapes: the entry point returns the op's error (same text as the CPU kernel's)."""
    cases = [
        (dict(q_shape=[2, 4, 41, 16], queries_at_end=1), ["queries_at_end", "Sq=41", "Sk=40"]),
        (dict(layout_rule=[[0, -2, 0, 0]]), ["layout_rule head 0", "window_before=-2"]),
        (dict(k_shape=[2, 4, 40, 8]), ["D=16", "D=8"]),
        (dict(q_shape=[2, 6, 40, 16], layout_shape=[1, 3, 3]), ["Hq=6", "Hkv=4"]),
        (dict(block_size=48), ["block_size", "48"]),
        (dict(q_shape=[4, 40, 16]), ["rank 4"]),
    ]
    ok_all = True
    for over, frags in cases:
        kw = dict(q_shape=[2, 4, 40, 16], k_shape=[2, 4, 40, 16], v_shape=[2, 4, 40, 16],
                  layout_shape=[1, 3, 3], block_size=16)  # fmt: skip
        kw.update(over)
        code, msg = ck.run_raw(lib, ck.FLOAT16, None, kw["q_shape"], None, kw["k_shape"], None, kw["v_shape"],
                               None, kw["layout_shape"], None, kw["block_size"], layout_rule=kw.get("layout_rule"),
                               queries_at_end=kw.get("queries_at_end", 0))  # fmt: skip
        ok = code == ck.INVALID_ARGUMENT and all(f in msg for f in frags)
        ok_all &= ok
        res.append("errors", {"case": over, "code": code, "message": msg, "ok": ok})
    log(f"error messages: {'ok' if ok_all else 'FAILED'}")
    return ok_all


# ---------------------------------------------------------------------------------------------
# 3. ORT CUDA EP end to end (only with onnxruntime-gpu)


def check_ort_cuda(lib_path, res):
    import numpy as np
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        res.set("ort_cuda", "status", f"skipped: onnxruntime {ort.__version__} has no CUDAExecutionProvider")
        log("ORT CUDA EP: not available (CPU onnxruntime); skipped")
        return
    from onnx import TensorProto, helper

    B, H, S, D, bs = 1, 4, 256, 64, 64
    m = S // bs
    rng = np.random.default_rng()
    layout = (rng.random((H, m, m)) < 0.5).astype(np.uint8)
    layout[:, np.arange(m), np.arange(m)] = 1
    node = helper.make_node("BlockSparseAttention", ["Q", "K", "V", "layout"], ["Y"], domain="onnxprune",
                            block_size=bs, is_causal=1)  # fmt: skip
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT16, [B, H, S, D]) for n in "QKV"]
    graph = helper.make_graph([node], "g", ins, [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, None)],
                              initializer=[helper.make_tensor("layout", TensorProto.UINT8, layout.shape,
                                                              layout.tobytes(), raw=True)])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("onnxprune", 1)])
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(lib_path))
    so.enable_profiling = False
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CUDAExecutionProvider"])
    feeds = {n: rng.standard_normal((B, H, S, D)).astype(np.float16) for n in "QKV"}
    (y,) = sess.run(None, feeds)
    import torch

    ref = reference(*(torch.from_numpy(feeds[n]) for n in "QKV"), torch.from_numpy(layout), bs, causal=True)
    rel = float((torch.from_numpy(y).double() - ref).norm() / ref.norm())
    res.set("ort_cuda", "status", "ran")
    res.set("ort_cuda", "rel_err", rel)
    log(f"ORT CUDA EP: rel err {rel:.2e}")


# ---------------------------------------------------------------------------------------------
# 4. speed


def bench(fn, warmup=20, rep=80):
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def matmul_rate(dtype, n=8192):
    import torch

    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = bench(lambda: torch.mm(a, b))
    return 2 * n**3 / (ms * 1e-3) / 1e12


class Flex:
    """torch.compile'd flex_attention, compiled once per shape (compile time measured apart)."""

    def __init__(self):
        import torch
        from torch.nn.attention.flex_attention import flex_attention

        self.fn = torch.compile(flex_attention, dynamic=False)
        self.compiled: set = set()
        self.checked_mask = False

    @staticmethod
    def block_mask(layout, bs):
        """The layout as a BlockMask: every kept block full (no mask_mod calls), per head."""
        import torch
        from torch.nn.attention.flex_attention import BlockMask

        lay = layout.bool()
        full_num = lay.sum(-1, dtype=torch.int32)[None]  # [1, H, M]
        full_idx = torch.argsort(lay.to(torch.int8), dim=-1, descending=True, stable=True)
        full_idx = full_idx.to(torch.int32)[None]  # kept blocks first, ascending
        return BlockMask.from_kv_blocks(torch.zeros_like(full_num), torch.zeros_like(full_idx),
                                        full_num, full_idx, BLOCK_SIZE=bs)  # fmt: skip

    @staticmethod
    def same_as_create_block_mask(layout, bs, S) -> bool:
        """Whether create_block_mask (mask_mod reading the layout) gives the same blocks."""
        import torch
        from torch.nn.attention.flex_attention import create_block_mask

        lay = layout.bool()

        def mask_mod(b, h, q_idx, kv_idx):
            return lay[h, q_idx // bs, kv_idx // bs]

        ref = create_block_mask(mask_mod, None, lay.shape[0], S, S, device=layout.device, BLOCK_SIZE=bs)
        mine = Flex.block_mask(layout, bs)
        n = mine.full_kv_num_blocks
        same = bool(torch.equal(ref.full_kv_num_blocks.to(n.dtype), n))
        same &= bool((ref.kv_num_blocks == 0).all())
        mask_idx = torch.arange(n.shape[-1] if n.dim() else 0, device=n.device)
        cols = mask_idx[None, None, None, :] < n[..., None]
        ref_idx = ref.full_kv_indices[..., : mine.full_kv_indices.shape[-1]]
        same &= bool(torch.equal(torch.where(cols, ref_idx.to(torch.int32), 0),
                                 torch.where(cols, mine.full_kv_indices[..., : ref_idx.shape[-1]], 0)))  # fmt: skip
        return same

    def run(self, q, k, v, bm):
        return self.fn(q, k, v, block_mask=bm)


def time_case(S, D, dtype_name, B, H, bs, pruned_list, ck, lib, flex, do_flex, res, gen, rates, variants=()):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dt = getattr(torch, dtype_name)
    n_sets = 3  # rotate inputs so repeated runs do not see the same (L2-resident) data

    def rnd():
        return torch.randn(B, H, S, D, generator=gen, device="cuda").to(dt)

    sets = [(rnd(), rnd(), rnd()) for _ in range(n_sets)]
    counter = [0]

    def next_set():
        counter[0] = (counter[0] + 1) % n_sets
        return sets[counter[0]]

    dense_flops = 4.0 * B * H * S * S * D
    row = {"S": S, "D": D, "dtype": dtype_name, "B": B, "H": H, "bs": bs}
    for backend, key in ((SDPBackend.FLASH_ATTENTION, "sdpa_flash_ms"), (SDPBackend.CUDNN_ATTENTION, "sdpa_cudnn_ms")):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(*sets[0])
                row[key] = bench(lambda: F.scaled_dot_product_attention(*next_set()))
        except Exception as e:  # noqa: BLE001
            res.error(f"{key} S={S} D={D} {dtype_name}", e)
    res.append("dense", dict(row))
    log(f"S={S} D={D} {dtype_name}: flash {row.get('sdpa_flash_ms', float('nan')):.3f} ms, "
        f"cudnn {row.get('sdpa_cudnn_ms', float('nan')):.3f} ms")  # fmt: skip

    m = S // bs
    for pruned in pruned_list:
        r = dict(row, pruned=pruned)
        try:
            lay = balanced_layout(gen, H, m, pruned, "cuda")
        except Exception as e:  # noqa: BLE001
            res.error(f"layout S={S} p={pruned}", e)
            continue
        try:
            kept = int(lay.sum())
            r["kept_fraction"] = kept / (H * m * m)
            kept_flops = 4.0 * B * kept * bs * bs * D
            out = torch.full((B, H, S, D), float("nan"), dtype=dt, device="cuda")
            q, k, v = sets[0]
            ck.block_sparse_attention(q, k, v, lay, bs, out=out, lib=lib)
            torch.cuda.synchronize()
            r["ours_finite"] = bool(torch.isfinite(out).all())

            def ours():
                q, k, v = next_set()
                ck.block_sparse_attention(q, k, v, lay, bs, out=out, lib=lib)

            r["ours_ms"] = bench(ours)
            ck.block_sparse_attention(q, k, v, lay, bs, out=out, lib=lib)
            ref_out = out.clone()
            for variant in variants:  # other tile shapes: same output, time
                try:
                    out.fill_(float("nan"))
                    with_tile(variant, lambda: ck.block_sparse_attention(q, k, v, lay, bs, out=out, lib=lib))
                    r[f"tile_{variant}_max_abs_diff"] = float((out.float() - ref_out.float()).abs().max())
                    r[f"ours_ms_{variant}"] = with_tile(variant, lambda: bench(ours))
                except Exception as e:  # noqa: BLE001
                    res.error(f"tile {variant} S={S} D={D} {dtype_name} p={pruned}", e)
            r["ours_tflops_kept"] = kept_flops / (r["ours_ms"] * 1e-3) / 1e12
            r["ours_frac_of_matmul"] = r["ours_tflops_kept"] / rates[dtype_name]
            if "sdpa_flash_ms" in r:
                r["speedup_vs_flash"] = r["sdpa_flash_ms"] / r["ours_ms"]
            r["dense_flops"] = dense_flops
        except Exception as e:  # noqa: BLE001
            res.error(f"ours S={S} D={D} {dtype_name} p={pruned}", e)
        if do_flex:
            try:
                bm = flex.block_mask(lay, bs)
                if S == 4096 and not flex.checked_mask:
                    flex.checked_mask = True
                    same = flex.same_as_create_block_mask(lay, bs, S)
                    res.set("flex", "block_mask_equals_create_block_mask", same)
                    log(f"flex: BlockMask from the layout == create_block_mask: {same}")
                key = (S, D, dtype_name)
                t = time.time()
                y = flex.run(*sets[0], bm)
                torch.cuda.synchronize()
                if key not in flex.compiled:
                    r["flex_compile_s"] = time.time() - t
                    flex.compiled.add(key)
                # same numbers as ours (fp16 rounding apart)?
                if "ours_ms" in r:
                    ck.block_sparse_attention(*sets[0], lay, bs, out=out, lib=lib)
                    r["flex_vs_ours_max_abs"] = float((y.float() - out.float()).abs().max())
                r["flex_ms"] = bench(lambda: flex.run(*next_set(), bm))
                if "ours_ms" in r:
                    r["speedup_vs_flex"] = r["flex_ms"] / r["ours_ms"]
            except Exception as e:  # noqa: BLE001
                res.error(f"flex S={S} D={D} {dtype_name} p={pruned}", e)
        res.append("speed", r)
        log(f"  p={pruned}: ours {r.get('ours_ms', float('nan')):.3f} ms "
            f"({r.get('ours_tflops_kept', float('nan')):.0f} TFLOP/s kept), flex {r.get('flex_ms', float('nan')):.3f} ms")  # fmt: skip
    del sets
    torch.cuda.empty_cache()


def speed_sweep(ck, lib, res, args):
    import torch

    gen = torch.Generator(device="cuda").manual_seed(1234)
    rates = {}
    for name in ("float16", "bfloat16"):
        try:
            rates[name] = matmul_rate(getattr(torch, name))
            res.set("matmul_tflops", name, rates[name])
            log(f"dense {name} matmul 8192^3: {rates[name]:.0f} TFLOP/s")
        except Exception as e:  # noqa: BLE001
            res.error(f"matmul {name}", e)
            rates[name] = float("nan")
    flex = None
    try:
        flex = Flex()
    except Exception as e:  # noqa: BLE001
        res.error("flex import", e)
    B, H, bs = 1, 16, 128
    headline = (8192, 64, "float16")
    plan = [headline]
    if not args.quick:
        for dtype_name in ("float16", "bfloat16"):
            for D in (64, 128):
                for S in args.sizes:
                    if (S, D, dtype_name) != headline:
                        plan.append((S, D, dtype_name))
    # FlexAttention compiles per shape (~10-30 s each): float16 D=64 at every S, and S=8192 with
    # D=128 float16 and D=64 bfloat16 (five compiles).
    for S, D, dtype_name in plan:
        if time.time() - T0 > args.budget_s:
            log(f"time budget reached: skipping S={S} D={D} {dtype_name} and later cases")
            res.append("skipped", {"S": S, "D": D, "dtype": dtype_name})
            continue
        do_flex = flex is not None and (
            (dtype_name == "float16" and (D == 64 or S == 8192)) or (D == 64 and S == 8192)
        )
        pruned_list = (0.5, 0.9, 0.95)
        try:
            variants = TILE_VARIANTS[bs] if S == 8192 else ()
            time_case(S, D, dtype_name, B, H, bs, pruned_list, ck, lib, flex, do_flex, res, gen, rates, variants)
        except Exception as e:  # noqa: BLE001
            res.error(f"speed S={S} D={D} {dtype_name}", e)
    # Block size 64 at the headline shape (our kernel only; flex's tiles are 128).
    if time.time() - T0 < args.budget_s:
        try:
            time_case(8192, 64, "float16", B, H, 64, (0.9,), ck, lib, None, False, res, gen, rates, TILE_VARIANTS[64])
        except Exception as e:  # noqa: BLE001
            res.error("speed bs=64", e)


def print_table(res):
    speed = res.data["sections"].get("speed", [])
    rates = res.data["sections"].get("matmul_tflops", {})
    lines = ["| S | D | dtype | bs | pruned | ours ms | flash ms | cudnn ms | flex ms | vs flash | vs flex | TFLOP/s kept | of matmul |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def f(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) and x == x else "-"

    for r in speed:
        lines.append(
            f"| {r['S']} | {r['D']} | {r['dtype'][:4]} | {r['bs']} | {r['pruned']:.2f} | {f(r.get('ours_ms'), '.3f')} | "
            f"{f(r.get('sdpa_flash_ms'), '.3f')} | {f(r.get('sdpa_cudnn_ms'), '.3f')} | {f(r.get('flex_ms'), '.3f')} | "
            f"{f(r.get('speedup_vs_flash'), '.2f')}x | {f(r.get('speedup_vs_flex'), '.2f')}x | "
            f"{f(r.get('ours_tflops_kept'), '.0f')} | {f(r.get('ours_frac_of_matmul'), '.2f')} |"
        )
    tiles = [r for r in speed if any(k.startswith("ours_ms_") for k in r)]
    if tiles:
        lines.append("")
        lines.append("| S | D | dtype | bs | pruned | default ms | " + " | ".join(f"{v} ms" for v in ("bm64", "mt2")) + " |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in tiles:
            cells = [f(r.get(f"ours_ms_{v}"), ".3f") for v in ("bm64", "mt2")]
            lines.append(f"| {r['S']} | {r['D']} | {r['dtype'][:4]} | {r['bs']} | {r['pruned']:.2f} | "
                         f"{f(r.get('ours_ms'), '.3f')} | " + " | ".join(cells) + " |")  # fmt: skip
    corr = res.data["sections"].get("summary", {}).get("correctness", {})
    print()
    print(f"matmul TFLOP/s: {', '.join(f'{k} {v:.0f}' for k, v in rates.items())}; "
          f"correctness: {corr}; errors: {len(res.data['errors'])}")  # fmt: skip
    print("\n".join(lines), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", help="use this built libonnxprune_ops.so instead of building")
    ap.add_argument("--build-dir", default="/tmp/onnxprune-gpu-build")
    ap.add_argument("--archs", default="90-real", help="CMAKE_CUDA_ARCHITECTURES for the build")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_check.json)")
    ap.add_argument("--quick", action="store_true", help="correctness and the headline case only")
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting speed cases after this")
    ap.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=[4096, 8192, 16384],
                    help="sequence lengths of the speed sweep (comma-separated)")
    ap.add_argument("--dry-run", action="store_true", help="CPU only: the harness with the reference as kernel")
    args = ap.parse_args(argv)

    out = Path(args.out or Path(os.environ.get("OUT", "out")) / "gpu_check.json")
    res = Results(out)
    import torch

    res.set("env", "torch", torch.__version__)
    if args.dry_run:
        check_correctness(None, None, "cpu", res, dry_run=True)
        print_table(res)
        return 0
    res.set("env", "device", torch.cuda.get_device_name())
    res.set("env", "sm_count", torch.cuda.get_device_properties(0).multi_processor_count)
    log(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")

    from onnxprune import cuda_kernel as ck

    lib_path = Path(args.library) if args.library else None
    if lib_path is None:
        try:
            lib_path = build_library(Path(args.build_dir), args.archs, res)
        except Exception as e:  # noqa: BLE001
            res.error("build", e)
            if isinstance(e, subprocess.CalledProcessError):
                print(e.stdout[-3000:], e.stderr[-3000:])
            return 1
    lib = ck.load(str(lib_path))
    for name, fn in (("errors", lambda: check_errors(ck, lib, res)),
                     ("correctness", lambda: check_correctness(ck, lib, "cuda", res, dry_run=False)),
                     ("ort_cuda", lambda: check_ort_cuda(lib_path, res)),
                     ("speed", lambda: speed_sweep(ck, lib, res, args))):  # fmt: skip
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            res.error(name, e)
    log(f"done; JSON at {out}")
    print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
