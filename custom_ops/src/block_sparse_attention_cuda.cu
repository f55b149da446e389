// Block-sparse attention on NVIDIA GPUs (op onnxprune.BlockSparseAttention).
//
// Two kernels:
//  * bsa_mma_kernel: float16 / bfloat16, head size D == Dv, D % 8 == 0,
//    D <= 128 (padded to 32, 64 or 128). Flash-attention-2 style: a CTA owns
//    BM query rows of one (batch, head), each warp 16 or 32 of them; the CTA
//    walks only the 64-key tiles that the layout keeps (a compacted list
//    built in shared memory from the layout), pipelines K and V tiles with
//    cp.async (2 or 3 stages), computes S = Q K^T and O += P V with
//    mma.sync.m16n8k16 (fp32 accumulators) and keeps an online softmax in
//    registers. Nothing of size Sq x Sk ever exists.
//  * bsa_generic_kernel: any type (float32 in particular) and any head sizes.
//    One warp per query row on CUDA cores, same semantics, same skipping of
//    pruned blocks; meant to be right, not fast.
//
// Tiles and layout blocks: query tiles of BM = 128 rows for block size 128
// and head size <= 64, BM = 64 otherwise (tile_for below), and 64-key tiles.
// For block_size >= 64 every tile lies inside one layout block, so a tile is
// either computed whole or skipped.
// For block_size 16 and 32 a tile spans several layout blocks: it is computed
// when any of them is kept, a warp skips it when none of its rows' blocks is
// kept, and the pruned sub-blocks are masked per element. Query tiles are local
// (query i at absolute position i + q_off): with queries_at_end and an offset
// that is not a multiple of the tile height, tiles straddle block rows and take
// the same per-element path.
//
// Blocks beyond the layout's explicit [Mq, Mk] region follow the head's
// layout_rule (passed by value in the launch parameters, clamped to int32), or
// are all kept without one.
#include "block_sparse_attention_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <vector>

namespace onnxprune {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kListCap = 256;  // key tiles listed per pass over the layout row
// Layout heads whose rule fits in the launch parameters (kMaxRuleHeads * 16 bytes).
constexpr int kMaxRuleHeads = 128;

struct KParams {
  const void* q;
  const void* k;
  const void* v;
  const uint8_t* layout;
  const void* attn_mask;
  const void* kpm;
  void* y;
  int B, Hq, Hkv, Sq, Sk, D, Dv;
  int Hl, Mq, Mk, bs, group;
  int nqt;           // query tiles per (batch, head) (mma kernel)
  float scale;       // natural units (generic kernel)
  float scale_log2;  // scale * log2(e) (mma kernel works in base 2)
  int causal;
  int q_off;      // absolute position of query 0 (Sk - Sq with queries_at_end, else 0)
  int has_rule;   // 0: blocks beyond the explicit region are all kept
  int mask_kind;  // 0 none, 1 bool, 2 float (value type)
  int pad_kind;   // 0 none, 1 bool, 2 int64
  long long ms[4];  // attn_mask element strides over [B, Hq, Sq, Sk]
  int rule[kMaxRuleHeads][kRuleColumns];  // layout_rule rows (Hl of them) when has_rule
};

// ---- small device helpers ---------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two floats -> one 32-bit register of two 16-bit values (lo in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float ex2(float x) {  // 2^x; ex2(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; `valid` false writes 16 zero bytes instead.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D(16x8, f32) += A(16x16) * B(16x8).
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                 uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Block (rb, cb), rb of the absolute query position: the layout's inside its
// explicit region, else the rule's (every block without one).
__device__ __forceinline__ bool layout_kept(const KParams& p, int hl, int rb, int cb) {
  if (rb < p.Mq && cb < p.Mk) return __ldg(p.layout + (static_cast<int64_t>(hl) * p.Mq + rb) * p.Mk + cb) != 0;
  return !p.has_rule || bsa_rule_keeps(p.rule[hl], rb, cb);
}

// Any kept (and not causally excluded) layout block among absolute query
// positions [r0, r1) and keys [j0, j1) (both ranges non-empty).
__device__ __forceinline__ bool any_block_kept(const KParams& p, int hl, int r0, int r1, int j0,
                                               int j1) {
  const int rb0 = r0 / p.bs, rb1 = (r1 - 1) / p.bs;
  const int cb0 = j0 / p.bs, cb1 = (j1 - 1) / p.bs;
  for (int rb = rb0; rb <= rb1; ++rb) {
    for (int cb = cb0; cb <= cb1; ++cb) {
      if (p.causal && cb > rb) break;
      if (layout_kept(p, hl, rb, cb)) return true;
    }
  }
  return false;
}

// Element mask beyond the layout block: key padding, causal, attn_mask.
// Returns the additive term (natural units) or -inf.
template <typename T>
__device__ __forceinline__ float element_bias(const KParams& p, int b, int h, int i, int j) {
  if (p.causal && j > i + p.q_off) return -INFINITY;
  if (p.pad_kind == 1) {
    if (__ldg(static_cast<const uint8_t*>(p.kpm) + static_cast<int64_t>(b) * p.Sk + j) == 0)
      return -INFINITY;
  } else if (p.pad_kind == 2) {
    if (__ldg(static_cast<const long long*>(p.kpm) + static_cast<int64_t>(b) * p.Sk + j) == 0)
      return -INFINITY;
  }
  if (p.mask_kind != 0) {
    const int64_t off = b * p.ms[0] + h * p.ms[1] + i * p.ms[2] + j * p.ms[3];
    if (p.mask_kind == 1) {
      if (__ldg(static_cast<const uint8_t*>(p.attn_mask) + off) == 0) return -INFINITY;
    } else {
      return to_float<T>(static_cast<const T*>(p.attn_mask)[off]);
    }
  }
  return 0.0f;
}

// ---- tensor-core kernel -----------------------------------------------------

// NW warps of WM = 16 * MT query rows each (MT m16 tiles per warp: every K / V
// fragment read from shared memory feeds MT mma instructions), 64-key tiles,
// a STAGES-deep cp.async pipeline of K / V tiles.
template <int HD, int NW, int MT, int STAGES_>
struct MmaConfig {
  static constexpr int WM = 16 * MT;  // query rows per warp
  static constexpr int BM = WM * NW;  // query rows per CTA
  static constexpr int BN = 64;       // keys per tile
  static constexpr int LD = HD + 8;   // smem row pitch (elements): conflict-free ldmatrix
  static constexpr int NT = NW * 32;
  static constexpr int STAGES = STAGES_;
  static constexpr int PASSES = kListCap / NT;
  static constexpr size_t smem_bytes(size_t elem) {
    return static_cast<size_t>(BM + 2 * STAGES * BN) * LD * elem +
           (kListCap + PASSES * NW) * sizeof(int);
  }
};

// MINB: CTAs per SM the register allocation must allow (e.g. 4 CTAs of 4
// warps cap a thread at 128 registers).
template <typename T, int HD, int NW, int MT, int STAGES, int MINB>
__global__ void __launch_bounds__(NW * 32, MINB) bsa_mma_kernel(const KParams p) {
  using C = MmaConfig<HD, NW, MT, STAGES>;
  constexpr int BM = C::BM, BN = C::BN, LD = C::LD, NT = C::NT, WM = C::WM;
  constexpr int CH = HD / 8;  // 16-byte chunks per row
  static_assert(kListCap % NT == 0, "list passes");
  static_assert(STAGES >= 2, "pipeline depth");

  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + BM * LD;           // STAGES tiles
  T* sV = sK + STAGES * BN * LD;  // STAGES tiles
  int* sList = reinterpret_cast<int*>(sV + STAGES * BN * LD);
  int* sCnt = sList + kListCap;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  int bid = blockIdx.x;
  const int qt = p.nqt - 1 - bid % p.nqt;  // late query tiles (most causal work) first
  bid /= p.nqt;
  const int h = bid % p.Hq, b = bid / p.Hq;
  const int hk = h / p.group;
  const int hl = p.Hl == 1 ? 0 : h;
  const int q0 = qt * BM;
  const int q1 = min(q0 + BM, p.Sq);
  const int w0 = q0 + warp * WM;      // this warp's first row
  const int w1 = min(w0 + WM, p.Sq);  // (w0 >= w1: the warp has no rows)
  // A tile spans several layout blocks (small blocks, or block rows shifted by the query offset).
  const bool union_tiles = p.bs < BN || p.bs < BM || p.q_off % BM != 0;
  const int off = p.q_off;

  const T* Qg = static_cast<const T*>(p.q) + (static_cast<int64_t>(b) * p.Hq + h) * p.Sq * p.D;
  const T* Kg = static_cast<const T*>(p.k) + (static_cast<int64_t>(b) * p.Hkv + hk) * p.Sk * p.D;
  const T* Vg = static_cast<const T*>(p.v) + (static_cast<int64_t>(b) * p.Hkv + hk) * p.Sk * p.D;

  // Q tile -> smem (rows past Sq and columns past D are zero).
  for (int c = tid; c < BM * CH; c += NT) {
    const int r = c / CH, cc = c % CH, i = q0 + r;
    const bool ok = i < p.Sq && cc * 8 < p.D;
    cp_async16(smem_addr(sQ + r * LD + cc * 8), ok ? Qg + static_cast<int64_t>(i) * p.D + cc * 8 : Qg,
               ok);
  }
  cp_async_commit();

  auto load_kv = [&](int kt, int stage) {
    const int j0 = kt * BN;
    T* dK = sK + stage * BN * LD;
    T* dV = sV + stage * BN * LD;
    for (int c = tid; c < BN * CH; c += NT) {
      const int r = c / CH, cc = c % CH, j = j0 + r;
      const bool ok = j < p.Sk && cc * 8 < p.D;
      const int64_t off = ok ? static_cast<int64_t>(j) * p.D + cc * 8 : 0;
      cp_async16(smem_addr(dK + r * LD + cc * 8), Kg + off, ok);
      cp_async16(smem_addr(dV + r * LD + cc * 8), Vg + off, ok);
    }
  };

  // Q fragments live in registers for MT = 1; for MT > 1 they are re-read from
  // shared memory per tile (registers go to the larger S and O tiles).
  constexpr bool kQInRegs = MT == 1;
  uint32_t qf[kQInRegs ? MT : 1][kQInRegs ? HD / 16 : 1][4];
  float acc[MT][HD / 8][4];
  float m_run[MT][2], l_run[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int dn = 0; dn < HD / 8; ++dn) acc[mt][dn][0] = acc[mt][dn][1] = acc[mt][dn][2] = acc[mt][dn][3] = 0.0f;
    m_run[mt][0] = m_run[mt][1] = -INFINITY;
    l_run[mt][0] = l_run[mt][1] = 0.0f;
  }
  bool q_ready = false;

  const int nkt = (p.Sk + BN - 1) / BN;
  const int kt_end = p.causal ? min(nkt, (q1 - 1 + off) / BN + 1) : nkt;

  for (int c0 = 0; c0 < kt_end; c0 += kListCap) {
    // Compact the kept key tiles of [c0, c0 + kListCap) into sList, in order.
    __syncthreads();  // previous pass is done with sList / sCnt / the K, V stages
    const int cend = min(c0 + kListCap, kt_end);
    bool keep[C::PASSES];
    unsigned ballot[C::PASSES];
#pragma unroll
    for (int r = 0; r < C::PASSES; ++r) {
      const int kt = c0 + r * NT + tid;
      keep[r] = kt < cend && any_block_kept(p, hl, q0 + off, q1 + off, kt * BN, min(kt * BN + BN, p.Sk));
      ballot[r] = __ballot_sync(0xffffffffu, keep[r]);
      if (lane == 0) sCnt[r * NW + warp] = __popc(ballot[r]);
    }
    __syncthreads();
    int count = 0;
    for (int x = 0; x < C::PASSES * NW; ++x) count += sCnt[x];
    const unsigned lanes_below = (1u << lane) - 1u;
#pragma unroll
    for (int r = 0; r < C::PASSES; ++r) {
      if (keep[r]) {
        int pos = __popc(ballot[r] & lanes_below);
        for (int x = 0; x < r * NW + warp; ++x) pos += sCnt[x];
        sList[pos] = c0 + r * NT + tid;
      }
    }
    __syncthreads();
    if (count == 0) continue;

    // Pipeline: while tile n is used, tiles n+1 .. n+STAGES-1 are in flight.
    // Every step commits one cp.async group (possibly empty), so "all but
    // the newest STAGES-2 groups complete" means tile n (and Q) has landed.
#pragma unroll
    for (int n = 0; n < STAGES - 1; ++n) {
      if (n < count) load_kv(sList[n], n);
      cp_async_commit();
    }
    for (int n = 0; n < count; ++n) {
      const int stage = n % STAGES;
      const int kt = sList[n];
      cp_async_wait<STAGES - 2>();
      // One barrier per tile: tile n is visible to all warps, and all warps are
      // done with tile n-1, whose stage the next load overwrites.
      __syncthreads();
      if (n + STAGES - 1 < count) load_kv(sList[n + STAGES - 1], (n + STAGES - 1) % STAGES);
      cp_async_commit();

      if (kQInRegs && !q_ready) {  // Q fragments, once (the Q copy was the oldest group)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int row = warp * WM + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
          for (int kk = 0; kk < HD / 16; ++kk) {
            ldmatrix_x4(qf[kQInRegs ? mt : 0][kQInRegs ? kk : 0],
                        smem_addr(sQ + row * LD + kk * 16 + (lane >> 4) * 8));
          }
        }
        q_ready = true;
      }

      const int j0 = kt * BN;
      bool active = w0 < w1 && (!p.causal || j0 <= w1 - 1 + off);
      if (active && union_tiles) active = any_block_kept(p, hl, w0 + off, w1 + off, j0, min(j0 + BN, p.Sk));
      if (!active) continue;

      const T* cK = sK + stage * BN * LD;
      const T* cV = sV + stage * BN * LD;
      float s[MT][BN / 8][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.0f;
      }
      // S = Q K^T.
#pragma unroll
      for (int kk = 0; kk < HD / 16; ++kk) {
        uint32_t qs[MT][4];
        if (!kQInRegs) {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const int row = warp * WM + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
            ldmatrix_x4(qs[mt], smem_addr(sQ + row * LD + kk * 16 + (lane >> 4) * 8));
          }
        }
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
          uint32_t bk[4];
          ldmatrix_x4(bk, smem_addr(cK + (np * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 +
                                    ((lane >> 3) & 1) * 8));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const uint32_t(&a)[4] = kQInRegs ? qf[kQInRegs ? mt : 0][kQInRegs ? kk : 0] : qs[mt];
            mma16816<T>(s[mt][2 * np], a, bk[0], bk[1]);
            mma16816<T>(s[mt][2 * np + 1], a, bk[2], bk[3]);
          }
        }
      }
      // Scale (base 2) and mask. Without masking (the common case), the scale
      // is folded into the exponent's FFMA (the max is taken on raw scores).
      const bool need_mask = j0 + BN > p.Sk || (p.causal && j0 + BN - 1 > w0 + off) || union_tiles ||
                             p.pad_kind != 0 || p.mask_kind != 0 || !(p.scale_log2 > 0.0f);
      const float sc = need_mask ? 1.0f : p.scale_log2;  // multiplier inside the exponent
      if (need_mask) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int i = w0 + mt * 16 + g + (e >> 1) * 8;
              const int j = j0 + nt * 8 + 2 * t + (e & 1);
              float x = s[mt][nt][e] * p.scale_log2;
              if (i >= p.Sq || j >= p.Sk || (union_tiles && !layout_kept(p, hl, (i + off) / p.bs, j / p.bs))) {
                x = -INFINITY;
              } else {
                x += element_bias<T>(p, b, h, i, j) * kLog2e;
              }
              s[mt][nt][e] = x;
            }
          }
        }
      }
      // Online softmax (rows g and g + 8 of each m tile; a row lives in 4 lanes).
      uint32_t pa[MT][BN / 16][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
          mx[0] = fmaxf(mx[0], fmaxf(s[mt][nt][0], s[mt][nt][1]));
          mx[1] = fmaxf(mx[1], fmaxf(s[mt][nt][2], s[mt][nt][3]));
        }
        float alpha[2], m_use[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
          mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
          const float m_new = fmaxf(m_run[mt][r], mx[r] * sc);
          m_use[r] = m_new == -INFINITY ? 0.0f : m_new;  // all masked so far: p = 0, no NaN
          alpha[r] = ex2(m_run[mt][r] - m_use[r]);
          m_run[mt][r] = m_new;
        }
        float rs[2] = {0.0f, 0.0f};
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[mt][nt][e] = ex2(fmaf(s[mt][nt][e], sc, -m_use[e >> 1]));
            rs[e >> 1] += s[mt][nt][e];
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) l_run[mt][r] = l_run[mt][r] * alpha[r] + rs[r];
        if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {  // max moved
#pragma unroll
          for (int dn = 0; dn < HD / 8; ++dn) {
            acc[mt][dn][0] *= alpha[0];
            acc[mt][dn][1] *= alpha[0];
            acc[mt][dn][2] *= alpha[1];
            acc[mt][dn][3] *= alpha[1];
          }
        }
        // P as A fragments (from the S accumulator layout).
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          pa[mt][kk][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
          pa[mt][kk][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
          pa[mt][kk][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
          pa[mt][kk][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
        }
      }
      // O += P V (V^T fragments by ldmatrix.trans).
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
        for (int dp = 0; dp < HD / 16; ++dp) {
          uint32_t bv[4];
          ldmatrix_x4_trans(bv, smem_addr(cV + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD +
                                          dp * 16 + (lane >> 4) * 8));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma16816<T>(acc[mt][2 * dp], pa[mt][kk], bv[0], bv[1]);
            mma16816<T>(acc[mt][2 * dp + 1], pa[mt][kk], bv[2], bv[3]);
          }
        }
      }
    }
  }
  cp_async_wait<0>();

  // Epilogue: O / l; rows with nothing kept (l == 0) give 0.
  T* Yg = static_cast<T*>(p.y) + (static_cast<int64_t>(b) * p.Hq + h) * p.Sq * p.D;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_run[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      const int i = w0 + mt * 16 + g + r * 8;
      if (i >= p.Sq) continue;
      T* yrow = Yg + static_cast<int64_t>(i) * p.D;
#pragma unroll
      for (int dn = 0; dn < HD / 8; ++dn) {
        const int d = dn * 8 + 2 * t;
        if (d < p.D) {
          *reinterpret_cast<uint32_t*>(yrow + d) = pack2<T>(acc[mt][dn][2 * r] * inv, acc[mt][dn][2 * r + 1] * inv);
        }
      }
    }
  }
}

// ---- generic kernel (any type, any head sizes) --------------------------------

constexpr int kGenericWarps = 4;

template <typename T>
__global__ void __launch_bounds__(kGenericWarps * 32) bsa_generic_kernel(const KParams p) {
  extern __shared__ float gsm[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGenericWarps + warp;
  if (row >= static_cast<int64_t>(p.B) * p.Hq * p.Sq) return;  // warp-uniform; no CTA barriers below
  const int i = static_cast<int>(row % p.Sq);
  const int h = static_cast<int>((row / p.Sq) % p.Hq);
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.Sq) * p.Hq));
  const int hk = h / p.group, hl = p.Hl == 1 ? 0 : h;

  float* qs = gsm + static_cast<size_t>(warp) * (p.D + p.Dv + 32);
  float* acc = qs + p.D;
  float* ps = acc + p.Dv;
  const T* qrow = static_cast<const T*>(p.q) + row * p.D;
  for (int d = lane; d < p.D; d += 32) qs[d] = to_float<T>(qrow[d]);
  for (int d = lane; d < p.Dv; d += 32) acc[d] = 0.0f;
  __syncwarp();

  const T* Kg = static_cast<const T*>(p.k) + (static_cast<int64_t>(b) * p.Hkv + hk) * p.Sk * p.D;
  const T* Vg = static_cast<const T*>(p.v) + (static_cast<int64_t>(b) * p.Hkv + hk) * p.Sk * p.Dv;
  const int rb = (i + p.q_off) / p.bs;  // block row of the absolute position
  const int nkb = (p.Sk + p.bs - 1) / p.bs;
  const int cb_end = p.causal ? min(nkb, rb + 1) : nkb;
  float m_run = -INFINITY, l_run = 0.0f;
  for (int cb = 0; cb < cb_end; ++cb) {
    if (!layout_kept(p, hl, rb, cb)) continue;
    const int jb = cb * p.bs;
    int je = min(jb + p.bs, p.Sk);
    if (p.causal) je = min(je, i + p.q_off + 1);
    for (int js = jb; js < je; js += 32) {
      const int j = js + lane;
      float x = -INFINITY;
      if (j < je) {
        const T* krow = Kg + static_cast<int64_t>(j) * p.D;
        float dot = 0.0f;
        for (int d = 0; d < p.D; ++d) dot = fmaf(qs[d], to_float<T>(krow[d]), dot);
        x = dot * p.scale + element_bias<T>(p, b, h, i, j);
      }
      float cmax = x;
      for (int o = 16; o > 0; o >>= 1) cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, o));
      const float m_new = fmaxf(m_run, cmax);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = expf(m_run - m_use);
      const float pj = expf(x - m_use);
      float psum = pj;
      for (int o = 16; o > 0; o >>= 1) psum += __shfl_xor_sync(0xffffffffu, psum, o);
      l_run = l_run * alpha + psum;
      m_run = m_new;
      ps[lane] = pj;
      __syncwarp();
      const int n = min(32, je - js);
      for (int d = lane; d < p.Dv; d += 32) {
        float a = acc[d] * alpha;
        for (int jj = 0; jj < n; ++jj) {
          a = fmaf(ps[jj], to_float<T>(Vg[static_cast<int64_t>(js + jj) * p.Dv + d]), a);
        }
        acc[d] = a;
      }
      __syncwarp();
    }
  }
  const float inv = l_run > 0.0f ? 1.0f / l_run : 0.0f;
  T* yrow = static_cast<T*>(p.y) + row * p.Dv;
  for (int d = lane; d < p.Dv; d += 32) yrow[d] = from_float<T>(acc[d] * inv);
}

// ---- launch -------------------------------------------------------------------

std::string cuda_error(const char* what, cudaError_t e) {
  return std::string("BlockSparseAttention (CUDA): ") + what + ": " + cudaGetErrorName(e) + ": " +
         cudaGetErrorString(e);
}

// Raises a kernel's dynamic shared-memory limit when it needs more than 48 KB.
// Done once per kernel and device (a host-side attribute, no synchronisation).
template <typename Kernel>
std::string ensure_smem(Kernel kernel, size_t bytes, std::atomic<uint64_t>& done_devices) {
  if (bytes <= 48 * 1024) return std::string();
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return cuda_error("cudaGetDevice", e);
  const uint64_t bit = dev < 64 ? (uint64_t{1} << dev) : 0;
  if (bit != 0 && (done_devices.load(std::memory_order_acquire) & bit)) return std::string();
  int optin = 0;
  e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e != cudaSuccess) return cuda_error("cudaDeviceGetAttribute", e);
  if (bytes > static_cast<size_t>(optin)) {
    std::ostringstream os;
    os << "BlockSparseAttention (CUDA): needs " << bytes << " bytes of shared memory per block, "
       << "the device allows " << optin;
    return os.str();
  }
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(bytes));
  if (e != cudaSuccess) return cuda_error("cudaFuncSetAttribute", e);
  if (bit != 0) done_devices.fetch_or(bit, std::memory_order_acq_rel);
  return std::string();
}

template <typename T, int HD, int NW, int MT, int STAGES, int MINB>
std::string launch_mma(KParams kp, cudaStream_t stream) {
  using C = MmaConfig<HD, NW, MT, STAGES>;
  static std::atomic<uint64_t> done{0};
  const size_t smem = C::smem_bytes(sizeof(T));
  auto kernel = bsa_mma_kernel<T, HD, NW, MT, STAGES, MINB>;
  std::string err = ensure_smem(kernel, smem, done);
  if (!err.empty()) return err;
  kp.nqt = (kp.Sq + C::BM - 1) / C::BM;
  const int64_t blocks = static_cast<int64_t>(kp.B) * kp.Hq * kp.nqt;
  if (blocks > INT_MAX) return "BlockSparseAttention (CUDA): too many query tiles for one launch";
  kernel<<<static_cast<unsigned>(blocks), C::NT, smem, stream>>>(kp);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : cuda_error("kernel launch", e);
}

// Tile shapes (measured on an H100, docs/GPU_NOTES.md):
//  * head size <= 64, block >= 128: 4 warps x 32 rows (the K / V fragments read
//    from shared memory serve two m tiles; Q is re-read per tile), 3 stages;
//  * head size <= 64, block 64: 2 warps x 32 rows (64-row tiles), 2 stages;
//  * head size 128 and blocks 16 / 32: 4 warps x 16 rows, Q in registers.
// ONNXPRUNE_CUDA_TILE (read per launch, for measuring) overrides for blocks >=
// 64: "bm64" (4 warps x 16 rows) or "mt2" (32 rows per warp, head sizes <= 64).
// (8 warps x 16 rows with 128-row tiles measured no faster than either.)
enum class Tile { kBm64, kMt2, kMt2W2 };

Tile tile_for(int bs, int D) {
  const bool small_d = D <= 64;
  Tile tile = Tile::kBm64;
  if (small_d && bs >= 128) tile = Tile::kMt2;
  if (small_d && bs == 64) tile = Tile::kMt2W2;
  const char* env = std::getenv("ONNXPRUNE_CUDA_TILE");
  if (env != nullptr && bs >= 64) {
    if (std::strcmp(env, "bm64") == 0) tile = Tile::kBm64;
    if (std::strcmp(env, "mt2") == 0 && small_d) tile = bs >= 128 ? Tile::kMt2 : Tile::kMt2W2;
  }
  return tile;
}

template <typename T>
std::string launch_mma_tiles(const KParams& kp, cudaStream_t stream) {
  switch (tile_for(kp.bs, kp.D)) {
    case Tile::kMt2:  // 128 rows: 4 warps x 2 m tiles, 3 stages
      if (kp.D <= 32) return launch_mma<T, 32, 4, 2, 3, 2>(kp, stream);
      return launch_mma<T, 64, 4, 2, 3, 2>(kp, stream);
    case Tile::kMt2W2:  // 64 rows: 2 warps x 2 m tiles, 2 stages
      if (kp.D <= 32) return launch_mma<T, 32, 2, 2, 2, 4>(kp, stream);
      return launch_mma<T, 64, 2, 2, 2, 4>(kp, stream);
    default:  // 64 rows (inside one layout block for block sizes >= 64): 4 warps, 2 stages
      if (kp.D <= 32) return launch_mma<T, 32, 4, 1, 2, 4>(kp, stream);
      if (kp.D <= 64) return launch_mma<T, 64, 4, 1, 2, 4>(kp, stream);
      return launch_mma<T, 128, 4, 1, 2, 2>(kp, stream);
  }
}

template <typename T>
std::string launch_generic(const KParams& kp, cudaStream_t stream) {
  static std::atomic<uint64_t> done{0};
  const size_t smem = static_cast<size_t>(kGenericWarps) * (kp.D + kp.Dv + 32) * sizeof(float);
  std::string err = ensure_smem(bsa_generic_kernel<T>, smem, done);
  if (!err.empty()) return err;
  const int64_t rows = static_cast<int64_t>(kp.B) * kp.Hq * kp.Sq;
  const int64_t blocks = (rows + kGenericWarps - 1) / kGenericWarps;
  if (blocks > INT_MAX) return "BlockSparseAttention (CUDA): too many query rows for one launch";
  bsa_generic_kernel<T><<<static_cast<unsigned>(blocks), kGenericWarps * 32, smem, stream>>>(kp);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : cuda_error("kernel launch", e);
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

template <typename T>
std::string launch_typed(const KParams& kp, cudaStream_t stream) {
  const bool mma_ok = kp.D == kp.Dv && kp.D % 8 == 0 && kp.D <= 128 && aligned16(kp.q) &&
                      aligned16(kp.k) && aligned16(kp.v);
  if (!mma_ok) return launch_generic<T>(kp, stream);
  return launch_mma_tiles<T>(kp, stream);
}

}  // namespace

std::string bsa_compute_cuda(const BsaParams& p, void* stream_ptr) {
  const int64_t limits[] = {p.B, p.Hq, p.Hkv, p.Sq, p.Sk, p.D, p.Dv, p.Hl, p.Mq, p.Mk};
  for (int64_t x : limits) {
    if (x > INT_MAX / 2) {
      return "BlockSparseAttention (CUDA): a dimension exceeds the kernel's 32-bit index range";
    }
  }
  if (p.B == 0 || p.Hq == 0 || p.Sq == 0 || p.Dv == 0) return std::string();  // empty output
  KParams kp{};
  kp.q = p.q;
  kp.k = p.k;
  kp.v = p.v;
  kp.layout = p.layout;
  kp.attn_mask = p.attn_mask;
  kp.kpm = p.key_padding_mask;
  kp.y = p.y;
  kp.B = static_cast<int>(p.B);
  kp.Hq = static_cast<int>(p.Hq);
  kp.Hkv = static_cast<int>(p.Hkv);
  kp.Sq = static_cast<int>(p.Sq);
  kp.Sk = static_cast<int>(p.Sk);
  kp.D = static_cast<int>(p.D);
  kp.Dv = static_cast<int>(p.Dv);
  kp.Hl = static_cast<int>(p.Hl);
  kp.Mq = static_cast<int>(p.Mq);
  kp.Mk = static_cast<int>(p.Mk);
  kp.bs = static_cast<int>(p.block_size);
  kp.group = p.Hkv > 0 ? static_cast<int>(p.Hq / p.Hkv) : 1;
  kp.scale = p.scale;
  kp.scale_log2 = p.scale * kLog2e;
  kp.causal = p.is_causal ? 1 : 0;
  kp.q_off = static_cast<int>(p.q_offset);
  if (p.layout_rule != nullptr) {
    if (p.Hl > kMaxRuleHeads) {
      std::ostringstream os;
      os << "BlockSparseAttention (CUDA): a layout_rule for Hl=" << p.Hl << " layout heads; the kernel takes at most "
         << kMaxRuleHeads;
      return os.str();
    }
    kp.has_rule = 1;
    // Validated (>= -1); indices stay below INT_MAX / 2, so larger values mean the same clamped.
    for (int64_t h = 0; h < p.Hl; ++h)
      for (int c = 0; c < kRuleColumns; ++c)
        kp.rule[h][c] = static_cast<int>(std::min<int64_t>(p.layout_rule[h * kRuleColumns + c], INT_MAX));
  }
  kp.mask_kind = p.mask_kind == MaskKind::kNone ? 0 : (p.mask_kind == MaskKind::kBool ? 1 : 2);
  kp.pad_kind =
      p.padding_kind == PaddingKind::kNone ? 0 : (p.padding_kind == PaddingKind::kBool ? 1 : 2);
  for (int a = 0; a < 4; ++a) kp.ms[a] = p.mask_strides[a];
  if (p.Sk == 0 || p.Hkv == 0) kp.Sk = 0;  // every row is empty: the kernels write zeros

  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  switch (p.value_type) {
    case kElemFloat: return launch_generic<float>(kp, stream);
    case kElemFloat16: return launch_typed<__half>(kp, stream);
    case kElemBFloat16: return launch_typed<__nv_bfloat16>(kp, stream);
    default: return "BlockSparseAttention (CUDA): unsupported element type";
  }
}

}  // namespace onnxprune

namespace {

void copy_error(const std::string& msg, char* err, size_t err_len) {
  if (err == nullptr || err_len == 0) return;
  const size_t n = msg.size() < err_len - 1 ? msg.size() : err_len - 1;
  std::memcpy(err, msg.data(), n);
  err[n] = '\0';
}

}  // namespace

extern "C" ONNXPRUNE_CUDA_EXPORT int onnxprune_bsa_cuda_run(
    int32_t value_type, const void* q, const int64_t* q_shape, const void* k,
    const int64_t* k_shape, const void* v, const int64_t* v_shape, const void* layout,
    const int64_t* layout_shape, const void* attn_mask, int32_t attn_mask_type,
    const int64_t* attn_mask_shape, int32_t attn_mask_rank, const void* key_padding_mask,
    int32_t key_padding_mask_type, const int64_t* key_padding_mask_shape,
    const int64_t* layout_rule, const int64_t* layout_rule_shape, int32_t layout_rule_rank, void* y,
    int64_t block_size, int32_t has_scale, float scale, int64_t is_causal, int64_t queries_at_end,
    void* stream, char* err, size_t err_len) {
  try {
    using namespace onnxprune;
    if (q_shape == nullptr || k_shape == nullptr || v_shape == nullptr || layout_shape == nullptr ||
        (attn_mask != nullptr && (attn_mask_shape == nullptr || attn_mask_rank < 0)) ||
        (key_padding_mask != nullptr && key_padding_mask_shape == nullptr) ||
        (layout_rule != nullptr && (layout_rule_shape == nullptr || layout_rule_rank < 0))) {
      copy_error("BlockSparseAttention: a shape pointer is null", err, err_len);
      return ONNXPRUNE_BSA_INVALID_ARGUMENT;
    }
    BsaInputDesc desc;
    desc.allow_half = true;
    desc.q_shape.assign(q_shape, q_shape + 4);
    desc.k_shape.assign(k_shape, k_shape + 4);
    desc.v_shape.assign(v_shape, v_shape + 4);
    desc.layout_shape.assign(layout_shape, layout_shape + 3);
    desc.q_type = desc.k_type = desc.v_type = value_type;
    desc.layout_type = kElemUint8;
    if (attn_mask != nullptr) {
      desc.has_attn_mask = true;
      desc.attn_mask_shape.assign(attn_mask_shape, attn_mask_shape + attn_mask_rank);
      desc.attn_mask_type = attn_mask_type;
    }
    if (key_padding_mask != nullptr) {
      desc.has_key_padding_mask = true;
      desc.key_padding_mask_shape.assign(key_padding_mask_shape, key_padding_mask_shape + 2);
      desc.key_padding_mask_type = key_padding_mask_type;
    }
    if (layout_rule != nullptr) {
      desc.has_layout_rule = true;
      desc.layout_rule_shape.assign(layout_rule_shape, layout_rule_shape + layout_rule_rank);
      desc.layout_rule_type = kElemInt64;
      desc.layout_rule = layout_rule;
    }
    desc.block_size = block_size;
    desc.has_scale = has_scale != 0;
    desc.scale = scale;
    desc.is_causal = is_causal;
    desc.queries_at_end = queries_at_end;
    BsaParams p;
    std::string msg = bsa_validate(desc, &p);
    if (!msg.empty()) {
      copy_error(msg, err, err_len);
      return ONNXPRUNE_BSA_INVALID_ARGUMENT;
    }
    p.q = static_cast<const float*>(q);
    p.k = static_cast<const float*>(k);
    p.v = static_cast<const float*>(v);
    p.layout = static_cast<const uint8_t*>(layout);
    p.attn_mask = attn_mask;
    p.key_padding_mask = key_padding_mask;
    p.y = static_cast<float*>(y);
    msg = bsa_compute_cuda(p, stream);
    if (!msg.empty()) {
      copy_error(msg, err, err_len);
      return ONNXPRUNE_BSA_CUDA_ERROR;
    }
    return ONNXPRUNE_BSA_OK;
  } catch (const std::exception& e) {
    copy_error(std::string("BlockSparseAttention (CUDA): ") + e.what(), err, err_len);
    return ONNXPRUNE_BSA_CUDA_ERROR;
  } catch (...) {
    copy_error("BlockSparseAttention (CUDA): unknown error", err, err_len);
    return ONNXPRUNE_BSA_CUDA_ERROR;
  }
}
